"""Watching local roots: watchdog observers → per-pair "something changed" marks, debounced.

The observer thread only records a timestamp per pair (never blocks, never does I/O);
the daemon asks `Debouncer.due()` which pairs are quiet long enough to scan.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from syncd.model import TMP_PREFIX, TRASH_DIR

# Events that change nothing on disk: our own reads of a file being uploaded produce them.
_IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})


# A file modified and not yet closed is still being written (inotify's IN_CLOSE_WRITE
# arrives as watchdog's "closed"). Not "created": for a directory that appears with files
# already in it, watchdog makes up "created" events (no close follows), so a file counts
# as written only once a write is seen.
_WRITE_EVENTS = frozenset({"modified"})
_GONE_EVENTS = frozenset({"closed", "deleted", "moved"})


@dataclass
class _Mark:
    first: float
    last: float
    writing: set[str] = field(default_factory=set)   # files open for writing


class Debouncer:
    """A pair is due when no event came for `debounce` seconds and no file of it is still
    open for writing, or when its first unsynced event is `max_delay` old (a file written
    continuously, or held open, is still synced that often)."""

    def __init__(self, debounce: float, max_delay: float,
                 clock: Callable[[], float] = time.monotonic):
        self.debounce = debounce
        self.max_delay = max(max_delay, debounce)
        self.clock = clock
        self._marks: dict[str, _Mark] = {}
        self._lock = threading.Lock()
        self.wake = threading.Event()   # set on every event: the daemon loop waits on it

    def touch(self, pair: str, now: float | None = None, path: str = "",
              event: str = "") -> None:
        """An event under `pair`; `path` and `event` (watchdog's event type, for files)
        tell which files are still open for writing."""
        t = self.clock() if now is None else now
        with self._lock:
            m = self._marks.get(pair)
            if m is None:
                m = self._marks[pair] = _Mark(t, t)
            else:
                m.last = t
            if path:
                if event in _WRITE_EVENTS:
                    m.writing.add(path)
                elif event in _GONE_EVENTS:
                    m.writing.discard(path)
        self.wake.set()

    def _due_at(self, m: _Mark) -> float:
        if m.writing:
            return m.first + self.max_delay
        return min(m.last + self.debounce, m.first + self.max_delay)

    def due(self, now: float | None = None) -> list[str]:
        """Pairs to scan now (their marks are cleared)."""
        t = self.clock() if now is None else now
        out = []
        with self._lock:
            for pair, m in list(self._marks.items()):
                if t >= self._due_at(m):
                    out.append(pair)
                    del self._marks[pair]
        return out

    def next_due(self) -> float | None:
        """When the earliest pending pair becomes due (clock time), or None."""
        with self._lock:
            if not self._marks:
                return None
            return min(self._due_at(m) for m in self._marks.values())


def relevant(rel: str, ignored: Callable[[str], bool]) -> bool:
    """Whether a change at `rel` (relative to the pair's root) can matter to the sync."""
    if not rel or rel == ".":
        return True
    parts = rel.split("/")
    if parts[0] == TRASH_DIR or any(p.startswith(TMP_PREFIX) for p in parts):
        return False
    return not ignored(rel)


class WatchError(Exception):
    pass


class Watcher:
    """One watchdog observer over every pair's root; events become Debouncer marks.

    A pair whose watch is lost, or was never complete, is reported by `take_lost()` (the
    daemon then scans it periodically): the root replaced, deleted or unmounted (seen by
    `check_roots()`, or by an event on the root itself), or a subdirectory that could not
    be watched (the inotify watch limit: watchdog skips those silently). A kernel queue
    overflow (events dropped) marks the pair changed, so it is scanned in full."""

    def __init__(self, debouncer: Debouncer, log: Any):
        self.debouncer = debouncer
        self.log = log
        self.observer: Any = None
        self.watched: dict[str, str] = {}   # pair -> root
        self._ident: dict[str, tuple[int, int]] = {}   # pair -> root's (st_dev, st_ino)
        self._handles: dict[str, Any] = {}
        self._lost: dict[str, str] = {}     # pair -> why; filled from watchdog's thread
        self._dead: list[Any] = []          # watches lost, to unschedule (reap)
        self._over: set[str] = set()        # past the watch limit while being scheduled
        self._lock = threading.Lock()
        self._track = False

    def start(self, roots: dict[str, tuple[str, Callable[[str], bool]]]) -> list[str]:
        """Watch each pair's root; returns the pairs that could not be watched (they fall
        back to periodic scans), after logging why."""
        from watchdog.observers import Observer

        _install_hooks(self.log)
        # Only inotify reports a file's close after writing; elsewhere (macOS FSEvents,
        # polling) a modified file would look open for ever: do not track writers there.
        self._track = getattr(Observer, "__name__", "") == "InotifyObserver"
        self.observer = Observer()
        try:
            self.observer.start()
        except OSError as e:
            for pair, (root, _) in roots.items():
                self._log_watch_error(pair, root, e)
            self.observer = None
            return list(roots)
        # Scheduled on the running observer, one pair at a time: a pair past the watch
        # limit fails alone (schedule() raises for it), never the observer's start.
        return [pair for pair, (root, ignored) in roots.items()
                if not self._schedule(pair, root, ignored)]

    def watch(self, pair: str, root: str, ignored: Callable[[str], bool]) -> bool:
        """Watch a pair again (its root is back); False if it cannot be watched yet."""
        if self.observer is None:
            return False
        self.reap()
        return self._schedule(pair, root, ignored, quiet=True)

    def _schedule(self, pair: str, root: str, ignored: Callable[[str], bool],
                  quiet: bool = False) -> bool:
        key = os.fsencode(root)
        # Known to the hooks before scheduling: on a running observer, schedule() adds the
        # inotify watches itself, and one refused there must be seen.
        _WATCHERS[key] = (self, pair)
        try:
            st = os.stat(root)
            h = self.observer.schedule(_handler(self, pair, root, ignored), root, recursive=True)
        except OSError as e:
            _WATCHERS.pop(key, None)
            if e.errno == errno.ENOSPC and os.path.isdir(root):
                # Out of watches while registering the tree (watchdog >= 7.1.1 says so
                # itself): as a folder refused by the hook, the pair is lost to the limit.
                self._over_limit(pair, root, str(e))
                self.lose(pair, "watch_limit", scheduled=False)
                return True
            if not quiet:
                self._log_watch_error(pair, root, e)
            return False
        with self._lock:
            self.watched[pair] = root
            self._ident[pair] = (st.st_dev, st.st_ino)
            self._handles[pair] = h
            self._lost.pop(pair, None)
            over = pair in self._over
            self._over.discard(pair)
        if over:
            self.lose(pair, "watch_limit")
        return True

    def _over_limit(self, pair: str, root: str, error: str) -> None:
        """A directory under the pair's root could not be watched (from watchdog's hook).
        Logged once per pair and scheduling: scheduling a big tree past the limit refuses
        every directory after the limit, and each log line counts the tree's folders."""
        with self._lock:
            scheduling = pair not in self.watched
            first = not scheduling or pair not in self._over
            if scheduling:
                self._over.add(pair)   # _schedule() loses it once it is recorded
        if first:
            self._log_limit(pair, root, error)
        if not scheduling:
            self.lose(pair, "watch_limit")

    def overflowed(self, pair: str, rewatch: bool) -> None:
        """The kernel dropped events of the pair (from watchdog's threads): scanned in full.
        `rewatch`: watchdog did not rebuild its watches itself (a folder made meanwhile
        has none), so the watch is placed again."""
        self.log.warning("watch_overflow", pair=pair,
                         note="the kernel dropped file events: rescanning the pair")
        if rewatch:
            self.lose(pair, "overflow")
        else:
            self.debouncer.touch(pair)

    def lose(self, pair: str, why: str, scheduled: bool = True) -> None:
        """Stop trusting a pair's watch (from any thread); the daemon polls it instead.
        `scheduled=False`: it never got one (refused while being scheduled)."""
        if not scheduled:
            with self._lock:
                self._lost[pair] = why
                self._over.discard(pair)
            self.debouncer.touch(pair)
            return
        with self._lock:
            root = self.watched.pop(pair, None)
            if root is None:
                return
            self._lost[pair] = why
            h = self._handles.pop(pair, None)
            self._ident.pop(pair, None)
            _WATCHERS.pop(os.fsencode(root), None)
            if h is not None:
                # Unscheduled by reap(), from the daemon's thread: not here (this may be
                # watchdog's own thread, which unscheduling joins), and before any new
                # watch of the same path (watchdog would take it for the old one).
                self._dead.append(h)
        self.debouncer.touch(pair)

    def reap(self) -> None:
        """Unschedule the watches lost since the last call (the daemon's thread only)."""
        with self._lock:
            dead, self._dead = self._dead, []
        obs = self.observer
        for h in dead:
            with contextlib.suppress(Exception):   # already gone with its root
                if obs is not None:
                    obs.unschedule(h)

    def take_lost(self) -> dict[str, str]:
        with self._lock:
            out, self._lost = self._lost, {}
        return out

    def check_roots(self) -> None:
        """A root deleted, replaced (moved aside and copied back) or unmounted keeps no
        working watch; a stat per pair tells."""
        for pair, root in list(self.watched.items()):
            try:
                st = os.stat(root)
                same = (st.st_dev, st.st_ino) == self._ident.get(pair)
            except OSError:
                same = False
            if not same:
                self.lose(pair, "root_replaced")

    def _log_watch_error(self, pair: str, root: str, e: OSError) -> None:
        if e.errno == errno.ENOSPC:
            self._log_limit(pair, root, str(e))
        else:
            self.log.error("watch_failed", pair=pair, path=root, error=str(e),
                           fallback="periodic scans")

    def _log_limit(self, pair: str, root: str, error: str) -> None:
        n = _count_dirs(root)
        self.log.error("watch_limit", pair=pair, path=root, error=error,
                       fix=f"raise fs.inotify.max_user_watches to at least "
                           f"{n + 8192} (this tree has {n} directories): "
                           f"sysctl fs.inotify.max_user_watches={n + 8192}, then "
                           "restart syncd", fallback="periodic scans")

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None
        with self._lock:
            for root in self.watched.values():
                _WATCHERS.pop(os.fsencode(root), None)
            self.watched.clear()


def _handler(w: Watcher, pair: str, root: str, ignored: Callable[[str], bool]) -> Any:
    from watchdog.events import FileSystemEventHandler

    deb = w.debouncer

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            kind = event.event_type
            if kind in _IGNORED_EVENTS:
                return
            if kind == "events_lost":   # watchdog >= 7.1.1, after rebuilding its watches
                w.overflowed(pair, rewatch=False)
                return
            for p in (event.src_path, getattr(event, "dest_path", "")):
                if not p:
                    continue
                p = os.fsdecode(p)
                if p == root and kind in ("deleted", "moved"):
                    w.lose(pair, "root_replaced")   # the root itself: its watch is gone
                    return
                rel = os.path.relpath(p, root) if p != root else ""
                if rel == ".." or rel.startswith("../"):   # not under this root
                    continue
                if relevant(rel.replace(os.sep, "/"), ignored):
                    deb.touch(pair, path="" if event.is_directory or not w._track else p,
                              event=kind)
                    return

    return Handler()


# root (bytes, as watchdog keeps it) -> (watcher, pair), for the hooks below
_WATCHERS: dict[bytes, tuple[Watcher, str]] = {}
_off_logged = False


def _install_hooks(log: Any) -> None:
    """What watchdog's inotify observer handles silently, made visible through
    syncd.compat.watchdog; a feature that is off on this watchdog is logged once."""
    global _off_logged
    from syncd.compat import watchdog as compat

    plan = compat.install(_on_limit, _on_overflow)
    if plan is not None and not _off_logged:
        _off_logged = True
        for off in plan.off():
            off.log(log)


def _on_limit(root: bytes, path: bytes) -> None:
    hit = _WATCHERS.get(root)
    if hit is not None:
        hit[0]._over_limit(hit[1], os.fsdecode(root), f"cannot watch {os.fsdecode(path)}")


def _on_overflow(root: bytes | None) -> None:
    """From watchdog's threads. root None: every watched root (the watchdog that says so
    keeps its watches as they were, so each is placed again)."""
    hits = list(_WATCHERS.values()) if root is None else [_WATCHERS.get(root)]
    for hit in hits:
        if hit is not None:
            hit[0].overflowed(hit[1], rewatch=root is None)


def _count_dirs(root: str) -> int:
    n = 0
    for _, dirs, _ in os.walk(root):
        n += len(dirs) + 1
    return n
