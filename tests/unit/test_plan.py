"""The planner, as a table of named scenarios plus a property: applying the plan to a model
remote makes it equal to the local tree."""

from __future__ import annotations

import posixpath

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.model import (
    DELETING_OPS,
    TMP_PREFIX,
    TRASH_DIR,
    Action,
    Base,
    Kind,
    LocalState,
    Op,
    RemoteEntry,
    When,
    phase,
)
from syncd.plan import STALE_TMP_NS, Facts, Policy, check_safety, plan_push

F, D = int(Kind.FILE), int(Kind.DIR)


def h(content: str) -> bytes:
    return xxhash.xxh3_128_digest(content.encode())


def mt(content: str) -> int:
    return 1_700_000_000_000_000_000 + xxhash.xxh64_intdigest(content.encode()) % 10**9


def loc(content: str | None) -> LocalState:
    if content is None:
        return LocalState(D, 0, 0, 1, 0o755, None)
    return LocalState(F, len(content), mt(content), 1, 0o644, h(content))


def rem(path: str, content: str | None, fp: str | None = None) -> RemoteEntry:
    if content is None:
        return RemoteEntry(path, D, 0, 0, "dir")
    return RemoteEntry(path, F, len(content), mt(content), fp or f"fp-{content}")


def base(content: str | None, fp: str | None = None) -> Base:
    if content is None:
        return Base(D, 0, 0, None, "dir")
    return Base(F, len(content), mt(content), h(content), fp or f"fp-{content}")


DIR = None  # marker for "a directory" in the table
NOW = 1_800_000_000_000_000_000

# name, local, base, remote, policy delete, expected [(op, reason)]
CASES = [
    ("new local file", "A", None, "-", "trash", [(Op.UPLOAD, "new")]),
    ("unchanged", "A", "A", "A", "trash", []),
    ("changed locally", "B", "A", "A", "trash", [(Op.UPLOAD, "changed")]),
    ("remote drifted", "A", "A", "X", "trash", [(Op.UPLOAD, "remote drift")]),
    ("remote vanished", "A", "A", "-", "trash", [(Op.UPLOAD, "missing on remote")]),
    ("remote equal, no base: adopt", "A", None, "A", "trash", [(Op.ADOPT, "")]),
    ("remote differs, no base", "A", None, "B", "trash", [(Op.UPLOAD, "differs from remote")]),
    ("deleted locally, trash", "-", "A", "A", "trash", [(Op.TRASH, "deleted locally")]),
    ("deleted locally, propagate", "-", "A", "A", "propagate", [(Op.DELETE, "deleted locally")]),
    ("deleted locally, keep", "-", "A", "A", "keep", [(Op.FORGET, "")]),
    ("remote-only file, trash", "-", None, "A", "trash", [(Op.TRASH, "not in the local tree")]),
    ("remote-only file, keep", "-", None, "A", "keep", []),
    ("gone on both sides", "-", "A", "-", "trash", [(Op.FORGET, "")]),
    ("new dir", DIR, None, "-", "trash", [(Op.MKDIR, "new")]),
    ("dir exists remotely, no base", DIR, None, DIR, "trash", [(Op.ADOPT, "")]),
    ("dir in sync", DIR, DIR, DIR, "trash", []),
    ("dir deleted locally", "-", DIR, DIR, "propagate", [(Op.RMDIR, "deleted locally")]),
    ("file where remote has dir", "A", None, DIR, "trash",
     [(Op.UPLOAD, "replaces a remote directory")]),
    ("dir where remote has file", DIR, None, "A", "trash", [(Op.MKDIR, "replaces a remote file")]),
    ("dir replaced a synced file", DIR, "A", "A", "propagate",
     [(Op.MKDIR, "replaces a remote file")]),
    ("file where remote has dir, keep", "A", None, DIR, "keep", [(Op.CONFLICT, "delete = keep")]),
    ("dir where remote has file, keep", DIR, None, "A", "keep", [(Op.CONFLICT, "delete = keep")]),
]


@pytest.mark.parametrize("name, l, b, r, delete, expected", CASES, ids=[c[0] for c in CASES])
def test_plan_table(name: str, l: str | None, b: str | None, r: str | None, delete: str,
                    expected: list[tuple[Op, str]]) -> None:
    p = "f"
    local = {} if l == "-" else {p: loc(l)}
    bases = {} if b == "-" or (b is None and name not in ("dir in sync", "dir deleted locally")) \
        else {p: base(b)}
    remote = {} if r == "-" else {p: rem(p, r)}
    acts = plan_push(local, bases, remote, Policy(delete=delete, trash_stamp="T", now_ns=NOW))
    got = [(a.op, a.reason) for a in acts]
    want = [(op, reason) for op, reason in expected]
    assert [g[0] for g in got] == [w[0] for w in want], name
    for (_, greason), (_, wreason) in zip(got, want, strict=True):
        assert wreason in greason


def test_file_replacing_a_directory_waits_for_its_content_to_go() -> None:
    """Local 'x' is now a file; the remote still has directory x/ with x/a and x/sub/b.
    The content is trashed, the emptied directories removed deepest first, and only then
    the file is written (it removes the empty directory itself)."""
    local = {"x": loc("A")}
    remote = {"x": rem("x", None), "x/a": rem("x/a", "B"), "x/sub": rem("x/sub", None),
              "x/sub/b": rem("x/sub/b", "C")}
    bases = {"x": base(None), "x/a": base("B"), "x/sub": base(None), "x/sub/b": base("C")}
    acts = plan_push(local, bases, remote, Policy(delete="trash", trash_stamp="T", now_ns=NOW))
    assert [(a.op, a.path) for a in acts] == [
        (Op.TRASH, "x/a"), (Op.TRASH, "x/sub/b"), (Op.RMDIR, "x/sub"), (Op.UPLOAD, "x")]
    assert acts[-1].replaces == D and phase(acts[-1]) > max(phase(a) for a in acts[:-1])


def test_directory_replacing_a_file_clears_it_before_anything_is_written_under_it() -> None:
    local = {"x": loc(None), "x/a": loc("A"), "y": loc("Y")}
    remote = {"x": rem("x", "OLD")}
    bases = {"x": base("OLD")}
    acts = plan_push(local, bases, remote, Policy(delete="trash", trash_stamp="T", now_ns=NOW))
    assert (acts[0].op, acts[0].path) == (Op.MKDIR, "x")
    mk = acts[0]
    assert mk.replaces == F and mk.dest == f"{TRASH_DIR}/T/x" and mk.size == 3
    assert phase(mk) < min(phase(a) for a in acts[1:])
    acts = plan_push(local, bases, remote, Policy(delete="propagate", now_ns=NOW))
    assert acts[0].replaces == F and acts[0].dest == ""
    # Replacing a file removes it: it counts against max_delete like a delete.
    trip = check_safety(acts, facts(remote_files=1, max_delete=0))
    assert trip is not None and "deletes 1 of 1" in trip.reason


def test_replacement_survives_the_queue_round_trip() -> None:
    from syncd.index import action_from_json, action_to_json

    a = Action(Op.MKDIR, "x", "replaces a remote file", 3, dest="t/x", replaces=F)
    assert action_from_json("x", action_to_json(a)) == a
    plain = Action(Op.UPLOAD, "y", "new", 1, b"h" * 16, 5)
    assert "replaces" not in action_to_json(plain) and action_from_json("y", action_to_json(plain)) == plain


@settings(max_examples=300, deadline=None)
@given(op=st.sampled_from(list(Op)), reason=st.text(), size=st.integers(0, 1 << 62),
       h=st.none() | st.binary(min_size=16, max_size=16), mtime=st.integers(0, 1 << 62),
       dest=st.text(), fp=st.text(), kind=st.sampled_from([F, D]),
       replaces=st.sampled_from([0, F, D]))
def test_job_args_encoding_round_trips(op: Op, reason: str, size: int, h: bytes | None,
                                       mtime: int, dest: str, fp: str, kind: int,
                                       replaces: int) -> None:
    """The hand-written JSON of a job's args reads back exactly, quotes, control
    characters and lone surrogates (non-UTF-8 names) included, and is what json.dumps
    would have written."""
    import json

    from syncd.index import action_from_json, action_to_json

    a = Action(op, "p", reason, size, h, mtime, dest, fp, kind, replaces)
    s = action_to_json(a)
    assert action_from_json("p", s) == a
    assert json.loads(s) == json.loads(json.dumps(
        [op.value, reason, size, h.hex() if h else None, mtime, dest, fp, kind]
        + ([replaces] if replaces else [])))


def test_a_mode_change_alone_sends_only_the_mode() -> None:
    """Content as the base holds it, remote as recorded, other permission bits: a chmod
    (with the hash the job checks again, and the remote fingerprint it expects). Content
    changed, or the remote drifted: the whole file, with its mode. A remote that keeps
    no modes: nothing."""
    moded = loc("A")._replace(mode=0o600)
    b = base("A")._replace(mode=0o644)
    (a,) = plan_push({"f": moded}, {"f": b}, {"f": rem("f", "A")}, Policy(modes=True))
    assert (a.op, a.reason, a.hash, a.remote_fp) == (Op.ATTRS, "mode changed", h("A"), "fp-A")
    (a,) = plan_push({"f": loc("B")._replace(mode=0o600)}, {"f": b}, {"f": rem("f", "A")},
                     Policy(modes=True))
    assert (a.op, a.reason) == (Op.UPLOAD, "changed")
    (a,) = plan_push({"f": moded}, {"f": b}, {"f": rem("f", "A", fp="other")},
                     Policy(modes=True))
    assert (a.op, a.reason) == (Op.UPLOAD, "remote drift")
    assert plan_push({"f": moded}, {"f": b}, {"f": rem("f", "A")}, Policy(modes=False)) == []


def test_an_mtime_change_alone_sends_only_the_attributes() -> None:
    """Content as the base holds it, remote as recorded, another mtime (touch): the
    attributes alone, where the remote can set an mtime; with the mode when that changed
    too. Where it cannot (S3, FTP), nothing: the engine settles the base instead."""
    touched = loc("A")._replace(mtime_ns=loc("A").mtime_ns + 7)
    b = base("A")._replace(mode=touched.mode)
    (a,) = plan_push({"f": touched}, {"f": b}, {"f": rem("f", "A")},
                     Policy(modes=True, mtimes=True))
    assert (a.op, a.reason, a.mtime_ns, a.remote_fp) == (Op.ATTRS, "mtime changed",
                                                          touched.mtime_ns, "fp-A")
    (a,) = plan_push({"f": touched._replace(mode=0o600)}, {"f": b}, {"f": rem("f", "A")},
                     Policy(modes=True, mtimes=True))
    assert (a.op, a.reason) == (Op.ATTRS, "mode and mtime changed")
    assert plan_push({"f": touched}, {"f": b}, {"f": rem("f", "A")}, Policy(modes=True)) == []
    assert plan_push({"f": loc("A")}, {"f": b}, {"f": rem("f", "A")},
                     Policy(modes=True, mtimes=True)) == []


def test_an_mtime_change_finer_than_the_remote_keeps_is_not_sent() -> None:
    """SFTP keeps whole seconds: a touch within the same second changes nothing there
    (the engine settles the base instead); one to another second is sent."""
    b = base("A")._replace(mtime_ns=5 * 10**9 + 100, mode=0o644)
    p = Policy(modes=True, mtimes=True, mtime_precision_ns=10**9)
    same_second = loc("A")._replace(mtime_ns=5 * 10**9 + 900)
    assert plan_push({"f": same_second}, {"f": b}, {"f": rem("f", "A")}, p) == []
    (a,) = plan_push({"f": loc("A")._replace(mtime_ns=6 * 10**9)}, {"f": b},
                     {"f": rem("f", "A")}, p)
    assert (a.op, a.reason) == (Op.ATTRS, "mtime changed")


def test_trash_destination_is_dated_under_pair() -> None:
    (a,) = plan_push({}, {"x/y.txt": base("A")}, {"x/y.txt": rem("x/y.txt", "A")},
                     Policy(delete="trash", trash_stamp="2026-11-25T081000Z"))
    assert a.op == Op.TRASH and a.dest == ".syncd-trash/2026-11-25T081000Z/x/y.txt"


def test_adopt_never_when_remote_does_not_keep_mtime() -> None:
    (a,) = plan_push({"f": loc("A")}, {}, {"f": rem("f", "A")}, Policy(mtime_precision_ns=0))
    assert a.op == Op.UPLOAD


def test_no_adoption_at_whole_second_precision() -> None:
    # Rewritten with the same size within the second it was sent in (…000.1 -> …000.9):
    # at whole seconds the remote's old copy looks equal, and adopting it would keep the
    # old bytes for good. Sent again instead.
    l = loc("A")._replace(mtime_ns=5_900_000_000)
    r = rem("f", "A")._replace(mtime_ns=5_000_000_000)
    (a,) = plan_push({"f": l}, {}, {"f": r}, Policy(mtime_precision_ns=1_000_000_000))
    assert a.op == Op.UPLOAD and "whole-second" in a.reason


def test_adopt_where_mtimes_tell_versions_apart() -> None:
    l = loc("A")._replace(mtime_ns=5_000_000_123)
    r = rem("f", "A")._replace(mtime_ns=5_000_000_123)
    (a,) = plan_push({"f": l}, {}, {"f": r}, Policy(mtime_precision_ns=1))
    assert a.op == Op.ADOPT and a.remote_fp == r.fp and a.hash == l.hash


def test_unhashed_new_file_is_uploaded_not_adopted() -> None:
    l = loc("A")._replace(hash=None)
    (a,) = plan_push({"f": l}, {}, {"f": rem("f", "A")}, Policy())
    assert a.op == Op.UPLOAD


def test_stale_temp_files_are_cleaned_fresh_ones_left() -> None:
    stale = rem(f"d/{TMP_PREFIX}abc", "x")._replace(mtime_ns=NOW - STALE_TMP_NS - 1)
    fresh = rem(f"d/{TMP_PREFIX}def", "x")._replace(mtime_ns=NOW)
    acts = plan_push({}, {}, {stale.path: stale, fresh.path: fresh}, Policy(now_ns=NOW))
    assert [(a.op, a.path) for a in acts] == [(Op.CLEANUP, stale.path)]


def test_rmdirs_come_last_children_first() -> None:
    remote = {"a": rem("a", None), "a/b": rem("a/b", None), "a/b/f": rem("a/b/f", "X")}
    acts = plan_push({}, {}, remote, Policy(delete="propagate"))
    assert [(a.op, a.path) for a in acts] == [(Op.DELETE, "a/b/f"), (Op.RMDIR, "a/b"),
                                              (Op.RMDIR, "a")]


def test_no_dirs_remote_ignores_directories() -> None:
    acts = plan_push({"d": loc(None), "d/f": loc("A")}, {}, {}, Policy(dirs=False))
    assert [(a.op, a.path) for a in acts] == [(Op.UPLOAD, "d/f")]


# --- safety -------------------------------------------------------------------------------

def facts(**kw: object) -> Facts:
    d: dict[str, object] = dict(root_exists=True, local_entries=10, base_entries=10,
                                remote_files=10, root_dev=1, recorded_dev=1, max_delete=5,
                                max_delete_setting="50%")
    d.update(kw)
    return Facts(**d)  # type: ignore[arg-type]


def deletes(n: int) -> list[Action]:
    return [Action(Op.TRASH, f"f{i}") for i in range(n)]


def test_safety_passes_a_normal_plan() -> None:
    assert check_safety(deletes(5), facts()) is None


def test_safety_trips_on_too_many_deletes_and_override_works() -> None:
    t = check_safety(deletes(6), facts())
    assert t is not None and "deletes 6 of 10" in t.reason and "max_delete = 50%" in t.reason
    assert "--allow-mass-delete" in t.override
    assert check_safety(deletes(6), facts(), allow_mass_delete=True) is None


def test_safety_trips_on_empty_root_with_history() -> None:
    t = check_safety([], facts(local_entries=0))
    assert t is not None and "empty" in t.reason


def test_safety_trips_on_missing_root_even_with_override() -> None:
    t = check_safety([], facts(root_exists=False), allow_mass_delete=True)
    assert t is not None and "does not exist" in t.reason


def test_safety_trips_on_device_change() -> None:
    t = check_safety([], facts(root_dev=2))
    assert t is not None and "different device" in t.reason
    assert t.override == "--allow-device-change"
    assert check_safety([], facts(root_dev=2), allow_device_change=True) is None


def test_safety_trips_on_an_empty_remote_path_with_history() -> None:
    # A NAS share unmounted under a local remote: its empty mount point lists nothing; the
    # plan (re-upload everything onto the system disk) must not run unasked.
    t = check_safety([], facts(remote_entries=0, bases_present=7))
    assert t is not None and "remote path is empty but 7 entries" in t.reason
    assert t.override == "--allow-device-change"
    assert check_safety([], facts(remote_entries=0, bases_present=7),
                        allow_device_change=True) is None
    # Nothing synced is still here (a first sync; or the synced files were deleted on both
    # sides): an empty remote is what it should be.
    assert check_safety([], facts(remote_entries=0, bases_present=0)) is None
    assert check_safety([], facts(remote_entries=-1, bases_present=7)) is None   # not listed
    # The override for deletes does not cover it.
    assert check_safety([], facts(remote_entries=0, bases_present=7),
                        allow_mass_delete=True) is not None
    # The same share after a few files were written onto its bare mount point (a daemon's
    # event-driven runs do not list): most of what was synced is missing, and the remote
    # holds less than that.
    t = check_safety([], facts(remote_entries=2, bases_present=9, base_entries=10))
    assert t is not None and "9 of the 10 entries" in t.reason and "holds only 2" in t.reason
    # Some remote files gone (drift), or a remote holding more than what is missing: sync.
    assert check_safety([], facts(remote_entries=8, bases_present=2, base_entries=10)) is None
    assert check_safety([], facts(remote_entries=9, bases_present=6, base_entries=10)) is None
    # Storage that cannot be unmounted (S3: a bucket): most objects gone is drift to repair.
    assert check_safety([], facts(remote_entries=2, bases_present=9, base_entries=10,
                                  remote_mountable=False)) is None
    # A run without listing that found the pair's remote directory gone.
    t = check_safety([], facts(remote_dir_missing=True))
    assert t is not None and "remote directory is gone" in t.reason
    assert check_safety([], facts(remote_dir_missing=True), allow_device_change=True) is None


def test_safety_trips_when_a_lost_mount_point_would_lose_its_files() -> None:
    gone = [Action(Op.TRASH, "photos/a.jpg"), Action(Op.RMDIR, "photos")]
    t = check_safety(gone, facts(lost_mounts=("photos",)))
    assert t is not None and "'photos'" in t.reason and "mount point" in t.reason
    assert check_safety(gone, facts(lost_mounts=("photos",)), allow_device_change=True) is None
    # Lost, but nothing under it is deleted (delete = keep, or an ignored folder): fine.
    assert check_safety([Action(Op.TRASH, "photosx/a")], facts(lost_mounts=("photos",))) is None
    assert check_safety(gone, facts(lost_mounts=("music",))) is None


# --- property: plan applied to a model remote = local tree ----------------------------------

names = st.sampled_from(["a", "b", "c", "d e", "é"])
paths = st.lists(names, min_size=1, max_size=3).map("/".join)
contents = st.sampled_from(["A", "BB", "CCC", "DDDD"])
trees = st.dictionaries(paths, contents, max_size=12)


def normalize(tree: dict[str, str]) -> dict[str, str]:
    """Drop files that collide with another file's parent directory."""
    out = dict(tree)
    for p in list(out):
        parent = posixpath.dirname(p)
        while parent:
            out.pop(parent, None)
            parent = posixpath.dirname(parent)
    return out


def dirs_of(files: dict[str, str]) -> set[str]:
    ds = set()
    for p in files:
        parent = posixpath.dirname(p)
        while parent:
            ds.add(parent)
            parent = posixpath.dirname(parent)
    return ds


@settings(max_examples=400, deadline=None)
@given(local_t=trees, remote_t=trees, base_keys=st.sets(paths, max_size=8),
       drift=st.booleans(), delete=st.sampled_from(["trash", "propagate", "keep"]))
def test_applying_the_plan_makes_remote_equal_local(local_t: dict[str, str], remote_t: dict[str, str],
                                                    base_keys: set[str], drift: bool,
                                                    delete: str) -> None:
    """Trees are drawn independently, so a path can be a file on one side and a directory
    on the other (a folder replaced by a file, or the reverse). Actions are applied in
    their queue phase order, as the engine runs them; a remote that would need a write
    under a file, or a removal of a non-empty directory, fails the model."""
    local_t, remote_t = normalize(local_t), normalize(remote_t)
    local = {p: loc(c) for p, c in local_t.items()} | {d: loc(None) for d in dirs_of(local_t)}
    remote = {p: rem(p, c) for p, c in remote_t.items()} | {d: rem(d, None) for d in dirs_of(remote_t)}
    bases: dict[str, Base] = {}
    for p in base_keys:
        if p in remote_t:   # base recorded what is there, or something older (drift)
            bases[p] = base(remote_t[p], fp="stale" if drift else None)
        elif p in local_t:
            bases[p] = base(local_t[p])
    acts = plan_push(local, bases, remote, Policy(delete=delete, trash_stamp="T", now_ns=NOW))
    assert [phase(a) for a in acts] == sorted(phase(a) for a in acts), "not in execution order"
    collisions = ({p for p in local_t if p in dirs_of(remote_t)}
                  | {d for d in dirs_of(local_t) if d in remote_t})

    model_files = dict(remote_t)
    model_dirs = dirs_of(remote_t)

    def parents_ok(path: str) -> None:
        for d in dirs_of({path: ""}):
            assert d not in model_files, f"write under a remote file: {path}"

    for a in acts:
        if a.op == Op.CONFLICT:
            assert delete == "keep" and a.path in collisions
            continue
        if a.replaces == D:
            assert a.path in model_dirs
            assert not any(p.startswith(a.path + "/") for p in (*model_files, *model_dirs)), \
                "replaced directory not emptied first"
            model_dirs.discard(a.path)
        elif a.replaces == F:
            del model_files[a.path]
        if a.op == Op.UPLOAD:
            parents_ok(a.path)
            assert a.path not in model_dirs
            model_files[a.path] = local_t[a.path]
            model_dirs |= dirs_of({a.path: ""})
        elif a.op == Op.MKDIR:
            parents_ok(a.path)
            assert a.path not in model_files
            model_dirs.add(a.path)
        elif a.op in DELETING_OPS:
            del model_files[a.path]
        elif a.op == Op.RMDIR:
            assert not any(f.startswith(a.path + "/") for f in model_files)
            model_dirs.discard(a.path)
        elif a.op == Op.ADOPT and a.kind == F:
            assert model_files[a.path] == local_t[a.path]
    if delete == "keep":   # what a conflict blocks (the path, or what lies under it) aside
        free = {p: c for p, c in local_t.items()
                if p not in collisions and not dirs_of({p: ""}) & collisions}
        assert {p: model_files[p] for p in free} == free
    else:
        assert model_files == local_t
        assert model_dirs == dirs_of(local_t)
    # Invariant: nothing is deleted before every write of the plan, except what a write
    # replaces (it cannot be written otherwise).
    ops = [a for a in acts if not a.replaces]
    first_delete = next((i for i, a in enumerate(ops) if a.op in DELETING_OPS or a.op == Op.RMDIR),
                        len(ops))
    assert all(a.op not in (Op.UPLOAD, Op.MKDIR) for a in ops[first_delete:])


def test_own_temps_cleaned_at_once_foreign_only_when_stale() -> None:
    from syncd.model import TMP_PREFIX

    now = 10**18
    young = now - 60 * 10**9
    remote = {f"d/{TMP_PREFIX}ab12-1": RemoteEntry(f"d/{TMP_PREFIX}ab12-1", int(Kind.FILE), 1, young, "1:x"),
              f"d/{TMP_PREFIX}zz99-2": RemoteEntry(f"d/{TMP_PREFIX}zz99-2", int(Kind.FILE), 1, young, "1:y")}
    acts = plan_push({}, {}, remote, Policy(now_ns=now, tmp_owner="ab12", delete="propagate"))
    assert [(a.op, a.path) for a in acts] == [(Op.CLEANUP, f"d/{TMP_PREFIX}ab12-1")]
    # Before the writes (a full disk needs that space; no upload goes on from it), except
    # where uploads resume from their own temps (FTP): after them, as deletes are.
    assert phase(acts[0]) < 0
    acts = plan_push({}, {}, remote, Policy(now_ns=now, tmp_owner="ab12", delete="propagate",
                                            resumes_temps=True))
    assert [a.op for a in acts] == [Op.CLEANUP] and phase(acts[0]) == 1


def test_foreign_temps_on_a_remote_without_times_are_never_judged_stale() -> None:
    # An FTP server with LIST only gives no mtime (0): another syncd's temp, being written
    # right now, must not be deleted under it.
    from syncd.model import TMP_PREFIX

    path = f"d/{TMP_PREFIX}zz99-2"
    remote = {path: RemoteEntry(path, int(Kind.FILE), 1, 0, "1:y")}
    assert plan_push({}, {}, remote, Policy(now_ns=10**18, tmp_owner="ab12")) == []


def test_removals_of_case_variants_of_local_names_run_before_the_writes() -> None:
    from syncd.model import BEFORE_WRITES

    local = {"foo.txt": loc("new"), "docs": loc(None), "docs/a": loc("a"), "caf\u00e9": loc("c")}
    content = {"Foo.txt": "new", "Docs": None, "Docs/a": "a", "cafe\u0301": "c", "other": "x"}
    remote = {p: rem(p, c) for p, c in content.items()}
    bases = {p: base(c) for p, c in content.items()}
    acts = plan_push(local, bases, remote, Policy(delete="propagate"))
    first = [(a.op, a.path) for a in acts if phase(a) < 0]
    assert first == [(Op.DELETE, "Foo.txt"), (Op.DELETE, "Docs/a"), (Op.DELETE, "cafe\u0301"),
                     (Op.RMDIR, "Docs")]
    assert all(a.when == When.BEFORE_WRITES and a.reason == BEFORE_WRITES
               for a in acts if phase(a) < 0)
    # An unrelated removal still waits until every write succeeded.
    assert [(a.op, a.path) for a in acts if phase(a) >= 1] == [(Op.DELETE, "other")]
    # A remote that never folds case (S3): every removal waits for the writes, as usual.
    acts = plan_push(local, bases, remote, Policy(delete="propagate", case_sensitive=True))
    assert [a for a in acts if phase(a) < 0] == []


def test_changes_the_remote_cannot_carry_are_settled_in_the_base() -> None:
    """What _file plans no job for is settled instead: a mode where the remote keeps none,
    an mtime where it sets none alone or that differs within its precision. Changed
    content, or a change the remote can carry, is never settled."""
    from syncd.plan import attrs_to_settle

    b = base("A")._replace(mode=0o644, mtime_ns=5 * 10**9 + 100)
    moded = loc("A")._replace(mode=0o600, mtime_ns=b.mtime_ns)
    touched = loc("A")._replace(mode=0o644, mtime_ns=6 * 10**9)
    same_second = loc("A")._replace(mode=0o644, mtime_ns=5 * 10**9 + 900)
    local = {"m": moded, "t": touched, "s": same_second, "c": loc("B")}
    bases = {p: b for p in local}
    assert attrs_to_settle(local, bases, Policy()) == (["m"], [("t", 6 * 10**9),
                                                              ("s", 5 * 10**9 + 900)])
    assert attrs_to_settle(local, bases, Policy(modes=True, mtimes=True,
                                                mtime_precision_ns=10**9)) == (
        [], [("s", 5 * 10**9 + 900)])
