"""watchdog's inotify observer where its public API does not say enough.

Two things syncd must know and watchdog's inotify observer does not always tell:

- **A subdirectory it could not watch** (the fs.inotify.max_user_watches limit). Public
  where it can: from 7.1.1 `schedule()` raises OSError(ENOSPC) when the first recursive
  registration runs out of watches. A directory created later past the limit, and on 7.0.0
  and 7.1.0 any directory, is skipped without a word: learned by wrapping
  `InotifyWatchGroup._add_callback`.
- **A kernel queue overflow** (events dropped). Public from 7.1.1: an `EventsLostEvent`
  reaches the handler (watch.py handles it; nothing here). 7.1.0 calls
  `InotifyWatchGroup.on_queue_overflow` (wrapped); 7.0.0 drops the overflow record while
  parsing (`InotifyFD._parse_event_buffer`, wrapped), so the caller is told for every root.

The wrappers are installed only on the versions in VERIFIED; on any other version the
feature is off and `install()` returns what the caller logs once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from syncd.compat import FeatureOff, installed_version

# The versions whose private methods below were read and tested (tests/unit/test_watch.py
# runs on each: scripts/test.sh --deps watchdog==VERSION).
VERIFIED = ("7.0.0", "7.1.0", "7.1.1")
_IN_Q_OVERFLOW = 0x4000

# on_limit(root, path): a directory under a watched root could not be watched.
LimitHook = Callable[[bytes, bytes], None]
# on_overflow(root): the kernel dropped events for `root`, or for every root (None).
OverflowHook = Callable[[bytes | None], None]


@dataclass(frozen=True, slots=True)
class Plan:
    """Which hooks a watchdog version gets."""

    version: str
    limit: str      # "wrap-dict" (7.0/7.1.0), "wrap-tree" (7.1.1), "" (off)
    overflow: str   # "event" (public EventsLostEvent), "wrap-group", "wrap-parse", "" (off)

    def off(self) -> list[FeatureOff]:
        out = []
        fix = (f"install a verified watchdog ({', '.join(VERIFIED)}): "
               "pip install -r requirements/run.lock")
        if not self.limit:
            out.append(FeatureOff(
                "watchdog", self.version, "watch_limit_detection",
                "a folder past fs.inotify.max_user_watches is not reported; changes "
                "there wait for the periodic full reconcile", fix))
        if not self.overflow:
            out.append(FeatureOff(
                "watchdog", self.version, "overflow_detection",
                "events the kernel drops are not noticed; they wait for the periodic "
                "full reconcile", fix))
        return out


def plan_for(version: str, has_events_lost: bool) -> Plan:
    """Pure: the hooks for `version` (has_events_lost: watchdog.events has
    EventsLostEvent, the public overflow report)."""
    limit = {"7.0.0": "wrap-dict", "7.1.0": "wrap-dict", "7.1.1": "wrap-tree"}.get(version, "")
    hooked = {"7.0.0": "wrap-parse", "7.1.0": "wrap-group"}.get(version, "")
    overflow = "event" if has_events_lost else hooked
    return Plan(version, limit, overflow)


_lock = threading.Lock()
_installed: Plan | None = None
_originals: list[tuple[Any, str, Any]] = []


def install(on_limit: LimitHook, on_overflow: OverflowHook,
            version: str | None = None) -> Plan | None:
    """Install the hooks the installed watchdog gets (once per process; later calls
    return the same plan). None where there is no inotify (not Linux)."""
    global _installed
    try:
        from watchdog.observers import inotify, inotify_c
    except ImportError:
        return None
    with _lock:
        if _installed is not None:
            return _installed
        import watchdog.events as events

        plan = plan_for(version or installed_version("watchdog"),
                        hasattr(events, "EventsLostEvent"))
        group_cls = inotify.InotifyWatchGroup
        if plan.limit:
            _wrap(group_cls, "_add_callback", _limit_wrapper(plan.limit, on_limit))
        if plan.overflow == "wrap-group":
            _wrap(group_cls, "on_queue_overflow", _group_overflow_wrapper(on_overflow))
        elif plan.overflow == "wrap-parse":
            _wrap(inotify_c.InotifyFD, "_parse_event_buffer", _parse_wrapper(on_overflow),
                  static=True)
        _installed = plan
        return plan


def uninstall() -> None:
    """Restore watchdog's own methods (tests)."""
    global _installed
    with _lock:
        while _originals:
            cls, name, orig = _originals.pop()
            setattr(cls, name, orig)
        _installed = None


def _wrap(cls: Any, name: str, make: Callable[[Any], Any], static: bool = False) -> None:
    orig = cls.__dict__[name]
    _originals.append((cls, name, orig))
    fn = make(orig.__func__ if static else orig)
    setattr(cls, name, staticmethod(fn) if static else fn)


def _limit_wrapper(kind: str, on_limit: LimitHook) -> Callable[[Any], Any]:
    def make(add: Any) -> Any:
        def _add_callback(group: Any, path: bytes) -> None:
            add(group, path)   # 7.1.1 raises here on a first registration: schedule() tells
            root = group.path
            if path == root or _watched(kind, group, path):
                return
            # Not a directory that vanished meanwhile, nor one this user cannot read (the
            # scan reports that one): what is left is the watch limit.
            if (os.path.isdir(path) and not os.path.islink(path)
                    and os.access(path, os.R_OK | os.X_OK)):
                on_limit(root, path)

        return _add_callback

    return make


def _watched(kind: str, group: Any, path: bytes) -> bool:
    if kind == "wrap-tree":
        node = group._find_node_by_path(path)
        return node is not None and int(node.wd) != -1
    return path in group._active_callbacks_by_path


def _group_overflow_wrapper(on_overflow: OverflowHook) -> Callable[[Any], Any]:
    def make(overflow: Any) -> Any:
        def on_queue_overflow(group: Any) -> None:
            overflow(group)   # watchdog rebuilds the group's watches
            on_overflow(group.path)

        return on_queue_overflow

    return make


def _parse_wrapper(on_overflow: OverflowHook) -> Callable[[Any], Any]:
    def make(parse: Any) -> Any:
        def _parse_event_buffer(event_buffer: bytes) -> Iterator[Any]:
            lost = False
            for rec in parse(event_buffer):
                if rec[0] == -1 and rec[1] & _IN_Q_OVERFLOW:
                    lost = True
                yield rec
            if lost:   # after the records read with it: a rescan sees them too
                on_overflow(None)

        return _parse_event_buffer

    return make


def overflow_record() -> bytes:
    """The bytes of a kernel IN_Q_OVERFLOW record (tests feed it to watchdog's parser)."""
    import struct

    return struct.pack("iIII", -1, _IN_Q_OVERFLOW, 0, 0)


__all__ = ["VERIFIED", "Plan", "install", "overflow_record", "plan_for", "uninstall"]
