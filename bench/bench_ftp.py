"""FTP benchmark: `syncd reconcile` to a throwaway pyftpdlib server on 127.0.0.1 (its own
process, `tests/ftpserver.py`), against `rclone sync` (ftp backend, defaults) on the same
workloads and server, in the same run; FTPS (explicit TLS, the default of both) and plain
FTP.

    .venv/bin/python bench/bench_ftp.py [--runs R] [--only small,large] [--tls explicit,none]
        [--small-files N] [--large-size SIZE]

Workloads (seeded, untimed): small = N × 4 KiB in 100 dirs (default 10,000); large = one
random file (default 1 GiB). Per run and tool: first sync to a fresh directory, a no-op
right after, then (small) 10 files modified. rclone cannot be given our test CA, so it
runs with no_check_certificate (it skips a verification syncd does). pyftpdlib is a
single Python process: its CPU bounds both tools. Prints a Markdown table; JSON in
bench/out/ftp-last.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_local as bl  # noqa: E402
import bench_sftp as bs  # noqa: E402

from tests.servers import FTPServer  # noqa: E402


def syncd_config(wd: Path, srv: FTPServer, name: str, tag: str) -> Path:
    q = json.dumps
    cfg = wd / "cfg" / f"{tag}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"""[daemon]
state_dir = {q(str(wd / "state" / tag))}
log_format = "json"

{srv.remote_toml("f")}
[[sync]]
name = {q(name)}
local = {q(str(wd / "src" / name))}
remote = "f"
path = {q(tag)}
""")
    return cfg


class PeerFailed(Exception):
    pass


def timed(argv: list[str], logs: Path, tag: str, env: dict[str, str | None],
          peer: bool = False) -> bl.Proc:
    p = bl.run_timed_env(argv, logs / f"{tag}.out", logs / f"{tag}.err", env)
    if p.rc != 0:
        tail = (logs / f"{tag}.err").read_text(errors="replace")[-1500:]
        if peer:   # a peer's failure is a result, not the end of the benchmark
            last = [x for x in tail.splitlines() if x.strip()][-1:] or ["?"]
            raise PeerFailed(last[0])
        raise SystemExit(f"bench: {tag} exited {p.rc}:\n{tail}")
    return p


def obscure(rclone: str | None) -> str:
    """The test password as rclone's config wants it ("" without rclone)."""
    if not rclone:
        return ""
    return subprocess.run([rclone, "obscure", FTPServer.PASSWORD], capture_output=True,
                          text=True, check=True).stdout.strip()


def rclone_env(wd: Path, srv: FTPServer, obscured: str) -> dict[str, str]:
    """rclone's remote `f:` for this server, from the environment (an empty config file
    under `wd`): its ftp backend with defaults, explicit TLS when the server speaks it."""
    (wd / "rclone.conf").touch()
    return {"RCLONE_CONFIG": str(wd / "rclone.conf"), "RCLONE_CONFIG_F_TYPE": "ftp",
            "RCLONE_CONFIG_F_HOST": "127.0.0.1", "RCLONE_CONFIG_F_PORT": str(srv.port),
            "RCLONE_CONFIG_F_USER": FTPServer.USER, "RCLONE_CONFIG_F_PASS": obscured,
            "RCLONE_CONFIG_F_EXPLICIT_TLS": "true" if srv.tls == "explicit" else "false",
            "RCLONE_CONFIG_F_NO_CHECK_CERTIFICATE": "true"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--large-size", type=bl.parse_size, default=1 << 30)
    ap.add_argument("--only", default="small,large")
    ap.add_argument("--tls", default="explicit,none")
    ap.add_argument("--idle-wait", type=float, default=20.0)
    args = ap.parse_args()
    bl.IDLE_WAIT = args.idle_wait
    wd = bl.bench_workdir("ftp")
    logs = wd / "logs"
    logs.mkdir()
    rclone = shutil.which("rclone")
    obscured = obscure(rclone)
    results: dict[str, dict[str, list[float]]] = {}
    fails: dict[str, str] = {}
    servers: list[FTPServer] = []
    try:
        for name in args.only.split(","):
            bl.log(f"generating {name} (untimed)")
            bs.generate(wd / "src", name, args.small_files, args.large_size, 0)
            bl.sync_disks()
            src = wd / "src" / name
            want = bl.tree_totals(src)
            for tls in args.tls.split(","):
                srv = FTPServer(wd / f"srv-{name}-{tls}", tls=tls, transfer_log=False).start()
                servers.append(srv)
                assert srv.proc is not None
                bl.KEEP_PIDS.add(srv.proc.pid)
                senv: dict[str, str | None] = {FTPServer.PASSWORD_ENV: FTPServer.PASSWORD}
                renv: dict[str, str | None] = {**rclone_env(wd, srv, obscured)}
                key = f"{name} {'FTPS' if tls == 'explicit' else 'FTP'}"
                res: dict[str, list[float]] = {}
                results[key] = res

                def add(k: str, p: bl.Proc, key: str = key, res: dict[str, list[float]] = res) -> None:
                    res.setdefault(k, []).append(p.wall_s)
                    bl.log(f"{key}: {k:<14} {p.wall_s:7.2f}s  cpu {p.user_s + p.sys_s:6.2f}s")

                for r in range(args.runs):
                    for tool in ("syncd", "rclone"):
                        tag = f"{tool}-{name}-{tls}-{r}"
                        # Created beforehand for both tools: pyftpdlib answers a listing of
                        # a missing directory with 501, which rclone takes as fatal.
                        (srv.root / tag).mkdir()
                        if tool == "syncd":
                            cfg = syncd_config(wd, srv, name, tag)
                            argv = [str(bl.SYNCD), "reconcile", "--config", str(cfg), "--json"]
                            env = senv
                        elif rclone:
                            argv = [rclone, "sync", str(src), f"f:{tag}"]
                            env = renv
                        else:
                            continue
                        peer = tool != "syncd"
                        try:
                            bl.warm_cache(src)
                            add(f"{tool}_first", timed(argv, logs, f"{tag}-first", env, peer))
                            got = bl.tree_totals(srv.root / tag)
                            if got != want:
                                raise SystemExit(f"bench: {tool} left {got} (files, bytes) in "
                                                 f"{srv.root / tag}, expected {want}")
                            add(f"{tool}_noop", timed(argv, logs, f"{tag}-noop", env, peer))
                            if name == "small":
                                bs.modify_ten(src, r * 2 + (tool == "rclone"))
                                add(f"{tool}_ten", timed(argv, logs, f"{tag}-ten", env, peer))
                        except PeerFailed as e:
                            fails[key] = f"{tool} failed: {e}"
                            bl.log(f"{key}: {fails[key]}")
                        shutil.rmtree(srv.root / tag, ignore_errors=True)
                srv.stop()
            shutil.rmtree(src, ignore_errors=True)
        text = render(results, args.runs, fails)
        print(text)
        out = HERE / "out" / "ftp-last.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"results": results, "failures": fails, "markdown": text},
                                  indent=2) + "\n")
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(wd, ignore_errors=True)


def render(results: dict[str, dict[str, list[float]]], runs: int, fails: dict[str, str]) -> str:
    med = statistics.median
    lines = [f"## syncd vs rclone, FTP(S) on a local pyftpdlib server "
             f"({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"{runs} runs, median wall s; ratio = syncd / rclone (lower is better).", "",
             "| workload | syncd | rclone | syncd / rclone |", "|---|---|---|---|"]
    for key, res in results.items():
        for kind in ("first", "noop", "ten"):
            s = res.get(f"syncd_{kind}")
            if not s:
                continue
            rv = res.get(f"rclone_{kind}")
            sm, rm = med(s), (med(rv) if rv else None)
            lines.append(f"| {key}: {kind} | {sm:.2f} | "
                         f"{bl.fmt_s(rm) if rm or key not in fails else 'failed'} | "
                         f"{(f'{sm / rm:.2f}×' if rm else '—')} |")
    for key, why in fails.items():
        lines.append(f"\n{key}: {why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
