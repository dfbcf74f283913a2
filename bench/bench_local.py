"""Local → local benchmark: `syncd reconcile` against `rclone sync` on the same trees, same run.

    .venv/bin/python bench/bench_local.py [--files N] [--dirs D] [--large-total SIZE] [--runs R]
                                          [--keep] [--workdir DIR]

Generates (seeded, untimed) N small files in D dirs plus LARGE_COUNT large random files, then
times whole processes (wall time here; peak RSS and CPU of that one child from /usr/bin/time), R runs
each, medians quoted. Every "first" run starts from a fresh destination and (syncd) a fresh state
dir; the no-op run is the one right after it. `sync` (untimed) runs before every timed run.
Also times syncd's scanner (walk + hash_paths) in-process against raw xxh3_128 on the large files.
Prints a Markdown report and writes it as JSON to bench/out/last.json.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT_JSON = REPO / "bench" / "out" / "last.json"
SYNCD = Path(sys.executable).parent / "syncd"
TIME = "/usr/bin/time"  # GNU time: -f %M = peak RSS of the one child
SEED = 20240601
SMALL_SIZE = 1024
LARGE_COUNT = 4
MTIME_NS = 1_700_000_000 * 10**9   # fixed mtime: deterministic tree, and never "racy" for syncd
CHUNK = 16 << 20
MARKER = ".bench-params.json"
MB = 1e6


# --- helpers ----------------------------------------------------------------------------------

def ensure_bytecode() -> None:
    """Byte-compile syncd (as scripts/bootstrap.sh does at install), so a timed run does
    not compile sources where __pycache__ is not written (PYTHONDONTWRITEBYTECODE)."""
    import compileall

    compileall.compile_dir(str(REPO / "syncd"), quiet=1)


ensure_bytecode()   # every bench imports this module before timing anything



def parse_size(s: str) -> int:
    """'1GiB', '256MiB', '64k', '1e9', '1000000' → bytes (K/M/G/T binary; KB/MB/GB decimal)."""
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]?)(i?b?)\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r}")
    num, unit, suffix = float(m.group(1)), m.group(2), m.group(3)
    base = 1000 if suffix == "b" else 1024
    return int(num * base ** " kmgt".index(unit or " "))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_workdir(name: str) -> Path:
    """A fresh /tmp work dir for one benchmark; SIGTERM becomes an exit (so the caller's
    `finally` still stops servers and cleans up), and this process adopts orphaned tool
    processes so their CPU is counted and they are reaped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    become_subreaper()
    return Path(tempfile.mkdtemp(prefix=f"syncd-bench-{name}-", dir="/tmp"))


def warm_cache(root: Path) -> None:
    """Read every file under `root` (untimed), so each tool's first sync starts from a warm
    page cache, as BASELINE.md measures: otherwise whichever tool runs first after the
    workload was generated (gigabytes later) pays the disk reads for the next one."""
    buf = bytearray(1 << 20)
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                with open(os.path.join(dirpath, n), "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
            except OSError:
                pass


def direct_reclaim_pages() -> int:
    """Pages scanned by direct reclaim so far (/proc/vmstat): memory short enough that
    allocating processes free page cache themselves, on their own CPU time."""
    try:
        with open("/proc/vmstat") as f:
            return sum(int(v) for k, v in (line.split() for line in f)
                       if k.startswith("pgscan_direct") and k != "pgscan_direct_throttle")
    except OSError:
        return 0


def sync_disks() -> None:
    subprocess.run(["sync"], check=True)


def fresh_dir(p: Path) -> None:
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)


def tree_totals(root: Path) -> tuple[int, int]:
    """(files, bytes) of regular files under root, skipping syncd's trash dir."""
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and ".syncd-trash" in dirnames:
            dirnames.remove(".syncd-trash")
        for f in filenames:
            files += 1
            size += os.lstat(os.path.join(dirpath, f)).st_size
    return files, size


@dataclass
class Proc:
    """One timed run of a tool: its whole process tree (workers and fork servers included)."""

    wall_s: float
    rc: int
    maxrss_kib: int      # largest single process: /usr/bin/time %M, or an orphan's ru_maxrss
    tree_rss_kib: int    # largest sum of RSS over the tree, sampled every SAMPLE_S (≥ maxrss_kib)
    procs: int           # most processes seen at once in the tree
    user_s: float        # CPU of the whole tree: the child and what it reaped, plus orphans
    sys_s: float
    other_cpu_s: float   # CPU the rest of the machine used meanwhile: well above 0 means contention
    reclaimed: int = 0   # pages the kernel scanned to free memory for allocations meanwhile
                         # (direct reclaim): paid by whoever allocated, the tool included


SAMPLE_S = 0.05
PR_SET_CHILD_SUBREAPER = 36
IDLE_WAIT = 120.0  # --idle-wait


def become_subreaper() -> None:
    """Orphans of our children (a fork server whose parent exited first, its workers) are
    re-parented to us instead of init, so we can reap them and count their CPU and memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log("prctl(PR_SET_CHILD_SUBREAPER) failed: CPU of orphaned worker processes is not counted")


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def tree_rss() -> tuple[int, int]:
    """(sum of RSS in KiB, process count) over all our descendants, from /proc/*/stat."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(name)] = int(fields[1])
        rss[int(name)] = int(fields[21]) * page_kib
    me, total, count = os.getpid(), 0, 0
    for pid in rss:
        p = parent.get(pid, 0)
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me:
            total, count = total + rss[pid], count + 1
    return total, count


def wait_idle(threshold: float = 0.15, window: float = 1.0) -> None:
    """Wait (up to IDLE_WAIT s) until the machine is idle: under `threshold` CPUs busy over `window`
    seconds. On a shared 2-core machine another job's burst would otherwise land in a timed run."""
    t0 = time.monotonic()
    while True:
        b0 = busy_cpu_s()
        time.sleep(window)
        busy = (busy_cpu_s() - b0) / window
        if busy < threshold:
            break
        if time.monotonic() - t0 > IDLE_WAIT:
            log(f"machine still busy ({busy:.2f} CPUs) after {IDLE_WAIT:.0f}s; timing anyway")
            break
    if time.monotonic() - t0 > 5:
        log(f"waited {time.monotonic() - t0:.0f}s for the machine to go idle")


KEEP_PIDS: set[int] = set()   # our own long-lived children (e.g. a server): never waited for


def other_children() -> bool:
    """Whether we have a child that is not in KEEP_PIDS (from /proc: ppid == us)."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in KEEP_PIDS:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if int(f.read().rpartition(b")")[2].split()[1]) == me:
                    return True
        except OSError:
            continue
    return False


def reap_orphans(deadline_s: float = 10.0) -> tuple[float, float, int]:
    """Wait for the descendants re-parented to us; (user s, sys s, max ru_maxrss KiB) of them."""
    user = system = 0.0
    maxrss = 0
    end = time.monotonic() + deadline_s
    while True:
        try:
            pid, _, ru = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break  # no children left
        if pid == 0:
            if not other_children():
                break  # only long-lived helpers (a test server) are left
            if time.monotonic() > end:
                log("orphaned processes still running after the tool exited; not counted")
                break
            time.sleep(0.01)
            continue
        user, system, maxrss = user + ru.ru_utime, system + ru.ru_stime, max(maxrss, ru.ru_maxrss)
    return user, system, maxrss


def run_timed_env(argv: list[str], out: Path, err: Path,
                  env: dict[str, str | None]) -> Proc:
    """run_timed with these environment variables set (None = unset) for the run only."""
    old = dict(os.environ)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        return run_timed(argv, out, err)
    finally:
        os.environ.clear()
        os.environ.update(old)


def run_timed(argv: list[str], out: Path, err: Path) -> Proc:
    """`sync`, wait for an idle machine, then run argv under /usr/bin/time, stdout/stderr to files.

    Peak RSS of the main process comes from /usr/bin/time's own fork of it, not from wait4 here: a
    child spawned straight from this process starts its ru_maxrss at *our* RSS (fork/vfork + exec
    keep the old hiwater mark), and RUSAGE_CHILDREN is a max over every child so far. time's floor
    is its own ~1 MiB. Wall time is measured here (time's start-up, ~1 ms, included); it ends when
    the tool exits, not when its orphans (if any) do."""
    sync_disks()
    if IDLE_WAIT > 0:
        wait_idle()
    usage = out.with_suffix(".time")
    peak = {"rss": 0, "procs": 0}
    with open(out, "wb") as fo, open(err, "wb") as fe:
        busy0, t0, rec0 = busy_cpu_s(), time.perf_counter(), direct_reclaim_pages()
        child = subprocess.Popen([TIME, "-f", "%M %U %S", "-o", str(usage), *argv],
                                 stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
        pidfd = os.pidfd_open(child.pid)  # readable when the child exits: no polling latency
        try:
            while not select.select([pidfd], [], [], SAMPLE_S)[0]:
                rss, procs = tree_rss()
                peak["rss"], peak["procs"] = max(peak["rss"], rss), max(peak["procs"], procs)
            wall = time.perf_counter() - t0
        finally:
            os.close(pidfd)
        rc = child.wait()
        o_user, o_sys, o_rss = reap_orphans()
        busy = busy_cpu_s() - busy0
        reclaimed = direct_reclaim_pages() - rec0
    # on failure time writes "Command exited with non-zero status N" first; the figures are last
    rss_s, user_s, sys_s = usage.read_text().split("\n")[-2].split()
    user, system = float(user_s) + o_user, float(sys_s) + o_sys
    maxrss = max(int(rss_s), o_rss)
    return Proc(wall, rc, maxrss, max(peak["rss"], maxrss), max(peak["procs"] - 1, 1),  # - time
                user, system, round(max(0.0, busy - user - system), 2), reclaimed)


# --- data ---------------------------------------------------------------------------------------


def generate(src: Path, files: int, dirs: int, large_total: int) -> None:
    rng = random.Random(SEED)
    small = src / "small"
    for d in range(dirs):
        (small / f"d{d:04d}").mkdir(parents=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(files):
        fd = os.open(small / f"d{i * dirs // files:04d}" / f"f{i:06d}.dat", flags, 0o644)
        try:
            os.write(fd, rng.randbytes(SMALL_SIZE))
            os.utime(fd, ns=(MTIME_NS, MTIME_NS))
        finally:
            os.close(fd)
    large = src / "large"
    large.mkdir(parents=True)
    each = large_total // LARGE_COUNT
    for i in range(LARGE_COUNT):
        size = each if i < LARGE_COUNT - 1 else large_total - each * (LARGE_COUNT - 1)
        fd = os.open(large / f"large{i}.bin", flags, 0o644)
        try:
            left = size
            while left:
                n = min(CHUNK, left)
                os.write(fd, rng.randbytes(n))
                left -= n
            os.utime(fd, ns=(MTIME_NS, MTIME_NS))
        finally:
            os.close(fd)


def prepare_workdir(args: argparse.Namespace) -> Path:
    """The work dir, with the trees generated. A --workdir from an earlier --keep run with the same
    parameters is reused as is (the tree is deterministic); any other non-empty dir is refused."""
    params = {"files": args.files, "dirs": args.dirs, "large_total": args.large_total,
              "seed": SEED, "small_size": SMALL_SIZE, "large_count": LARGE_COUNT}
    if args.workdir is None:
        wd = Path(tempfile.mkdtemp(prefix="syncd-bench-", dir="/tmp"))
    else:
        wd = Path(args.workdir).resolve()
        if wd.exists() and any(wd.iterdir()):
            marker = wd / MARKER
            if marker.exists() and json.loads(marker.read_text()) == params:
                log(f"reusing generated trees in {wd}")
                return wd
            sys.exit(f"bench: --workdir {wd} is not empty and was not made by this benchmark with the "
                     "same parameters; pick another directory")
        wd.mkdir(parents=True, exist_ok=True)
    log(f"generating {args.files:,} × {SMALL_SIZE} B in {args.dirs:,} dirs + {LARGE_COUNT} large files "
        f"({fmt_bytes(args.large_total)}) under {wd}/src (untimed)")
    t0 = time.perf_counter()
    generate(wd / "src", args.files, args.dirs, args.large_total)
    (wd / MARKER).write_text(json.dumps(params))
    sync_disks()
    log(f"generated in {time.perf_counter() - t0:.1f}s")
    return wd


# --- the tools ------------------------------------------------------------------------------------


FSYNC = True   # set from --fsync


def write_config(wd: Path, name: str, run: int) -> tuple[Path, Path, Path]:
    """A config with one local pair: src/<name> → dst/<name>/syncd-<run>, its own state dir;
    returns (config, dst, state)."""
    dst, state = wd / "dst" / name / f"syncd-{run}", wd / "state" / f"{name}-{run}"
    cfg = wd / "cfg" / f"{name}-{run}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    q = json.dumps  # a JSON string is a valid TOML basic string for these paths
    cfg.write_text(f"""[daemon]
state_dir = {q(str(state))}
log_format = "json"
log_level = "info"

[remotes.dst]
type = "local"
path = {q(str(dst))}
fsync = {"true" if FSYNC else "false"}

[[sync]]
name = {q(name)}
local = {q(str(wd / "src" / name))}
remote = "dst"
path = ""
mode = "push"
""")
    return cfg, dst, state


def run_syncd(cfg: Path, logs: Path, tag: str, expect_uploads: int) -> Proc:
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    p = run_timed([str(SYNCD), "reconcile", "--config", str(cfg), "--json"], out, err)
    if p.rc != 0:
        raise SystemExit(f"bench: syncd {tag} exited {p.rc}; see {err}")
    uploaded = sum(r["uploaded"] for r in json.loads(out.read_text())["pairs"])
    if uploaded != expect_uploads:
        raise SystemExit(f"bench: syncd {tag} uploaded {uploaded} files, expected {expect_uploads}")
    return p


def run_rclone(rclone: str, src: Path, dst: Path, logs: Path, tag: str,
               durable: bool = False) -> Proc:
    """`rclone sync`; `durable`: then `sync -f` of dst's filesystem, timed together (what
    it costs rclone to have every file on disk when it says done, as syncd does)."""
    out, err = logs / f"{tag}.out", logs / f"{tag}.err"
    argv = [rclone, "sync", str(src), str(dst)]
    if durable:
        argv = ["sh", "-c", '"$0" sync "$1" "$2" && sync -f "$2"', *argv[:1], *argv[2:]]
    p = run_timed(argv, out, err)
    if p.rc != 0:
        raise SystemExit(f"bench: rclone {tag} exited {p.rc}; see {err}")
    return p


def check_copy(src: Path, dst: Path, tool: str) -> None:
    want, got = tree_totals(src), tree_totals(dst)
    if want != got:
        raise SystemExit(f"bench: {tool} copy of {src} has {got} (files, bytes), expected {want}")


def note(name: str, r: int, runs: int, what: str, p: Proc) -> None:
    log(f"{name} run {r + 1}/{runs}: {what:<12} {p.wall_s:7.2f}s  rss {p.maxrss_kib / 1024:4.0f} MiB "
        f"(tree {p.tree_rss_kib / 1024:.0f} MiB, {p.procs} procs)  "
        f"cpu {p.user_s + p.sys_s:6.2f}s  other cpu {p.other_cpu_s:.2f}s")


def bench_sync(wd: Path, name: str, runs: int, rclone: str | None) -> dict[str, list[Proc]]:
    """R × (first, no-op) for syncd and rclone on src/<name>; returns runs by '<tool>_<kind>'.

    Every first run gets a new destination (and syncd a new state dir), and nothing is deleted
    until all runs of the workload are done: on this VM's ext4 (no journal) creating files soon
    after deleting a large tree is much slower (inode allocation re-checks recently freed inodes),
    and that would land on whichever tool runs next. Only if the disk is too small are the
    copies deleted between runs (with a warning)."""
    src = wd / "src" / name
    files, nbytes = tree_totals(src)
    need = 2 * runs * (files * 4096 + nbytes) * 1.1 + (1 << 30)
    keep = shutil.disk_usage(wd).free > need
    if not keep:
        log(f"{name}: not enough free disk to keep every copy ({fmt_bytes(need)}); deleting between "
            "runs, which slows the next run's file creation on some filesystems")
    logs = wd / "logs"
    logs.mkdir(exist_ok=True)
    res: dict[str, list[Proc]] = {k: [] for k in ("syncd_first", "syncd_noop", "rclone_first",
                                                  "rclone_noop", "rclone_durable_first")}

    def first_then_noop(tool: str, r: int, run: Any, dst: Path) -> None:
        """One timed first sync into a fresh `dst`, then the no-op right after it."""
        for phase in ("first", "noop"):
            if phase == "first":
                warm_cache(src)
            p = run(phase, f"{tool}-{name}-{phase}-{r}")
            res[f"{tool}_{phase}"].append(p)
            note(name, r, runs, f"{tool} {'no-op' if phase == 'noop' else phase}", p)
        if r == 0:
            check_copy(src, dst, tool)
        if not keep:
            shutil.rmtree(dst)

    for r in range(runs):
        cfg, sdst, state = write_config(wd, name, r)
        fresh_dir(sdst)
        if state.exists():
            shutil.rmtree(state)
        first_then_noop("syncd", r, lambda phase, tag, cfg=cfg: run_syncd(
            cfg, logs, tag, files if phase == "first" else 0), sdst)
        if rclone is None:
            continue
        rdst = wd / "dst" / name / f"rclone-{r}"
        fresh_dir(rdst)
        first_then_noop("rclone", r, lambda _phase, tag, rdst=rdst: run_rclone(
            rclone, src, rdst, logs, tag), rdst)
        ddst = wd / "dst" / name / f"rclone-durable-{r}"
        fresh_dir(ddst)
        warm_cache(src)
        p = run_rclone(rclone, src, ddst, logs, f"rclone-durable-{name}-{r}", durable=True)
        res["rclone_durable_first"].append(p)
        note(name, r, runs, "rclone + sync -f first", p)
        if not keep:
            shutil.rmtree(ddst)
    shutil.rmtree(wd / "dst" / name)  # untimed; the next workload creates only a few files
    return res


def bench_hash(root: Path, runs: int) -> dict[str, Any]:
    """syncd.scan.walk + hash_paths (empty prior index) vs raw xxh3_128 with 1 MiB readinto."""
    import xxhash

    from syncd.scan import Matcher, hash_paths, walk

    paths = sorted(str(p) for p in root.iterdir() if p.is_file())
    total = sum(os.path.getsize(p) for p in paths)

    def raw() -> dict[str, bytes]:
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        out: dict[str, bytes] = {}
        for p in paths:
            h = xxhash.xxh3_128()
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(mv[:n])
            out[p] = h.digest()
        return out

    # Empty prior index: every file is new. walk()'s index arguments have changed shape across
    # commits (prior states, racy set, clean signatures…), so each gets an empty container by name.
    walk_args: dict[str, Any] = {}
    for pname, param in inspect.signature(walk).parameters.items():
        if param.default is param.empty:
            walk_args[pname] = {"root": str(root), "ignore": Matcher([])}.get(pname) or (
                set() if "set" in str(param.annotation) else {})

    def scanner() -> dict[str, bytes]:
        w = walk(**walk_args)
        hashed = hash_paths(str(root), w, list(w.dirty))
        if hashed.bytes != total or hashed.errors:
            raise SystemExit(f"bench: syncd's scanner hashed {hashed.bytes} B, errors {hashed.errors}")
        return {str(root / rel): s.hash for rel, s in w.states.items() if s.hash is not None}

    if raw() != scanner():  # also the warm-up: the first pass of each is slower
        raise SystemExit("bench: syncd's scanner and raw xxh3_128 disagree on the large files")
    times: dict[str, list[float]] = {"raw": [], "syncd": []}
    for r in range(runs):  # alternate the order: whichever goes first pays a little more
        for name, fn in ((("raw", raw), ("syncd", scanner)) if r % 2 == 0
                         else (("syncd", scanner), ("raw", raw))):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    raw_s, syncd_s = times["raw"], times["syncd"]
    raw_med, syncd_med = statistics.median(raw_s), statistics.median(syncd_s)
    return {"files": len(paths), "bytes": total, "raw_runs_s": raw_s, "syncd_runs_s": syncd_s,
            "raw_median_s": raw_med, "syncd_median_s": syncd_med,
            "raw_gb_s": total / raw_med / 1e9, "syncd_gb_s": total / syncd_med / 1e9,
            "ratio_syncd_over_raw": syncd_med / raw_med}


def syncd_source() -> dict[str, Any]:
    """Which syncd is measured (the child inherits this process's sys.path / PYTHONPATH)."""
    import syncd

    top = Path(syncd.__file__).resolve().parent.parent
    info: dict[str, Any] = {"path": str(top)}
    git = ["git", "-C", str(top)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()
    if head:
        info["commit"] = head
        info["dirty"] = bool(subprocess.run([*git, "status", "--porcelain", "--", "syncd"],
                                            capture_output=True, text=True, check=False).stdout.strip())
    elif (top / "COMMIT").exists():  # a `git archive` snapshot with its commit written next to it
        info["commit"], info["dirty"] = (top / "COMMIT").read_text().strip(), False
    return info


# --- report -----------------------------------------------------------------------------------


def summarize(name: str, kind: str, res: dict[str, list[Proc]], files: int, nbytes: int) -> dict[str, Any]:
    s, r = res[f"syncd_{kind}"], res[f"rclone_{kind}"]
    s_med = statistics.median(p.wall_s for p in s)
    r_med = statistics.median(p.wall_s for p in r) if r else None
    row: dict[str, Any] = {
        "workload": f"{'first' if kind == 'first' else 'no-op'}, {name}",
        "files": files, "bytes": nbytes,
        "syncd_median_s": s_med, "rclone_median_s": r_med,
        "ratio": s_med / r_med if r_med else None,
        "syncd_peak_rss_kib": max(p.maxrss_kib for p in s),
        "rclone_peak_rss_kib": max(p.maxrss_kib for p in r) if r else None,
        "syncd_tree_rss_kib": max(p.tree_rss_kib for p in s),
        "syncd_procs": max(p.procs for p in s),
        "syncd_cpu_median_s": statistics.median(p.user_s + p.sys_s for p in s),
        "rclone_cpu_median_s": statistics.median(p.user_s + p.sys_s for p in r) if r else None,
        "other_cpu_max_s": max(p.other_cpu_s for p in s + r),
        "syncd_runs": [asdict(p) for p in s], "rclone_runs": [asdict(p) for p in r],
    }

    def tput(sec: float) -> str:
        if kind == "noop":
            return f"{files / sec:,.0f} files/s checked"
        if name == "small":
            return f"{files / sec:,.0f} files/s, {nbytes / sec / MB:,.1f} MB/s"
        return f"{nbytes / sec / MB:,.0f} MB/s"

    row["throughput"] = f"syncd {tput(s_med)}" + (f"; rclone {tput(r_med)}" if r_med else "")
    d = res.get(f"rclone_durable_{kind}") or []
    row["rclone_durable_median_s"] = statistics.median(p.wall_s for p in d) if d else None
    row["ratio_durable"] = s_med / row["rclone_durable_median_s"] if d else None
    row["rclone_durable_runs"] = [asdict(p) for p in d]
    return row


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def render(report: dict[str, Any]) -> str:
    a = report["args"]
    sd = report["syncd"]
    src_line = f"{sd['path']} @ {sd.get('commit', 'unknown commit')}" + (
        " + uncommitted changes under syncd/" if sd.get("dirty") else "")
    lines = [f"## syncd vs rclone, local → local ({report['date']})", "",
             f"small = {a['files']:,} × {SMALL_SIZE} B in {a['dirs']:,} dirs; large = {LARGE_COUNT} files, "
             f"{fmt_bytes(a['large_total'])} total; {a['runs']} runs each, median; MB = 10^6 B; "
             f"ratio = syncd / rclone (lower is better); syncd's local remote fsync = "
             f"{a.get('fsync', 'true')}.", "", f"syncd: {src_line}", "",
             "| workload | syncd median (s) | rclone median (s) | ratio | throughput |",
             "|---|---|---|---|---|"]
    for w in report["workloads"]:
        ratio = "—" if w["ratio"] is None else f"{w['ratio']:.2f}×"
        lines.append(f"| {w['workload']} | {fmt_s(w['syncd_median_s'])} | {fmt_s(w['rclone_median_s'])} "
                     f"| {ratio} | {w['throughput']} |")
    durable = [w for w in report["workloads"] if w.get("rclone_durable_median_s")]
    if durable:
        lines += ["", "With the same durability (rclone's sync, then `sync -f` of the destination's "
                  "filesystem, timed together; syncd makes each file durable before it renames it "
                  "into place, rclone never syncs):", "",
                  "| workload | syncd median (s) | rclone + sync -f median (s) | ratio |",
                  "|---|---|---|---|"]
        lines += [f"| {w['workload']} | {fmt_s(w['syncd_median_s'])} | "
                  f"{fmt_s(w['rclone_durable_median_s'])} | {w['ratio_durable']:.2f}× |"
                  for w in durable]
    lines += ["", "| workload | syncd peak RSS: largest process / whole tree (processes) | rclone peak RSS "
              "| syncd CPU (user+sys, median s) | rclone CPU (median s) | other processes' CPU (max, s) |",
              "|---|---|---|---|---|---|"]
    for w in report["workloads"]:
        r_rss = w["rclone_peak_rss_kib"]
        lines.append(f"| {w['workload']} | {w['syncd_peak_rss_kib'] / 1024:.0f} MiB / "
                     f"{w['syncd_tree_rss_kib'] / 1024:.0f} MiB ({w['syncd_procs']}) | "
                     f"{'—' if r_rss is None else f'{r_rss / 1024:.0f} MiB'} | "
                     f"{w['syncd_cpu_median_s']:.2f} | {fmt_s(w['rclone_cpu_median_s'])} | "
                     f"{w['other_cpu_max_s']:.2f} |")
    lines += ["", "CPU and RSS cover each tool's whole process tree (worker processes and fork servers "
              f"included; the tree sum is sampled every {SAMPLE_S * 1000:.0f} ms). Other processes' CPU = "
              "busy CPU of the whole machine (/proc/stat) during a timed run minus the tool's own; well "
              "above 0 means something else was running, or kernel threads worked for the tool (writeback "
              "after fsync: a few seconds on a 100k-file first run)."]
    h = report["hash"]
    lines += ["", f"Scan + hash of the large files in-process ({h['files']} files, {fmt_bytes(h['bytes'])}, "
              "after one warm-up pass of each):", "",
              "| method | median (s) | GB/s |", "|---|---|---|",
              f"| syncd.scan.walk + hash_paths (empty index) | {h['syncd_median_s']:.3f} | "
              f"{h['syncd_gb_s']:.2f} |",
              f"| raw xxhash.xxh3_128, 1 MiB readinto | {h['raw_median_s']:.3f} | {h['raw_gb_s']:.2f} |",
              "", f"syncd / raw = {h['ratio_syncd_over_raw']:.2f}×", ""]
    return "\n".join(lines)


def main() -> None:
    global IDLE_WAIT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="small files (default 100000)")
    ap.add_argument("--dirs", type=int, default=1_000, help="dirs for the small files (default 1000)")
    ap.add_argument("--large-total", type=parse_size, default=1 << 30,
                    help=f"total size of the {LARGE_COUNT} large files (default 1GiB)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--fsync", choices=("true", "false"), default="true",
                    help="the local remote's fsync setting for syncd (default true, syncd's default; "
                         "rclone never fsyncs)")
    ap.add_argument("--workdir", help="work dir (default: a new /tmp/syncd-bench-*)")
    ap.add_argument("--idle-wait", type=float, default=IDLE_WAIT, metavar="SECONDS",
                    help="before each timed run, wait up to this long for the machine to be idle "
                    f"(default {IDLE_WAIT:.0f}; 0 = don't wait)")
    args = ap.parse_args()
    global FSYNC
    FSYNC = args.fsync == "true"
    IDLE_WAIT = args.idle_wait
    if args.files < 1 or args.dirs < 1 or args.dirs > args.files or args.runs < 1 \
            or args.large_total < LARGE_COUNT:
        ap.error("need files ≥ dirs ≥ 1, runs ≥ 1, large-total ≥ 4 bytes")
    if not os.access(TIME, os.X_OK):
        sys.exit(f"bench: {TIME} (GNU time) is needed for per-process peak RSS; apt-get install time")
    if not SYNCD.exists():
        sys.exit(f"bench: {SYNCD} not found; run with the venv's python (.venv/bin/python)")
    rclone = shutil.which("rclone")
    if rclone is None:
        log("rclone not on PATH: syncd only")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` still cleans up
    become_subreaper()
    wd = prepare_workdir(args)
    try:
        sizes = {n: tree_totals(wd / "src" / n) for n in ("small", "large")}
        workloads = []
        for name in ("small", "large"):
            res = bench_sync(wd, name, args.runs, rclone)
            for kind in ("first", "noop"):
                workloads.append(summarize(name, kind, res, *sizes[name]))
        log("scan + hash of the large files, in-process")
        hsh = bench_hash(wd / "src" / "large", args.runs)
        rc_version = None
        if rclone:
            rc_version = subprocess.run([rclone, "version"], capture_output=True, text=True,
                                        check=False).stdout.splitlines()[0]
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([".venv/bin/python", "bench/bench_local.py", *sys.argv[1:]]),
            "args": {"files": args.files, "dirs": args.dirs, "large_total": args.large_total,
                     "runs": args.runs, "idle_wait_s": args.idle_wait, "fsync": args.fsync},
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "python": platform.python_version(), "rclone": rc_version},
            "syncd": syncd_source(), "workdir": str(wd), "workloads": workloads, "hash": hsh,
        }
        text = render(report)
        print(text)
        OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
        OUT_JSON.write_text(json.dumps({**report, "markdown": text}, indent=2) + "\n")
        log(f"wrote {OUT_JSON}")
    finally:
        if args.keep:
            log(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
