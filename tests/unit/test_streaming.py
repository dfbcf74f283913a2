"""A first sync into an empty remote uploads what the walk finds while the walk goes on
(Engine._walk_streaming). What must hold: uploads start before the walk ends; a remote
with anything on it is planned after the walk, as before; a stop mid-walk loses no job
and the next run completes the mirror; the run records the scan, so the next one is
idle; a failure is parked and reported like any other."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest

import syncd.engine as eng
import syncd.transfer as transfer
from syncd.engine import Options
from syncd.model import Kind
from syncd.remotes.base import Source
from tests.unit.test_engine import Clock, Faulty, engine, setup, tree

FILES = {f"d{i % 20:02d}/f{i:03d}": f"content {i}".encode() for i in range(400)}


class Watching(Faulty):
    """Sets `uploaded` at the first put (threads: the event lives in this process)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.uploaded = threading.Event()

    def put(self, path: str, source: Source) -> Any:
        self.uploaded.set()
        return super().put(path, source)


def pausing_walk(monkeypatch: pytest.MonkeyPatch, until: threading.Event,
                 hold: float = 10.0) -> dict[str, Any]:
    """The engine's walk, holding back after its first directory with files until `until`
    is set (at most `hold` s); reports whether it was set in time."""
    seen: dict[str, Any] = {"in_time": None, "walk_done": threading.Event()}
    real = eng.walk

    def walk(*a: Any, **kw: Any) -> Any:
        sink = kw.get("sink")
        if sink is not None:
            def slow_sink(entries: Any) -> None:
                sink(entries)
                if seen["in_time"] is None and any(s.kind == Kind.FILE for _, s in entries):
                    seen["in_time"] = until.wait(hold)
            kw["sink"] = slow_sink
        else:
            # Not streaming: nothing can upload until this returns.
            seen["in_time"] = until.is_set()
        try:
            return real(*a, **kw)
        finally:
            seen["walk_done"].set()

    monkeypatch.setattr(eng, "walk", walk)
    return seen


def test_a_first_sync_uploads_while_the_walk_goes_on(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    remote = Watching(dst)
    seen = pausing_walk(monkeypatch, remote.uploaded)
    res = engine(cfg, remote, Clock()).reconcile(cfg.pairs[0], Options())
    assert seen["in_time"] is True, "no upload while the walk was held after one directory"
    assert res.status == "ok" and res.uploaded == len(FILES)
    assert tree(dst / "docs") == FILES
    # The scan is recorded: the next run finds nothing to do and uploads nothing.
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 0 and res.mkdirs == 0


def test_a_remote_with_content_is_planned_after_the_walk(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Something on the remote may have to be adopted, compared or deleted (and a safety
    guard may stop the pair): then nothing moves before the whole plan is made."""
    cfg, src, dst = setup(tmp_path, FILES)
    (dst / "docs").mkdir()
    (dst / "docs" / "stray").write_bytes(b"not in the local tree")
    remote = Watching(dst)
    seen = pausing_walk(monkeypatch, remote.uploaded, hold=0.5)   # streamed uploads take ms
    res = engine(cfg, remote, Clock()).reconcile(cfg.pairs[0], Options())
    assert seen["in_time"] is False
    assert res.status == "ok" and res.uploaded == len(FILES) and res.trashed == 1


def test_a_dry_run_streams_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    remote = Watching(dst)
    pausing_walk(monkeypatch, remote.uploaded)
    res = engine(cfg, remote, Clock()).reconcile(cfg.pairs[0], Options(dry_run=True))
    assert res.status == "planned" and not remote.uploaded.is_set()
    assert len([a for a in res.plan if a.op.value == "upload"]) == len(FILES)
    assert not (dst / "docs").exists()


def test_a_stop_mid_walk_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon shutting down during its first reconcile: the run ends early, every job
    it leased goes back to the queue, and the next start completes the mirror."""
    cfg, src, dst = setup(tmp_path, FILES)
    stop = threading.Event()
    monkeypatch.setattr(transfer, "NET_CHUNK_FILES", 4)   # little in flight when it stops

    class Stopping(Watching):
        def put(self, path: str, source: Source) -> Any:
            if len(self.puts) == 10:
                stop.set()
            return super().put(path, source)

    e = engine(cfg, Stopping(dst), Clock())
    e.stop = stop
    res = e.reconcile(cfg.pairs[0], Options())
    published = tree(dst / "docs")
    assert 0 < len(published) < len(FILES) and res.uploaded == len(published)
    assert all(FILES[k] == v for k, v in published.items())
    assert e.index.job_counts("p").get("leased", 0) == 0
    # Recorded as cut short, not as in sync (status showed "ok" after a shutdown).
    assert res.status == "interrupted" and e.index.pair_meta("p").last_result == "interrupted"  # type: ignore[union-attr]
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and tree(dst / "docs") == FILES


def test_a_failure_while_streaming_is_parked_and_retried_next_run(tmp_path: Path) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    e = engine(cfg, Faulty(dst, permanent=frozenset({"docs/d03/f003"})), Clock())
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "failed" and [p for p, _ in res.failures] == ["d03/f003"]
    assert [j.path for j in e.index.failed_jobs("p")] == ["d03/f003"]
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 1 and tree(dst / "docs") == FILES


def test_progress_totals_grow_as_the_walk_finds_files(tmp_path: Path) -> None:
    """The bar of a streamed first sync starts from what the walk found so far and ends
    at everything, with every job advanced once."""
    calls: list[tuple[str, int, int]] = []

    class Rec:
        def advance(self, files: int, nbytes: int) -> None:
            calls.append(("advance", files, nbytes))

        def set_totals(self, files: int, nbytes: int) -> None:
            calls.append(("totals", files, nbytes))

        def close(self) -> None:
            calls.append(("close", 0, 0))

    cfg, src, dst = setup(tmp_path, FILES)
    e = engine(cfg, None, Clock())
    made: list[tuple[int, int]] = []

    def factory(pair: str, files: int, nbytes: int) -> Rec:
        made.append((files, nbytes))
        return Rec()

    e.reporter_factory = factory
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and len(made) == 1
    entries = len(FILES) + len({k.rpartition("/")[0] for k in FILES})   # files + dirs
    nbytes = sum(len(v) for v in FILES.values())
    totals = [(f, b) for k, f, b in calls if k == "totals"]
    assert totals and totals[-1] == (entries, nbytes)
    assert all(a <= b for a, b in itertools.pairwise(totals))
    assert sum(f for k, f, _ in calls if k == "advance") == entries
    assert sum(b for k, _, b in calls if k == "advance") == nbytes
    assert calls[-1][0] == "close"


def test_rich_reporter_takes_new_totals() -> None:
    from syncd.progress import RichReporter

    r = RichReporter("p", 10, 0)
    r.advance(4, 0)
    r.set_totals(25, 0)
    task = r.progress.tasks[0]
    assert task.total == 25 and task.completed == 4 and task.fields["total_files"] == 25
    r.close()


def test_an_error_while_streaming_ends_the_walk_too(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the transfer half (here: a database error while feeding the runner)
    stops the walk at its next directory instead of letting it run to the end of a large
    tree first."""
    files = {f"d{i:02d}/f": b"x" for i in range(50)}
    cfg, src, dst = setup(tmp_path, files)
    listed: list[int] = []
    real = eng.walk

    def walk(*a: Any, **kw: Any) -> Any:
        sink = kw["sink"]

        def slow_sink(entries: Any) -> None:
            listed.append(len(entries))
            threading.Event().wait(0.02)   # a slow disk: ~1 s for the whole tree
            sink(entries)
        kw["sink"] = slow_sink
        return real(*a, **kw)

    monkeypatch.setattr(eng, "walk", walk)
    e = engine(cfg, None, Clock())
    calls = {"n": 0}
    real_feed = e.queue.unqueued

    def unqueued(pair: str, actions: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            import sqlite3

            raise sqlite3.OperationalError("database is locked")
        return real_feed(pair, actions)

    monkeypatch.setattr(e.queue, "unqueued", unqueued)
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "failed" and "database is locked" in res.message
    assert len(listed) < 51, "the walk went on to the end after the failure"


def test_a_root_on_another_device_than_recorded_trips_the_guard_first(tmp_path: Path) -> None:
    """A pair whose root was recorded on another device (a disk that was mounted there)
    is stopped by the device guard before anything moves."""
    cfg, src, dst = setup(tmp_path, FILES)
    e = engine(cfg, None, Clock())
    e.index.set_pair_meta("p", str(src), src.stat().st_dev + 1)
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "stopped" and res.uploaded == 0 and not (dst / "docs").exists()


class AskingStatus(Faulty):
    """Takes `syncd status` at its first put, while the first sync runs."""

    def __init__(self, root: Path, cfg: Any):
        super().__init__(root)
        self.cfg = cfg
        self.report: dict[str, Any] | None = None

    def put(self, path: str, source: Source) -> Any:
        if self.report is None:
            from syncd.cli import collect_status

            self.report = collect_status(self.cfg)
        return super().put(path, source)


def test_status_shows_a_running_first_sync(tmp_path: Path) -> None:
    """A first sync's uploads have no queue rows: `syncd status` shows the pair syncing
    from the first-sync mark, and not once the run is over, nor from a mark a killed
    syncd left behind: not while no syncd holds the state dir's lock, and the next to
    take it drops the mark (with the dead process's leases)."""
    from syncd.cli import collect_status
    from syncd.engine import StateLock

    cfg, src, dst = setup(tmp_path, FILES)
    remote = AskingStatus(dst, cfg)
    e = engine(cfg, remote, Clock())
    with StateLock(cfg.daemon.state_dir):
        assert e.reconcile(cfg.pairs[0], Options()).status == "ok"
        (p,) = remote.report["pairs"] if remote.report else [None]
        assert p["state"] == "syncing" and p["first_sync_since"] and p["in_flight"] == 0
        (p,) = collect_status(cfg)["pairs"]
        assert p["state"] == "idle" and p["first_sync_since"] is None
    e.index.set_first_sync("p", 1.8e9)   # as a syncd killed mid-sync leaves it
    (p,) = collect_status(cfg)["pairs"]
    assert p["state"] == "idle" and p["first_sync_since"] is None
    with StateLock(cfg.daemon.state_dir):   # the next syncd
        e.queue.reclaim(exclusive=True)
        (p,) = collect_status(cfg)["pairs"]
        assert p["state"] == "idle" and p["first_sync_since"] is None
    assert e.index.pair_meta("p").first_sync_since is None  # type: ignore[union-attr]
