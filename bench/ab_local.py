"""A/B of syncd versions (and rclone) on one local → local first sync, side by side.

    git archive 625cf69 syncd | tar -x -C /tmp/old     # a version to compare with
    .venv/bin/python bench/ab_local.py SRC_TREE --runs 3 new=. old=/tmp/old rclone
    .venv/bin/python bench/ab_local.py SRC_TREE nofsync=.:false rclone

Each variant is NAME=DIR[:fsync], DIR being what goes first on PYTHONPATH (a tree holding
a `syncd/` package; `.` is this checkout), fsync true (default) or false; `rclone` runs
`rclone sync` with defaults. Every run gets a fresh destination and state dir and nothing
is deleted until the end (creating files right after deleting many is slow on some
filesystems, and would land on the next variant); the page cache is warmed and the disks
synced before each run; the order rotates from round to round, so no variant always runs
after the same one (rclone evicts the source from the page cache with fadvise). Prints
each run and the medians: wall, CPU of the whole process tree, and other processes' CPU
(kernel writeback among it).

`--fresh-fs` (root, e2fsprogs) puts each run's destination on a new ext4 filesystem,
made in a sparse image file and loop-mounted for that run only: no run meets the files
of an earlier one, or the slow inode allocation that follows mass deletes.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_local as bl

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def fresh_fs(where: Path, size: str) -> Iterator[Path]:
    """A new ext4 filesystem (no journal, like this VM's root) mounted for one run. Never
    raises while cleaning up (that would hide the run's own error): a mount that stays
    busy is detached lazily, and the image goes only once nothing has it mounted."""
    img, mnt = where.with_suffix(".img"), where.with_suffix(".mnt")
    mnt.mkdir()
    mounted = False
    try:
        subprocess.run(["truncate", "-s", size, str(img)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E",
                        "lazy_itable_init=0", str(img)], check=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
        mounted = True
        yield mnt
    finally:
        for _ in range(10):   # a tool's last processes may still be exiting
            if not mounted or subprocess.run(["umount", str(mnt)]).returncode == 0:
                mounted = False
                break
            time.sleep(0.5)
        if mounted and subprocess.run(["umount", "-l", str(mnt)]).returncode == 0:
            mounted = False
        if mounted:
            print(f"ab_local: could not unmount {mnt}; left it and {img}", file=sys.stderr)
        else:
            img.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                mnt.rmdir()


def one_run(a: argparse.Namespace, name: str, spec: str, wd: Path, k: int, dst: Path,
            state: Path, rclone: str | None) -> bl.Proc:
    dst.mkdir()
    bl.warm_cache(a.src)
    out, err = wd / f"{k}.out", wd / f"{k}.err"
    if name == "rclone":
        p = bl.run_timed([str(rclone), "sync", str(a.src), str(dst)], out, err)
    else:
        path, _, fsync = spec.partition(":")
        cfg = wd / f"{k}.toml"
        cfg.write_text(
            f'[daemon]\nstate_dir = "{state}"\nlog_format = "json"\n'
            f'[remotes.d]\ntype = "local"\npath = "{dst}"\nfsync = {fsync or "true"}\n'
            f'[[sync]]\nname = "s"\nlocal = "{a.src}"\nremote = "d"\n')
        pp = str((REPO if path in ("", ".") else Path(path)).resolve())
        # Compiled ahead, like the install: no variant pays its compile.
        compileall.compile_dir(str(Path(pp) / "syncd"), quiet=1)
        # -P: `-m` would put the current directory first on sys.path, so from the repo's
        # root every variant would run the checkout's code.
        p = bl.run_timed_env([sys.executable, "-P", "-m", "syncd", "reconcile", "--config",
                              str(cfg)], out, err, {"PYTHONPATH": pp})
        if p.rc != 0:
            sys.exit(f"{name}: exit {p.rc}\n{err.read_text()[-2000:]}")
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="source tree (e.g. one bench_local.py --keep made)")
    ap.add_argument("variants", nargs="+", help="NAME=DIR[:fsync] or rclone")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle-wait", type=float, default=20.0, metavar="SECONDS")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where destinations go (default: a new dir under $TMPDIR); e.g. a "
                    "freshly made filesystem, where no tool meets the slow inode allocation "
                    "that follows mass deletes on ext4 without a journal")
    ap.add_argument("--keep", action="store_true",
                    help="leave the destinations in place (delete them later, when no "
                    "benchmark follows for a few minutes)")
    ap.add_argument("--fresh-fs", metavar="SIZE", default=None,
                    help="each run's destination on a new ext4 of this size (e.g. 16G, "
                    "sparse), loop-mounted for that run and removed after it (root)")
    a = ap.parse_args()
    if a.fresh_fs and (os.geteuid() != 0 or not shutil.which("mkfs.ext4")):
        sys.exit("--fresh-fs needs root and mkfs.ext4 (apt-get install e2fsprogs)")
    if a.fresh_fs and a.keep:
        ap.error("--keep cannot keep destinations made with --fresh-fs (each filesystem is "
                 "removed after its run)")
    bl.IDLE_WAIT = a.idle_wait
    bl.become_subreaper()
    rclone = shutil.which("rclone")
    if "rclone" in a.variants and rclone is None:
        sys.exit("rclone is not installed (apt-get install rclone)")
    if a.workdir:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
    wd = Path(tempfile.mkdtemp(prefix="syncd-ab-", dir=a.workdir))
    res: dict[str, list[bl.Proc]] = {}
    k = 0
    try:
        for r in range(a.runs):
            shift = r % len(a.variants)
            for v in a.variants[shift:] + a.variants[:shift]:
                k += 1
                name, _, spec = v.partition("=")
                state = wd / f"state-{k}"
                where = fresh_fs(wd / f"fs-{k}", a.fresh_fs) if a.fresh_fs else \
                    contextlib.nullcontext(wd)
                with where as base:
                    p = one_run(a, name, spec, wd, k, base / f"dst-{k}", state, rclone)
                res.setdefault(name, []).append(p)
                print(f"round {r + 1} {name:12s} wall {p.wall_s:6.2f} s  cpu {p.user_s + p.sys_s:6.2f}"
                      f" (user {p.user_s:5.2f} sys {p.sys_s:5.2f})  other {p.other_cpu_s:5.2f}", flush=True)
    finally:
        if a.keep:
            print(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)
    print("\nmedians:")
    for name, ps in res.items():
        print(f"  {name:12s} wall {statistics.median(p.wall_s for p in ps):6.2f} s"
              f"  cpu {statistics.median(p.user_s + p.sys_s for p in ps):6.2f}"
              f" (user {statistics.median(p.user_s for p in ps):5.2f}"
              f" sys {statistics.median(p.sys_s for p in ps):5.2f})"
              f"  other {statistics.median(p.other_cpu_s for p in ps):5.2f}"
              f"  walls {[round(p.wall_s, 2) for p in ps]}")


if __name__ == "__main__":
    main()
