"""The daemon's probes of unavailable remotes: connect and stat the root, from a thread of
their own with growing delays, so one dead remote never holds up the other pairs; a probe
that gets through puts the remote back in service (`remote_available`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from syncd.breaker import Breaker, Down, probe_delay
from syncd.errors import SyncdError


class Prober:
    """Probes the remotes the breaker took out of service. `check(name)` connects to the
    remote and stats its root (raises if it cannot); `wake()` tells the daemon's loop
    that a probe finished."""

    def __init__(self, breaker: Breaker, check: Callable[[str], None], *, initial: float,
                 cap: float, log: Any, wake: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic):
        self.breaker = breaker
        self.check = check
        self.initial = initial
        self.cap = cap
        self.log = log
        self.wake = wake
        self.clock = clock
        self._next: dict[str, float] = {}     # remote -> when its next probe starts
        self._attempt: dict[str, int] = {}
        self._running: set[str] = set()
        self._back: list[Down] = []
        self._lock = threading.Lock()

    def next_at(self) -> float | None:
        """When the earliest probe is due (clock time), or None."""
        self._schedule_new()
        with self._lock:
            due = [t for r, t in self._next.items() if r not in self._running]
        return min(due) if due else None

    def tick(self) -> None:
        """Start the probes that are due (each in a thread)."""
        self._schedule_new()
        now = self.clock()
        with self._lock:
            due = [r for r, t in self._next.items() if t <= now and r not in self._running]
            self._running.update(due)
        for r in due:
            threading.Thread(target=self._probe, args=(r,), daemon=True,
                             name=f"probe-{r}").start()

    def take_back(self) -> list[Down]:
        """The remotes back in service since the last call (their outage, as it was)."""
        with self._lock:
            out, self._back = self._back, []
        return out

    def forget(self, remote: str) -> None:
        """No longer probe `remote` (removed by a reload)."""
        with self._lock:
            self._next.pop(remote, None)
            self._attempt.pop(remote, None)
        self.breaker.restore(remote)

    def _schedule_new(self) -> None:
        for name in self.breaker.all_down():
            with self._lock:
                if name not in self._next:
                    self._attempt[name] = 1
                    self._next[name] = self.clock() + probe_delay(1, self.initial, self.cap)

    def _probe(self, remote: str) -> None:
        try:
            self.check(remote)
        except (SyncdError, OSError) as e:
            with self._lock:
                n = self._attempt[remote] = self._attempt.get(remote, 1) + 1
                delay = probe_delay(n, self.initial, self.cap)
                self._next[remote] = self.clock() + delay
                self._running.discard(remote)
            self.log.info("remote_probe_failed", remote=remote, error=str(e),
                          next_probe_in_s=round(delay, 3))
            self.wake()   # the loop's next wake-up is the next probe
            return
        except BaseException as e:   # a bug must not kill the probing for good
            with self._lock:
                self._next[remote] = self.clock() + self.cap
                self._running.discard(remote)
            self.log.error("remote_probe_failed", remote=remote, error=repr(e), exc_info=e)
            return
        down = self.breaker.restore(remote)
        with self._lock:
            self._next.pop(remote, None)
            self._attempt.pop(remote, None)
            self._running.discard(remote)
            if down is not None:
                self._back.append(down)
        if down is not None:
            self.log.info("remote_available", remote=remote,
                          down_s=round(max(0.0, time.time() - down.since), 3))
        self.wake()


__all__ = ["Prober"]
