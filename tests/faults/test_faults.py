"""Faults on the wire, SFTP / FTPS / S3 through the TCP fault proxy: a refused, silent,
dropped, reset or slow remote ends `syncd reconcile` with the documented code in bounded
time, never shows a partial file under a final name, leaves no temp behind the run that
follows, and converges with nothing lost once the fault ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import SYNCD, tree
from tests.faults.conftest import Outcome, Setup, Target, Watcher, wait_until

pytestmark = pytest.mark.e2e

RATE = 256 * 1024       # trickle per connection and direction: stretches a run over seconds
FAULT_AT = 300 * 1024   # bytes uploaded through the proxy before the fault is injected


def why(r: Outcome) -> str:
    return f"exit {r.code} after {r.seconds:.1f} s (None: still running, killed)\n{r.tail()}"


def after_upload(t: Target, nbytes: int, fault: Callable[[], None]) -> Callable[[], None]:
    """A `during` step: inject `fault` once `nbytes` more went up through the proxy (or
    after 20 s, whichever first: a run that uploads less still meets the fault)."""
    def step() -> None:
        start = t.proxy.stats.bytes_up
        wait_until(lambda: t.proxy.stats.bytes_up - start >= nbytes, 20)
        fault()
    return step


class Soft:
    """Expectations about the faulted run: collected, not raised at once, so the
    convergence step still runs and shows whether anything was lost; reported together."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, msg: str) -> None:
        if not ok:
            self.failed.append(msg)


def lost(s: Setup) -> list[str]:
    """Local files whose last version is not on the remote under their name."""
    remote = s.final()
    return sorted(k for k, v in s.local().items() if remote.get(k) != v)


def converge_and_report(s: Setup, soft: Soft, label: str) -> None:
    """The fault is over: a rerun exits 0, every local file's last version is on the
    remote under its name, no temp is left, nothing partial is seen; then every
    expectation of the faulted run is reported."""
    s.target.proxy.set_mode("reset")   # held or half-open connections of the fault: gone
    s.target.proxy.set_mode("pass")
    with Watcher(s) as w:
        r = s.reconcile()
    gone = lost(s)
    # One line per scenario for the figures in docs/guarantees.md (pytest -s shows them).
    print(f"\n[fault] {s.target.kind} {label}: faulted run "
          f"{'as expected' if not soft.failed else 'NOT as expected'}; rerun exit {r.code}; "
          f"missing or stale after it {len(gone)}")
    soft.check(r.code == 0, "rerun after the fault: " + why(r))
    soft.check(gone == [], f"not converged, missing or stale on the remote: {gone[:10]}")
    soft.check(s.final().keys() == s.local().keys(),
               f"extra files on the remote: {sorted(s.final().keys() - s.local().keys())[:10]}")
    soft.check(s.temps() == [], f"temps left after the rerun: {s.temps()[:5]}")
    soft.check(not w.bad, f"partial files under final names during the rerun: {w.bad}")
    if s.target.kind == "s3":   # S3's temps: multipart uploads never completed or aborted
        c = s.target.extra["client"]
        ups = c.list_multipart_uploads(Bucket="faults", Prefix=f"{s.tmp.name}/").get("Uploads", [])
        soft.check(ups == [], f"multipart uploads left: {len(ups)}")
    assert not soft.failed, "\n".join(soft.failed)


def failed_jobs(s: Setup) -> int:
    return sum(len(p["failed"]) for p in s.status().get("pairs", []))


def test_refused_remote_exits_3_then_converges(target: Target, tmp_path: Path) -> None:
    s = Setup(tmp_path, target)
    s.write_tree()
    target.proxy.set_mode("refuse")
    r = s.reconcile()
    soft = Soft()
    soft.check(r.code == 3, why(r))
    soft.check(s.partial(s.final()) == [], "partial files under final names")
    converge_and_report(s, soft, "refused from the start")


def test_silent_remote_exits_3_in_bounded_time(target: Target, tmp_path: Path) -> None:
    """Accepts TCP, then never sends a byte (no SSH banner, no FTP greeting, no HTTP
    reply): every phase is bounded by `timeout` = 2 s, so the run ends with 3."""
    s = Setup(tmp_path, target)
    s.write_tree(n=10, big=0)
    held = target.proxy.stats.held_while_stalled
    target.proxy.set_mode("stall")
    r = s.reconcile()
    assert target.proxy.stats.held_while_stalled > held   # syncd did connect, and met silence
    soft = Soft()
    soft.check(r.code == 3, why(r))
    converge_and_report(s, soft, "silent from the start")


@pytest.mark.parametrize("fault", ["refuse", "stall"])
def test_remote_lost_mid_run_exits_3_parks_nothing_then_converges(
        target: Target, tmp_path: Path, fault: str) -> None:
    """The server goes down (refuse + reset) or silent (stall) while files are uploading:
    an outage, not N failures. One `remote_unavailable`, exit 3 in bounded time, no job
    parked as failed, no partial file; the rerun converges and leaves no temp."""
    s = Setup(tmp_path, target)
    s.write_tree()
    target.proxy.set_mode("trickle", rate=RATE)
    sent = target.proxy.stats.bytes_up
    with Watcher(s) as w:
        r = s.reconcile(after_upload(target, FAULT_AT, lambda: target.proxy.set_mode(fault)))
    assert target.proxy.stats.bytes_up - sent >= FAULT_AT   # the fault came mid-upload
    soft = Soft()
    soft.check(r.code == 3, why(r))
    soft.check(not w.bad, f"partial files under final names: {w.bad}")
    n = len(r.events("remote_unavailable"))
    soft.check(n == 1, f"{n} remote_unavailable events, want 1")
    n = len(r.events("job_failed"))
    soft.check(n == 0, f"{n} job_failed events: an outage parked jobs as failed")
    n = failed_jobs(s)
    soft.check(n == 0, f"syncd status lists {n} failed jobs after an outage")
    converge_and_report(s, soft, f"{'down' if fault == 'refuse' else 'silent'} mid-run")


@pytest.mark.parametrize("fault", ["cut", "reset"])
def test_link_dropped_mid_transfer_recovers_in_the_same_run(
        target: Target, tmp_path: Path, fault: str) -> None:
    """Every established connection is closed (FIN after 16 KiB more) or reset mid-upload,
    then the link is fine again: the run reconnects, exits 0, publishes nothing partial and
    removes the temps of the broken attempts before it ends."""
    s = Setup(tmp_path, target)
    s.write_tree()
    target.proxy.set_mode("trickle", rate=RATE)
    before = target.proxy.stats.cut + target.proxy.stats.reset

    def drop() -> None:
        if fault == "cut":
            target.proxy.set_mode("cut", cut_after=16 * 1024)
            wait_until(lambda: target.proxy.stats.cut > 0 and target.proxy.connections() == 0, 5)
        else:
            target.proxy.set_mode("reset")
        target.proxy.set_mode("pass")

    with Watcher(s) as w:
        r = s.reconcile(after_upload(target, FAULT_AT, drop))
    assert target.proxy.stats.cut + target.proxy.stats.reset > before   # the fault happened
    soft = Soft()
    soft.check(r.code == 0, why(r))
    soft.check(not w.bad, f"partial files under final names: {w.bad}")
    soft.check(lost(s) == [], f"not converged by the same run: {lost(s)[:10]}")
    temps = s.temps()
    soft.check(temps == [], f"{len(temps)} temps of broken attempts left after the run, "
                            f"e.g. {temps[:3]}")
    converge_and_report(s, soft, f"{fault} mid-transfer")


def test_slow_link_is_not_a_dead_one(target: Target, tmp_path: Path) -> None:
    """A trickle of 512 KiB/s per connection: a 1 MiB file takes longer than `timeout`,
    but bytes keep flowing, so nothing times out; exit 0 and converged."""
    s = Setup(tmp_path, target)
    s.write_tree(n=10, big=1, big_size=1 << 20)
    target.proxy.set_mode("trickle", rate=512 * 1024)
    sent = target.proxy.stats.bytes_up
    with Watcher(s) as w:
        r = s.reconcile()
    assert target.proxy.stats.bytes_up - sent >= 1 << 20   # the big file crossed the trickle
    soft = Soft()
    soft.check(r.code == 0, why(r))
    soft.check(not w.bad, f"partial files under final names: {w.bad}")
    soft.check(lost(s) == [] and s.temps() == [], "not converged by the slow run")
    converge_and_report(s, soft, "trickle")


def test_daemon_keeps_other_pairs_going_and_resumes_a_silent_remote(
        target: Target, tmp_path: Path) -> None:
    """`syncd run` with a pair behind a silent remote and a healthy local pair: the daemon
    stays up, the local pair syncs, one `remote_unavailable` says so; once the remote
    answers, the daemon resumes by itself and converges; SIGTERM exits 0."""
    tmp = tmp_path
    s = Setup(tmp, target)
    near_src, near_dst = tmp / "near-src", tmp / "near-dst"
    near_src.mkdir()
    near_dst.mkdir()
    s.config.write_text(s.config.read_text()
                        + f'\n[remotes.near]\ntype = "local"\npath = "{near_dst}"\n'
                        + f'\n[[sync]]\nname = "near"\nlocal = "{near_src}"\nremote = "near"\n'
                        + 'path = "n"\n')
    s.write_tree(n=10, big=0)
    (near_src / "a.txt").write_bytes(b"near a")
    log = tmp / "daemon.log"
    target.proxy.set_mode("stall")
    p = subprocess.Popen([str(SYNCD), "run", "--config", str(s.config)],
                         stdout=subprocess.DEVNULL, stderr=log.open("ab"), env=s.env,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    def tail() -> str:
        return f"(daemon {'running' if p.poll() is None else f'exited {p.returncode}'})\n" \
            + log.read_text(errors="replace")[-1500:]

    soft = Soft()
    try:
        soft.check(wait_until(lambda: tree(near_dst / "n") == {"a.txt": b"near a"}, 20),
                   "the healthy pair did not sync while the other remote was silent " + tail())
        (near_src / "b.txt").write_bytes(b"near b")
        soft.check(wait_until(lambda: (near_dst / "n" / "b.txt").exists(), 15),
                   "the healthy pair stopped following changes " + tail())
        soft.check(wait_until(lambda: '"remote_unavailable"' in log.read_text(), 10),
                   "no remote_unavailable event for the silent remote " + tail())
        assert p.poll() is None, tail()
        target.proxy.set_mode("reset")
        target.proxy.set_mode("pass")
        s.write("later.txt", b"after the outage")
        ok = wait_until(lambda: lost(s) == [], 30)
        print(f"\n[fault] {target.kind} daemon, silent remote: "
              f"{'as expected' if not soft.failed else 'NOT as expected'}; "
              f"resumed {'yes' if ok else 'no'}; missing or stale {len(lost(s))}")
        soft.check(ok, f"no convergence once the remote answered: {lost(s)[:5]} " + tail())
        soft.check(wait_until(lambda: s.temps() == [], 5), f"temps left: {s.temps()[:5]}")
        p.send_signal(signal.SIGTERM)
        try:
            code: int | None = p.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        soft.check(code == 0, f"SIGTERM: exit {code} (None: still running after 30 s) " + tail())
        assert not soft.failed, "\n".join(soft.failed)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_proxy_really_faults(target: Target) -> None:
    """The harness itself: each mode does to a raw connection what it says."""
    px = target.proxy
    px.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", px.port), timeout=2).close()
    px.set_mode("stall")
    with socket.create_connection(("127.0.0.1", px.port), timeout=1) as c, pytest.raises(TimeoutError):
        c.sendall(b"GET / HTTP/1.0\r\n\r\n" if target.kind == "s3" else b"\r\n")
        c.recv(1)   # no banner, no reply: silent
    px.set_mode("reset")
    # At connect or at the first read, depending on when the RST lands.
    with pytest.raises(ConnectionResetError), \
            socket.create_connection(("127.0.0.1", px.port), timeout=2) as c:
        time.sleep(0.1)
        c.sendall(b"x" * 10)
        c.recv(1)
    px.set_mode("pass")
    with socket.create_connection(("127.0.0.1", px.port), timeout=5) as c:
        if target.kind == "s3":
            c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        assert c.recv(4)   # a banner, a greeting or an HTTP reply: forwarded
