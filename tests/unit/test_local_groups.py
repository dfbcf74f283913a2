"""New directories on the local remote go in whole: their files are written under their
final names into a temp directory, made durable, and renamed into place with one
renameat2(RENAME_NOREPLACE). What must hold: readers never see part of a group; a
directory that appears meanwhile (another batch's part of it, someone else's mkdir) gets
the files moved in one by one; nothing is left behind by a failure, a discard or a crash."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import pytest

import syncd.remotes.local as local_mod
from syncd.engine import Options
from syncd.listing import DIR_FP
from syncd.model import TMP_PREFIX, Action, Job, Kind, Op, RemoteEntry
from syncd.plan import Policy, plan_push
from syncd.queue import Outcome
from syncd.remotes.base import Source, Staged
from syncd.remotes.local import LocalRemote
from syncd.scan import Matcher, walk
from syncd.transfer import _publish_batches, _take_chunk
from tests.unit.test_engine import Clock, engine, setup, tree

pytestmark = pytest.mark.skipif(local_mod._renameat2 is None,
                                reason="no renameat2 in this libc: groups are off")


def stage(r: LocalRemote, src: Path, files: dict[str, bytes], dirs: tuple[str, ...] = (),
          base: str = "") -> list[Any]:
    sources = []
    for p, data in files.items():
        f = src / p.replace("/", "_")
        f.write_bytes(data)
        sources.append(Source(str(f), p))
    try:
        return r.stage_many(list(zip(files, sources, strict=True)), dirs, base)
    finally:
        for so in sources:
            so.close()


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def temps(root: Path) -> list[Path]:
    return list(root.rglob(f"{TMP_PREFIX}*"))


@pytest.fixture
def env(tmp_path: Path) -> tuple[LocalRemote, Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    return LocalRemote("nas", dst), src, dst


def test_a_new_directory_appears_whole_with_one_rename(env: Any) -> None:
    r, src, dst = env
    files = {f"new/sub/f{i}": b"x" * i for i in range(5)} | {"new/top": b"t"}
    staged = stage(r, src, files, dirs=("new", "new/sub", "new/empty"))
    items, for_dirs = staged[:len(files)], staged[len(files):]
    assert all(isinstance(s, Staged) and s.group == "new" for s in staged)
    assert not (dst / "new").exists()   # nothing under a final path before the publish
    assert files_under(dst / items[0].gtmp) == {k[len("new/"):]: v for k, v in files.items()}
    assert [s.sent for s in for_dirs] == [-1, -1, -1]
    r.flush(staged)
    res = r.publish_many(staged)
    assert [e.kind for e in res] == [Kind.FILE] * len(files) + [Kind.DIR] * 3
    assert all(e.fp == f"{len(files[e.path])}:{e.mtime_ns}" for e in res[:len(files)])
    assert res[-1].fp == DIR_FP
    assert files_under(dst) == files and (dst / "new" / "empty").is_dir()
    assert not temps(dst)


def test_existing_directories_take_plain_temp_files(env: Any) -> None:
    r, src, dst = env
    (dst / "old").mkdir()
    staged = stage(r, src, {"old/a": b"a", "top": b"b"}, dirs=("old",))
    assert [s.group for s in staged[:2]] == ["", ""] and staged[2] is None
    r.flush(staged[:2])
    r.publish_many(staged[:2])
    assert files_under(dst) == {"old/a": b"a", "top": b"b"}


def test_two_batches_of_one_new_directory_both_land(env: Any) -> None:
    """Each batch has its own temp directory: the first rename wins, the other batch's
    files are moved in one by one (renameat2 refuses to replace the directory)."""
    r, src, dst = env
    a = stage(r, src, {"d/1": b"1", "d/2": b"2"}, dirs=("d",))
    b = stage(r, src, {"d/3": b"3", "d/e/4": b"4"}, dirs=("d/e",))
    assert a[0].gtmp != b[0].gtmp and a[0].group == b[0].group == "d"
    r.flush(a + b)
    assert not any(isinstance(e, Exception) for e in r.publish_many(b))
    assert not any(isinstance(e, Exception) for e in r.publish_many(a))
    assert files_under(dst) == {"d/1": b"1", "d/2": b"2", "d/3": b"3", "d/e/4": b"4"}
    assert not temps(dst)


def test_a_directory_made_meanwhile_gets_the_files_moved_in(env: Any) -> None:
    r, src, dst = env
    staged = stage(r, src, {"d/1": b"1", "e/2": b"2"})
    (dst / "d").mkdir()
    (dst / "d" / "theirs").write_bytes(b"kept")
    (dst / "e").mkdir(mode=0o700)   # empty: a plain rename(2) would replace it
    ino = (dst / "e").stat().st_ino
    r.flush(staged)
    assert not any(isinstance(e, Exception) for e in r.publish_many(staged))
    assert files_under(dst) == {"d/1": b"1", "d/theirs": b"kept", "e/2": b"2"}
    assert (dst / "e").stat().st_ino == ino and not temps(dst)


def test_a_file_that_fails_to_stage_leaves_the_rest_of_its_group(env: Any) -> None:
    r, src, dst = env
    (src / "gone").write_bytes(b"x")
    s_ok = Source(str(src / "gone"), "g/ok")
    (src / "shrinks").write_bytes(b"y" * 100)
    s_bad = Source(str(src / "shrinks"), "g/bad")
    (src / "shrinks").write_bytes(b"y")   # changed after open: verify fails
    try:
        staged = r.stage_many([("g/ok", s_ok), ("g/bad", s_bad)])
    finally:
        s_ok.close()
        s_bad.close()
    assert isinstance(staged[0], Staged) and isinstance(staged[1], Exception)
    r.flush([staged[0]])
    r.publish_many([staged[0]])
    assert files_under(dst) == {"g/ok": b"x"} and not temps(dst)


def test_discard_and_a_vanished_parent_leave_no_temp(env: Any) -> None:
    r, src, dst = env
    staged = stage(r, src, {"x/1": b"1", "x/y/2": b"2"})
    r.discard(staged)
    assert not temps(dst) and not (dst / "x").exists()
    (dst / "p").mkdir()
    staged = stage(r, src, {"p/q/1": b"1"})
    r.flush(staged)
    import shutil

    shutil.rmtree(dst / "p")   # the parent of the new directory is gone at publish
    res = r.publish_many(staged)
    assert isinstance(res[0], Exception) and not temps(dst)


def test_the_pairs_own_directory_is_made_directly(env: Any) -> None:
    """A temp directory must lie inside the pair's directory, where its listing (and so
    the cleanup after a crash) can find it."""
    r, src, dst = env
    staged = stage(r, src, {"pair/sub/a": b"a", "pair/b": b"b"}, base="pair")
    assert (dst / "pair").is_dir()
    assert {s.group for s in staged} == {"pair/sub", ""}
    assert all(s.gtmp.startswith("pair/") for s in staged if s.group)


def test_a_groups_temp_files_are_made_durable_with_their_directories(
        env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    r, src, dst = env
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    staged = stage(r, src, {"n/m/f": b"f"}, dirs=("n", "n/m"))
    monkeypatch.setattr(os, "fsync", fsync)
    r.flush(staged)
    gt = str(dst / staged[0].gtmp)
    # The file, and every directory on the way: the entries must be durable too.
    assert {gt + "/m/f", gt + "/m", gt} <= set(synced)


def test_a_crash_leftover_is_cleaned_and_a_foreign_one_left_alone(tmp_path: Path) -> None:
    """A temp directory of this state dir (a run killed before its publish) is removed by
    the next reconcile; another syncd's is neither removed nor mistaken for content to
    delete, whatever the delete policy."""
    files = {"a/1": b"1"}
    cfg, src, dst = setup(tmp_path, files)
    e = engine(cfg, None, Clock())
    owner = e.remote("nas").tmp_owner   # type: ignore[attr-defined]
    ours = dst / "docs" / f"{TMP_PREFIX}{owner}-00000000abcd"
    theirs = dst / "docs" / f"{TMP_PREFIX}someone-00000000abcd"
    for d in (ours, theirs):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "f").write_bytes(b"partial")
    res = e.reconcile(cfg.pairs[0], Options())
    assert res.status == "ok", res.failures
    assert not ours.exists() and (theirs / "sub" / "f").read_bytes() == b"partial"
    assert tree(dst / "docs") == {**files, f"{theirs.name}/sub/f": b"partial"}


def test_plan_cleans_our_temp_directories_and_skips_what_is_in_any() -> None:
    remote = {
        ".syncd-tmp-me-1": RemoteEntry(".syncd-tmp-me-1", Kind.DIR, 0, 0, DIR_FP),
        ".syncd-tmp-me-1/f": RemoteEntry(".syncd-tmp-me-1/f", Kind.FILE, 1, 1, "1:1"),
        "d/.syncd-tmp-you-2": RemoteEntry("d/.syncd-tmp-you-2", Kind.DIR, 0, 0, DIR_FP),
        "d/.syncd-tmp-you-2/g/h": RemoteEntry("d/.syncd-tmp-you-2/g/h", Kind.FILE, 1, 1, "1:1"),
    }
    for delete in ("trash", "propagate", "keep"):
        acts = plan_push({}, {}, remote, Policy(delete=delete, tmp_owner="me"))
        assert [(a.op, a.path, a.kind) for a in acts] == [
            (Op.CLEANUP, ".syncd-tmp-me-1", Kind.DIR)], delete


def test_walk_puts_each_directory_right_before_its_files(tmp_path: Path) -> None:
    for rel in ("a/1", "a/2", "a/b/3", "c/4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    order = list(walk(str(tmp_path), {}, {}, Matcher([])).states)
    for d in ("a", "a/b", "c"):
        i = order.index(d)
        mine = [p for p in order if p.rpartition("/")[0] == d]
        assert order[i + 1:i + 1 + len(mine)] == mine, order


def job(i: int, path: str, op: Op = Op.UPLOAD) -> Job:
    return Job(i, "p", path, Action(op, path, "new", 1), 0, 0.0, None)


def test_chunks_end_where_a_directory_ends() -> None:
    q = deque([job(0, "a", Op.MKDIR), *(job(i, f"a/{i}") for i in range(1, 6)),
               job(6, "b", Op.MKDIR), *(job(i, f"b/{i}") for i in range(7, 12))])
    first = _take_chunk(q, 1 << 30, 8)
    assert [j.path for j in first] == ["a", "a/1", "a/2", "a/3", "a/4", "a/5"]
    assert q[0].path == "b"
    # A directory larger than a chunk is cut anyway (no chunk shrinks below half).
    q = deque(job(i, f"big/{i}") for i in range(20))
    assert len(_take_chunk(q, 1 << 30, 8)) == 8


def test_publish_batches_never_split_a_group() -> None:
    def item(path: str, gtmp: str) -> tuple[Outcome, Staged]:
        return (Outcome(job(0, path)), Staged(path, "t", 1, 1, "g" if gtmp else "", gtmp))

    items = [item(f"p{i}", "") for i in range(5)] + [item(f"g{i}", "T1") for i in range(4)] \
        + [item(f"h{i}", "T2") for i in range(3)]
    batches = _publish_batches(items, 4)
    assert sorted(it[1].path for b in batches for it in b) == sorted(s.path for _, s in items)
    for b in batches:
        for g in ("T1", "T2"):
            n = sum(1 for _, s in b if s.gtmp == g)
            assert n in (0, sum(1 for _, s in items if s.gtmp == g))
