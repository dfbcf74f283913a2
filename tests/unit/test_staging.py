"""The staged upload path of a directory remote (fsync on): workers write temp files, one
flush (syncfs) makes everything written so far durable while they go on, then the files
are renamed into place. What must hold: nothing is published before a flush that started
after its bytes were written; flushes are shared by many chunks; a failed flush publishes
nothing and retries; a stop mid-flight leaves no temp file and no job lost."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import syncd.engine as eng
import syncd.remotes.local as local_mod
import syncd.transfer as transfer
from syncd.engine import Options
from syncd.model import TMP_PREFIX
from syncd.remotes.base import owner_tag
from syncd.remotes.local import LocalRemote
from tests.unit.test_engine import Clock, Recording, engine, setup, tree

FILES = {f"d{i % 7}/f{i:03d}": f"content {i}".encode() * (i % 5 + 1) for i in range(200)}


class Flushes:
    """Wraps syncfs, the temp-file writer and the rename of the local remote (threads, so
    they run in this process) and records their order on one counter."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float = 0.0,
                 fail_first: int = 0, on_flush: Any = None):
        self.lock = threading.Lock()
        self.seq = 0
        self.written: dict[str, int] = {}            # temp name -> seq when written
        self.flushes: list[tuple[int, int]] = []      # (seq at start, seq at end)
        self.published: list[tuple[str, int]] = []    # (temp name, seq)
        self.fail_first = fail_first
        self.delay = delay
        self.on_flush = on_flush
        real_write, real_publish = LocalRemote._write_temp, LocalRemote._publish
        outer = self

        def write_temp(self: LocalRemote, dfd: int, name: str, path: str, source: Any,
                       fsync: bool, chmod: bool = True) -> str:
            tmp = real_write(self, dfd, name, path, source, fsync, chmod)
            outer.written[tmp] = outer.tick()
            return tmp

        def publish(self: LocalRemote, dfd: int, tmp: str, name: str, path: str,
                    sent: int) -> Any:
            outer.published.append((tmp, outer.tick()))
            return real_publish(self, dfd, tmp, name, path, sent)

        real_settle = LocalRemote.settle
        self.settling = False
        self.settles: list[int] = []   # the end-of-run syncfs (LocalRemote.settle): apart

        def settle(remote: LocalRemote, prefix: str, folders: Any = None) -> None:
            outer.settling = True
            try:
                real_settle(remote, prefix, None)   # one syncfs, as a first sync does
            finally:
                outer.settling = False

        def syncfs(fd: int) -> int:
            if self.settling:
                self.settles.append(self.tick())
                return 0
            start = self.tick()
            if self.on_flush is not None:
                self.on_flush()
            if self.delay:
                threading.Event().wait(self.delay)
            if self.fail_first > 0:
                self.fail_first -= 1
                self.flushes.append((start, -1))
                return -1
            self.flushes.append((start, self.tick()))
            return 0

        monkeypatch.setattr(LocalRemote, "_write_temp", write_temp)
        monkeypatch.setattr(LocalRemote, "_publish", publish)
        monkeypatch.setattr(LocalRemote, "settle", settle)
        monkeypatch.setattr(local_mod, "_syncfs", syncfs)
        monkeypatch.setattr(local_mod, "FSYNC_EACH_MAX", 0)   # every flush a syncfs
        monkeypatch.setattr(eng, "PROCESS_POOL_MIN_JOBS", 1 << 30)   # threads: we see it all
        monkeypatch.setattr(transfer, "CHUNK_FILES", 8)

    def tick(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq


def temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TMP_PREFIX}*")]


def test_nothing_is_published_before_a_flush_that_began_after_its_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fl = Flushes(monkeypatch, delay=0.002)
    cfg, src, dst = setup(tmp_path, FILES)
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == len(FILES)
    assert tree(dst / "docs") == FILES and not temps(dst)
    assert len(fl.published) == len(FILES)
    ok = [f for f in fl.flushes if f[1] > 0]
    for tmp, at in fl.published:
        w = fl.written[tmp]
        assert any(start > w and end < at for start, end in ok), f"{tmp} published unflushed"


def test_one_flush_serves_many_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a slow disk (50 ms a flush) the workers keep writing meanwhile, and each flush
    covers what was written during the previous one: far fewer flushes than chunks (25)."""
    fl = Flushes(monkeypatch, delay=0.05)
    cfg, src, dst = setup(tmp_path, FILES)
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and tree(dst / "docs") == FILES
    chunks = len(FILES) // 8
    assert 1 <= len(fl.flushes) <= chunks // 3, (len(fl.flushes), chunks)


def test_a_failed_flush_publishes_nothing_and_the_retry_converges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fl = Flushes(monkeypatch, fail_first=1)
    cfg, src, dst = setup(tmp_path, FILES)
    clock = Clock()
    res = engine(cfg, None, clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.retries >= 1 and not res.failures
    assert tree(dst / "docs") == FILES and not temps(dst)
    # What the failed flush covered was never renamed into place: each retried file was
    # written again, and every file was published exactly once.
    assert fl.flushes[0][1] == -1
    assert len(fl.written) == len(FILES) + res.retries
    assert len(fl.published) == len({t for t, _ in fl.published}) == len(FILES)
    assert clock.t > 1_800_000_000.0     # the retry waited for its backoff (fake clock)


def test_a_stop_while_flushing_leaves_no_temp_and_loses_no_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    fl = Flushes(monkeypatch, delay=0.05, on_flush=stop.set)
    cfg, src, dst = setup(tmp_path, FILES)
    e = engine(cfg, None, Clock())
    e.stop = stop
    res = e.reconcile(cfg.pairs[0], Options())
    assert not temps(dst)
    published = tree(dst / "docs") if (dst / "docs").exists() else {}
    assert len(fl.flushes) == 1 and 0 < len(published) < len(FILES)
    assert len(fl.settles) == 1 and fl.settles[0] > max(s for _, s in fl.published)
    assert len(fl.written) > len(published)   # staged meanwhile, then discarded
    assert all(FILES[k] == v for k, v in published.items())
    # A first sync streams: its jobs run without queue rows (Queue.unqueued); those not
    # finished get one as they are given back. Exactly the published files have bases.
    counts = e.index.job_counts("p")
    assert counts.get("leased", 0) == 0
    assert counts.get("pending", 0) + len(published) == len(FILES), counts
    bases = e.index.load_bases("p")
    assert {k for k, b in bases.items() if b.kind == 1} == set(published)
    # The next run (no stop) finishes the job.
    stop.clear()
    e2 = engine(cfg, None, Clock())
    res = e2.reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and tree(dst / "docs") == FILES and not temps(dst)


class FirstMoveFails(Recording):
    def __init__(self, root: Path):
        super().__init__(root)
        self.move_failures = 1

    def move(self, src: str, dst: str) -> None:
        if self.move_failures:
            self.move_failures -= 1
            from syncd.errors import TransientError

            self.ops.append(("move-failed", src))
            raise TransientError("busy", remote=self.name, path=src)
        super().move(src, dst)


def test_fed_jobs_wait_for_a_retry_of_an_earlier_phase(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder replacing a remote file (phase -1: the file is trashed first) whose trash
    move fails once: nothing is written under the folder before the retried move is done,
    though those jobs were enqueued already leased to the runner."""
    monkeypatch.setattr(eng, "ENQUEUE_BATCH", 2)
    cfg, src, dst = setup(tmp_path, {"was_file": b"w", "other": b"o"})
    clock = Clock()
    assert engine(cfg, Recording(dst), clock).reconcile(cfg.pairs[0], Options()).status == "ok"
    (src / "was_file").unlink()
    for i in range(5):
        (src / "was_file").mkdir(exist_ok=True)
        (src / "was_file" / f"n{i}").write_bytes(b"n")
    remote = FirstMoveFails(dst)
    res = engine(cfg, remote, clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.retries == 1, res.failures
    ops = remote.ops
    assert ops[0] == ("move-failed", "docs/was_file")
    moved = ops.index(("move", "docs/was_file"))
    assert all(i > moved for i, (op, p) in enumerate(ops) if p.startswith("docs/was_file/"))
    mirror = {k: v for k, v in tree(dst / "docs").items() if not k.startswith(".syncd-trash")}
    assert mirror == tree(src)


def test_a_few_staged_files_are_fsynced_one_by_one_many_share_a_syncfs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """syncfs writes out the whole filesystem, other programs' dirty data included: the
    daemon's usual handful of files is fsynced file by file instead."""
    import os

    from syncd.remotes.base import Source

    calls = {"fsync": 0, "syncfs": 0}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls["fsync"] += 1
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        calls["syncfs"] += 1
        return 0

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(local_mod, "_syncfs", syncfs)
    src = tmp_path / "src"
    src.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    r = LocalRemote("nas", dst)
    for n, expect in ((local_mod.FSYNC_EACH_MAX, {"fsync": local_mod.FSYNC_EACH_MAX,
                                                  "syncfs": 0}),
                      (local_mod.FSYNC_EACH_MAX + 1, {"fsync": 0, "syncfs": 1})):
        calls.update(fsync=0, syncfs=0)
        sources = []
        for i in range(n):
            (src / f"{n}-{i}").write_bytes(b"x" * i)
            sources.append(Source(str(src / f"{n}-{i}"), f"{n}-{i}"))
        staged = r.stage_many([(f"d{n}/f{i}", so) for i, so in enumerate(sources)])
        for so in sources:
            so.close()
        assert calls == {"fsync": 0, "syncfs": 0}   # staging alone makes nothing durable
        r.flush(staged)   # type: ignore[arg-type]
        assert calls == expect
        assert all(not isinstance(e, Exception) for e in r.publish_many(staged))  # type: ignore[arg-type]
        assert sorted(p.name for p in (dst / f"d{n}").iterdir()) == sorted(f"f{i}" for i in range(n))


def test_a_failed_fsync_of_a_staged_file_is_transient(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from syncd.errors import TransientError
    from syncd.remotes.base import Source

    (tmp_path / "f").write_bytes(b"data")
    dst = tmp_path / "dst"
    dst.mkdir()
    r = LocalRemote("nas", dst)
    with Source(str(tmp_path / "f"), "f") as so:
        staged = r.stage_many([("f", so)])

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(TransientError, match="fsync failed"):
        r.flush(staged)   # type: ignore[arg-type]
    r.discard(staged)   # type: ignore[arg-type]
    assert list(dst.iterdir()) == []


class DyingRemote(LocalRemote):
    """Kills the worker process that stages while `marker` exists (the first to claim it:
    rename is atomic), as an OOM kill would. Importable, so worker processes can load it."""

    def __init__(self, root: Path, marker: Path):
        super().__init__("nas", root)
        self.marker = str(marker)

    def stage_many(self, items: Any) -> Any:
        import os

        try:
            os.rename(self.marker, self.marker + ".taken")
        except FileNotFoundError:
            return super().stage_many(items)
        os._exit(1)


def test_a_worker_process_killed_while_staging_loses_nothing(tmp_path: Path) -> None:
    """A worker process dies mid-run (the pool breaks under every chunk in flight): those
    jobs are retried on threads, the mirror is exact, and no temp file outlives the next
    run."""
    files = {f"d{i % 9}/f{i}": f"v{i}".encode() * (i % 50 + 1) for i in range(eng.PROCESS_POOL_MIN_JOBS * 4)}
    cfg, src, dst = setup(tmp_path, files)
    marker = tmp_path / "die"
    marker.touch()
    clock = Clock()
    dying = DyingRemote(dst, marker)
    dying.tmp_owner = owner_tag(str(cfg.daemon.state_dir))   # as open_remote sets it
    res = engine(cfg, dying, clock).reconcile(cfg.pairs[0], Options())
    assert (tmp_path / "die.taken").exists(), "no worker process ran a stage"
    assert res.status == "ok" and res.retries >= 1 and not res.failures, res.failures
    # A chunk staged by a worker killed with the pool may leave temps: the next run's
    # listing removes temps of this state dir.
    assert {k: v for k, v in tree(dst / "docs").items()
            if not k.rpartition("/")[2].startswith(TMP_PREFIX)} == files
    res = engine(cfg, None, clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 0 and not temps(dst)
    assert tree(dst / "docs") == files


def test_a_broken_pool_is_replaced_once_and_the_run_ends(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every future of a broken process pool fails, one after another. Only the first may
    replace the pool: replacing it again for the others would shut down the new pool under
    the chunks already given to it, whose cancelled futures never finish (the run hung)."""
    from concurrent.futures import Future, ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    class BrokenPool:
        """Accepts work, then fails each future 30 ms after the previous one."""

        def __init__(self) -> None:
            self.n = 0

        def submit(self, fn: Any, *a: Any) -> Future[Any]:
            f: Future[Any] = Future()
            self.n += 1
            threading.Timer(0.03 * self.n, f.set_exception,
                            [BrokenProcessPool("a worker died")]).start()
            return f

        def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
            pass

    made: list[Any] = []

    def pool(ctx: Any, processes: bool) -> Any:
        made.append(BrokenPool() if not made else ThreadPoolExecutor(ctx.transfers))
        return made[-1]

    Flushes(monkeypatch)   # threads, chunks of 8
    monkeypatch.setattr(transfer.Runner, "_pool", staticmethod(pool))
    cfg, src, dst = setup(tmp_path, FILES)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(
        res=engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the run hung"
    res = out["res"]
    assert res.status == "ok" and res.retries >= 2 and not res.failures, res.failures
    assert len(made) == 2 and tree(dst / "docs") == FILES


def _stage(r: LocalRemote, src: Path, paths: list[str]) -> list[Any]:
    from syncd.remotes.base import Source

    sources = []
    for p in paths:
        f = src / p.replace("/", "_")
        f.write_bytes(p.encode())
        sources.append(Source(str(f), p))
    try:
        return r.stage_many(list(zip(paths, sources, strict=True)))
    finally:
        for so in sources:
            so.close()


def test_flush_survives_what_only_one_file_suffers(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A temp its owner may not read (mode 0o044) cannot be fsynced by name: the flush
    falls back to syncfs. A staged file whose directory vanished fails alone, at its
    publish; the batch's other files are flushed and published."""
    import os
    import shutil

    calls = {"syncfs": 0}

    def syncfs(fd: int) -> int:
        calls["syncfs"] += 1
        return 0

    monkeypatch.setattr(local_mod, "_syncfs", syncfs)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    r = LocalRemote("nas", dst)
    staged = _stage(r, src, ["a/1", "b/2"])
    real_open = os.open

    def no_read(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if str(path).startswith(TMP_PREFIX) and not flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_read)
    r.flush(staged)
    assert calls["syncfs"] == 1
    monkeypatch.setattr(os, "open", real_open)
    assert all(not isinstance(e, Exception) for e in r.publish_many(staged))

    monkeypatch.setattr(local_mod, "FSYNC_EACH_MAX", 0)
    staged = _stage(r, src, ["c/3", "d/4"])
    shutil.rmtree(dst / "c")
    r.flush(staged)
    res = r.publish_many(staged)
    assert isinstance(res[0], Exception) and not isinstance(res[1], Exception)
    assert (dst / "d" / "4").read_bytes() == b"d/4"


def test_a_temp_name_clash_fails_and_leaves_the_other_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from syncd.errors import TransientError

    dst = tmp_path / "dst"
    dst.mkdir()
    theirs = dst / f"{TMP_PREFIX}x-000000000001"
    theirs.write_bytes(b"another writer's upload")
    monkeypatch.setattr(local_mod, "temp_name", lambda name, owner="": theirs.name)
    src = tmp_path / "src"
    src.mkdir()
    (res,) = _stage(LocalRemote("nas", dst), src, ["f"])
    assert isinstance(res, TransientError) and "temp name in use" in str(res)
    assert theirs.read_bytes() == b"another writer's upload"


def test_set_attrs_of_a_file_this_user_cannot_read(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote file we may chmod but not read (its owner is us, its mode 0o200, say): the
    mode and mtime are set, never through a symlink, and made durable by a sync of the file system
    instead of an fsync. (Tests run as root, who reads everything: the refusal is
    simulated.)"""
    import os

    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"content")
    os.chmod(root / "d" / "f", 0o200)
    (tmp_path / "outside").write_bytes(b"outside")
    os.chmod(tmp_path / "outside", 0o644)
    (root / "d" / "link").symlink_to(tmp_path / "outside")
    real_open = os.open

    def no_read(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if str(path).startswith("/proc/self/fd/"):   # reopening it to fsync the change
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(local_mod.os, "open", no_read)
    r = LocalRemote("nas", root)
    e = r.set_attrs("d/f", mode=0o640, mtime_ns=1_750_000_000_000_000_001)
    assert (root / "d" / "f").stat().st_mode & 0o777 == 0o640 and e.size == 7
    assert (root / "d" / "f").stat().st_mtime_ns == e.mtime_ns == 1_750_000_000_000_000_001
    outside = (tmp_path / "outside").stat().st_mtime_ns
    with pytest.raises(local_mod.Conflict):
        r.set_attrs("d/link", mode=0o600, mtime_ns=1)
    assert (tmp_path / "outside").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "outside").stat().st_mtime_ns == outside


def test_jobs_cross_to_worker_processes_as_plain_tuples_and_come_back_equal() -> None:
    import pickle

    from syncd.model import Action, Job, Op

    jobs = [Job(7, "p", "a/b", Action(Op.UPLOAD, "a/b", "new", 3, b"h" * 16, 5), 0, 0.0, None),
            Job(8, "p", "c", Action(Op.MKDIR, "c", "replaces a remote file", 0, None, 0,
                                    ".syncd-trash/x/c", "", 2, 1), 2, 9.5, "boom")]
    plain = transfer._plain(jobs)
    assert all(type(r) is tuple and type(r[3]) is tuple for r in plain)
    back = transfer._jobs(pickle.loads(pickle.dumps(plain)))
    assert back == jobs and all(type(j) is Job and type(j.action) is Action for j in back)
    assert transfer._jobs(jobs) is jobs   # a thread pool's chunk: untouched


def test_set_attrs_many_syncs_a_few_one_by_one_and_more_with_one_syncfs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `chmod -R` must not cost an fsync per file: up to FSYNC_EACH_MAX changes are
    fsynced each, more take one syncfs of their file system after all of them; a failed
    syncfs fails every change it covered (retried), and fsync = false syncs nothing."""
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    n = local_mod.FSYNC_EACH_MAX + 4
    for i in range(n):
        (root / "d" / f"f{i}").write_bytes(b"x")
    calls: list[str] = []
    real_syncfs, real_inode = local_mod._syncfs, LocalRemote._sync_inode

    def syncfs(fd: int) -> int:
        calls.append("syncfs")
        return real_syncfs(fd)

    def inode(self: LocalRemote, proc: str, dfd: int, path: str) -> None:
        calls.append("fsync")
        real_inode(self, proc, dfd, path)

    monkeypatch.setattr(local_mod, "_syncfs", syncfs)
    monkeypatch.setattr(LocalRemote, "_sync_inode", inode)
    r = LocalRemote("nas", root)
    few = [(f"d/f{i}", 0o600, None, None) for i in range(local_mod.FSYNC_EACH_MAX)]
    assert all(not isinstance(e, Exception) for e in r.set_attrs_many(few))
    assert calls == ["fsync"] * local_mod.FSYNC_EACH_MAX
    calls.clear()
    many = [(f"d/f{i}", 0o640, 10**18, None) for i in range(n)]
    got = r.set_attrs_many(many)
    assert calls == ["syncfs"] and all(e.mtime_ns == 10**18 for e in got)  # type: ignore[union-attr]
    assert all((root / "d" / f"f{i}").stat().st_mode & 0o777 == 0o640 for i in range(n))
    monkeypatch.setattr(local_mod, "_syncfs", lambda fd: -1)
    got = r.set_attrs_many(many)
    assert all(isinstance(e, local_mod.TransientError) and "syncfs failed" in str(e)
               for e in got)
    calls.clear()
    assert not any(isinstance(e, Exception)
                   for e in LocalRemote("nas", root, fsync=False).set_attrs_many(many))
    assert calls == []

    def gone(self: LocalRemote, dev: int, paths: Any) -> int:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(LocalRemote, "_dev_fd", gone)   # the root unmounted mid-batch
    got = r.set_attrs_many(many)
    assert all(isinstance(e, local_mod.TransientError) and "cannot be opened" in str(e)
               for e in got)
