"""The circuit breaker: a few connection-level failures in a row make a remote one
unavailable state (exit 3), not one failure per file; an outage costs no attempts."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from syncd.breaker import Breaker, probe_delay
from syncd.engine import Options
from syncd.errors import (
    AuthError,
    ConnectionLost,
    NotFound,
    NotTried,
    PermanentError,
    TransientError,
    UnavailableError,
)
from syncd.index import Index
from syncd.probe import Prober
from syncd.queue import Outcome, Queue
from syncd.remotes.base import Source
from tests.unit.test_engine import Clock, Faulty, engine, setup, tree

LOST = ConnectionLost("Connection refused", remote="r")


def test_three_connection_failures_in_a_row_trip_it_once() -> None:
    b = Breaker(threshold=3, clock=lambda: 42.0)
    assert b.record("r", LOST) is None and b.record("r", LOST) is None
    assert b.record("r", NotTried("not tried", remote="r")) is None   # no evidence
    assert b.suspect("r") and b.down("r") is None
    d = b.record("r", LOST)
    assert d is not None and (d.remote, d.reason, d.since, d.auth) == (
        "r", "Connection refused", 42.0, False)
    assert b.record("r", LOST) is None          # said once per outage
    assert b.down("r") == d and b.down("other") is None
    assert b.restore("r") == d and b.down("r") is None and not b.suspect("r")
    assert b.record("r", LOST) is None          # counting starts over


def test_a_streak_shorter_than_the_remotes_timeout_is_a_blip() -> None:
    now = [0.0]
    b = Breaker(threshold=3, clock=lambda: now[0], grace={"r": 2.0})
    for t in (0.0, 0.0, 0.0, 0.0, 0.5, 1.9):   # every transfer in flight, then retries
        now[0] = t
        assert b.record("r", LOST) is None      # reconnecting within the grace
    now[0] = 2.0
    assert b.record("r", LOST) is not None
    b2 = Breaker(threshold=3, clock=lambda: now[0], grace={"r": 2.0})
    now[0] = 10.0
    assert b2.record("r", AuthError("denied", remote="r")) is not None   # no grace for that


def test_an_answer_in_between_resets_the_count() -> None:
    for answered in (None, PermanentError("permission denied", path="x"),
                     NotFound("gone", path="y"), TransientError("503 slow down", path="z")):
        b = Breaker(threshold=3)
        b.record("r", LOST)
        b.record("r", LOST)
        b.record("r", answered)   # the server answered about one path
        assert b.record("r", LOST) is None and b.down("r") is None


def test_a_refusal_of_us_trips_at_once_and_says_what_to_fix() -> None:
    b = Breaker(threshold=3)
    d = b.record("r", AuthError("authentication failed", remote="r"))
    assert d is not None and d.auth
    b2 = Breaker(threshold=3)
    d2 = b2.record("r", UnavailableError("root directory does not exist", remote="r"))
    assert d2 is not None and not d2.auth     # a disk to mount, not a login to fix


def test_a_suspect_remote_waits_a_growing_pause_per_round() -> None:
    now = [0.0]
    b = Breaker(threshold=99, clock=lambda: now[0], backoff=(1.0, 4.0))
    for _ in range(4):                      # one round: the transfers in flight
        b.record("r", LOST)
    assert b.wait("r") == 1.0
    for t, pause in ((1.0, 2.0), (3.0, 4.0), (7.0, 4.0)):
        now[0] = t
        b.record("r", LOST)                 # the next round failed too
        assert b.wait("r") == pause
    b.record("r", None)
    assert b.wait("r") == 0.0 and not b.suspect("r")


def test_probe_delays_double_up_to_the_cap() -> None:
    assert [probe_delay(n, 1.0, 10.0) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 8, 10, 10]


def test_an_outage_keeps_the_attempts_and_parks_nothing(tmp_path: Path) -> None:
    idx = Index.open(tmp_path / "state")
    clock = Clock()
    q = Queue(idx, "me", clock=clock, rand=lambda: 1.0, max_attempts=1)
    from syncd.model import Action, Op

    q.enqueue("p", [Action(Op.UPLOAD, "a.txt", "new", 1)])
    (job,) = q.lease(10)
    for _ in range(5):   # with max_attempts = 1, a plain transient failure would park it
        s = q.settle("p", [Outcome(job, error=LOST)])
        assert s.held and not s.failed and not s.retried
        clock.t += 10
        (job,) = q.lease(10)
        assert job.attempts == 0
    s = q.settle("p", [Outcome(job, error=TransientError("reset", path="a.txt"))])
    assert [msg for _, msg in s.failed] == ["gave up after 1 attempts: path 'a.txt': reset"]


class Dead(Faulty):
    """A remote that takes `good` uploads, then refuses every connection."""

    def __init__(self, root: Path, good: int):
        super().__init__(root)
        self.good = good
        self.lock = threading.Lock()

    def put(self, path: str, source: Source) -> Any:
        with self.lock:
            if self.good <= 0:
                self.puts.append(path)
                raise ConnectionLost("connection refused", remote=self.name, path=path)
            self.good -= 1
        return Faulty.put(self, path, source)


def test_a_remote_that_dies_mid_run_is_one_state_and_exit_3(tmp_path: Path) -> None:
    files = {f"d/f{i:03}.txt": b"x" * i for i in range(200)}
    cfg, src, dst = setup(tmp_path, files, max_attempts=2)
    clock = Clock()
    remote = Dead(dst, good=5)
    e = engine(cfg, remote, clock)
    e.breaker.grace["nas"] = 1.0   # as a network remote's timeout (on the fake clock)
    with capture_logs() as logs:
        res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "unavailable" and res.exit_code == 3
    assert res.message.startswith("remote 'nas': connection refused (unavailable since ")
    assert "(unavailable since " in res.message
    assert "jobs wait in the queue, attempts intact" in res.message
    assert res.failures == [] and res.uploaded == 5
    events = [x["event"] for x in logs]
    assert events.count("remote_unavailable") == 1
    assert "job_failed" not in events and "job_retry" not in events
    # Stopped at the trip: the chunks in flight (each stops at its first failure), then
    # one batch per growing pause for about the grace; not one attempt per file.
    assert len(remote.puts) <= 2 * cfg.remotes["nas"].transfers + 6, len(remote.puts)
    jobs = e.index.all_jobs("p")
    assert len(jobs) == 195 and {(s, a) for _, s, a, _ in jobs} == {("pending", 0)}
    # A second pair on the same remote is not tried again in this run.
    res2 = e.reconcile(cfg.pairs[0], Options())
    tried = len(remote.puts)
    assert res2.status == "unavailable" and len(remote.puts) == tried

    # Back: the next run sends the rest, nothing was lost or failed.
    e.close()
    e2 = engine(cfg, Faulty(dst), Clock())
    res3 = e2.reconcile(cfg.pairs[0], Options())
    assert res3.status == "ok" and res3.uploaded == 195 and res3.failures == []
    assert tree(dst / "docs") == files


class Drops(Faulty):
    """A link that drops for a moment (`for_s` on the fake clock) from the `drop_at`-th
    upload on: what is tried meanwhile fails."""

    def __init__(self, root: Path, clock: Clock, drop_at: int, for_s: float):
        super().__init__(root)
        self.clock, self.n, self.drop_at, self.for_s = clock, 0, drop_at, for_s
        self.since: float | None = None
        self.lock = threading.Lock()

    def put(self, path: str, source: Source) -> Any:
        with self.lock:
            self.n += 1
            if self.n == self.drop_at:
                self.since = self.clock()
            down = self.since is not None and self.clock() < self.since + self.for_s
        if down:
            raise ConnectionLost("connection reset by peer", remote=self.name, path=path)
        return Faulty.put(self, path, source)


def test_a_connection_dropped_once_is_no_outage(tmp_path: Path) -> None:
    files = {f"d/f{i:03}.txt": b"y" * i for i in range(60)}
    cfg, src, dst = setup(tmp_path, files, max_attempts=2)
    clock = Clock()
    e = engine(cfg, Drops(dst, clock, drop_at=10, for_s=0.5), clock)
    e.breaker.grace["nas"] = 2.0   # as a network remote's timeout (on the fake clock)
    with capture_logs() as logs:
        res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 60 and res.failures == []
    assert "remote_unavailable" not in [x["event"] for x in logs]
    assert tree(dst / "docs") == files


def test_the_prober_backs_off_then_restores(tmp_path: Path) -> None:
    b = Breaker()
    b.trip("r", LOST)
    now = [100.0]
    tries: list[str] = []
    woke = threading.Event()

    def check(name: str) -> None:
        tries.append(name)
        if len(tries) < 3:
            raise ConnectionLost("still refused", remote=name)

    with capture_logs() as logs:
        p = Prober(b, check, initial=1.0, cap=4.0, log=_Log(), wake=woke.set,
                   clock=lambda: now[0])
        assert p.next_at() == 101.0
        p.tick()                      # not due yet
        assert tries == []
        for expect_next in (103.0, 107.0):
            now[0] = p.next_at() or 0.0
            woke.clear()
            p.tick()
            assert woke.wait(5), "the probe did not report"   # a bound on a hang
            assert p.next_at() == expect_next                  # failed: doubled delay
        now[0] = 107.0
        woke.clear()
        p.tick()
        assert woke.wait(5)
    assert tries == ["r", "r", "r"] and b.down("r") is None
    (back,) = p.take_back()
    assert back.remote == "r" and p.take_back() == [] and p.next_at() is None
    del logs


class _Log:
    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None

