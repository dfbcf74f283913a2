"""Queue: newest intent wins, leases of dead processes come back, backoff with full jitter
stays in bounds, transient errors retry and permanent ones park. A fake clock: no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.errors import NotFound, PermanentError, SourceChanged, TransientError
from syncd.index import Index
from syncd.model import Action, Base, Op
from syncd.queue import Outcome, Queue, next_try


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def idx(tmp_path: Path) -> Index:
    return Index(tmp_path / "i.sqlite3")


def q(idx: Index, clock: Clock, owner: str = "me", **kw: float) -> Queue:
    return Queue(idx, owner, clock=clock, rand=lambda: 1.0, retry_initial=1.0, retry_max=60.0,
                 max_attempts=int(kw.pop("max_attempts", 3)), lease_timeout=kw.pop("lease", 600.0))


def up(path: str, reason: str = "new") -> Action:
    return Action(Op.UPLOAD, path, reason)


@given(attempt=st.integers(1, 40), r=st.floats(0, 1), base=st.floats(0.001, 10),
       cap=st.floats(0.01, 1000))
def test_backoff_is_full_jitter_within_bounds(attempt: int, r: float, base: float, cap: float) -> None:
    t = next_try(attempt, 100.0, lambda: r, base, cap)
    assert 100.0 <= t <= 100.0 + min(cap, base * 2 ** (attempt - 1)) + 1e-9


def test_backoff_grows_then_caps() -> None:
    delays = [next_try(n, 0.0, lambda: 1.0, 1.0, 60.0) for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]


def test_enqueue_is_idempotent_newest_intent_wins(idx: Index) -> None:
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("f", "first")])
    qu.enqueue("p", [up("f", "second")])
    qu.enqueue("p", [Action(Op.TRASH, "f", "third")])
    jobs = qu.lease(10)
    assert [(j.path, j.action.op, j.action.reason) for j in jobs] == [("f", Op.TRASH, "third")]


def test_enqueue_leased_hands_back_new_jobs_leased_to_us(idx: Index) -> None:
    """The runner's path: new paths come back as jobs already leased to this owner (a
    crash leaves them to reclaim); a path with a job already is upserted and left to
    lease(); a batch naming one path twice leases nothing."""
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("old", "v1")])
    jobs = qu.enqueue_leased("p", [up("a"), up("old", "v2"), up("b")])
    assert [(j.path, j.action.reason) for j in jobs] == [("a", "new"), ("b", "new")]
    rows = dict(idx.db.execute("SELECT path, state || ':' || coalesce(lease_owner, '') "
                               "FROM jobs").fetchall())
    assert rows == {"old": "pending:", "a": "leased:me", "b": "leased:me"}
    assert [(j.path, j.action.reason) for j in qu.lease(10)] == [("old", "v2")]
    assert q(idx, c, owner="other").reclaim() == 3   # a new process: every lease is stale
    assert qu.enqueue_leased("p", [up("x"), up("x", "again")]) == []
    assert {j.path for j in qu.lease(10)} >= {"x"}


def test_unqueued_jobs_get_a_row_only_when_they_do_not_succeed(idx: Index) -> None:
    """A streamed first sync's jobs (Queue.unqueued) run without queue rows: success moves
    the base and writes no job; a transient error becomes a pending row with its backoff,
    a permanent one a parked failure; one given back unfinished becomes a pending row."""
    c = Clock()
    qu = q(idx, c)
    jobs = qu.unqueued("p", [up("a"), up("b"), up("c"), Action(Op.MKDIR, "d")])
    assert [j.path for j in jobs] == ["a", "b", "c", "d"] and all(j.id < 0 for j in jobs)
    assert len({j.id for j in jobs + qu.unqueued("p", [up("a")])}) == 5
    assert idx.job_counts("p") == {}
    base = Base(1, 1, 1, b"h" * 16, "1:1", 0o644)
    s = qu.settle("p", [Outcome(jobs[0], base=base),
                        Outcome(jobs[1], error=TransientError("timeout", path="b")),
                        Outcome(jobs[2], error=PermanentError("denied", path="c"))])
    assert len(s.done) == len(s.retried) == len(s.failed) == 1
    assert idx.load_bases("p") == {"a": base}
    assert idx.all_jobs("p") == [("b", "pending", 1, "path 'b': timeout"),
                                 ("c", "failed", 1, "path 'c': denied")]
    qu.release(jobs[3:])                         # a stop: never ran
    assert [(j.path, j.attempts, j.action.op) for j in qu.lease(10)] == [("d", 0, Op.MKDIR)]
    c.t += 1.0                                   # b's backoff is over
    (j,) = qu.lease(10)
    assert (j.path, j.id > 0, j.attempts, j.action) == ("b", True, 1, up("b"))
    assert [f.path for f in idx.failed_jobs("p")] == ["c"]


def test_only_phase_0_jobs_run_without_a_queue_row(idx: Index) -> None:
    """The phase gate reads phases from queue rows: a job that others must wait for (a
    delete waits for every upload) never runs without one."""
    qu = q(idx, Clock())
    with pytest.raises(ValueError, match="phase 1"):
        qu.unqueued("p", [up("a"), Action(Op.DELETE, "x", "deleted locally")])


def test_a_failed_unqueued_job_leaves_a_running_job_of_its_path_alone(idx: Index) -> None:
    """A failure's row does not replace a row of the same path that another runner has
    leased (that job's own outcome decides what comes next)."""
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("a", "planned")])
    (running,) = qu.lease(10)
    (j,) = qu.unqueued("p", [up("a")])
    qu.settle("p", [Outcome(j, error=PermanentError("denied"))])
    assert idx.all_jobs("p") == [("a", "leased", 0, None)]
    qu.settle("p", [Outcome(running, base=Base(1, 1, 1, b"h" * 16, "1:1"))])
    assert idx.job_counts("p") == {}


def test_new_intent_waits_behind_an_inflight_job(idx: Index) -> None:
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("f", "v1")])
    (j1,) = qu.lease(10)
    qu.enqueue("p", [up("f", "v2")])
    assert qu.lease(10) == []              # no two transfers of one path at once
    qu.settle("p", [Outcome(j1)])
    (j2,) = qu.lease(10)
    assert j2.action.reason == "v2" and j2.attempts == 0


def test_lease_of_a_crashed_process_is_reclaimed(idx: Index) -> None:
    c = Clock()
    dead = q(idx, c, owner="dead-pid")
    dead.enqueue("p", [up("a"), up("b")])
    assert len(dead.lease(10)) == 2
    alive = q(idx, c, owner="new-pid")
    assert alive.lease(10) == []
    assert alive.reclaim(exclusive=True) == 2
    assert sorted(j.path for j in alive.lease(10)) == ["a", "b"]


def test_expired_lease_is_reclaimed_without_the_lock(idx: Index) -> None:
    c = Clock()
    other = q(idx, c, owner="other", lease=30.0)
    other.enqueue("p", [up("a")])
    other.lease(10)
    me = q(idx, c, owner="me")
    assert me.reclaim(exclusive=False) == 0      # still within its lease
    c.t += 31
    assert me.reclaim(exclusive=False) == 1


def test_transient_error_retries_with_backoff_then_parks(idx: Index) -> None:
    c = Clock()
    qu = q(idx, c, max_attempts=3)
    qu.enqueue("p", [up("f")])
    (j,) = qu.lease(10)
    s = qu.settle("p", [Outcome(j, error=TransientError("timeout", remote="r", path="f"))])
    ((_, not_before),) = s.retried
    assert not_before == c.t + 1.0
    assert qu.lease(10) == []                    # not before its time
    c.t = not_before
    (j,) = qu.lease(10)
    assert j.attempts == 1 and "timeout" in (j.last_error or "")
    qu.settle("p", [Outcome(j, error=SourceChanged("f"))])
    c.t += 2.0
    (j,) = qu.lease(10)
    s = qu.settle("p", [Outcome(j, error=TransientError("timeout"))])
    ((_, msg),) = s.failed
    assert msg.startswith("gave up after 3 attempts")
    assert idx.all_jobs("p") == [("f", "failed", 3, msg)]


def test_permanent_error_parks_at_once_with_its_message(idx: Index) -> None:
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("f"), up("g")])
    jf, jg = qu.lease(10)
    qu.settle("p", [Outcome(jf, error=PermanentError("permission denied", remote="nas", path="x/f")),
                    Outcome(jg, error=NotFound("no such dir", remote="nas", path="x/g"))])
    failed = idx.failed_jobs("p")
    assert [(j.path, j.last_error) for j in failed] == [
        ("f", "remote 'nas', path 'x/f': permission denied"),
        ("g", "remote 'nas', path 'x/g': no such dir")]


def test_unexpected_exception_parks_as_internal_error(idx: Index) -> None:
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("f")])
    (j,) = qu.lease(10)
    s = qu.settle("p", [Outcome(j, error=ZeroDivisionError("boom"))])
    assert s.failed[0][1] == "internal error (ZeroDivisionError): boom"


def test_deletes_wait_for_every_earlier_phase(idx: Index) -> None:
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("a"), Action(Op.TRASH, "old"), Action(Op.RMDIR, "d"),
                     Action(Op.RMDIR, "d/e")])
    assert [j.path for j in qu.lease(10)] == ["a"]
    assert qu.lease(10) == []     # the upload is still in flight: nothing else may start


def test_phases_release_in_order(idx: Index) -> None:
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("a"), Action(Op.TRASH, "old"), Action(Op.RMDIR, "d"),
                     Action(Op.RMDIR, "d/e")])
    order = []
    while jobs := qu.lease(10):
        order.append([j.path for j in jobs])
        qu.settle("p", [Outcome(j) for j in jobs])
    assert order == [["a"], ["old"], ["d/e"], ["d"]]


def test_other_pairs_are_not_blocked_by_a_pair_phase(idx: Index) -> None:
    c = Clock()
    qu = q(idx, c)
    qu.enqueue("p", [up("a")])
    qu.enqueue("q", [Action(Op.TRASH, "x")])
    assert sorted((j.pair, j.path) for j in qu.lease(10)) == [("p", "a"), ("q", "x")]
