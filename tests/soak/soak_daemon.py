"""Crash soak: `syncd run` is killed with SIGKILL at random moments while files are
written and rewritten (and some only chmod-ed or touched), restarted each time, then left
to converge. Reports files lost, files corrupt (remote content that was never a version of
the local file), partial files seen under a final name, files whose remote mode or mtime
is not the local one once converged, and jobs left stuck. Every figure must be 0.

    .venv/bin/python -m tests.soak.soak_daemon [--kills 200] [--remote local|sftp] [--seed N]

CI runs a short version (tests/soak/test_soak.py: 10 kills, local and SFTP).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SYNCD = Path(sys.executable).parent / "syncd"
FILES = 40


@dataclass
class Report:
    kills: int = 0
    versions_written: int = 0
    lost: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    partial_seen: list[str] = field(default_factory=list)
    stuck_jobs: int = 0
    converged_s: float = 0.0
    remote_reads_checked: int = 0   # the monitor's work: proof that it looked
    # Contents a file rewritten in place (truncate + write) really had for an instant
    # (empty, a prefix of the new version): mirroring them is correct, and they are
    # counted apart from partial_seen, which must stay empty.
    transient_states_published: int = 0
    temps_left: int = 0
    attr_changes: int = 0           # chmods and touches alone (no new content)
    attrs_jobs: int = 0             # attrs jobs the daemons logged done (the path was used)
    attrs_wrong: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.corrupt or self.partial_seen or self.stuck_jobs
                    or self.temps_left or self.attrs_wrong)


def content(rel: str, version: int, rng: random.Random) -> bytes:
    head = f"{rel} v{version}\n".encode()
    return head + bytes([version % 251]) * rng.choice((0, 10, 5_000, 200_000, 1_500_000))


def soak(work: Path, kills: int, remote: str = "local", seed: int = 1,
         sshd: object | None = None) -> Report:
    rng = random.Random(seed)
    src, dst, state = work / "src", work / "dst", work / "state"
    for d in (src, dst):
        d.mkdir(parents=True, exist_ok=True)
    rconf = (f'type = "local"\npath = "{dst}"' if remote == "local"
             else sshd.remote_toml(dst))  # type: ignore[attr-defined]
    cfg = work / "config.toml"
    cfg.write_text(f"""[daemon]
state_dir = "{state}"
log_format = "json"
debounce = "50ms"
max_delay = "500ms"
retry_initial = "20ms"
retry_max = "200ms"

[remotes.r]
{rconf}

[[sync]]
name = "soak"
local = "{src}"
remote = "r"
path = "m"
delete = "propagate"
max_delete = "100%"
""")
    mirror = dst / "m"
    versions: dict[str, set[bytes]] = {}
    in_place: dict[str, set[bytes]] = {}
    vlock = threading.Lock()
    rep = Report()
    stop = threading.Event()
    watched = threading.Event()   # the monitor stops

    def writer() -> None:
        wrng = random.Random(seed + 1)
        v = 0
        while not stop.is_set():
            rel = f"d{wrng.randrange(4)}/f{wrng.randrange(FILES)}.bin"
            p = src / rel
            pick = wrng.random()
            if pick < 0.2 and p.exists():   # metadata alone: the attrs path
                if pick < 0.1:
                    os.chmod(p, wrng.choice((0o600, 0o640, 0o644, 0o700, 0o755)))
                else:
                    t = time.time_ns() - wrng.randrange(10**9, 10**12)
                    os.utime(p, ns=(t, t))
                rep.attr_changes += 1
                time.sleep(wrng.uniform(0.0, 0.02))
                continue
            v += 1
            data = content(rel, v, wrng)
            with vlock:
                versions.setdefault(rel, set()).add(data)
            p.parent.mkdir(parents=True, exist_ok=True)
            if wrng.random() < 0.5:       # in place: truncate + write
                with vlock:
                    in_place.setdefault(rel, set()).add(data)
                with open(p, "wb") as f:
                    f.write(data)
            else:                         # editor style: temp + rename
                tmp = p.with_name(f".tmp-{v}")
                tmp.write_bytes(data)
                os.replace(tmp, p)
            rep.versions_written = v
            time.sleep(wrng.uniform(0.0, 0.02))

    def monitor() -> None:   # every complete file seen under a final name must be a version
        # Until the end of convergence, not only of the kills: a daemon killed each time
        # before it published anything (start-up is slow on a loaded machine) would leave
        # the monitor nothing to check.
        while not watched.is_set():
            for p in mirror.rglob("*") if mirror.exists() else ():
                if not p.is_file() or p.name.startswith(".syncd-tmp-"):
                    continue
                rel = p.relative_to(mirror).as_posix()
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                with vlock:
                    rep.remote_reads_checked += 1
                    if data in versions.get(rel, set()):
                        continue
                    # A file rewritten in place really is empty, then a prefix of its new
                    # content, for a moment; syncd may faithfully publish such a state.
                    if any(v.startswith(data) for v in in_place.get(rel, ())):
                        rep.transient_states_published += 1
                    elif rel not in rep.partial_seen:
                        rep.partial_seen.append(f"{rel} ({len(data)} bytes: {data[:24]!r})")
            time.sleep(0.01)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([str(SYNCD), "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL,
                                stderr=(work / "daemon.log").open("ab"))

    # Whole seconds on SFTP, nanoseconds locally: the remote's mtime precision.
    prec = 1 if remote == "local" else 10**9

    def converge(t0: float) -> None:   # wait (bounded) until the remote equals local
        while time.monotonic() - t0 < 120:
            if _tree(mirror) == _tree(src) and _attrs(mirror, prec) == _attrs(src, prec):
                return
            time.sleep(0.1)

    threads = [threading.Thread(target=writer), threading.Thread(target=monitor)]
    for t in threads:
        t.start()
    proc = start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.05, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            rep.kills += 1
            proc = start()
        stop.set()
        threads[0].join()
        # Converge: the last writes are in.
        t0 = time.monotonic()
        converge(t0)
        rep.converged_s = time.monotonic() - t0
        # Attribute changes alone, to a daemon that stays up: the attrs path must carry
        # them (during the kills each may be overtaken by a write of the same file, or by
        # a kill, and go as an upload).
        for i, p in enumerate(sorted(src.rglob("*.bin"))[:4]):
            if i % 2:
                os.chmod(p, p.stat().st_mode & 0o777 ^ 0o040)
            else:
                t = p.stat().st_mtime_ns - 10**9 * (i + 1)
                os.utime(p, ns=(t, t))
            rep.attr_changes += 1
        converge(time.monotonic())
        # Temps of uploads cut by a kill: the last start's full reconcile removes them.
        while list(mirror.rglob(".syncd-tmp-*")) and time.monotonic() - t0 < 120:
            time.sleep(0.1)
        rep.temps_left = len(list(mirror.rglob(".syncd-tmp-*")))
        watched.set()
        threads[1].join()
    finally:
        stop.set()
        watched.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    local, remote_t = _tree(src), _tree(mirror)
    for rel, data in local.items():
        if rel not in remote_t:
            rep.lost.append(rel)
        elif remote_t[rel] != data:
            rep.corrupt.append(rel)   # converged state must be exactly the last version
    for rel, data in remote_t.items():
        if rel not in local and data not in versions.get(rel, set()):
            rep.corrupt.append(rel)
    want, got = _attrs(src, prec), _attrs(mirror, prec)
    rep.attrs_wrong = [f"{rel}: local {want[rel]}, remote {got.get(rel)}" for rel in want
                       if rel in got and got[rel] != want[rel]]
    with open(work / "daemon.log", encoding="utf-8", errors="replace") as f:
        rep.attrs_jobs = sum(1 for line in f if '"attrs_done"' in line)
    st = subprocess.run([str(SYNCD), "status", "--config", str(cfg), "--json"],
                        capture_output=True, text=True, check=True)
    for p in json.loads(st.stdout)["pairs"]:
        rep.stuck_jobs += p["queued"] + p["in_flight"] + len(p["failed"])
    return rep


def _tree(root: Path) -> dict[str, bytes]:
    out = {}
    if not root.exists():
        return out
    for p in root.rglob("*"):
        if p.is_file() and not p.name.startswith((".syncd-tmp-", ".tmp-")) \
                and ".syncd-trash" not in p.parts:
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def _attrs(root: Path, precision_ns: int) -> dict[str, tuple[int, int]]:
    """(permission bits, mtime at the remote's precision) of each file under root."""
    out = {}
    for rel in _tree(root):
        st = (root / rel).stat()
        out[rel] = (st.st_mode & 0o777, st.st_mtime_ns // precision_ns)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--remote", choices=("local", "sftp"), default="local")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="syncd-soak-") as tmp:
        srv = None
        if args.remote == "sftp":
            from tests.servers import SSHServer

            srv = SSHServer(Path(tmp) / "sshd").start()
        try:
            rep = soak(Path(tmp), args.kills, args.remote, args.seed, srv)
        finally:
            if srv is not None:
                srv.stop()
    print(json.dumps({**asdict(rep), "ok": rep.ok}, indent=2))
    sys.exit(0 if rep.ok else 1)


if __name__ == "__main__":
    main()
