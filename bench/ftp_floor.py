"""The floor of an FTP no-op and of a 1 GiB FTP upload from Python, against rclone, on the
same throwaway pyftpdlib server (plain FTP): what no Python client can beat here.

    .venv/bin/python bench/ftp_floor.py [--runs R] [--small-files N] [--large-size SIZE]

Times whole processes: a bare `ftplib` script that only logs in (4 connections) and MLSDs
every directory of the small tree; `rclone sync` no-op of the same tree; a bare `ftplib`
STOR of the large file; `rclone sync` of it. Medians of R runs. No syncd involved: this
is the yardstick for bench_ftp.py's no-op and 1 GiB rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_ftp as bf  # noqa: E402
import bench_local as bl  # noqa: E402
import bench_sftp as bs  # noqa: E402

from tests.servers import FTPServer  # noqa: E402

LISTER = """
import ftplib, socket, sys, threading
port, dirs = int(sys.argv[1]), sys.argv[2].split(",")
todo, lock = list(dirs), threading.Lock()
def work():
    f = ftplib.FTP(); f.connect("127.0.0.1", port)
    f.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f.login(sys.argv[3], sys.argv[4])
    while True:
        with lock:
            if not todo: break
            d = todo.pop()
        for _ in f.mlsd(d): pass
    f.quit()
ts = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
"""

UPLOADER = """
import ftplib, sys
f = ftplib.FTP(); f.connect("127.0.0.1", int(sys.argv[1])); f.login(sys.argv[3], sys.argv[4])
with open(sys.argv[2], "rb") as src:
    f.storbinary("STOR /floor.bin", src, blocksize=1 << 20)
f.quit()
"""


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--large-size", type=bl.parse_size, default=1 << 30)
    args = ap.parse_args()
    rclone = shutil.which("rclone")
    wd = Path(tempfile.mkdtemp(prefix="syncd-ftp-floor-", dir="/tmp"))
    srv = FTPServer(wd / "srv", tls="none", transfer_log=False).start()
    try:
        bs.generate(wd / "src", "small", args.small_files, 0, 0)
        bs.generate(wd / "src", "large", 0, args.large_size, 0)
        shutil.copytree(wd / "src" / "small", srv.root / "small")   # the remote is in sync
        dirs = ["/small", *sorted(f"/small/{p.name}" for p in (wd / "src" / "small").iterdir())]
        big = next((wd / "src" / "large").iterdir())
        py, user, pw = sys.executable, FTPServer.USER, FTPServer.PASSWORD
        renv = {**os.environ, **bf.rclone_env(wd, srv, bf.obscure(rclone))}
        res: dict[str, list[float]] = {}
        for r in range(args.runs):
            bl.warm_cache(wd / "src")
            res.setdefault("bare lister (no-op floor)", []).append(
                timed([py, "-c", LISTER, str(srv.port), ",".join(dirs), user, pw]))
            if rclone:
                res.setdefault("rclone no-op", []).append(
                    timed([rclone, "sync", str(wd / "src" / "small"), "f:small"], renv))
            res.setdefault("bare STOR of the large file", []).append(
                timed([py, "-c", UPLOADER, str(srv.port), str(big), user, pw]))
            (srv.root / "floor.bin").unlink()
            if rclone:
                (srv.root / f"rl{r}").mkdir()
                res.setdefault("rclone sync of the large file", []).append(
                    timed([rclone, "sync", str(wd / "src" / "large"), f"f:rl{r}"], renv))
                shutil.rmtree(srv.root / f"rl{r}")
            bl.sync_disks()
        print(f"## FTP floors, pyftpdlib on 127.0.0.1, median of {args.runs} (whole processes)\n")
        print("| what | median s | runs |\n|---|---|---|")
        for k, v in res.items():
            print(f"| {k} | {statistics.median(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    finally:
        srv.stop()
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
