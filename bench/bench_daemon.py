"""Daemon benchmark: change-to-remote latency of `syncd run`, its idle cost, a burst.

    .venv/bin/python bench/bench_daemon.py [--changes 200] [--tree 100000]
        [--remotes local,sftp,s3,ftp]

For each remote (a local directory; a throwaway OpenSSH sshd, moto S3 server and
pyftpdlib FTPS server on 127.0.0.1): start the
daemon on a tree of --tree-small files (default 10,000), then write one file at a time
(a new 4 KiB file, or a rewrite of an earlier one) and poll the remote every 2 ms until
the file is there with the new content; report p50 / p95 / max over --changes changes,
with the default debounce (250 ms). Then a burst of --burst files written at once: time
until all are on the remote. Finally idle CPU (% of one core over --idle seconds) and
RSS of the daemon watching a --tree-file tree (default 100,000 files). Prints a Markdown
table; JSON in bench/out/daemon-last.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

sys.path.insert(0, str(HERE))

from tests.servers import FTPServer, SSHServer  # noqa: E402

SYNCD = Path(sys.executable).parent / "syncd"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_tree(root: Path, n: int) -> None:
    for i in range(n):
        p = root / f"d{i % max(1, n // 100):04d}" / f"f{i:06d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 100)


def config(wd: Path, name: str, src: Path, remote: str) -> Path:
    cfg = wd / f"{name}.toml"
    cfg.write_text(f"""[daemon]
state_dir = "{wd / ('state-' + name)}"
log_format = "json"
log_level = "warning"

[remotes.r]
{remote}

[[sync]]
name = "p"
local = "{src}"
remote = "r"
path = "p"
delete = "propagate"
""")
    return cfg


class Run:
    def __init__(self, cfg: Path, logf: Path, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([str(SYNCD), "run", "--config", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=logf.open("ab"),
                                     env={**os.environ, "NOTIFY_SOCKET": "", **(env or {})})

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0


def wait_until(cond: Any, timeout: float = 60.0, step: float = 0.002) -> float:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise SystemExit("bench: timed out waiting for the daemon")
        time.sleep(step)
    return time.perf_counter() - t0


def same(p: Path, data: bytes) -> bool:
    try:
        return p.read_bytes() == data
    except OSError:
        return False


class FilePeek:
    """The remote's storage seen on this machine's filesystem (local, SFTP, FTP servers)."""

    def __init__(self, mirror: Path):
        self.mirror = mirror

    def read(self, rel: str) -> bytes | None:
        try:
            return (self.mirror / rel).read_bytes()
        except OSError:
            return None

    def complete(self, rel_dir: str, n: int) -> bool:
        try:
            names = os.listdir(self.mirror / rel_dir)
        except OSError:
            return False
        return len(names) >= n and not any(x.startswith(".syncd-tmp-") for x in names)


class S3Peek:
    def __init__(self, endpoint: str, bucket: str, prefix: str):
        import boto3

        self.c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        self.bucket, self.prefix = bucket, prefix

    def read(self, rel: str) -> bytes | None:
        try:
            return bytes(self.c.get_object(Bucket=self.bucket,
                                           Key=f"{self.prefix}/{rel}")["Body"].read())
        except Exception:
            return None

    def complete(self, rel_dir: str, n: int) -> bool:
        # A listing of thousands of objects costs moto seconds of CPU (taken from the
        # uploads being timed): wait for the last file first, list only then, once a second.
        if self.read(f"{rel_dir}/b{n - 1:05d}") is None:
            time.sleep(0.2)
            return False
        time.sleep(1.0)
        got = 0
        for page in self.c.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/{rel_dir}/"):
            got += len(page.get("Contents", ()))
        return got >= n


def bench_remote(wd: Path, kind: str, remote: str, peek: Any, args: argparse.Namespace,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    src = wd / f"src-{kind}"
    make_tree(src, args.tree_small)
    cfg = config(wd, kind, src, remote)
    d = Run(cfg, wd / f"{kind}.log", env)
    # A network poll costs the server: poll object stores less often.
    step = 0.01 if kind == "s3" else 0.002
    def initial_done() -> bool:
        r = subprocess.run([str(SYNCD), "status", "--config", str(cfg), "--json"],
                           capture_output=True, text=True, timeout=60)
        return r.returncode == 0 and json.loads(r.stdout)["pairs"][0]["last_reconcile"] is not None

    try:
        # Measure from a quiet state: after the initial full reconcile has finished.
        wait_until(initial_done, timeout=900, step=0.5)
        assert peek.read("d0000/f000000") is not None, "initial sync did not reach the remote"
        time.sleep(1.0)
        lat = []
        for i in range(args.changes):
            rel = f"lat/f{i % 50:03d}"
            data = f"change {i} ".encode() * 400
            p = src / rel
            p.parent.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            p.write_bytes(data)
            wait_until(lambda r=rel, x=data: peek.read(r) == x, step=step)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.05)
        log(f"{kind}: latency p50 {statistics.median(lat):.3f}s")
        burst_dir = src / "burst"
        burst_dir.mkdir()
        t0 = time.perf_counter()
        for i in range(args.burst):
            (burst_dir / f"b{i:05d}").write_bytes(b"b" * 4096)
        wait_until(lambda: peek.complete("burst", args.burst), timeout=900, step=0.05)
        burst_s = time.perf_counter() - t0
        log(f"{kind}: burst of {args.burst} in {burst_s:.2f}s")
    finally:
        d.stop()
    lat.sort()
    return {"remote": kind, "changes": len(lat), "p50_s": statistics.median(lat),
            "p95_s": lat[int(0.95 * (len(lat) - 1))], "max_s": lat[-1],
            "burst_files": args.burst, "burst_s": burst_s}


def bench_lsyncd(wd: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """lsyncd with its default configuration (default.rsync, 15 s delay) between two local
    directories: the same write-then-poll measurement, fewer changes (each waits ~15 s)."""
    lsyncd = shutil.which("lsyncd")
    if not lsyncd or not shutil.which("rsync") or args.lsyncd_changes <= 0:
        return None
    src, dst = wd / "src-lsyncd", wd / "dst-lsyncd"
    make_tree(src, args.tree_small)
    dst.mkdir()
    conf = wd / "lsyncd.lua"
    conf.write_text(f'settings {{ nodaemon = true, logfile = "{wd}/lsyncd.log" }}\n'
                    f'sync {{ default.rsync, source = "{src}", target = "{dst}" }}\n')
    proc = subprocess.Popen([lsyncd, str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (dst / "d0000" / "f000000").exists(), timeout=300, step=0.1)
        time.sleep(1.0)
        lat = []
        for i in range(args.lsyncd_changes):
            rel = f"lat/f{i:03d}"
            data = f"change {i} ".encode() * 400
            (src / "lat").mkdir(exist_ok=True)
            t0 = time.perf_counter()
            (src / rel).write_bytes(data)
            wait_until(lambda r=rel, x=data: same(dst / r, x), timeout=120, step=0.01)
            lat.append(time.perf_counter() - t0)
        log(f"lsyncd: latency p50 {statistics.median(lat):.3f}s")
    finally:
        proc.terminate()
        proc.wait(30)
    lat.sort()
    return {"remote": "lsyncd 2 default (local dir, rsync)", "changes": len(lat),
            "p50_s": statistics.median(lat), "p95_s": lat[int(0.95 * (len(lat) - 1))],
            "max_s": lat[-1]}


def bench_idle(wd: Path, args: argparse.Namespace) -> dict[str, Any]:
    src = wd / "src-idle"
    log(f"idle: generating {args.tree_idle:,} files (untimed)")
    make_tree(src, args.tree_idle)
    dst = wd / "dst-idle"
    dst.mkdir()
    cfg = config(wd, "idle", src, f'type = "local"\npath = "{dst}"\nfsync = false')
    d = Run(cfg, wd / "idle.log")
    try:
        wait_until(lambda: (dst / "p" / "d0000" / "f000000").exists(), timeout=900, step=0.2)
        # wait for the initial reconcile to finish: CPU stops climbing
        prev = -1.0
        while True:
            time.sleep(2)
            c = d.cpu_s()
            if c - prev < 0.02:
                break
            prev = c
        c0, t0 = d.cpu_s(), time.perf_counter()
        time.sleep(args.idle)
        cpu = (d.cpu_s() - c0) / (time.perf_counter() - t0) * 100
        rss = d.rss_mib()
    finally:
        d.stop()
    return {"files": args.tree_idle, "idle_cpu_pct": cpu, "rss_mib": rss, "seconds": args.idle}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--tree-small", type=int, default=10_000)
    ap.add_argument("--tree-idle", type=int, default=100_000)
    ap.add_argument("--burst", type=int, default=10_000)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    ap.add_argument("--remotes", default="local,sftp,s3,ftp")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--lsyncd-changes", type=int, default=10,
                    help="changes timed through lsyncd, where installed (0: skip)")
    args = ap.parse_args()
    wd = Path(tempfile.mkdtemp(prefix="syncd-bench-daemon-", dir="/tmp"))
    servers: list[Any] = []
    results: dict[str, Any] = {"latency": []}
    try:
        for kind in args.remotes.split(","):
            root = wd / f"remote-{kind}"
            root.mkdir()
            env = None
            peek: Any = FilePeek(root / "p")
            if kind == "local":
                remote = f'type = "local"\npath = "{root}"'
            elif kind == "sftp":
                srv = SSHServer(wd / "sshd").start()
                servers.append(srv)
                remote = srv.remote_toml(root)
            elif kind == "ftp":   # FTPS, the default
                fsrv = FTPServer(wd / "ftpd").start()
                servers.append(fsrv)
                remote = fsrv.remote_toml("r").split("\n", 1)[1]
                peek = FilePeek(fsrv.root / "p")
                env = {FTPServer.PASSWORD_ENV: FTPServer.PASSWORD}
            elif kind == "s3":
                import bench_s3

                moto, endpoint = bench_s3.start_moto(wd)
                servers.append(moto)
                S3Peek(endpoint, "daemon", "p").c.create_bucket(Bucket="daemon")
                remote = (f'type = "s3"\nbucket = "daemon"\nendpoint_url = "{endpoint}"\n'
                          'region = "us-east-1"\naddressing_style = "path"')
                peek = S3Peek(endpoint, "daemon", "p")
                env = {k: v for k, v in bench_s3.ENV.items() if v is not None}
            else:
                raise SystemExit(f"bench: unknown remote kind {kind}")
            results["latency"].append(bench_remote(wd, kind, remote, peek, args, env))
        results["lsyncd"] = bench_lsyncd(wd, args)
        results["idle"] = bench_idle(wd, args)
        lines = [f"## syncd run: change-to-remote latency ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})",
                 "", f"{args.changes} single-file changes (16 KiB), default debounce 250 ms; "
                 f"burst = {args.burst:,} × 4 KiB written at once; tree of {args.tree_small:,} "
                 "files being watched.", "",
                 "| remote | p50 | p95 | max | burst |", "|---|---|---|---|---|"]
        for r in results["latency"]:
            lines.append(f"| {r['remote']} | {r['p50_s']:.3f} s | {r['p95_s']:.3f} s | "
                         f"{r['max_s']:.3f} s | {r['burst_s']:.2f} s |")
        ls = results["lsyncd"]
        if ls:
            lines.append(f"| {ls['remote']}, {ls['changes']} changes | {ls['p50_s']:.3f} s | "
                         f"{ls['p95_s']:.3f} s | {ls['max_s']:.3f} s | — |")
        i = results["idle"]
        lines += ["", f"Idle, watching {i['files']:,} files: {i['idle_cpu_pct']:.2f}% of one core "
                  f"over {i['seconds']:.0f} s, RSS {i['rss_mib']:.0f} MiB.", ""]
        text = "\n".join(lines)
        print(text)
        out = HERE / "out" / "daemon-last.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({**results, "markdown": text}, indent=2) + "\n")
    finally:
        for srv in servers:
            if isinstance(srv, subprocess.Popen):
                srv.terminate()
                srv.wait(10)
            else:
                srv.stop()
        if args.keep:
            log(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
