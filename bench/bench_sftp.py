"""SFTP benchmark: `syncd reconcile` to a throwaway OpenSSH sshd on 127.0.0.1, against
`rclone sync` (defaults), OpenSSH `sftp -b` (large file) and `rsync -a` over ssh (small
files) on the same workloads and the same server, in the same run.

    .venv/bin/python bench/bench_sftp.py [--runs R] [--only small,large,mixed] [--keep]

Workloads (seeded, untimed to generate): small = 10,000 × 4 KiB in 100 dirs; large = one
1 GiB random file; mixed = 2,000 files, log-uniform 1 KiB–8 MiB, in 20 dirs. For each run
and tool: first sync to a fresh remote directory, a no-op right after, then (small, mixed)
10 files modified and synced again, then (small) every file touched (new mtime, same
content) and synced again. Whole processes are timed (start-up, SSH handshake
included), `sync` before every timed run, medians of R runs; ratio = tool / rclone.
Prints a Markdown table; JSON in bench/out/sftp-last.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_local as bl  # noqa: E402  (shared timing helpers)

from tests.servers import SSHServer  # noqa: E402

SEED = 4242
MTIME = 1_700_000_000
WORKLOADS = ("small", "large", "mixed")


def generate(src: Path, name: str, small_files: int, large_size: int, mixed_files: int) -> None:
    rng = random.Random(f"{SEED}-{name}")
    root = src / name
    root.mkdir(parents=True)

    def put(rel: str, size: int) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            left = size
            while left:
                n = min(left, 16 << 20)
                f.write(rng.randbytes(n))
                left -= n
        os.utime(p, (MTIME, MTIME))

    if name == "small":
        for i in range(small_files):
            put(f"d{i % 100:03d}/f{i:05d}.dat", 4096)
    elif name == "large":
        put("large.bin", large_size)
    else:
        lo, hi = math.log(1024), math.log(8 << 20)
        for i in range(mixed_files):
            put(f"m{i % 20:02d}/f{i:05d}.bin", int(math.exp(rng.uniform(lo, hi))))


def touch_all(root: Path, round_: int) -> None:
    """Every file gets a new mtime, same content (`touch`, or a tool that rewrites the
    same bytes): syncd sends the mtimes alone, rsync -a its delta check, rclone (no
    hash over an SFTP-only account) the files."""
    t = MTIME + 1000 + round_
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (t, t))


def modify_ten(root: Path, round_: int) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    step = max(1, len(files) // 10)
    for p in files[::step][:10]:
        with open(p, "r+b") as f:
            f.write(f"round {round_} ".encode())
        os.utime(p, (MTIME + round_ + 1, MTIME + round_ + 1))


class Tools:
    def __init__(self, wd: Path, srv: SSHServer, shell_srv: SSHServer):
        self.wd, self.srv, self.shell_srv = wd, srv, shell_srv
        (wd / "rclone.conf").write_text("")   # hermetic: no user config, nothing saved back
        self.logs = wd / "logs"
        self.logs.mkdir(exist_ok=True)
        self.ssh_opts = ["-i", str(srv.client_key), "-o", f"UserKnownHostsFile={srv.known_hosts}",
                         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
        self.rclone = shutil.which("rclone")
        self.rsync = shutil.which("rsync")
        self.sftp = shutil.which("sftp")
        self.rclone_env = {**os.environ, "RCLONE_CONFIG": str(wd / "rclone.conf"),
                           "RCLONE_CONFIG_BENCH_TYPE": "sftp",
                           "RCLONE_CONFIG_BENCH_HOST": srv.host,
                           "RCLONE_CONFIG_BENCH_PORT": str(srv.port),
                           "RCLONE_CONFIG_BENCH_USER": srv.user,
                           "RCLONE_CONFIG_BENCH_KEY_FILE": str(srv.client_key),
                           "RCLONE_CONFIG_BENCH_KNOWN_HOSTS_FILE": str(srv.known_hosts)}

    def timed(self, argv: list[str], tag: str, env: dict[str, str] | None = None) -> bl.Proc:
        out, err = self.logs / f"{tag}.out", self.logs / f"{tag}.err"
        if env is not None:
            old = dict(os.environ)
            os.environ.update(env)
        try:
            p = bl.run_timed(argv, out, err)
        finally:
            if env is not None:
                os.environ.clear()
                os.environ.update(old)
        if p.rc != 0:
            raise SystemExit(f"bench: {tag} exited {p.rc}; see {err}")
        return p

    def syncd_config(self, name: str, run: int, dst: Path) -> Path:
        q = json.dumps
        cfg = self.wd / "cfg" / f"{name}-{run}.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"""[daemon]
state_dir = {q(str(self.wd / "state" / f"{name}-{run}"))}
log_format = "json"

[remotes.box]
type = "sftp"
host = {q(self.srv.host)}
port = {self.srv.port}
user = {q(self.srv.user)}
root = {q(str(dst))}
key_file = {q(str(self.srv.client_key))}
known_hosts = {q(str(self.srv.known_hosts))}
use_agent = false

[[sync]]
name = {q(name)}
local = {q(str(self.wd / "src" / name))}
remote = "box"
path = ""
""")
        return cfg

    def syncd(self, cfg: Path, tag: str, expect: int | None) -> bl.Proc:
        p = self.timed([str(bl.SYNCD), "reconcile", "--config", str(cfg), "--json"], tag)
        got = sum(r["uploaded"] for r in json.loads((self.logs / f"{tag}.out").read_text())["pairs"])
        if expect is not None and got != expect:
            raise SystemExit(f"bench: syncd {tag} uploaded {got}, expected {expect}")
        return p

    def rclone_sync(self, src: Path, dst: Path, tag: str) -> bl.Proc:
        assert self.rclone
        return self.timed([self.rclone, "sync", str(src), f"bench:{dst}"], tag, self.rclone_env)

    def rsync_run(self, src: Path, dst: Path, tag: str) -> bl.Proc:
        assert self.rsync
        s = self.shell_srv
        ssh = " ".join(["ssh", "-p", str(s.port), "-i", str(s.client_key), "-o",
                        f"UserKnownHostsFile={s.known_hosts}", "-o", "BatchMode=yes"])
        return self.timed([self.rsync, "-a", "--delete", "-e", ssh, f"{src}/",
                           f"{s.user}@{s.host}:{dst}/"], tag)

    def sftp_put(self, src: Path, dst: Path, tag: str, cipher: str = "") -> bl.Proc:
        """OpenSSH's sftp; `cipher` (e.g. aes128-gcm, the cheapest here) instead of its
        default chacha20-poly1305: the best a C client does on this machine."""
        assert self.sftp
        batch = self.wd / "cfg" / f"{tag}.batch"
        batch.write_text(f"put -p {src} {dst}/{src.name}\n")
        extra = ["-c", cipher] if cipher else []
        return self.timed([self.sftp, "-q", "-b", str(batch), "-P", str(self.srv.port), *extra,
                           *self.ssh_opts, f"{self.srv.user}@{self.srv.host}"], tag)


def check_copy(src: Path, dst: Path, tool: str) -> None:
    want, got = bl.tree_totals(src), bl.tree_totals(dst)
    if want != got:
        raise SystemExit(f"bench: {tool} copy of {src} has {got} (files, bytes), expected {want}")


def drop(name: str, dst: Path) -> None:
    """The large file's copies are removed as soon as a tool is done with them (untimed,
    then `sync`): a gigabyte of another tool's dirty pages would otherwise be written back
    during the next tool's timed run."""
    if name == "large":
        shutil.rmtree(dst, ignore_errors=True)
        bl.sync_disks()


def bench_workload(t: Tools, name: str, runs: int) -> dict[str, list[float]]:
    src = t.wd / "src" / name
    files, nbytes = bl.tree_totals(src)
    res: dict[str, list[float]] = {}
    # Copies are kept until the whole bench is done (the work dir goes at the end): on this
    # VM's ext4 (no journal) creating files soon after deleting many is much slower (inode
    # allocation re-checks recently freed inodes, with the directory locked: a second sftp
    # server spins on that lock), and that cost would land on whichever tool runs next.
    # Only without the disk space for every copy are they deleted between runs.
    need = 4 * runs * (files * 4096 + nbytes) * 1.1 + (1 << 30)
    keep = name == "large" or shutil.disk_usage(t.wd).free > need
    if not keep:
        bl.log(f"{name}: not enough free disk to keep every copy ({bl.fmt_bytes(need)}); "
               "deleting between runs, which slows the next run's file creation on some "
               "filesystems")

    def add(key: str, p: bl.Proc) -> None:
        res.setdefault(key, []).append(p.wall_s)
        res.setdefault(key + "_cpu", []).append(p.user_s + p.sys_s)
        res.setdefault(key + "_other", []).append(p.other_cpu_s)
        bl.log(f"{name}: {key:<22} {p.wall_s:7.2f}s  cpu {p.user_s + p.sys_s:6.2f}s  "
               f"rss {p.maxrss_kib / 1024:4.0f} MiB  other cpu {p.other_cpu_s:.2f}s"
               + (f"  direct reclaim {p.reclaimed} pages" if p.reclaimed else ""))

    for r in range(runs):
        dsts = {k: t.wd / "dst" / name / f"{k}-{r}" for k in ("syncd", "rclone", "rsync", "sftp")}
        for d in dsts.values():
            bl.fresh_dir(d)
        cfg = t.syncd_config(name, r, dsts["syncd"])
        bl.warm_cache(src)
        add("syncd_first", t.syncd(cfg, f"syncd-{name}-first-{r}", files))
        add("syncd_noop", t.syncd(cfg, f"syncd-{name}-noop-{r}", 0))
        if r == 0:
            check_copy(src, dsts["syncd"], "syncd")
        drop(name, dsts["syncd"])
        if t.rclone:
            bl.warm_cache(src)
            add("rclone_first", t.rclone_sync(src, dsts["rclone"], f"rclone-{name}-first-{r}"))
            add("rclone_noop", t.rclone_sync(src, dsts["rclone"], f"rclone-{name}-noop-{r}"))
            if r == 0:
                check_copy(src, dsts["rclone"], "rclone")
            drop(name, dsts["rclone"])
        if name == "small" and t.rsync:
            bl.warm_cache(src)
            add("rsync_first", t.rsync_run(src, dsts["rsync"], f"rsync-{name}-first-{r}"))
            add("rsync_noop", t.rsync_run(src, dsts["rsync"], f"rsync-{name}-noop-{r}"))
        if name == "large" and t.sftp:
            bl.warm_cache(src)
            add("sftp_first", t.sftp_put(src / "large.bin", dsts["sftp"], f"sftp-{name}-{r}"))
            drop(name, dsts["sftp"])
            bl.fresh_dir(dsts["sftp"])
            bl.warm_cache(src)
            add("sftpgcm_first", t.sftp_put(src / "large.bin", dsts["sftp"],
                                            f"sftpgcm-{name}-{r}", "aes128-gcm@openssh.com"))
            drop(name, dsts["sftp"])
        if name != "large":
            modify_ten(src, r)
            add("syncd_ten", t.syncd(cfg, f"syncd-{name}-ten-{r}", 10))
            if t.rclone:
                add("rclone_ten", t.rclone_sync(src, dsts["rclone"], f"rclone-{name}-ten-{r}"))
            if name == "small" and t.rsync:
                add("rsync_ten", t.rsync_run(src, dsts["rsync"], f"rsync-{name}-ten-{r}"))
        if name == "small":
            touch_all(src, r)
            add("syncd_touch", t.syncd(cfg, f"syncd-{name}-touch-{r}", 0))
            if t.rclone:
                add("rclone_touch", t.rclone_sync(src, dsts["rclone"],
                                                  f"rclone-{name}-touch-{r}"))
            if t.rsync:
                add("rsync_touch", t.rsync_run(src, dsts["rsync"], f"rsync-{name}-touch-{r}"))
        if not keep:
            for d in dsts.values():
                shutil.rmtree(d, ignore_errors=True)
            bl.sync_disks()
    return res


def med(xs: list[float] | None) -> float | None:
    return statistics.median(xs) if xs else None


def render(report: dict[str, Any]) -> str:
    lines = [f"## syncd vs peers over SFTP, loopback OpenSSH sshd ({report['date']})", "",
             f"{report['runs']} runs each, median wall seconds of the whole process "
             "(start-up and SSH handshake included); ratio = tool / rclone (lower is better). "
             f"syncd: {report['syncd'].get('commit', '?')}"
             + (" + uncommitted changes" if report["syncd"].get("dirty") else ""), "",
             "| workload | syncd | rclone | syncd / rclone | other peer | peer / rclone | syncd CPU s |",
             "|---|---|---|---|---|---|---|"]
    labels = {"first": "first sync", "noop": "no-op", "ten": "10 files modified",
              "touch": "every file touched (new mtime, same content)"}
    for name, res in report["results"].items():
        for kind in ("first", "noop", "ten", "touch"):
            s = med(res.get(f"syncd_{kind}"))
            if s is None:
                continue
            rc = med(res.get(f"rclone_{kind}"))
            peers, prs = [], []
            for tool, label in (("rsync", "rsync -a"), ("sftp", "OpenSSH sftp"),
                                ("sftpgcm", "OpenSSH sftp -c aes128-gcm")):
                v = med(res.get(f"{tool}_{kind}"))
                if v is not None:
                    peers.append(f"{label} {v:.2f}")
                    prs.append(f"{v / rc:.2f}×" if rc else "—")
            peer, pr = "; ".join(peers) or "—", "; ".join(prs) or "—"
            ratio = f"{s / rc:.2f}×" if rc else "—"
            lines.append(f"| {name}: {labels[kind]} | {s:.2f} | {bl.fmt_s(rc)} | {ratio} | {peer} "
                         f"| {pr} | {med(res.get(f'syncd_{kind}_cpu')):.2f} |")
    lines += floor_lines(report)
    return "\n".join(lines) + "\n"


def floor_lines(report: dict[str, Any]) -> list[str]:
    """What the machine's cores allow each tool on the first syncs: its own CPU plus what
    the rest of the machine spent meanwhile (sshd and the kernel), divided by the cores.
    On a loopback bench the server shares the client's cores, so no tool's wall time can
    go below its floor, however well it overlaps its work."""
    cores = os.cpu_count() or 1
    out = ["", f"CPU floor of the first syncs on this machine's {cores} cores: (tool CPU + "
           "the rest of the machine's CPU during the run, sshd and kernel) / cores; ratio "
           "to rclone's median wall:", ""]
    for name, res in report["results"].items():
        rc = med(res.get("rclone_first"))
        parts = []
        for tool, label in (("syncd", "syncd"), ("rclone", "rclone"),
                            ("sftpgcm", "OpenSSH sftp -c aes128-gcm")):
            own, other = med(res.get(f"{tool}_first_cpu")), med(res.get(f"{tool}_first_other"))
            if own is None or other is None:
                continue
            floor = (own + other) / cores
            ratio = f" = {floor / rc:.2f}× rclone" if rc else ""
            parts.append(f"{label} {own:.2f} + {other:.2f} CPU-s → ≥ {floor:.2f} s{ratio}")
        if parts:
            out.append(f"- {name}: " + "; ".join(parts))
    return out if len(out) > 3 else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--small-files", type=int, default=10_000)
    ap.add_argument("--large-size", type=bl.parse_size, default=1 << 30)
    ap.add_argument("--mixed-files", type=int, default=2_000)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--idle-wait", type=float, default=60.0, metavar="SECONDS")
    args = ap.parse_args()
    bl.IDLE_WAIT = args.idle_wait
    names = [n for n in args.only.split(",") if n]
    if any(n not in WORKLOADS for n in names):
        ap.error(f"--only takes {', '.join(WORKLOADS)}")
    if not bl.SYNCD.exists():
        sys.exit(f"bench: {bl.SYNCD} not found; run with the venv's python (.venv/bin/python)")
    wd = bl.bench_workdir("sftp")
    # syncd, rclone and sftp talk to an SFTP-only account (ForceCommand internal-sftp, the
    # usual backup target; it also keeps rclone from running md5sum over ssh per file, which
    # it does by default when it finds a shell). rsync needs a shell: its own server.
    srv = SSHServer(wd / "sshd")
    srv.extra_config = "ForceCommand internal-sftp"
    srv.start()
    shell_srv = SSHServer(wd / "sshd-shell").start()
    bl.KEEP_PIDS.update(p.pid for p in (srv.proc, shell_srv.proc) if p is not None)
    try:
        for n in names:
            bl.log(f"generating {n} (untimed)")
            generate(wd / "src", n, args.small_files, args.large_size, args.mixed_files)
        bl.sync_disks()
        t = Tools(wd, srv, shell_srv)
        for tool in ("rclone", "rsync", "sftp"):
            if getattr(t, tool) is None:
                bl.log(f"{tool} not installed: not compared (apt-get install {tool})")
        results = {n: bench_workload(t, n, args.runs) for n in names}
        report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runs": args.runs,
                  "syncd": bl.syncd_source(), "results": results}
        text = render(report)
        print(text)
        out = HERE / "out" / "sftp-last.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({**report, "markdown": text}, indent=2) + "\n")
    finally:
        srv.stop()
        shell_srv.stop()
        if args.keep:
            bl.log(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
