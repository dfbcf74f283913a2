"""The persistent transfer queue: enqueue (newest intent per path wins), lease, settle with
retry/backoff (full jitter) or park as failed. Clock and randomness are passed in."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from syncd.breaker import connection_level
from syncd.errors import PermanentError, SourceChanged, TransientError
from syncd.index import Done, Index, Unqueued
from syncd.model import Action, Base, Job, LocalState, phase


def next_try(attempt: int, now: float, rand: Callable[[], float], base: float = 1.0,
             cap: float = 300.0) -> float:
    """When a job that failed `attempt` times (>= 1) may run again: full jitter backoff."""
    return now + rand() * min(cap, base * 2 ** (attempt - 1))


@dataclass(slots=True)
class Outcome:
    """What a worker did with one job; the queue turns it into a commit."""

    job: Job
    base: Base | None = None
    local: LocalState | None = None
    racy: bool = False
    error: BaseException | None = None
    bytes: int = 0
    duration_ms: int = 0
    note: str = ""             # e.g. "vanished", "not empty"
    keep_base: bool = False    # nothing changed on the remote; leave base as it is
    sent: bool = False         # the file's bytes went to the remote (an upload's, or
                               # an attrs job's that had to send the whole file)


@dataclass(slots=True)
class Settled:
    done: list[Outcome] = field(default_factory=list)
    retried: list[tuple[Outcome, float]] = field(default_factory=list)
    failed: list[tuple[Outcome, str]] = field(default_factory=list)
    # Failed for the remote's sake (refused, reset, silent, login): pending again with
    # their attempts as they were, an outage never parks a job.
    held: list[Outcome] = field(default_factory=list)


class Queue:
    def __init__(self, index: Index, owner: str, *, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random, retry_initial: float = 1.0,
                 retry_max: float = 300.0, max_attempts: int = 10, lease_timeout: float = 600.0):
        self.index = index
        self.owner = owner
        self.clock = clock
        self.rand = rand
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_attempts = max_attempts
        self.lease_timeout = lease_timeout

    def enqueue(self, pair: str, actions: Iterable[Action]) -> None:
        self.index.enqueue(pair, actions, phase, self.clock())

    def enqueue_leased(self, pair: str, actions: Iterable[Action]) -> list[Job]:
        """Enqueue, and lease to this owner at once the jobs that are new to the queue: a
        runner about to run them skips the lease round trip. Phase order is then the
        runner's to keep (see transfer.Runner)."""
        now = self.clock()
        return self.index.enqueue(pair, actions, phase, now, (self.owner, now + self.lease_timeout))

    def unqueued(self, pair: str, actions: Iterable[Action]) -> list[Job]:
        """Jobs that run without a row in the queue (negative ids), for a streamed first
        sync: its crash recovery is the plan of the next run (every file without a base
        is uploaded or adopted), so a row per file (written, then deleted a moment later)
        would only cost, ~18 % of that run's time. One that does not succeed gets its row
        then, a retry (pending, with its backoff) or a parked failure, as any job would;
        so does one given back unfinished (release).

        Only phase-0 jobs (uploads, mkdirs: what a plan into an empty remote holds): the
        runner's phase gate and lease() read phases from the queue's rows, and nothing
        of a lower phase exists to wait for, so none of these jobs need be seen there."""
        now = self.clock()
        jobs = []
        for a in actions:
            if phase(a) != 0:
                raise ValueError(f"{a.op.value} of {a.path!r} is of phase {phase(a)}: only "
                                 "phase-0 jobs may run without a queue row")
            jobs.append(Job(next(_unqueued_ids), pair, a.path, a, 0, now, None))
        return jobs

    def reclaim(self, exclusive: bool = True) -> int:
        """Leases of crashed processes go back to pending. With the state-dir lock held
        (`exclusive`), every lease not ours is dead; otherwise only expired ones."""
        return self.index.reclaim(self.clock(), self.owner if exclusive else None)

    def lease(self, limit: int, pairs: Sequence[str] | None = None) -> list[Job]:
        now = self.clock()
        return self.index.lease(self.owner, now, now + self.lease_timeout, limit, pairs)

    def release(self, jobs: Sequence[Job]) -> None:
        """Give leased-but-unfinished jobs back (e.g. when a run stops early): pending
        again, and a job that ran without a row (unqueued) gets one."""
        ids = [j.id for j in jobs if j.id > 0]
        if ids:
            self.index.release(ids)
        rows: dict[str, list[Unqueued]] = {}
        for j in jobs:
            if j.id < 0:
                rows.setdefault(j.pair, []).append(
                    Unqueued(j.action, "pending", j.attempts, 0.0, None))
        for pair, new in rows.items():
            self.index.add_unqueued(pair, new, self.clock())

    def classify(self, o: Outcome) -> tuple[str, float | str]:
        """("done", 0) | ("retry", not_before) | ("hold", not_before) | ("failed",
        message): by type, not text. "hold": a failure of the remote as a whole, which
        does not count as an attempt (the circuit breaker deals with it)."""
        e = o.error
        if e is None:
            return "done", 0.0
        if connection_level(e):
            return "hold", next_try(1, self.clock(), self.rand, self.retry_initial,
                                    self.retry_max)
        attempts = o.job.attempts + 1
        msg = str(e) or type(e).__name__
        if isinstance(e, (TransientError, SourceChanged)):
            if attempts >= self.max_attempts:
                return "failed", f"gave up after {attempts} attempts: {msg}"
            return "retry", next_try(attempts, self.clock(), self.rand, self.retry_initial,
                                     self.retry_max)
        if isinstance(e, PermanentError):
            return "failed", msg
        return "failed", f"internal error ({type(e).__name__}): {msg}"

    def settle(self, pair: str, outcomes: Sequence[Outcome]) -> Settled:
        s = Settled()
        done: list[Done] = []
        retry: list[tuple[int, float, str, int]] = []
        failed: list[tuple[int, str, int]] = []
        new_rows: list[Unqueued] = []
        for o in outcomes:
            verdict, val = self.classify(o)
            j = o.job
            if verdict == "done":
                s.done.append(o)
                done.append(Done(j.id, j.path, o.base, o.local, o.racy, o.keep_base))
            elif verdict in ("retry", "hold"):
                assert isinstance(val, float)
                attempts = j.attempts + (verdict == "retry")
                if verdict == "retry":
                    s.retried.append((o, val))
                else:
                    s.held.append(o)
                if j.id < 0:
                    new_rows.append(Unqueued(j.action, "pending", attempts, val, str(o.error)))
                else:
                    retry.append((j.id, val, str(o.error), attempts))
            else:
                assert isinstance(val, str)
                s.failed.append((o, val))
                if j.id < 0:
                    new_rows.append(Unqueued(j.action, "failed", j.attempts + 1, 0.0, val))
                else:
                    failed.append((j.id, val, j.attempts + 1))
        self.index.finish(pair, done, retry, failed, self.clock(), new_rows)
        return s


# Ids of unqueued jobs: negative, unique in this process (queue rows have positive ones).
_unqueued_ids = itertools.count(-1, -1)
