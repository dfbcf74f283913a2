"""The remote half of a reconcile: diff_listing, the local remote's one-loop diff (must
agree with it exactly), and the forked Listing with its fallback."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from syncd.errors import NotFound
from syncd.listing import DIR_FP, Listing, RemoteDiff, diff_listing, drop_ignored_dirs
from syncd.model import Kind, RemoteEntry
from syncd.remotes.local import LocalRemote

F, D = int(Kind.FILE), int(Kind.DIR)


def build(root: Path, seed: int) -> None:
    rnd = random.Random(seed)
    for i in range(60):
        p = root / "pfx" / f"d{rnd.randint(0, 4)}" / f"s{rnd.randint(0, 2)}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(rnd.randint(0, 50)))
    (root / "pfx" / ".syncd-trash" / "t").mkdir(parents=True)
    (root / "pfx" / ".syncd-trash" / "t" / "old").write_bytes(b"x")
    (root / "pfx" / "link").symlink_to(root / "pfx" / "d0")
    os.mkfifo(root / "pfx" / "fifo")


def expected_from(entries: list[RemoteEntry], seed: int) -> dict[str, str]:
    """Bases that match most entries, disagree with some, and name some that are gone."""
    rnd = random.Random(seed)
    exp: dict[str, str] = {}
    for e in entries:
        r = rnd.random()
        if r < 0.7:
            exp[e.path] = e.fp
        elif r < 0.8:
            exp[e.path] = "stale"
        elif r < 0.85:
            exp[e.path] = "1:1" if e.kind == D else "dir"   # kind changed
    for i in range(5):
        exp[f"gone/{i}"] = "1:1"
    return exp


@pytest.mark.parametrize("seed", range(8))
def test_local_one_loop_diff_agrees_with_list_then_diff(tmp_path: Path, seed: int) -> None:
    build(tmp_path, seed)
    r = LocalRemote("t", tmp_path)
    entries = list(r.list("pfx"))
    exp = expected_from(entries, seed)
    fast, slow = r.diff("pfx", exp), diff_listing(iter(entries), exp)
    assert fast.changed == slow.changed and sorted(fast.gone) == sorted(slow.gone)
    assert (fast.files, fast.entries) == (slow.files, slow.entries)
    assert fast.changed and fast.gone   # the case mix really exercised both branches


def test_diff_of_missing_prefix_reports_every_base_gone(tmp_path: Path) -> None:
    d = LocalRemote("t", tmp_path).diff("nope", {"a": "1:1"})
    assert d.gone == ["a"] and d.changed == {} and d.files == 0


def test_keep_filter_drops_entries_before_comparing() -> None:
    es = [RemoteEntry("a", F, 1, 1, "x"), RemoteEntry("b.tmp", F, 1, 1, "y")]
    d = diff_listing(iter(es), {"b.tmp": "y"}, keep=lambda e: not e.path.endswith(".tmp"))
    assert list(d.changed) == ["a"] and d.gone == ["b.tmp"] and d.files == 1


@pytest.mark.parametrize("seed", range(40))
def test_dropping_ignored_dirs_after_the_diff_equals_filtering_each_entry(seed: int) -> None:
    """drop_ignored_dirs (what the engine does for rules that each name one directory)
    gives exactly what diff_listing with a per-entry keep gives: the same changes, gone
    paths and counts, bases that were synced before the rule included."""
    rnd = random.Random(seed)
    # Top-level names, and deeper ones (the state dir inside a pair: ".local/state/syncd").
    names = frozenset({"lost+found", "build", "docs/gen", "keep/a/b"})
    entries = []
    for top in ("lost+found", "build", "docs", "keep"):
        if top == "keep" or rnd.random() < 0.8:
            # Sometimes a top-level *file* with an ignored directory's name: kept.
            as_file = top != "docs" and rnd.random() < 0.2
            entries.append(RemoteEntry(top, F, 1, 1, "1:1") if as_file
                           else RemoteEntry(top, D, 0, 0, DIR_FP))
            if not as_file:
                for i in range(rnd.randint(0, 6)):
                    sub = f"{top}/s{i % 2}" if i % 3 else top
                    if sub != top:
                        entries.append(RemoteEntry(sub, D, 0, 0, DIR_FP))
                    entries.append(RemoteEntry(f"{sub}/f{i}", F, i, i, f"{i}:{i}"))
    for deep in ("docs/gen", "keep/a/b"):
        if rnd.random() < 0.7:
            parent = deep.rpartition("/")[0]
            if parent != "docs":
                entries.append(RemoteEntry(parent, D, 0, 0, DIR_FP))
            if rnd.random() < 0.2:   # a file with the directory's name: kept
                entries.append(RemoteEntry(deep, F, 2, 2, "2:2"))
            else:
                entries.append(RemoteEntry(deep, D, 0, 0, DIR_FP))
                for i in range(rnd.randint(0, 3)):
                    entries.append(RemoteEntry(f"{deep}/g{i}", F, i, i, f"{i}:{i}"))
    entries = list({e.path: e for e in entries}.values())
    exp = expected_from(entries, seed)
    exp["build/old-base"] = "3:3"
    exp.setdefault("lost+found", DIR_FP)

    def keep(e: RemoteEntry) -> bool:
        return not (any(e.path.startswith(n + "/") for n in names)
                    or (e.path in names and e.kind == D))

    want = diff_listing(iter(entries), exp, keep)
    got = drop_ignored_dirs(diff_listing(iter(entries), exp), exp, names)
    assert got.changed == want.changed and sorted(got.gone) == sorted(want.gone)
    assert (got.files, got.entries) == (want.files, want.entries)


def test_forked_listing_returns_the_childs_result() -> None:
    d = Listing(lambda: RemoteDiff(files=7), fork=True).result()
    assert d.files == 7


def test_forked_listing_reraises_remote_errors_with_their_fields() -> None:
    def boom() -> RemoteDiff:
        raise NotFound("no such dir", remote="nas", path="x/y")

    with pytest.raises(NotFound) as ei:
        Listing(boom, fork=True).result()
    assert ei.value.remote == "nas" and ei.value.path == "x/y"


def test_child_crash_falls_back_to_listing_in_process() -> None:
    pid = os.getpid()

    def only_in_parent() -> RemoteDiff:
        if os.getpid() != pid:
            raise RuntimeError("the child cannot list")
        return RemoteDiff(files=3)

    assert Listing(only_in_parent, fork=True).result().files == 3


def test_forked_listing_child_keeps_the_parents_objects_out_of_its_collections() -> None:
    # A collection in the child writes to the header of every object it scans, which
    # would copy the parent's whole heap page by page.
    import gc

    assert gc.get_freeze_count() == 0
    d = Listing(lambda: RemoteDiff(files=gc.get_freeze_count()), fork=True).result()
    assert d.files > 1000
    assert gc.get_freeze_count() == 0   # the parent's collector is untouched
