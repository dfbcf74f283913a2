"""Debouncing and watch set-up, with an injected clock (no sleeping)."""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import pytest

from syncd.watch import Debouncer, Watcher, relevant


def test_quiet_period_then_due_once() -> None:
    d = Debouncer(0.25, 5.0, clock=lambda: 0.0)
    d.touch("a", now=10.0)
    d.touch("a", now=10.2)
    assert d.due(now=10.3) == []                 # only 0.1 s quiet
    assert d.next_due() == pytest.approx(10.45)
    assert d.due(now=10.45) == ["a"]
    assert d.due(now=11.0) == [] and d.next_due() is None


def test_continuous_writes_still_due_after_max_delay() -> None:
    d = Debouncer(0.25, 5.0, clock=lambda: 0.0)
    t = 100.0
    d.touch("a", now=t)
    while t < 104.9:
        t += 0.1
        d.touch("a", now=t)
        assert d.due(now=t) == []
    assert d.due(now=105.0) == ["a"]            # first event 5 s ago


def test_pairs_are_independent_and_touch_wakes() -> None:
    d = Debouncer(1.0, 5.0, clock=lambda: 0.0)
    d.touch("a", now=0.0)
    assert d.wake.is_set()
    d.touch("b", now=0.5)
    assert d.due(now=1.0) == ["a"] and d.due(now=1.5) == ["b"]


def test_relevant_filters_reserved_and_ignored() -> None:
    ignored = {"x.tmp"}.__contains__
    assert relevant("a/b.txt", ignored)
    assert not relevant("x.tmp", ignored)
    assert not relevant("d/.syncd-tmp-123", ignored)
    assert not relevant(".syncd-trash/2026/a.txt", ignored)
    assert relevant("", ignored)


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def error(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    warning = info = error


def test_out_of_inotify_watches_says_what_to_set_and_falls_back(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from watchdog.observers import Observer

    def refuse(*_a: Any, **_k: Any) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(Observer, "schedule", refuse)
    (tmp_path / "a" / "b").mkdir(parents=True)
    log = Log()
    w = Watcher(Debouncer(0.1, 1.0), log)
    failed = w.start({"p": (str(tmp_path), lambda _r: False)})
    w.stop()
    assert failed == [] and w.take_lost() == {"p": "watch_limit"}   # periodic scans
    (event, kw), = log.events
    assert event == "watch_limit" and "fs.inotify.max_user_watches" in kw["fix"]
    assert kw["fallback"] == "periodic scans"


def test_a_file_open_for_writing_holds_the_pair_until_closed_or_max_delay() -> None:
    d = Debouncer(0.25, 5.0, clock=lambda: 0.0)
    d.touch("a", now=0.0, path="/r/f", event="created")
    d.touch("a", now=0.1, path="/r/f", event="modified")
    assert d.due(now=1.0) == []                  # quiet for 0.9 s, but still being written
    assert d.next_due() == pytest.approx(5.0)    # at the latest max_delay after the first
    d.touch("a", now=1.2, path="/r/f", event="closed")
    assert d.due(now=1.3) == []
    assert d.due(now=1.45) == ["a"]              # closed, then debounce


def test_a_writer_that_never_closes_is_synced_every_max_delay() -> None:
    d = Debouncer(0.25, 5.0, clock=lambda: 0.0)
    d.touch("a", now=0.0, path="/r/log", event="modified")
    assert d.due(now=4.9) == []
    assert d.due(now=5.0) == ["a"]
    d.touch("a", now=5.5, path="/r/log", event="modified")   # a new mark: again bounded
    assert d.due(now=10.4) == [] and d.due(now=10.5) == ["a"]


def test_directory_events_and_deletes_do_not_count_as_writers() -> None:
    d = Debouncer(0.25, 5.0, clock=lambda: 0.0)
    d.touch("a", now=0.0, path="", event="modified")          # a directory's mtime
    d.touch("a", now=0.0, path="/r/x", event="modified")
    d.touch("a", now=0.1, path="/r/x", event="deleted")        # gone before it was closed
    d.touch("a", now=0.1, path="/r/y", event="created")        # made up for a new dir's
    assert d.due(now=0.35) == ["a"]                            # content: not a writer


def refuse_watches_of(suffix: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify refuses watches of directories whose path ends with `suffix`, as at the
    fs.inotify.max_user_watches limit."""
    from watchdog.observers.inotify_c import InotifyFD

    real = InotifyFD.add_callback

    def limited(self: Any, path: bytes, *a: Any, **k: Any) -> Any:
        if path.endswith(suffix):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real(self, path, *a, **k)

    monkeypatch.setattr(InotifyFD, "add_callback", limited)


def test_a_subdirectory_past_the_watch_limit_puts_the_pair_on_periodic_scans(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # watchdog skips a subdirectory it cannot watch without a word: changes there waited
    # for the hourly full reconcile, and no watch_limit was ever logged.
    refuse_watches_of(b"/deep", monkeypatch)
    (tmp_path / "a" / "deep").mkdir(parents=True)
    log = Log()
    w = Watcher(Debouncer(0.1, 1.0), log)
    try:
        assert w.start({"p": (str(tmp_path), lambda _r: False)}) == []
        assert w.take_lost() == {"p": "watch_limit"}
        assert [e for e, _ in log.events] == ["watch_limit"]
        assert "p" not in w.watched
    finally:
        w.stop()


def simulate_overflow(w: Watcher) -> None:
    """The kernel's IN_Q_OVERFLOW, delivered as the installed watchdog delivers it."""
    from watchdog.observers.inotify import InotifyWatchGroup

    from syncd.compat import watchdog as compat

    plan = compat.install(lambda *_: None, lambda *_: None)   # already installed: its plan
    assert plan is not None and plan.overflow, f"no overflow report on watchdog {plan}"
    group = next(g for g in _groups(w) if isinstance(g, InotifyWatchGroup))
    if plan.overflow == "wrap-parse":      # 7.0.0: the record is dropped while parsing
        from watchdog.observers.inotify_c import InotifyFD

        list(InotifyFD._parse_event_buffer(compat.overflow_record()))
        return
    group.on_queue_overflow()              # as InotifyFD calls it on IN_Q_OVERFLOW...
    if plan.overflow == "event":
        group.on_events_lost()             # ...then this, once every group recovered


def test_a_kernel_queue_overflow_rescans_the_pair(tmp_path: Path) -> None:
    # The kernel dropped events: watchdog drops what was pending; the pair must be scanned
    # in full, or a change whose event was lost waits an hour.
    deb = Debouncer(0.0, 1.0)
    log = Log()
    w = Watcher(deb, log)
    try:
        w.start({"p": (str(tmp_path), lambda _r: False)})
        assert deb.due() == []
        simulate_overflow(w)
        deadline, due = time.monotonic() + 10, []   # the event may come through a thread
        while not due and time.monotonic() < deadline:
            deb.wake.wait(0.2)
            deb.wake.clear()
            due = deb.due()
        assert due == ["p"]
        assert [e for e, _ in log.events] == ["watch_overflow"]
        # Still watched where watchdog rebuilt its watches; placed again where it did not.
        assert "p" in w.watched or w.take_lost() == {"p": "overflow"}
    finally:
        w.stop()


def _groups(w: Watcher) -> list[Any]:
    """The watchdog callback objects of a Watcher's observer (its emitters' watch groups)."""
    out = []
    for em in list(w.observer.emitters):
        out += [v for v in vars(em).values() if type(v).__name__ == "InotifyWatchGroup"]
    return out


def test_a_replaced_root_is_lost_then_watched_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    deb = Debouncer(0.0, 1.0)
    w = Watcher(deb, Log())
    try:
        w.start({"p": (str(root), lambda _r: False)})
        root.rename(tmp_path / "aside")
        root.mkdir()                        # a copy put back: another directory
        w.check_roots()
        assert w.take_lost() == {"p": "root_replaced"} and "p" not in w.watched
        assert w.watch("p", str(root), lambda _r: False) and "p" in w.watched
        w.check_roots()
        assert w.take_lost() == {}
        deb.due()   # the marks of the loss
        deb.wake.clear()
        (root / "new.txt").write_bytes(b"seen by the new watch")
        # Each event sets wake; the pair is due once the file's close arrived (a file
        # being written waits for it), which under load can trail the first event.
        deadline, due = time.monotonic() + 10, []   # a bound, not a speed check
        while not due and time.monotonic() < deadline:
            deb.wake.wait(0.5)
            deb.wake.clear()
            due = deb.due()
        assert due == ["p"], "no event through the new watch"
    finally:
        w.stop()


def test_a_root_watched_again_past_the_limit_is_lost_again(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # On a running observer, schedule() adds the watches itself: a refused subdirectory
    # there went unnoticed (the hooks did not know the root yet).
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    log = Log()
    w = Watcher(Debouncer(0.0, 1.0), log)
    try:
        w.start({"p": (str(root), lambda _r: False)})
        root.rename(tmp_path / "aside")
        (root / "a" / "deep").mkdir(parents=True)
        w.check_roots()
        assert w.take_lost() == {"p": "root_replaced"}
        refuse_watches_of(b"/deep", monkeypatch)
        assert w.watch("p", str(root), lambda _r: False)
        assert w.take_lost() == {"p": "watch_limit"} and "p" not in w.watched
        assert "watch_limit" in [e for e, _ in log.events]
    finally:
        w.stop()


def test_many_folders_past_the_limit_log_once(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Every folder past the limit is refused while one watch is scheduled: one watch_limit
    # for them all, since each line counts the whole tree's folders (quadratic otherwise).
    root = tmp_path / "root"
    root.mkdir()
    log = Log()
    w = Watcher(Debouncer(0.0, 1.0), log)
    try:
        w.start({"p": (str(root), lambda _r: False)})
        root.rename(tmp_path / "aside")
        for i in range(20):
            (root / f"d{i}" / "deep").mkdir(parents=True)
        w.check_roots()
        assert w.take_lost() == {"p": "root_replaced"}
        refuse_watches_of(b"/deep", monkeypatch)
        assert w.watch("p", str(root), lambda _r: False)
        assert w.take_lost() == {"p": "watch_limit"}
        assert [e for e, _ in log.events].count("watch_limit") == 1
    finally:
        w.stop()


def test_a_folder_made_past_the_watch_limit_while_watched_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # watchdog adds the new folder's watch from its own thread, and says nothing (or only
    # a line of its own log) when the kernel refuses it: the compat hook must see it.
    log = Log()
    w = Watcher(Debouncer(0.0, 1.0), log)
    try:
        assert w.start({"p": (str(tmp_path), lambda _r: False)}) == []
        refuse_watches_of(b"/deep", monkeypatch)
        (tmp_path / "deep").mkdir()
        deadline, lost = time.monotonic() + 10, {}   # a bound, not a speed check
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
            lost = w.take_lost()
        assert lost == {"p": "watch_limit"} and "p" not in w.watched
        assert [e for e, _ in log.events] == ["watch_limit"]
    finally:
        w.stop()


def test_the_hooks_each_verified_watchdog_gets() -> None:
    from syncd.compat.watchdog import VERIFIED, plan_for

    assert plan_for("7.0.0", False) == compat_plan("7.0.0", "wrap-dict", "wrap-parse")
    assert plan_for("7.1.0", False) == compat_plan("7.1.0", "wrap-dict", "wrap-group")
    assert plan_for("7.1.1", True) == compat_plan("7.1.1", "wrap-tree", "event")
    for v in VERIFIED:
        assert plan_for(v, v >= "7.1.1").off() == []


def compat_plan(version: str, limit: str, overflow: str) -> Any:
    from syncd.compat.watchdog import Plan

    return Plan(version, limit, overflow)


def test_an_unverified_watchdog_turns_the_hooks_off_and_says_so_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from watchdog.observers.inotify import InotifyWatchGroup

    from syncd import watch
    from syncd.compat import watchdog as compat

    assert compat.plan_for("7.2.0", True).off() and not compat.plan_for("7.2.0", True).limit
    off = compat.plan_for("6.0.0", False).off()
    assert [f.feature for f in off] == ["watch_limit_detection", "overflow_detection"]
    assert all("requirements/run.lock" in f.fix for f in off)

    compat.uninstall()
    real_add = InotifyWatchGroup.__dict__["_add_callback"]
    monkeypatch.setattr(compat, "installed_version", lambda _dist: "7.99.0")
    monkeypatch.setattr(watch, "_off_logged", False)
    try:
        log = Log()
        for _ in range(2):   # a second watcher (a reload) says nothing more
            w = Watcher(Debouncer(0.0, 1.0), log)
            try:
                assert w.start({"p": (str(tmp_path), lambda _r: False)}) == []
                assert "p" in w.watched   # watching works; only the hooks are off
            finally:
                w.stop()
        # Not wrapped: watchdog's own method.
        assert InotifyWatchGroup.__dict__["_add_callback"] is real_add
        offs = [kw for e, kw in log.events if e == "compat_feature_off"]
        import watchdog.events

        public_overflow = hasattr(watchdog.events, "EventsLostEvent")
        assert [kw["feature"] for kw in offs] == ["watch_limit_detection"] + (
            [] if public_overflow else ["overflow_detection"])
        assert offs[0]["library"] == "watchdog" and offs[0]["version"] == "7.99.0"
    finally:
        compat.uninstall()   # the next Watcher installs the hooks of the real version
