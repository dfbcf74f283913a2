"""Watching local roots: watchdog observers → per-pair "something changed" marks, debounced.

The observer thread only records a timestamp per pair (never blocks, never does I/O);
the daemon asks `Debouncer.due()` which pairs are quiet long enough to scan.
"""

from __future__ import annotations

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
    """One watchdog observer over every pair's root; events become Debouncer marks."""

    def __init__(self, debouncer: Debouncer, log: Any):
        self.debouncer = debouncer
        self.log = log
        self.observer: Any = None
        self.watched: dict[str, str] = {}   # pair -> root

    def start(self, roots: dict[str, tuple[str, Callable[[str], bool]]]) -> list[str]:
        """Watch each pair's root; returns the pairs that could not be watched (they fall
        back to periodic scans), after logging why."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        deb = self.debouncer
        # Only inotify reports a file's close after writing; elsewhere (macOS FSEvents,
        # polling) a modified file would look open for ever: do not track writers there.
        track = Observer.__name__ == "InotifyObserver"

        class Handler(FileSystemEventHandler):
            def __init__(self, pair: str, root: str, ignored: Callable[[str], bool]):
                self.pair, self.root, self.ignored = pair, root, ignored

            def on_any_event(self, event: Any) -> None:
                kind = event.event_type
                if kind in _IGNORED_EVENTS:
                    return
                for p in (event.src_path, getattr(event, "dest_path", "")):
                    if not p:
                        continue
                    p = os.fsdecode(p)
                    rel = os.path.relpath(p, self.root) if p != self.root else ""
                    if rel == ".." or rel.startswith("../"):   # not under this root
                        continue
                    if relevant(rel.replace(os.sep, "/"), self.ignored):
                        deb.touch(self.pair, path="" if event.is_directory or not track
                                  else p, event=kind)
                        return

        self.observer = Observer()
        failed = []
        for pair, (root, ignored) in roots.items():
            try:
                self.observer.schedule(Handler(pair, root, ignored), root, recursive=True)
                self.watched[pair] = root
            except OSError as e:
                failed.append(pair)
                self._log_watch_error(pair, root, e)
        try:
            self.observer.start()
        except OSError as e:
            for pair, root in self.watched.items():
                self._log_watch_error(pair, root, e)
            failed += list(self.watched)
            self.watched.clear()
        return failed

    def _log_watch_error(self, pair: str, root: str, e: OSError) -> None:
        if e.errno == errno.ENOSPC:
            n = _count_dirs(root)
            self.log.error("watch_limit", pair=pair, path=root, error=str(e),
                           fix=f"raise fs.inotify.max_user_watches to at least "
                               f"{n + 8192} (this tree has {n} directories): "
                               f"sysctl fs.inotify.max_user_watches={n + 8192}",
                           fallback="periodic scans")
        else:
            self.log.error("watch_failed", pair=pair, path=root, error=str(e),
                           fallback="periodic scans")

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None
        self.watched.clear()


def _count_dirs(root: str) -> int:
    n = 0
    for _, dirs, _ in os.walk(root):
        n += len(dirs) + 1
    return n
