"""Engine + runner in-process: retries converge, permanent failures park with their error,
a file changing mid-upload is never published torn, an idle reconcile opens no file."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import xxhash

from syncd import transfer
from syncd.config import parse_config
from syncd.engine import Engine, Options
from syncd.errors import PermanentError, TransientError
from syncd.index import Index
from syncd.model import Op
from syncd.remotes.base import Capabilities, Source
from syncd.remotes.local import LocalRemote


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, d: float) -> None:
        self.t += d


class Faulty(LocalRemote):
    """A local remote that fails: the first `transient` puts, and every put of `permanent`.
    Its counters live in this process, so its transfers run in threads, not processes."""

    caps = Capabilities(dirs=True, move=True, mtime_precision_ns=1, cpu_bound=False)
    put_many = None   # every upload goes through put(), where the faults are
    stage_many = None

    def __init__(self, root: Path, transient: int = 0, permanent: frozenset[str] = frozenset(),
                 mutate: dict[str, bytes] | None = None):
        super().__init__("nas", root)
        self.transient = transient
        self.permanent = permanent
        self.mutate = dict(mutate or {})
        self.puts: list[str] = []

    def put(self, path: str, source: Source) -> Any:
        self.puts.append(path)
        if self.transient > 0:
            self.transient -= 1
            raise TransientError("connection reset", remote=self.name, path=path)
        if path in self.permanent:
            raise PermanentError("permission denied", remote=self.name, path=path)
        if path in self.mutate:   # the file changes while the upload reads it
            Path(source.abspath).write_bytes(self.mutate.pop(path))
        return super().put(path, source)


def setup(tmp_path: Path, files: dict[str, bytes], **daemon: Any) -> tuple[Any, Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    dst.mkdir()
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    cfg = parse_config({
        "daemon": {"state_dir": str(tmp_path / "state"), "retry_initial": "1s", "retry_max": "10s",
                   "max_attempts": 4, **daemon},
        "remotes": {"nas": {"type": "local", "path": str(dst)}},
        "sync": [{"name": "p", "local": str(src), "remote": "nas", "path": "docs"}],
    }, "test.toml", {})
    return cfg, src, dst


def engine(cfg: Any, remote: LocalRemote | None, clock: Clock) -> Engine:
    e = Engine(cfg, Index.open(cfg.daemon.state_dir), clock=clock, sleep=clock.sleep)
    if remote is not None:
        e.remotes["nas"] = remote
    return e


FILES = {f"d{i % 3}/f{i}.txt": f"content {i}".encode() for i in range(12)}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_transient_failures_retry_and_converge(tmp_path: Path) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    clock = Clock()
    remote = Faulty(dst, transient=3)
    res = engine(cfg, remote, clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 12 and res.retries == 3
    assert tree(dst / "docs") == FILES
    assert len(remote.puts) == 15
    assert clock.t > 1_800_000_000.0          # waited for the backoff, on the fake clock


def test_retries_exhausted_park_the_job_and_skip_deletes(tmp_path: Path) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    (dst / "docs").mkdir()
    (dst / "docs" / "stale.txt").write_bytes(b"only on the remote")
    clock = Clock()
    res = engine(cfg, Faulty(dst, transient=1000), clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "failed" and len(res.failures) == 12
    assert all("gave up after 4 attempts" in why for _, why in res.failures)
    assert (dst / "docs" / "stale.txt").exists()      # deletes wait for a clean run


def test_permanent_failure_is_parked_with_error_others_sync(tmp_path: Path) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    clock = Clock()
    e = engine(cfg, Faulty(dst, permanent=frozenset({"docs/d1/f4.txt"})), clock)
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "failed" and res.retries == 0
    assert res.failures == [("d1/f4.txt", "remote 'nas', path 'docs/d1/f4.txt': permission denied")]
    expected = {k: v for k, v in FILES.items() if k != "d1/f4.txt"}
    assert tree(dst / "docs") == expected
    _, _, base = e.index.load("p")
    assert "d1/f4.txt" not in base and "d1/f7.txt" in base     # base moved only where confirmed
    assert [j.path for j in e.index.failed_jobs("p")] == ["d1/f4.txt"]
    # The next reconcile retries the failed job (here: the remote has recovered).
    e.remotes["nas"] = LocalRemote("nas", dst)
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 1 and tree(dst / "docs") == FILES
    assert e.index.failed_jobs("p") == []


def test_file_changed_mid_upload_is_never_published_torn(tmp_path: Path) -> None:
    cfg, src, dst = setup(tmp_path, {"big.bin": b"A" * 3_000_000})
    clock = Clock()
    new = b"B" * 2_500_000
    e = engine(cfg, Faulty(dst, mutate={"docs/big.bin": new}), clock)
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.retries == 1
    assert (dst / "docs" / "big.bin").read_bytes() == new
    _, _, base = e.index.load("p")
    assert base["big.bin"].hash == xxhash.xxh3_128_digest(new)
    assert not [p for p in (dst / "docs").iterdir() if p.name.startswith(".syncd-tmp-")]


def test_idle_reconcile_opens_no_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    old = 1_600_000_000_000_000_000
    for p in src.rglob("*.txt"):
        os.utime(p, ns=(old, old))
    clock = Clock()
    e = engine(cfg, None, clock)
    assert e.reconcile(cfg.pairs[0], Options()).uploaded == 12
    opened: list[str] = []
    real = os.open

    def spy(path: Any, *a: Any, **k: Any) -> int:
        if str(path).startswith(str(src)):
            opened.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", spy)
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 0 and res.hashed_files == 0
    assert opened == []


def test_lost_index_adopts_equal_remote_files_without_sending(tmp_path: Path) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    clock = Clock()
    assert engine(cfg, None, clock).reconcile(cfg.pairs[0], Options()).uploaded == 12
    for f in (tmp_path / "state").iterdir():
        f.unlink()
    remote = Faulty(dst)
    res = engine(cfg, remote, clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 0 and res.adopted == 12 + 3 and remote.puts == []


def test_adopting_on_a_remote_that_keeps_modes_gives_the_remote_copy_the_local_mode(
        tmp_path: Path) -> None:
    """A listing shows no modes: an adopted file (the index lost, say by a crash between
    an upload and its record) gets the local mode on the remote, in batches, and its base
    records it, or a chmod made meanwhile would never reach the remote (found by the
    crash soak). Still no bytes sent."""
    cfg, src, dst = setup(tmp_path, FILES)
    clock = Clock()
    assert engine(cfg, None, clock).reconcile(cfg.pairs[0], Options()).uploaded == 12
    for f in (tmp_path / "state").iterdir():
        f.unlink()
    for rel in FILES:
        os.chmod(src / rel, 0o600)
    e = engine(cfg, None, clock)
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.status, res.uploaded, res.uploaded_bytes, res.adopted) == ("ok", 0, 0, 12 + 3)
    assert all((dst / "docs" / rel).stat().st_mode & 0o777 == 0o600 for rel in FILES)
    _, _, base = e.index.load("p")
    assert {base[rel].mode for rel in FILES} == {0o600}
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.uploaded, res.adopted, res.attrs_set, res.failures) == (0, 0, 0, [])


def test_attrs_jobs_of_big_files_still_go_in_batches() -> None:
    """A chunk is cut by the bytes its jobs send: an attrs job sends none, whatever the
    file's size (a chmod -R over big files must not cost one remote call each)."""
    from collections import deque

    from syncd.model import Action, Job

    big = 1 << 30
    q = deque(Job(i, "p", f"f{i}", Action(Op.ATTRS, f"f{i}", "mode changed", big), 0, 0, None)
              for i in range(10))
    assert len(transfer._take_chunk(q, max_bytes=4 << 20, max_files=256)) == 10
    q = deque(Job(i, "p", f"f{i}", Action(Op.UPLOAD, f"f{i}", "new", big), 0, 0, None)
              for i in range(10))
    assert len(transfer._take_chunk(q, max_bytes=4 << 20, max_files=256)) == 1


def test_nothing_under_an_ignored_dir_is_deleted_even_if_a_rule_reincludes_it(tmp_path: Path) -> None:
    cfg, src, dst = setup(tmp_path, FILES)
    cfg = cfg.__class__(cfg.source, cfg.daemon, cfg.remotes, (cfg.pairs[0].__class__(
        **{**{f: getattr(cfg.pairs[0], f) for f in cfg.pairs[0].__slots__},
           "ignore": ("node_modules", "!node_modules/keep.txt"), "delete": "propagate"}),))
    keep = dst / "docs" / "node_modules" / "keep.txt"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"on the remote only")
    (src / "node_modules").mkdir()
    (src / "node_modules" / "keep.txt").write_bytes(b"local, inside an ignored dir")
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 12 and res.deleted == 0
    assert keep.read_bytes() == b"on the remote only"


class Recording(Faulty):
    """Records the order of every remote operation (threads: its list lives here)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.ops: list[tuple[str, str]] = []

    def put(self, path: str, source: Source) -> Any:
        self.ops.append(("put", path))
        return super().put(path, source)

    def mkdir(self, path: str) -> Any:
        self.ops.append(("mkdir", path))
        return super().mkdir(path)

    def delete(self, paths: Any) -> None:
        self.ops += [("delete", p) for p in paths]
        super().delete(paths)

    def move(self, src: str, dst: str) -> None:
        self.ops.append(("move", src))
        super().move(src, dst)


def test_plan_fed_to_the_queue_in_batches_keeps_phase_order(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the plan enqueued a few jobs at a time while workers run, every job still runs
    once, a file that replaces a remote folder is written only after the folder's content
    went (last phase), and a folder replacing a remote file is made before anything is
    written under it (first phase)."""
    import syncd.engine as eng

    monkeypatch.setattr(eng, "ENQUEUE_BATCH", 3)
    files = {f"a/f{i}": b"x" * i for i in range(10)} | {"gone_dir/k": b"k", "was_file": b"w"}
    files |= {f"keep{i}": b"k" for i in range(10)}
    cfg, src, dst = setup(tmp_path, files)
    clock = Clock()
    assert engine(cfg, Recording(dst), clock).reconcile(cfg.pairs[0], Options()).status == "ok"
    import shutil

    shutil.rmtree(src / "gone_dir")
    (src / "gone_dir").write_bytes(b"now a file")
    (src / "was_file").unlink()
    for i in range(7):
        (src / "was_file" / f"n{i}").parent.mkdir(exist_ok=True)
        (src / "was_file" / f"n{i}").write_bytes(b"n")
    remote = Recording(dst)
    res = engine(cfg, remote, clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and not res.failures, res.failures
    mirror = {k: v for k, v in tree(dst / "docs").items() if not k.startswith(".syncd-trash")}
    assert mirror == tree(src)
    ops = remote.ops
    assert ops[0] == ("move", "docs/was_file")        # trashed before anything else
    assert ops.index(("mkdir", "docs/was_file")) < min(
        ops.index(("put", f"docs/was_file/n{i}")) for i in range(7))
    assert ops[-1] == ("put", "docs/gone_dir")         # after the folder's content went
    assert ops.index(("move", "docs/gone_dir/k")) < len(ops) - 1
    puts = [p for op, p in ops if op == "put"]
    assert len(puts) == len(set(puts)) == 8


@pytest.mark.parametrize("becomes", ["directory", "symlink"])
def test_a_file_that_is_no_longer_one_at_its_upload_waits_for_the_next_scan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, becomes: str) -> None:
    """A file replaced by a directory (or a symlink) between the plan and its upload: the
    job ends at once, like a file that vanished (no retry could send it), and the next
    run syncs what the path is now."""
    import syncd.engine as eng

    cfg, src, dst = setup(tmp_path, FILES)
    clock = Clock()
    assert engine(cfg, None, clock).reconcile(cfg.pairs[0], Options()).status == "ok"
    f = src / "d0" / "f0.txt"
    f.write_bytes(b"changed")
    real = eng.plan_push

    def plan(*a: Any, **kw: Any) -> Any:
        out = real(*a, **kw)
        if f.is_file():
            f.unlink()
            if becomes == "directory":
                f.mkdir()
                (f / "inner").write_bytes(b"i")
            else:
                f.symlink_to(src / "d1" / "f1.txt")
        return out

    monkeypatch.setattr(eng, "plan_push", plan)
    res = engine(cfg, None, clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.retries == 0 and not res.failures, res.failures
    assert (dst / "docs" / "d0" / "f0.txt").read_bytes() == FILES["d0/f0.txt"]  # untouched
    monkeypatch.undo()
    res = engine(cfg, None, clock).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and not res.failures
    want = {k: v for k, v in tree(src).items() if becomes == "directory" or k != "d0/f0.txt"}
    mirror = {k: v for k, v in tree(dst / "docs").items() if not k.startswith(".syncd-trash")}
    assert mirror == want


def test_own_temps_go_first_even_when_an_upload_fails(tmp_path: Path) -> None:
    """A temp left by this state dir's interrupted upload holds remote space (on a full
    disk, the very space the retried upload needs). Its cleanup was a delete, skipped
    while any transfer failed: on a nearly full server the pair stayed stuck for good.
    Now it runs before the writes, whatever fails."""
    from syncd.model import TMP_PREFIX
    from syncd.remotes.base import owner_tag

    cfg, src, dst = setup(tmp_path, FILES)
    assert engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options()).status == "ok"
    remote = Faulty(dst, permanent=frozenset({"docs/d1/f1.txt"}))
    remote.tmp_owner = owner_tag(cfg.daemon.state_dir)  # as open_remote sets it
    own = dst / "docs" / "d0" / f"{TMP_PREFIX}{remote.tmp_owner}-00000000abcd"
    own.write_bytes(b"half of an upload a crash cut")
    (src / "d1" / "f1.txt").write_bytes(b"changed: its upload fails")
    res = engine(cfg, remote, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "failed" and [p for p, _ in res.failures] == ["d1/f1.txt"]
    assert not own.exists()


def test_lost_and_found_at_the_pair_root_is_never_touched(tmp_path: Path) -> None:
    """A pair rooted at a mount point: the remote's lost+found holds what fsck recovered and
    is neither deleted nor trashed; the local one is not uploaded. A pattern can re-include
    it; a lost+found deeper in the tree is ordinary data."""
    cfg, src, dst = setup(tmp_path, FILES)
    pair = cfg.pairs[0]
    cfg = cfg.__class__(cfg.source, cfg.daemon, cfg.remotes, (pair.__class__(
        **{**{f: getattr(pair, f) for f in pair.__slots__}, "delete": "propagate"}),))
    recovered = dst / "docs" / "lost+found" / "#1234"
    recovered.parent.mkdir(parents=True)
    recovered.write_bytes(b"recovered by fsck")
    (src / "lost+found").mkdir()
    (src / "lost+found" / "#99").write_bytes(b"local fsck leftovers")
    (src / "sub" / "lost+found").mkdir(parents=True)
    (src / "sub" / "lost+found" / "note.txt").write_bytes(b"just a folder name here")
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.deleted == 0 and res.trashed == 0
    assert recovered.read_bytes() == b"recovered by fsck"
    assert not (dst / "docs" / "lost+found" / "#99").exists()
    assert (dst / "docs" / "sub" / "lost+found" / "note.txt").read_bytes() == b"just a folder name here"

    pair = cfg.pairs[0]
    cfg = cfg.__class__(cfg.source, cfg.daemon, cfg.remotes, (pair.__class__(
        **{**{f: getattr(pair, f) for f in pair.__slots__}, "ignore": ("!/lost+found/",)}),))
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok"
    assert (dst / "docs" / "lost+found" / "#99").read_bytes() == b"local fsck leftovers"
    assert not recovered.exists()   # re-included: mirrored, so the remote-only file goes


def test_remote_names_that_are_not_utf8_are_left_alone(tmp_path: Path) -> None:
    """A remote file (or directory) whose name is not valid UTF-8 cannot be a synced file
    nor stored in the index: it is reported and never touched, even with delete =
    propagate, and the rest of the reconcile goes on."""
    cfg, src, dst = setup(tmp_path, FILES)
    pair = cfg.pairs[0]
    cfg = cfg.__class__(cfg.source, cfg.daemon, cfg.remotes, (pair.__class__(
        **{**{f: getattr(pair, f) for f in pair.__slots__}, "delete": "propagate"}),))
    docs = os.fsencode(dst / "docs")
    os.makedirs(os.path.join(docs, b"dir\xfe"))
    for p in (b"bad\xff.txt", b"dir\xfe/inner.txt"):
        with open(os.path.join(docs, p), "wb") as f:
            f.write(b"theirs")
    for _ in range(2):
        res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
        assert res.status == "ok" and res.deleted == 0 and not res.failures
    for p in (b"bad\xff.txt", b"dir\xfe/inner.txt"):
        with open(os.path.join(docs, p), "rb") as f:
            assert f.read() == b"theirs"


@pytest.mark.parametrize("how", ["one process", "one process per run", "clock set back"])
def test_trashing_one_path_twice_keeps_both_versions(tmp_path: Path, how: str) -> None:
    """Two reconciles in the same second (the daemon debounces 250 ms; one-shot runs, each
    its own process, one after the other) or after the clock was set back shared a trash
    folder: the second trashing of a path renamed over the first trashed version."""
    from syncd.engine import trash_stamp

    cfg, src, dst = setup(tmp_path, {"f.txt": b"version-1"})
    clock = Clock()
    e = engine(cfg, None, clock)
    stamps = []
    for version in (b"version-1", b"version-2", b"version-3"):
        if how != "one process":
            e.close()
            e = engine(cfg, None, clock)
        (src / "f.txt").write_bytes(version)
        assert e.reconcile(cfg.pairs[0], Options()).status == "ok"
        (src / "f.txt").unlink()
        (src / "keep.txt").write_bytes(b"so the root is not empty")
        if how == "clock set back":
            clock.t -= 3600
        res = e.reconcile(cfg.pairs[0], Options())
        assert res.status == "ok" and res.trashed == 1
        stamps.append(e.index.db.execute("SELECT trash_stamp FROM pairs").fetchone()[0])
    trashed = {k: v for k, v in tree(dst / "docs").items() if k.startswith(".syncd-trash")}
    assert sorted(trashed.values()) == [b"version-1", b"version-2", b"version-3"]
    assert len(set(stamps)) == 3, stamps
    assert trash_stamp(5.0) == trash_stamp(5.5) == "1970-01-01T000005Z"


class CaseInsensitive(LocalRemote):
    """A directory remote that resolves names case-insensitively, as an SMB/CIFS share or
    macOS does (case-preserving: a new name keeps its case, an existing one is reused)."""

    put_many = None   # type: ignore[assignment]  # one code path: put()
    stage_many = None   # type: ignore[assignment]

    def _canon(self, path: str) -> str:
        cur, out = str(self.root), []
        for c in path.split("/"):
            m = c
            if os.path.isdir(cur):
                m = next((n for n in os.listdir(cur) if n.lower() == c.lower()), c)
            out.append(m)
            cur = os.path.join(cur, m)
        return "/".join(out)

    def put(self, path: str, source: Any) -> Any:
        canon = self._canon(path)
        parent, _, name = canon.rpartition("/")
        if name != path.rpartition("/")[2] and os.path.exists(os.path.join(self.root, canon)):
            # Writing 'foo.txt' over 'Foo.txt' replaces that entry (keeping one name).
            os.unlink(os.path.join(self.root, canon))
            canon = f"{parent}/{path.rpartition('/')[2]}" if parent else path.rpartition("/")[2]
        return super().put(canon, source)._replace(path=path)

    def delete(self, paths: Any) -> None:
        super().delete([self._canon(p) for p in paths])

    def move(self, src: str, dst: str) -> None:
        super().move(self._canon(src), dst)

    def mkdir(self, path: str) -> Any:
        return super().mkdir(self._canon(path))

    def rmdir(self, path: str) -> bool:
        return super().rmdir(self._canon(path))


@pytest.mark.parametrize("delete", ["trash", "propagate"])
def test_case_only_renames_keep_the_file_on_a_case_insensitive_remote(tmp_path: Path,
                                                                       delete: str) -> None:
    """'Foo.txt' renamed 'foo.txt' (and 'Docs/' renamed 'docs/'): the upload of the new
    name landed on the old entry, and the removal of the old name, after the writes, then
    took the only copy away; the run still said "in sync"."""
    files = {"Foo.txt": b"precious", "Docs/a.txt": b"A", "Docs/sub/b.txt": b"B",
             "k1": b"1", "k2": b"2", "k3": b"3", "k4": b"4", "k5": b"5", "k6": b"6"}
    cfg, src, dst = setup(tmp_path, files)
    pair = cfg.pairs[0]
    cfg = cfg.__class__(cfg.source, cfg.daemon, cfg.remotes, (pair.__class__(
        **{**{f: getattr(pair, f) for f in pair.__slots__}, "delete": delete}),))
    remote = CaseInsensitive("nas", dst, fsync=False)
    clock = Clock()
    assert engine(cfg, remote, clock).reconcile(cfg.pairs[0], Options()).status == "ok"
    os.rename(src / "Foo.txt", src / "foo.txt")
    os.rename(src / "Docs", src / "docs")
    want = {"foo.txt": b"precious", "docs/a.txt": b"A", "docs/sub/b.txt": b"B",
            **{f"k{i}": str(i).encode() for i in range(1, 7)}}
    for _ in range(2):   # the rename, then a run that must find nothing to do
        clock.t += 1
        res = engine(cfg, remote, clock).reconcile(cfg.pairs[0], Options())
        assert res.status == "ok" and not res.failures
        mirror = {k: v for k, v in tree(dst / "docs").items() if not k.startswith(".syncd-trash")}
        assert mirror == want
    assert res.uploaded == 0 and res.deleted == 0 and res.trashed == 0


def test_a_state_dir_inside_the_local_root_is_never_synced(tmp_path: Path) -> None:
    """local = "~" with the default state dir ~/.local/state/syncd: the index changes on
    every run; it was uploaded (half-written) on every run, and woke the daemon forever."""
    state = tmp_path / "src" / ".local" / "state" / "syncd"
    cfg, src, dst = setup(tmp_path, FILES, state_dir=str(state))
    clock = Clock()
    for _ in range(2):
        res = engine(cfg, None, clock).reconcile(cfg.pairs[0], Options())
        assert res.status == "ok"
    assert res.uploaded == 0   # the second run: nothing changed that is synced
    assert tree(dst / "docs") == FILES   # .local/ had nothing else in it: not even made
    assert any(state.iterdir())


def test_with_patience_a_run_leaves_a_long_backoff_to_a_later_retry(tmp_path: Path) -> None:
    """The daemon runs pairs one after another: a pair whose transfers keep failing held
    every other pair (and SIGHUP, SIGUSR1) through all its retries, ~7 minutes with the
    default backoff. With patience, the run ends once the next retry is further away."""
    cfg, src, dst = setup(tmp_path, FILES, retry_initial="5s", retry_max="5m", max_attempts=10)
    clock = Clock()
    start = clock.t
    e = Engine(cfg, Index.open(cfg.daemon.state_dir), clock=clock, sleep=clock.sleep,
               patience=10.0)
    e.remotes["nas"] = Faulty(dst, transient=10**6)
    # Every backoff at its full length (no jitter): retries after 5 s and 10 s, then the
    # next is 20 s away, past the patience. With random jitter a run of short draws could
    # go on longer (a bound on it failed once in a full run).
    e.queue.rand = lambda: 1.0
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "failed" and len(res.failures) == 12
    assert all("retried in" in why for _, why in res.failures), res.failures
    assert clock.t - start < 60   # ~15 s; without patience: 5+10+...+300+300 s, ~20 min
    assert e.index.failed_jobs("p") == []   # not parked: the daemon's retry goes on


def test_an_unsyncable_name_holds_only_the_deletes_of_its_folder(tmp_path: Path) -> None:
    """A name the walk cannot sync (not UTF-8) may be a file renamed from a name the remote
    still has: deletes in that folder wait, not every delete of the pair. A backslash is
    an ordinary character on a directory remote: that file syncs."""
    files = {"odd/keep.txt": b"k", "other/keep.txt": b"k", "back\\slash.txt": b"b",
             "top/project/a.txt": b"a", "top/other.txt": b"o"}
    cfg, src, dst = setup(tmp_path, files)
    pair = cfg.pairs[0]
    cfg = cfg.__class__(cfg.source, cfg.daemon, cfg.remotes, (pair.__class__(
        **{**{f: getattr(pair, f) for f in pair.__slots__}, "delete": "propagate"}),))
    e = engine(cfg, None, Clock())
    assert e.reconcile(cfg.pairs[0], Options()).status == "ok"
    assert (dst / "docs" / "back\\slash.txt").read_bytes() == b"b"
    for d in ("odd", "other"):
        (dst / "docs" / d / "gone.txt").write_bytes(b"remote only")
    with open(os.path.join(os.fsencode(src / "odd"), b"caf\xe9.txt"), "wb") as f:
        f.write(b"renamed here?")
    # A folder renamed to such a name: the walk cannot enter it, so its files look deleted
    # under the old name; they are held too (the folder's own and everything below).
    os.rename(src / "top" / "project", os.path.join(os.fsencode(src / "top"), b"proj\xe9"))
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "failed"
    assert sorted(p for p, _ in res.failures) == ["odd/caf\\xe9.txt", "top/proj\\xe9"]
    assert (dst / "docs" / "odd" / "gone.txt").exists()        # held: same folder
    assert (dst / "docs" / "top" / "project" / "a.txt").exists()   # held: below
    assert not (dst / "docs" / "other" / "gone.txt").exists()  # deleted as usual
    # A bad *file* name at the top holds the deletes of the top folder only, and a name
    # reserved for syncd (a trash folder copied back) holds none.
    with open(os.path.join(os.fsencode(src), b"na\xefve.txt"), "wb") as f:
        f.write(b"x")
    (src / ".syncd-trash").mkdir()
    (src / "other" / "keep.txt").unlink()
    e.reconcile(cfg.pairs[0], Options())
    assert not (dst / "docs" / "other" / "keep.txt").exists()


def test_a_run_that_changed_a_directory_remote_ends_with_its_names_made_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes are synced before each rename; the renames (and new folders, deletes) were
    left to the file system's next journal commit. A run that changed something ends by
    making them durable: the folders it wrote in, fsynced one by one when they are few
    (the daemon's usual run: a syncfs would also wait for every other program's data),
    else one syncfs; a run that changed nothing does not pay it."""
    import syncd.remotes.local as local_mod

    synced: list[int] = []
    fsynced: list[int] = []
    real_syncfs, real_fsync = local_mod._syncfs, local_mod._fsync_ok

    def counting_syncfs(fd: int) -> int:
        synced.append(os.fstat(fd).st_ino)
        return real_syncfs(fd) if real_syncfs is not None else 0

    def counting_fsync(fd: int) -> bool:
        fsynced.append(os.fstat(fd).st_ino)
        return real_fsync(fd)

    monkeypatch.setattr(local_mod, "_syncfs", counting_syncfs)
    monkeypatch.setattr(local_mod, "_fsync_ok", counting_fsync)
    cfg, src, dst = setup(tmp_path, FILES)
    e = engine(cfg, None, Clock())
    assert e.reconcile(cfg.pairs[0], Options()).status == "ok"   # a first sync: syncfs
    assert synced and synced[-1] == os.stat(dst / "docs").st_ino
    synced.clear()
    assert e.reconcile(cfg.pairs[0], Options()).uploaded == 0
    assert synced == [] and fsynced == []
    (src / "d0" / "f0.txt").unlink()
    (src / "d1" / "f1.txt").write_bytes(b"changed")
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.trashed == 1 and res.uploaded == 1 and synced == []
    # The folders written in, and every folder on the way to the trashed copy (made by
    # this run: each is an entry in its parent) down from the pair's root.
    stamp = next((dst / "docs" / ".syncd-trash").iterdir())
    want = [dst / "docs" / "d0", dst / "docs" / "d1", dst / "docs",
            dst / "docs" / ".syncd-trash", stamp, stamp / "d0"]
    assert sorted(fsynced) == sorted(os.stat(d).st_ino for d in want)


def synced_long_ago(tmp_path: Path, remote: Callable[[Path], LocalRemote] | None = None
                    ) -> tuple[Engine, Any, Path, Path]:
    """FILES synced once by an engine (on `remote(dst)` if given), their mtimes old enough
    not to be racy: hashed once, then trusted to the stat cache."""
    cfg, src, dst = setup(tmp_path, FILES)
    old = time.time() - 100
    for rel in FILES:
        os.utime(src / rel, (old, old))
    e = engine(cfg, remote(dst) if remote else None, Clock())
    assert e.reconcile(cfg.pairs[0], Options()).status == "ok"
    return e, cfg, src, dst


def test_a_chmod_alone_is_synced_to_a_remote_that_keeps_modes(tmp_path: Path) -> None:
    """chmod changes neither content nor mtime: the stat signature holds the mode, and the
    base records the mode it was sent with. The file is read again (hashed), but only its
    mode goes to the remote: same remote file, same bytes."""
    e, cfg, src, dst = synced_long_ago(tmp_path)
    target = dst / "docs" / "d1" / "f1.txt"
    assert target.stat().st_mode & 0o777 == (src / "d1" / "f1.txt").stat().st_mode & 0o777
    ino = target.stat().st_ino
    os.chmod(src / "d1" / "f1.txt", 0o750)
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.uploaded_bytes) == (1, 0, 0)
    assert target.stat().st_mode & 0o777 == 0o750 and target.stat().st_ino == ino
    assert target.read_bytes() == (src / "d1" / "f1.txt").read_bytes()
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.hashed_files) == (0, 0, 0)   # cache holds


def test_a_chmod_job_sends_the_file_whole_if_it_is_not_the_one_planned(tmp_path: Path) -> None:
    """Replaced between the scan and the job by a file of the same size and mtime (ext4
    may even give it the same inode): the job reads it again, sees other content, and
    sends the whole file instead of just the mode."""
    e, cfg, src, dst = synced_long_ago(tmp_path)
    f = src / "d1" / "f1.txt"
    os.chmod(f, 0o750)
    real = transfer._attrs_many

    def swap_first(items: Any, ctx: Any, now_ns: Any) -> None:
        st = f.stat()
        data = f.read_bytes()
        f.unlink()
        f.write_bytes(bytes(b ^ 1 for b in data))   # same size, other bytes
        os.chmod(f, 0o750)
        os.utime(f, ns=(st.st_mtime_ns, st.st_mtime_ns))
        real(items, ctx, now_ns)

    with mock.patch.object(transfer, "_attrs_many", swap_first):
        res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.failures) == (0, 1, [])
    target = dst / "docs" / "d1" / "f1.txt"
    assert target.read_bytes() == f.read_bytes() and target.stat().st_mode & 0o777 == 0o750


def test_a_pair_pointed_elsewhere_syncs_there_afresh(tmp_path: Path) -> None:
    """The pair's path (or remote) changed in the config: its history is of the old place.
    It used to make the new, empty place look like an unmounted disk (exit 4)."""
    cfg, src, dst = setup(tmp_path, FILES)
    assert engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options()).status == "ok"
    pair = cfg.pairs[0]
    # The section renamed, pointing at the same place: the history still holds.
    renamed = cfg.__class__(cfg.source, cfg.daemon, {"box": cfg.remotes["nas"]}, (pair.__class__(
        **{**{f: getattr(pair, f) for f in pair.__slots__}, "remote": "box"}),))
    res = engine(renamed, None, Clock()).reconcile(renamed.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == 0
    cfg = cfg.__class__(cfg.source, cfg.daemon, cfg.remotes, (pair.__class__(
        **{**{f: getattr(pair, f) for f in pair.__slots__}, "path": "docs2"}),))
    dry = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options(dry_run=True))
    assert dry.status == "planned"   # as the real run will go, not "stopped"
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "ok" and res.uploaded == len(FILES)
    assert tree(dst / "docs2") == FILES and tree(dst / "docs") == FILES   # old place kept
    # And an emptied remote with that history is still caught.
    shutil.rmtree(dst / "docs2")
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "stopped" and "remote path is empty" in res.message


def test_an_unmounted_share_gets_nothing_from_runs_without_listing(tmp_path: Path) -> None:
    """The daemon's event-driven runs do not list the remote. With the share under a local
    remote unmounted, one of them wrote a changed file onto the bare mount point, making
    the remote path non-empty, and the next full reconcile sent the whole tree there. Now
    the run without listing finds the pair's directory gone and stops; and a full
    reconcile that finds most synced entries missing, next to a few strays, stops too."""
    files = {f"d{i % 4}/f{i}.txt": b"x%d" % i for i in range(40)}
    cfg, src, dst = setup(tmp_path, files)
    assert engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options()).status == "ok"
    (dst / "docs").rename(tmp_path / "share-away")      # "unmounted"
    (src / "d0" / "f0.txt").write_bytes(b"edited")
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options(list_remote=False))
    assert res.status == "stopped" and "remote directory is gone" in res.message
    assert not (dst / "docs").exists()
    # What an older syncd left on the bare mount point: one file. Full reconcile: stop.
    (dst / "docs" / "d0").mkdir(parents=True)
    (dst / "docs" / "d0" / "f0.txt").write_bytes(b"edited")
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options())
    assert res.status == "stopped" and "are missing there" in res.message, res.message
    assert set(tree(dst / "docs")) == {"d0/f0.txt"}
    # Mounted again: both kinds of run go on.
    shutil.rmtree(dst / "docs")
    (tmp_path / "share-away").rename(dst / "docs")
    res = engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options(list_remote=False))
    assert res.status == "ok" and res.uploaded == 1
    assert engine(cfg, None, Clock()).reconcile(cfg.pairs[0], Options()).status == "ok"
    assert tree(dst / "docs") == tree(src)


def test_a_chmod_job_sends_the_file_whole_if_the_remote_one_changed(tmp_path: Path) -> None:
    """The remote file changed between the plan and the job (someone wrote it): the mode
    alone would leave their bytes under our name, so the job sends the whole file."""
    e, cfg, src, dst = synced_long_ago(tmp_path)
    os.chmod(src / "d1" / "f1.txt", 0o750)
    target = dst / "docs" / "d1" / "f1.txt"
    real = transfer._attrs_many

    def remote_write_first(items: Any, ctx: Any, now_ns: Any) -> None:
        target.write_bytes(b"written on the remote meanwhile")
        real(items, ctx, now_ns)

    with mock.patch.object(transfer, "_attrs_many", remote_write_first):
        res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.failures) == (0, 1, [])
    assert target.read_bytes() == (src / "d1" / "f1.txt").read_bytes()
    assert target.stat().st_mode & 0o777 == 0o750


def test_a_refused_chmod_sends_the_whole_file(tmp_path: Path) -> None:
    """The remote refuses the chmod (a file of another owner: EPERM): the whole file goes,
    as before modes went alone (that needs only write access to the folder). Failing the
    job would leave the mode unsynced for good, the content being synced already."""
    e, cfg, src, dst = synced_long_ago(tmp_path)
    os.chmod(src / "d1" / "f1.txt", 0o750)

    def refuse(self: LocalRemote, path: str, **_: Any) -> Any:
        raise PermanentError("Operation not permitted", remote=self.name, path=path)

    with mock.patch.object(LocalRemote, "set_attrs", refuse):
        res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.failures) == (0, 1, [])
    assert (dst / "docs" / "d1" / "f1.txt").stat().st_mode & 0o777 == 0o750


def test_a_mode_change_that_did_not_reach_the_remote_is_planned_again(tmp_path: Path) -> None:
    """The chmod job failed for good (parked): the index holds the content as synced, but
    not the mode, so the next scan plans the chmod again instead of calling it clean."""
    e, cfg, src, dst = synced_long_ago(tmp_path)
    f = src / "d1" / "f1.txt"
    os.chmod(f, 0o750)

    def unreachable(self: LocalRemote, path: str, **_: Any) -> Any:
        raise TransientError("connection reset", remote=self.name, path=path)

    with mock.patch.object(LocalRemote, "set_attrs", unreachable):
        res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "failed" and res.attrs_set == 0
    target = dst / "docs" / "d1" / "f1.txt"
    assert target.stat().st_mode & 0o777 != 0o750
    for _ in range(2):   # a full reconcile, and a local-only one as the daemon's
        res = e.reconcile(cfg.pairs[0], Options())
        if res.attrs_set:
            break
    assert res.attrs_set == 1 and target.stat().st_mode & 0o777 == 0o750
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.hashed_files) == (0, 0, 0)


@pytest.mark.parametrize("change", ["chmod", "touch"])
def test_an_attribute_change_a_remote_cannot_carry_is_seen_once(tmp_path: Path,
                                                                change: str) -> None:
    """The remote keeps no modes and sets no mtime alone (S3, FTP): a local chmod or
    touch syncs nothing, and the base takes it (forgets the mode it was sent with; takes
    the local mtime), so later scans see the file clean."""
    e, cfg, src, dst = synced_long_ago(tmp_path, Faulty)
    caps = e.remotes["nas"].caps
    assert not caps.modes and not caps.mtimes
    f = src / "d1" / "f1.txt"
    want: int | None = None
    if change == "chmod":
        os.chmod(f, 0o750)
        column = "b_mode"
    else:
        want = time.time_ns() - 50 * 10**9
        os.utime(f, ns=(want, want))
        column = "b_mtime"
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.uploaded, res.attrs_set, res.hashed_files) == (0, 0, 1)
    row = e.index.db.execute(f"SELECT {column} FROM entries WHERE path = 'd1/f1.txt'").fetchone()
    assert row == (want,)
    clean, _ = e.index.load_prior("p")
    assert "d1/f1.txt" in clean
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.uploaded, res.attrs_set, res.hashed_files) == (0, 0, 0)


def test_a_touch_alone_sets_the_remote_mtime(tmp_path: Path) -> None:
    """Content and mode unchanged, mtime moved (touch, or a tool that rewrote the same
    bytes): the file is read again (hashed), and only its mtime goes to the remote, as
    rclone and rsync -a do: same remote file, no bytes sent. Then it is clean again."""
    e, cfg, src, dst = synced_long_ago(tmp_path)
    f, target = src / "d1" / "f1.txt", dst / "docs" / "d1" / "f1.txt"
    ino = target.stat().st_ino
    new = time.time_ns() - 50 * 10**9 + 123
    os.utime(f, ns=(new, new))
    plan = e.reconcile(cfg.pairs[0], Options(dry_run=True)).plan
    assert [(a.op, a.path, a.reason) for a in plan] == [(Op.ATTRS, "d1/f1.txt", "mtime changed")]
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.uploaded_bytes) == (1, 0, 0)
    assert target.stat().st_mtime_ns == new and target.stat().st_ino == ino
    assert target.read_bytes() == f.read_bytes()
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.hashed_files) == (0, 0, 0)   # cache holds
    # Mode and mtime at once: one job sets both.
    os.chmod(f, 0o700)
    os.utime(f, ns=(new + 10**9, new + 10**9))
    plan = e.reconcile(cfg.pairs[0], Options(dry_run=True)).plan
    assert [(a.op, a.reason) for a in plan] == [(Op.ATTRS, "mode and mtime changed")]
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded) == (1, 0)
    assert (target.stat().st_mtime_ns, target.stat().st_mode & 0o777) == (new + 10**9, 0o700)


def test_a_chmod_or_touch_over_a_tree_goes_to_the_remote_in_batches(tmp_path: Path) -> None:
    """`chmod -R` / `touch` over many files: the attrs jobs of a chunk go to the remote in
    one set_attrs_many call (SFTP pipelines them; the local remote syncs them together),
    not one call per file; a file replaced meanwhile still goes whole, alone."""
    e, cfg, src, dst = synced_long_ago(tmp_path)
    new = time.time_ns() - 50 * 10**9
    for rel in FILES:
        os.chmod(src / rel, 0o700)
        os.utime(src / rel, ns=(new, new))
    real = LocalRemote.set_attrs_many
    calls: list[int] = []

    def count(self: LocalRemote, items: Any) -> Any:
        calls.append(len(items))
        return real(self, items)

    with mock.patch.object(LocalRemote, "set_attrs_many", count):
        res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.uploaded_bytes, res.failures) == (
        len(FILES), 0, 0, [])
    assert sum(calls) == len(FILES) and max(calls) > 1
    for rel in FILES:
        st = (dst / "docs" / rel).stat()
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o700, new), rel
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.hashed_files) == (0, 0, 0)


def test_attrs_jobs_sent_whole_go_in_groups_of_a_chunks_bytes(tmp_path: Path) -> None:
    """A remote that refuses attributes alone gets the files whole, several per put_many
    call, but no more bytes per call than a chunk of uploads (each call has all its temp
    files at once on the remote)."""
    big = {f"d{i}/f{i}.bin": os.urandom(1_500_000) for i in range(6)}
    cfg, src, dst = setup(tmp_path, big)
    old = time.time() - 100
    for rel in big:
        os.utime(src / rel, (old, old))
    e = engine(cfg, None, Clock())
    assert e.reconcile(cfg.pairs[0], Options()).uploaded == 6
    for rel in big:
        os.chmod(src / rel, 0o600)

    def refuse(self: LocalRemote, items: Any) -> Any:
        return [PermanentError("Operation not permitted", remote=self.name, path=p)
                for p, *_ in items]

    real, calls = LocalRemote.put_many, []

    def spy(self: LocalRemote, items: Any) -> Any:
        calls.append(sum(src.size for _, src in items))
        return real(self, items)

    with mock.patch.object(LocalRemote, "set_attrs_many", refuse), \
            mock.patch.object(LocalRemote, "put_many", spy):
        res = e.reconcile(cfg.pairs[0], Options())
    assert (res.uploaded, res.attrs_set, res.failures) == (6, 0, [])
    assert len(calls) >= 2 and max(calls) <= transfer.CHUNK_BYTES and sum(calls) == 9_000_000
    assert all((dst / "docs" / rel).stat().st_mode & 0o777 == 0o600 for rel in big)


def test_an_mtime_change_that_did_not_reach_the_remote_is_planned_again(tmp_path: Path) -> None:
    """The touch's job failed (remote unreachable): the index holds the content as synced
    but not the mtime, so the next scan plans it again instead of calling it clean."""
    e, cfg, src, dst = synced_long_ago(tmp_path)
    f, target = src / "d1" / "f1.txt", dst / "docs" / "d1" / "f1.txt"
    new = time.time_ns() - 50 * 10**9
    os.utime(f, ns=(new, new))

    def unreachable(self: LocalRemote, path: str, **_: Any) -> Any:
        raise TransientError("connection reset", remote=self.name, path=path)

    with mock.patch.object(LocalRemote, "set_attrs", unreachable):
        res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "failed" and res.attrs_set == 0 and target.stat().st_mtime_ns != new
    for _ in range(2):   # a full reconcile, and a local-only one as the daemon's
        res = e.reconcile(cfg.pairs[0], Options())
        if res.attrs_set:
            break
    assert res.attrs_set == 1 and target.stat().st_mtime_ns == new
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.attrs_set, res.uploaded, res.hashed_files) == (0, 0, 0)


def test_a_state_dir_inside_the_remote_directory_is_never_listed_as_remote_content(
        tmp_path: Path) -> None:
    """The config refuses it; should the state dir get there anyway (a config not checked,
    a directory moved under a running syncd), it is not removed as a remote-only file."""
    import dataclasses

    cfg, src, dst = setup(tmp_path, FILES)
    state = dst / "docs" / "state"
    cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, state_dir=state))
    e = engine(cfg, None, Clock())
    try:
        res = e.reconcile(cfg.pairs[0], Options())
        again = e.reconcile(cfg.pairs[0], Options())
    finally:
        e.close()
        e.index.close()
    assert res.status == "ok" and again.status == "ok", (res.message, again.message)
    assert again.trashed == 0 and again.deleted == 0
    assert {"index.sqlite3", "tmp-owner"} <= {p.name for p in state.iterdir()}
    assert not (dst / "docs" / ".syncd-trash").exists()
