"""The per-remote circuit breaker: a few connection-level failures in a row, across jobs,
make a remote *unavailable*, one state instead of one failure per file.

Pure bookkeeping (the clock is passed in): the runner records each job's outcome, stops
giving the remote work once it trips, and the engine and daemon report and probe it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from syncd.errors import AuthError, ConnectionLost, HostKeyError, NotTried, UnavailableError

# Connection-level failures in a row that make a remote unavailable, over at least the
# remote's grace (its `timeout`): a connection that drops once fails every transfer in
# flight on it at the same moment, and their retries reconnect once a short blip is over;
# a server that is gone fails the retries too, for longer than that.
THRESHOLD = 3


def connection_level(e: BaseException | None) -> bool:
    """About the whole remote (refused, reset, silent, TLS, host key, login), not one
    path: these never count against a job's attempts."""
    return isinstance(e, (ConnectionLost, UnavailableError))


@dataclass(frozen=True, slots=True)
class Down:
    """A remote the breaker took out of service."""

    remote: str
    reason: str        # the last connection-level error
    since: float       # clock time it tripped
    auth: bool         # a refusal of us (login, host key): waiting will not fix it alone
    message: str = ""  # the error as the user reads it (remote and path named)


class Breaker:
    """Counts connection-level failures per remote; `threshold` in a row, the streak
    lasting at least the remote's `grace`, trip it; a refusal (UnavailableError) trips it
    at once. Any other
    outcome (a success, or a failure about one path: the server answered) resets the
    count. Thread-safe: the runner and the daemon's probes share one."""

    def __init__(self, threshold: int = THRESHOLD, clock: Callable[[], float] = time.time,
                 grace: dict[str, float] | None = None,
                 backoff: tuple[float, float] = (1.0, 60.0)):
        self.threshold = threshold
        self.clock = clock
        # A suspect remote is tried again after these delays (doubling), not by every
        # job in the queue as fast as they fail.
        self.backoff = backoff
        self._next_try: dict[str, float] = {}
        self._rounds: dict[str, int] = {}
        self.grace = dict(grace or {})     # remote -> seconds a streak must last (timeout)
        self._first: dict[str, float] = {}   # remote -> when its streak of failures began
        self._run: dict[str, int] = {}
        self._down: dict[str, Down] = {}
        self._lock = threading.Lock()

    def record(self, remote: str, error: BaseException | None) -> Down | None:
        """One job's outcome on `remote`. Returns the Down state when this outcome
        tripped the breaker (once per outage), else None."""
        with self._lock:
            if isinstance(error, NotTried):
                return None
            if error is None or not connection_level(error):
                self._run[remote] = 0
                self._next_try.pop(remote, None)
                self._rounds.pop(remote, None)
                return None
            now = self.clock()
            n = self._run[remote] = self._run.get(remote, 0) + 1
            if n == 1:
                self._first[remote] = now
            if now >= self._next_try.get(remote, 0.0):   # a new round of tries failed
                k = self._rounds[remote] = self._rounds.get(remote, 0) + 1
                self._next_try[remote] = now + probe_delay(k, *self.backoff)
            # "Cannot be used" (a login refused, a root not there) is no flaky network:
            # the first one is enough.
            if remote in self._down or (not isinstance(error, UnavailableError) and (
                    n < self.threshold
                    or now - self._first[remote] < self.grace.get(remote, 0.0))):
                return None
            d = Down(remote, _reason(error), self.clock(), _refused(error), _message(error))
            self._down[remote] = d
            return d

    def trip(self, remote: str, error: BaseException) -> Down | None:
        """Out of service at once (a listing or check that could not connect). Returns
        the Down state if it is new."""
        with self._lock:
            if remote in self._down:
                return None
            d = Down(remote, _reason(error), self.clock(), _refused(error), _message(error))
            self._down[remote] = d
            self._run[remote] = self.threshold
            return d

    def wait(self, remote: str) -> float:
        """Seconds before a suspect remote may be tried again (0: now)."""
        with self._lock:
            t = self._next_try.get(remote)
        return 0.0 if t is None else max(0.0, t - self.clock())

    def suspect(self, remote: str) -> bool:
        """The remote's last outcome was a connection-level failure: until it answers
        again, one batch at a time tests it (not every worker, each paying a timeout)."""
        with self._lock:
            return self._run.get(remote, 0) > 0

    def down(self, remote: str) -> Down | None:
        with self._lock:
            return self._down.get(remote)

    def all_down(self) -> dict[str, Down]:
        with self._lock:
            return dict(self._down)

    def restore(self, remote: str) -> Down | None:
        """Back in service (a probe reached it). Returns the Down state it was in."""
        with self._lock:
            self._run[remote] = 0
            self._next_try.pop(remote, None)
            self._rounds.pop(remote, None)
            return self._down.pop(remote, None)


def _message(e: BaseException) -> str:
    """A refusal's own words (they name the key or file to fix); a lost connection is
    said without the path of the job that met it."""
    return str(e) if isinstance(e, UnavailableError) else ""


def _refused(e: BaseException) -> bool:
    return isinstance(e, (AuthError, HostKeyError))


def _reason(e: BaseException) -> str:
    return getattr(e, "reason", None) or str(e) or type(e).__name__


def probe_delay(attempt: int, initial: float, cap: float) -> float:
    """Seconds before the `attempt`-th probe (1-based) of an unavailable remote: doubling
    from `initial`, at most `cap`. No jitter: one probe per remote, not a herd."""
    return min(cap, initial * 2 ** max(0, attempt - 1))


__all__ = ["THRESHOLD", "Breaker", "Down", "connection_level", "probe_delay"]
