"""S3 benchmark: `syncd reconcile` to a local moto server (its own process, HTTP on
127.0.0.1), against `rclone sync` (s3 backend, provider Other, path style, defaults) on
the same workloads and server, in the same run; plus the endpoint's own ceiling measured
with a plain boto3 loop.

    .venv/bin/python bench/bench_s3.py [--runs R] [--small-files N] [--large-size SIZE]

Workloads (seeded, untimed): small = N × 4 KiB in 100 dirs (default 10,000); large = one
random file (default 1 GiB). Per run and tool: first sync to a fresh prefix, a no-op right
after, then (small) 10 files modified. moto is CPU-bound and slow: every figure here is a
moto figure, not an AWS one. Prints a Markdown table; JSON in bench/out/s3-last.json.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_local as bl  # noqa: E402
import bench_sftp as bs  # noqa: E402

from tests.servers import free_port  # noqa: E402

ENV: dict[str, str | None] = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


def start_moto(wd: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=(wd / "moto.log").open("wb"))
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("bench: moto_server did not start")


def client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def syncd_config(wd: Path, name: str, run: int, endpoint: str, bucket: str) -> Path:
    q = json.dumps
    cfg = wd / "cfg" / f"{name}-{run}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"""[daemon]
state_dir = {q(str(wd / "state" / f"{name}-{run}"))}
log_format = "json"

[remotes.b]
type = "s3"
bucket = {q(bucket)}
prefix = {q(f"syncd-{name}-{run}")}
endpoint_url = {q(endpoint)}
region = "us-east-1"
addressing_style = "path"
transfers = 16

[[sync]]
name = {q(name)}
local = {q(str(wd / "src" / name))}
remote = "b"
path = ""
""")
    return cfg


def timed(argv: list[str], logs: Path, tag: str, env: dict[str, str | None]) -> bl.Proc:
    old = dict(os.environ)
    for k, v in env.items():   # None = unset
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        p = bl.run_timed(argv, logs / f"{tag}.out", logs / f"{tag}.err")
    finally:
        os.environ.clear()
        os.environ.update(old)
    if p.rc != 0:
        raise SystemExit(f"bench: {tag} exited {p.rc}; see {logs / (tag + '.err')}")
    return p


def ceiling(endpoint: str, bucket: str, src: Path) -> float:
    """Plain boto3 put_object of every file from 16 threads: the endpoint's ceiling."""
    c = client(endpoint)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: c.put_object(Bucket=bucket, Key=f"ceiling/{p.name}",
                                             Body=p.read_bytes()), files))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--large-size", type=bl.parse_size, default=1 << 30)
    ap.add_argument("--only", default="small,large")
    ap.add_argument("--idle-wait", type=float, default=20.0)
    args = ap.parse_args()
    bl.IDLE_WAIT = args.idle_wait
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wd = Path(tempfile.mkdtemp(prefix="syncd-bench-s3-", dir="/tmp"))
    logs = wd / "logs"
    logs.mkdir()
    moto, endpoint = start_moto(wd)
    bl.KEEP_PIDS.add(moto.pid)
    bl.become_subreaper()
    rclone = shutil.which("rclone")
    (wd / "rclone.conf").write_text("")
    # rclone's AWS SDK refuses a custom CA bundle on its HTTP transport ("unsupported
    # transport"): this is plain HTTP anyway, so it runs without one.
    renv: dict[str, str | None] = {
            **ENV, "AWS_CA_BUNDLE": None,
            "RCLONE_CONFIG": str(wd / "rclone.conf"), "RCLONE_CONFIG_M_TYPE": "s3",
            "RCLONE_CONFIG_M_PROVIDER": "Other", "RCLONE_CONFIG_M_ENDPOINT": endpoint,
            "RCLONE_CONFIG_M_ACCESS_KEY_ID": "testing",
            "RCLONE_CONFIG_M_SECRET_ACCESS_KEY": "testing",
            "RCLONE_CONFIG_M_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG_M_REGION": "us-east-1"}
    results: dict[str, dict[str, list[float]]] = {}
    try:
        c = client(endpoint)
        c.create_bucket(Bucket="bench")
        for name in args.only.split(","):
            bl.log(f"generating {name} (untimed)")
            bs.generate(wd / "src", name, args.small_files, args.large_size, 0)
            bl.sync_disks()
            src = wd / "src" / name
            files = bl.tree_totals(src)[0]
            res: dict[str, list[float]] = {}
            results[name] = res

            def add(key: str, p: bl.Proc, name: str = name, res: dict[str, list[float]] = res) -> None:
                res.setdefault(key, []).append(p.wall_s)
                bl.log(f"{name}: {key:<14} {p.wall_s:7.2f}s  cpu {p.user_s + p.sys_s:6.2f}s")

            for r in range(args.runs):
                cfg = syncd_config(wd, name, r, endpoint, "bench")
                sy = [str(bl.SYNCD), "reconcile", "--config", str(cfg), "--json"]
                add("syncd_first", timed(sy, logs, f"syncd-{name}-first-{r}", ENV))
                add("syncd_noop", timed(sy, logs, f"syncd-{name}-noop-{r}", ENV))
                rc = [rclone, "sync", str(src), f"m:bench/rclone-{name}-{r}"] if rclone else None
                if rc:
                    add("rclone_first", timed(rc, logs, f"rclone-{name}-first-{r}", renv))
                    add("rclone_noop", timed(rc, logs, f"rclone-{name}-noop-{r}", renv))
                if name == "small":
                    bs.modify_ten(src, r)
                    add("syncd_ten", timed(sy, logs, f"syncd-{name}-ten-{r}", ENV))
                    if rc:
                        add("rclone_ten", timed(rc, logs, f"rclone-{name}-ten-{r}", renv))
            if name == "small":
                res["boto3_ceiling"] = [ceiling(endpoint, "bench", src)]
                bl.log(f"small: boto3 put_object x16 threads {res['boto3_ceiling'][0]:.2f}s")
            del files
        lines = [f"## syncd vs rclone, S3 on a local moto server ({time.strftime('%Y-%m-%d %H:%M')})",
                 "", f"{args.runs} runs, median wall s; ratio = syncd / rclone.", "",
                 "| workload | syncd | rclone | ratio |", "|---|---|---|---|"]
        for name, res in results.items():
            for kind in ("first", "noop", "ten"):
                s = res.get(f"syncd_{kind}")
                if not s:
                    continue
                rv = res.get(f"rclone_{kind}")
                sm, rm = statistics.median(s), (statistics.median(rv) if rv else None)
                lines.append(f"| {name}: {kind} | {sm:.2f} | {bl.fmt_s(rm)} | "
                             f"{(f'{sm / rm:.2f}×' if rm else '—')} |")
            if "boto3_ceiling" in res:
                lines.append(f"| {name}: plain boto3 put_object ×16 (endpoint ceiling) | "
                             f"{res['boto3_ceiling'][0]:.2f} | — | — |")
        text = "\n".join(lines) + "\n"
        print(text)
        out = HERE / "out" / "s3-last.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"results": results, "markdown": text}, indent=2) + "\n")
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
