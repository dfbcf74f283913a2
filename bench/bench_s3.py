"""S3 benchmark: `syncd reconcile` to a local moto server (its own process, HTTP on
127.0.0.1), against `rclone sync` (s3 backend, provider Other, path style, defaults) and
`aws s3 sync` (defaults) on the same workloads and server, in the same run; plus the
endpoint's own ceiling measured with plain boto3 (put_object from 16 threads for a tree,
`upload_file` with the default TransferConfig for the large file).

    .venv/bin/python bench/bench_s3.py [--runs R] [--only small,large,mixed]
        [--small-files N] [--large-size SIZE] [--mixed-files N]

Workloads (seeded, untimed): small = N × 4 KiB in 100 dirs (default 10,000); large = one
random file (default 1 GiB); mixed = N files log-uniform 1 KiB–8 MiB in 20 dirs (default
1,000, ~0.9 GB). Per run and tool: first sync to a fresh prefix, a no-op right after,
then (small, mixed) 10 files modified; the prefix is emptied afterwards (untimed) so
moto's bucket does not grow run after run. moto is CPU-bound and slow: every figure here
is a moto figure, not an AWS one. Prints a Markdown table; JSON in bench/out/s3-last.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
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
    p = bl.run_timed_env(argv, logs / f"{tag}.out", logs / f"{tag}.err", env)
    if p.rc != 0:
        raise SystemExit(f"bench: {tag} exited {p.rc}; see {logs / (tag + '.err')}")
    return p


def ceiling(endpoint: str, bucket: str, src: Path) -> float:
    """Plain boto3, no hashing, no index: put_object of every file from 16 threads, or
    upload_file (default TransferConfig: 8 MiB parts, 10 threads) for one big file."""
    c = client(endpoint)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    bl.sync_disks()
    bl.wait_idle()
    t0 = time.perf_counter()
    if len(files) == 1:
        c.upload_file(str(files[0]), bucket, f"ceiling/{files[0].name}")
    else:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: c.put_object(Bucket=bucket, Key=f"ceiling/{p.name}",
                                                 Body=p.read_bytes()), files))
    took = time.perf_counter() - t0
    empty(c, bucket, "ceiling/")
    return took


def empty(c: Any, bucket: str, prefix: str) -> None:
    """Delete everything under prefix (untimed): moto keeps every object in memory."""
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            c.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def count(c: Any, bucket: str, prefix: str) -> tuple[int, int]:
    n = size = 0
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", ()):
            n += 1
            size += o["Size"]
    return n, size


TOOLS = ("syncd", "rclone", "aws")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--large-size", type=bl.parse_size, default=1 << 30)
    ap.add_argument("--mixed-files", type=int, default=1_000)
    ap.add_argument("--only", default="small,large,mixed")
    ap.add_argument("--idle-wait", type=float, default=20.0)
    args = ap.parse_args()
    bl.IDLE_WAIT = args.idle_wait
    wd = bl.bench_workdir("s3")
    logs = wd / "logs"
    logs.mkdir()
    moto, endpoint = start_moto(wd)
    bl.KEEP_PIDS.add(moto.pid)
    (wd / "rclone.conf").write_text("")
    (wd / "aws.conf").write_text("[default]\ns3 =\n  addressing_style = path\n")
    # rclone's AWS SDK refuses a custom CA bundle on its HTTP transport ("unsupported
    # transport"): this is plain HTTP anyway, so it runs without one.
    envs: dict[str, dict[str, str | None]] = {
        "syncd": dict(ENV),
        "rclone": {
            **ENV, "AWS_CA_BUNDLE": None,
            "RCLONE_CONFIG": str(wd / "rclone.conf"), "RCLONE_CONFIG_M_TYPE": "s3",
            "RCLONE_CONFIG_M_PROVIDER": "Other", "RCLONE_CONFIG_M_ENDPOINT": endpoint,
            "RCLONE_CONFIG_M_ACCESS_KEY_ID": "testing",
            "RCLONE_CONFIG_M_SECRET_ACCESS_KEY": "testing",
            "RCLONE_CONFIG_M_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG_M_REGION": "us-east-1"},
        "aws": {**ENV, "AWS_CONFIG_FILE": str(wd / "aws.conf"),
                "AWS_SHARED_CREDENTIALS_FILE": str(wd / "none"), "AWS_PROFILE": None},
    }
    rclone = shutil.which("rclone")
    aws = _real_aws()
    results: dict[str, dict[str, list[float]]] = {}
    try:
        c = client(endpoint)
        c.create_bucket(Bucket="bench")
        for name in args.only.split(","):
            bl.log(f"generating {name} (untimed)")
            bs.generate(wd / "src", name, args.small_files, args.large_size, args.mixed_files)
            bl.sync_disks()
            src = wd / "src" / name
            want = bl.tree_totals(src)
            res: dict[str, list[float]] = {}
            results[name] = res

            def add(key: str, p: bl.Proc, name: str = name, res: dict[str, list[float]] = res) -> None:
                res.setdefault(key, []).append(p.wall_s)
                bl.log(f"{name}: {key:<14} {p.wall_s:7.2f}s  cpu {p.user_s + p.sys_s:6.2f}s")

            for r in range(args.runs):
                for tool in TOOLS:
                    prefix = f"{tool}-{name}-{r}"
                    if tool == "syncd":
                        cfg = syncd_config(wd, name, r, endpoint, "bench")
                        argv = [str(bl.SYNCD), "reconcile", "--config", str(cfg), "--json"]
                    elif tool == "rclone" and rclone:
                        argv = [rclone, "sync", str(src), f"m:bench/{prefix}"]
                    elif tool == "aws" and aws:
                        argv = [aws, "s3", "sync", str(src), f"s3://bench/{prefix}",
                                "--endpoint-url", endpoint, "--only-show-errors", "--no-progress"]
                    else:
                        continue
                    env = envs[tool]
                    bl.warm_cache(src)
                    add(f"{tool}_first", timed(argv, logs, f"{prefix}-first", env))
                    got = count(c, "bench", prefix + "/")
                    if got != want:
                        raise SystemExit(f"bench: {tool} left {got} (files, bytes) under "
                                         f"{prefix}/, expected {want}")
                    add(f"{tool}_noop", timed(argv, logs, f"{prefix}-noop", env))
                    if name != "large":
                        bs.modify_ten(src, r * len(TOOLS) + TOOLS.index(tool))
                        add(f"{tool}_ten", timed(argv, logs, f"{prefix}-ten", env))
                    empty(c, "bench", prefix + "/")
            # The endpoint's ceiling for this workload, in the same run.
            res["boto3_ceiling"] = [ceiling(endpoint, "bench", src) for _ in range(args.runs)]
            bl.log(f"{name}: plain boto3 {res['boto3_ceiling']}")
            shutil.rmtree(src, ignore_errors=True)
        text = render(results, args.runs)
        print(text)
        out = HERE / "out" / "s3-last.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"results": results, "markdown": text}, indent=2) + "\n")
    finally:
        moto.terminate()
        try:
            moto.wait(30)
        except subprocess.TimeoutExpired:
            moto.kill()
            moto.wait(10)
        shutil.rmtree(wd, ignore_errors=True)


def _real_aws() -> str | None:
    """The aws CLI's own script, not a pyenv shim (a shim adds ~0.1 s of shell per call)."""
    aws = shutil.which("aws")
    if aws and "/shims/" in aws:
        with contextlib.suppress(Exception):
            real = subprocess.run(["pyenv", "which", "aws"], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
            if real:
                return real
    return aws


def render(results: dict[str, dict[str, list[float]]], runs: int) -> str:
    med = statistics.median
    lines = [f"## syncd vs rclone and aws s3 sync, S3 on a local moto server "
             f"({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"{runs} runs, median wall s; ratio = tool / rclone (lower is better).", "",
             "| workload | syncd | rclone | aws s3 sync | syncd / rclone | aws / rclone | plain boto3 |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for kind in ("first", "noop", "ten"):
            s = res.get(f"syncd_{kind}")
            if not s:
                continue
            sm = med(s)
            rv, av = res.get(f"rclone_{kind}"), res.get(f"aws_{kind}")
            rm, am = (med(rv) if rv else None), (med(av) if av else None)
            ceil = res.get("boto3_ceiling") if kind == "first" else None
            lines.append(f"| {name}: {kind} | {sm:.2f} | {bl.fmt_s(rm)} | {bl.fmt_s(am)} | "
                         f"{(f'{sm / rm:.2f}×' if rm else '—')} | "
                         f"{(f'{am / rm:.2f}×' if rm and am else '—')} | "
                         f"{(f'{med(ceil):.2f}' if ceil else '—')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
