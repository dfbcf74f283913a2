"""The Remote protocol conformance battery: every backend must pass every test here.

Tests talk to the backend only through the Remote protocol and check the outcome through
`peek`, a raw view of the backend's storage that does not use the code under test.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from syncd.errors import (
    Conflict,
    ConnectionLost,
    NotFound,
    PathEscape,
    RemoteChanged,
    RemoteError,
    SourceChanged,
    SyncdError,
    UnavailableError,
)
from syncd.model import TMP_PREFIX, TRASH_DIR, Kind, RemoteEntry
from syncd.remotes import base
from syncd.remotes.base import Remote, Source

if TYPE_CHECKING:
    from .conftest import Peek

FILE, DIR = int(Kind.FILE), int(Kind.DIR)
MIB = 1 << 20

Upload = Callable[..., RemoteEntry]


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def upload(remote: Remote, local_dir: Path) -> Upload:
    """upload(path, data, mtime_ns=None) -> RemoteEntry: put `data` through a real Source."""
    counter = itertools.count()

    def _upload(path: str, data: bytes, mtime_ns: int | None = None) -> RemoteEntry:
        src = local_dir / f"src-{next(counter)}"
        src.write_bytes(data)
        if mtime_ns is not None:
            os.utime(src, ns=(mtime_ns, mtime_ns))
        with Source(str(src), path) as s:
            return remote.put(path, s)

    return _upload


@pytest.fixture
def fetch(remote: Remote, local_dir: Path) -> Callable[[str], bytes]:
    """fetch(path) -> bytes: get() into a fresh local file and read it back."""
    counter = itertools.count()

    def _fetch(path: str) -> bytes:
        dest = local_dir / f"got-{next(counter)}"
        entry = remote.get(path, str(dest))
        data = dest.read_bytes()
        assert entry.size == len(data)
        return data

    return _fetch


class HookedSource(Source):
    """A Source that calls `hook(self, n)` after each read the backend makes (n = bytes)."""

    def __init__(self, abspath: str, rel: str, hook: Callable[[HookedSource, int], None]):
        super().__init__(abspath, rel)
        self.hook = hook
        self.reads = 0

    def readinto(self, buf: bytearray | memoryview) -> int:
        n = super().readinto(buf)
        self._after(n)
        return n

    def read(self, size: int = MIB) -> bytes:
        b = super().read(size)
        self._after(len(b))
        return b

    def _after(self, n: int) -> None:
        if n:
            self.reads += 1
        self.hook(self, n)


def listing(remote: Remote, prefix: str = "") -> dict[str, RemoteEntry]:
    out: dict[str, RemoteEntry] = {}
    for e in remote.list(prefix):
        assert isinstance(e, RemoteEntry), e
        assert e.path not in out, f"{e.path!r} listed twice"
        assert e.path and not e.path.startswith("/") and not e.path.endswith("/"), e.path
        out[e.path] = e
    return out


def files_of(entries: dict[str, RemoteEntry]) -> dict[str, RemoteEntry]:
    return {p: e for p, e in entries.items() if e.kind == FILE}


def dirs_of(entries: dict[str, RemoteEntry]) -> set[str]:
    return {p for p, e in entries.items() if e.kind == DIR}


def assert_bytes_equal(got: bytes | None, want: bytes) -> None:
    """Byte-exact comparison with a short message (no multi-MiB diffs)."""
    assert got is not None, "no file there"
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                     min(len(got), len(want)))
        pytest.fail(f"content differs: got {len(got)} bytes, want {len(want)}; "
                    f"first difference at offset {first}")


def same_time(a: int, b: int, precision_ns: int) -> bool:
    return a == b if precision_ns <= 1 else a // precision_ns == b // precision_ns


def temp_names(peek: Peek, d: str = "") -> set[str]:
    return {n for n in peek.listdir_names(d) if n.startswith(TMP_PREFIX)}


def need_dirs(remote: Remote) -> None:
    if not remote.caps.dirs:
        pytest.skip("backend has no real directories")


def rand_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- put / get -----------------------------------------------------------------------------


def test_put_then_get_roundtrip_bytes_exact(remote: Remote, peek: Peek, upload: Upload,
                                            local_dir: Path) -> None:
    data = bytes(range(256)) * 17 + b"\x00\r\n\r\x1a\xff" + rand_bytes(5000, 1)
    e = upload("a/b/data.bin", data)
    assert (e.path, e.kind, e.size) == ("a/b/data.bin", FILE, len(data))
    assert_bytes_equal(peek.read("a/b/data.bin"), data)

    dest = local_dir / "out.bin"
    g = remote.get("a/b/data.bin", str(dest))
    assert_bytes_equal(dest.read_bytes(), data)
    assert (g.path, g.kind, g.size, g.fp) == ("a/b/data.bin", FILE, len(data), e.fp)


def test_put_entry_matches_stat_and_list(remote: Remote, upload: Upload) -> None:
    # The engine records put()'s fingerprint and later compares list()'s against it: they
    # must agree for an unchanged object or every file looks like remote drift.
    e = upload("d/x.txt", b"some content", mtime_ns=1_500_000_000_000_000_000)
    s = remote.stat("d/x.txt")
    lst = listing(remote)["d/x.txt"]
    assert s == e
    assert lst == e


def test_put_is_atomic_to_readers(remote: Remote, peek: Peek, upload: Upload,
                                  local_dir: Path) -> None:
    old = b"old content that must stay whole until the new one is published\n" * 16
    upload("dir/target.bin", old)
    new = rand_bytes(3 * MIB + 7, 2)
    src = local_dir / "new.bin"
    src.write_bytes(new)

    seen: list[str] = []

    def watch_existing(s: HookedSource, n: int) -> None:
        got = peek.read("dir/target.bin")
        if got != old:
            seen.append(f"after {s.sent} bytes read, target holds {len(got or b'')} bytes "
                        f"that are not the old content")

    with HookedSource(str(src), "dir/target.bin", watch_existing) as s:
        e = remote.put("dir/target.bin", s)
    assert s.reads >= 2, "the upload should have taken several reads"
    assert seen == []
    assert e.size == len(new)
    assert_bytes_equal(peek.read("dir/target.bin"), new)
    assert temp_names(peek, "dir") == set()

    # A brand-new target does not appear at all until it is complete.
    def watch_new(s: HookedSource, n: int) -> None:
        if peek.exists("dir/fresh.bin"):
            seen.append(f"fresh.bin visible after {s.sent} of {len(new)} bytes")

    with HookedSource(str(src), "dir/fresh.bin", watch_new) as s:
        remote.put("dir/fresh.bin", s)
    assert seen == []
    assert_bytes_equal(peek.read("dir/fresh.bin"), new)
    assert temp_names(peek, "dir") == set()
    assert peek.listdir_names("dir") == {"target.bin", "fresh.bin"}


@pytest.mark.parametrize("change", ["grows", "rewritten_same_size"])
def test_put_is_atomic_when_source_changes_mid_read(remote: Remote, peek: Peek, upload: Upload,
                                                    local_dir: Path, change: str) -> None:
    old = b"the old, intact target\n" * 100
    upload("dir/target.bin", old)
    before = peek.tree()

    def mutate(s: HookedSource, n: int) -> None:
        if n and s.reads == 1:   # first chunk read: change the rest under the backend's feet
            if change == "grows":
                with open(s.abspath, "ab") as f:
                    f.write(b"appended while uploading" * 100)
            else:
                with open(s.abspath, "r+b") as f:
                    f.seek(-4096, os.SEEK_END)
                    f.write(b"X" * 4096)

    for target in ("dir/target.bin", "dir/new.bin"):
        src = local_dir / f"src-{target.replace('/', '_')}"
        src.write_bytes(rand_bytes(2 * MIB + 11, 3))
        os.utime(src, ns=(1_000_000_000_000_000_000,) * 2)   # so the rewrite moves the mtime
        with HookedSource(str(src), target, mutate) as s, pytest.raises(SourceChanged):
            remote.put(target, s)

    assert_bytes_equal(peek.read("dir/target.bin"), old)
    assert not peek.exists("dir/new.bin")
    assert temp_names(peek, "dir") == set()
    assert peek.tree() == before


def test_put_overwrites_existing(remote: Remote, peek: Peek, upload: Upload,
                                 fetch: Callable[[str], bytes]) -> None:
    first = b"a long first version of the file " * 50
    second = b"short"
    third = rand_bytes(70_000, 4)
    upload("f.txt", first)
    e = upload("f.txt", second)
    assert e.size == len(second)
    assert_bytes_equal(peek.read("f.txt"), second)   # no tail of the longer old version
    assert remote.stat("f.txt").size == len(second)
    upload("f.txt", third)
    assert_bytes_equal(peek.read("f.txt"), third)
    assert_bytes_equal(fetch("f.txt"), third)
    assert peek.listdir_names("") == {"f.txt"}


def test_put_creates_parent_dirs(remote: Remote, peek: Peek, upload: Upload) -> None:
    upload("p/q/r/s/file.txt", b"deep")
    assert_bytes_equal(peek.read("p/q/r/s/file.txt"), b"deep")
    entries = listing(remote)
    assert set(files_of(entries)) == {"p/q/r/s/file.txt"}
    if remote.caps.dirs:
        for d in ("p", "p/q", "p/q/r", "p/q/r/s"):
            assert peek.is_dir(d), d
        assert dirs_of(entries) == {"p", "p/q", "p/q/r", "p/q/r/s"}


def test_put_keeps_mtime(remote: Remote, upload: Upload) -> None:
    prec = remote.caps.mtime_precision_ns
    if prec <= 0:
        pytest.skip("backend does not keep mtimes")
    cases = {
        "ns.bin": 1_234_567_890_123_456_789,     # 2009, with a nanosecond fraction
        "y2k.bin": 946_684_800_000_000_001,      # 2000-01-01 plus one nanosecond
        "whole.bin": 1_700_000_000_000_000_000,  # a whole second
    }
    put_entries = {p: upload(f"m/{p}", p.encode() * 10, mtime_ns=t) for p, t in cases.items()}
    listed = listing(remote, "m")
    for p, t in cases.items():
        for how, e in (("put", put_entries[p]), ("stat", remote.stat(f"m/{p}")),
                       ("list", listed[p])):
            assert same_time(e.mtime_ns, t, prec), f"{how} {p}: {e.mtime_ns} != {t}"

    # Overwriting with an older mtime moves it back: the source's mtime wins, not "newest".
    upload("m/ns.bin", b"older", mtime_ns=1_000_000_000_987_654_321)
    assert same_time(remote.stat("m/ns.bin").mtime_ns, 1_000_000_000_987_654_321, prec)


def test_zero_byte_file(remote: Remote, peek: Peek, upload: Upload, local_dir: Path) -> None:
    e = upload("z/empty", b"")
    assert (e.kind, e.size) == (FILE, 0)
    assert peek.read("z/empty") == b""
    assert remote.stat("z/empty").size == 0
    assert listing(remote, "z")["empty"].size == 0
    dest = local_dir / "dest"
    dest.write_bytes(b"junk that get() must truncate")
    g = remote.get("z/empty", str(dest))
    assert g.size == 0
    assert dest.read_bytes() == b""
    # Overwriting a non-empty file with an empty one.
    upload("z/was-full", b"full")
    upload("z/was-full", b"")
    assert peek.read("z/was-full") == b""
    assert remote.stat("z/was-full").size == 0


def test_large_file(remote: Remote, peek: Peek, upload: Upload,
                    fetch: Callable[[str], bytes]) -> None:
    data = rand_bytes(20 * MIB + 123, 5)
    e = upload("big/blob.bin", data)
    assert e.size == len(data)
    assert remote.stat("big/blob.bin").size == len(data)
    assert_bytes_equal(peek.read("big/blob.bin"), data)
    assert_bytes_equal(fetch("big/blob.bin"), data)
    assert temp_names(peek, "big") == set()


UNICODE_NAMES = ["été/naïve file ☃.txt", "with space/a b.txt", "日本語/ファイル名.md",
                 "emoji 🎉/x y z", "top level ü.txt"]


def test_unicode_and_spaces_roundtrip(remote: Remote, peek: Peek, upload: Upload,
                                      fetch: Callable[[str], bytes]) -> None:
    contents = {p: f"content of {p}\n".encode() for p in UNICODE_NAMES}
    for p, data in contents.items():
        assert upload(p, data).path == p
    for p, data in contents.items():
        assert_bytes_equal(peek.read(p), data)
        assert_bytes_equal(fetch(p), data)
        assert remote.stat(p).size == len(data)
    entries = listing(remote)
    assert {p: e.size for p, e in files_of(entries).items()} == \
        {p: len(d) for p, d in contents.items()}
    if remote.caps.dirs:
        assert dirs_of(entries) == {"été", "with space", "日本語", "emoji 🎉"}
    assert set(files_of(listing(remote, "été"))) == {"naïve file ☃.txt"}
    remote.delete(["été/naïve file ☃.txt"])
    assert not peek.exists("été/naïve file ☃.txt")


# --- list ----------------------------------------------------------------------------------


def test_nested_dirs_listing(remote: Remote, upload: Upload) -> None:
    tree = {"top/a.txt": b"a", "top/sub/b.txt": b"bb", "top/sub/deeper/c.txt": b"ccc",
            "top/sub/deeper/d.txt": b""}
    for p, data in tree.items():
        upload(p, data, mtime_ns=1_600_000_000_000_000_000)
    upload("other.txt", b"not under the prefix")
    upload("topx/e.txt", b"a sibling whose name starts with the prefix")
    if remote.caps.dirs:
        remote.mkdir("top/empty")

    entries = listing(remote, "top")
    assert {p: e.size for p, e in files_of(entries).items()} == \
        {"a.txt": 1, "sub/b.txt": 2, "sub/deeper/c.txt": 3, "sub/deeper/d.txt": 0}
    if remote.caps.dirs:
        assert dirs_of(entries) == {"sub", "sub/deeper", "empty"}
    assert {e.kind for e in entries.values()} <= {FILE, DIR}

    sub = listing(remote, "top/sub")
    assert set(files_of(sub)) == {"b.txt", "deeper/c.txt", "deeper/d.txt"}
    if remote.caps.dirs:
        assert dirs_of(sub) == {"deeper"}
    everything = listing(remote)
    assert set(files_of(everything)) == set(tree) | {"other.txt", "topx/e.txt"}

    # Fingerprints are stable while nothing changes...
    again = listing(remote, "top")
    assert {p: e.fp for p, e in again.items()} == {p: e.fp for p, e in entries.items()}
    # ...and move when content changes (new size; same size with a new mtime).
    upload("top/sub/b.txt", b"changed, longer", mtime_ns=1_600_000_000_000_000_000)
    upload("top/a.txt", b"A", mtime_ns=1_600_000_001_000_000_000)
    after = listing(remote, "top")
    assert after["sub/b.txt"].fp != entries["sub/b.txt"].fp
    assert after["a.txt"].fp != entries["a.txt"].fp
    assert after["sub/b.txt"].size == len(b"changed, longer")
    for p in ("sub/deeper/c.txt", "sub/deeper/d.txt"):
        assert after[p].fp == entries[p].fp


def test_list_missing_prefix_is_empty(remote: Remote, upload: Upload) -> None:
    assert listing(remote) == {}
    upload("present/x.txt", b"x")
    assert listing(remote, "missing") == {}
    assert listing(remote, "missing/deeper") == {}
    assert listing(remote, "present/missing") == {}
    assert listing(remote, "pres") == {}   # a string prefix of a dir is not that dir


def test_list_excludes_trash_dir(remote: Remote, upload: Upload) -> None:
    upload(f"{TRASH_DIR}/2024-01-01T000000Z/old.txt", b"trashed")
    upload("keep.txt", b"keep")
    upload(f"pair/{TRASH_DIR}/2024-01-01T000000Z/sub/old.txt", b"trashed too")
    upload("pair/f.txt", b"f")
    upload("pair/sub/g.txt", b"g")

    root = listing(remote)
    assert not any(p == TRASH_DIR or p.startswith(TRASH_DIR + "/") for p in root), sorted(root)
    assert {"keep.txt", "pair/f.txt", "pair/sub/g.txt"} <= set(files_of(root))

    pair = listing(remote, "pair")
    assert set(files_of(pair)) == {"f.txt", "sub/g.txt"}
    if remote.caps.dirs:
        assert dirs_of(pair) == {"sub"}


# --- stat / delete / rmdir / mkdir -------------------------------------------------------


def test_stat_missing_raises_NotFound(remote: Remote, upload: Upload) -> None:
    with pytest.raises(NotFound):
        remote.stat("missing.txt")
    with pytest.raises(NotFound):
        remote.stat("no/such/dir/f.txt")
    upload("d/f.txt", b"here")
    e = remote.stat("d/f.txt")
    assert (e.path, e.kind, e.size) == ("d/f.txt", FILE, 4)
    with pytest.raises(NotFound):
        remote.stat("d/g.txt")
    if remote.caps.dirs:
        assert remote.stat("d").kind == DIR
    remote.delete(["d/f.txt"])
    with pytest.raises(NotFound):
        remote.stat("d/f.txt")


def test_delete_files_and_missing_is_ok(remote: Remote, peek: Peek, upload: Upload) -> None:
    for p in ("a.txt", "d/b.txt", "d/c.txt"):
        upload(p, p.encode())
    remote.delete(["a.txt", "missing.txt", "no/such/dir/x", "d/b.txt"])
    assert not peek.exists("a.txt")
    assert not peek.exists("d/b.txt")
    assert_bytes_equal(peek.read("d/c.txt"), b"d/c.txt")
    remote.delete(["a.txt", "d/b.txt"])   # already gone: still fine
    remote.delete([])
    with pytest.raises(NotFound):
        remote.stat("a.txt")
    assert set(files_of(listing(remote))) == {"d/c.txt"}


def test_rmdir_empty_and_nonempty(remote: Remote, peek: Peek, upload: Upload) -> None:
    need_dirs(remote)
    remote.mkdir("d/e")
    assert remote.rmdir("d") is False           # holds a subdirectory
    assert peek.is_dir("d/e")
    assert remote.rmdir("d/e") is True
    assert not peek.exists("d/e")
    assert remote.rmdir("d") is True
    assert not peek.exists("d")

    upload("f/x.txt", b"x")
    assert remote.rmdir("f") is False           # holds a file
    assert_bytes_equal(peek.read("f/x.txt"), b"x")
    assert remote.rmdir("missing") is True      # already gone, like delete()

    # A removed directory is recreated by the next put below it.
    upload("d/e/again.txt", b"again")
    assert_bytes_equal(peek.read("d/e/again.txt"), b"again")


def test_mkdir_idempotent(remote: Remote, peek: Peek, upload: Upload) -> None:
    e = remote.mkdir("m/n/o")
    assert (e.path, e.kind) == ("m/n/o", DIR)
    assert remote.mkdir("m/n/o").kind == DIR
    assert remote.mkdir("m/n").kind == DIR
    if remote.caps.dirs:
        for d in ("m", "m/n", "m/n/o"):
            assert peek.is_dir(d), d
        assert remote.stat("m/n/o").kind == DIR
        assert dirs_of(listing(remote)) == {"m", "m/n", "m/n/o"}
    upload("m/n/file.txt", b"kept")
    remote.mkdir("m/n")
    assert_bytes_equal(peek.read("m/n/file.txt"), b"kept")


def test_kind_mismatch_is_conflict(remote: Remote, peek: Peek, upload: Upload,
                                   local_dir: Path) -> None:
    need_dirs(remote)
    upload("dir/child.txt", b"child")
    upload("file.txt", b"file")
    before = peek.tree()
    with pytest.raises(Conflict):
        upload("dir", b"a file where a directory is")
    with pytest.raises(Conflict):
        remote.mkdir("file.txt")
    with pytest.raises(Conflict):
        upload("file.txt/child", b"below a file")
    with pytest.raises(Conflict):
        remote.get("dir", str(local_dir / "dest"))
    with pytest.raises(Conflict):
        remote.delete(["dir"])
    with pytest.raises(Conflict):
        remote.rmdir("file.txt")
    assert peek.tree() == before
    assert temp_names(peek) == set()


# --- move ----------------------------------------------------------------------------------


class NoMoveRemote:
    """The same backend, but claiming it cannot move server-side."""

    def __init__(self, inner: Remote):
        self._inner = inner
        self.name = inner.name
        self.caps = dataclasses.replace(inner.caps, move=False)

    def move(self, src: str, dst: str) -> None:
        raise AssertionError("move() called although caps.move is False")

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


@pytest.mark.parametrize("via", ["native", "fallback"])
def test_move_and_move_fallback(remote: Remote, peek: Peek, upload: Upload, tmp_path: Path,
                                via: str) -> None:
    if via == "native":
        if not remote.caps.move:
            pytest.skip("backend has no server-side move")
        r: Any = remote
    else:
        r = NoMoveRemote(remote)
    move_tmp = tmp_path / "move-tmp"
    move_tmp.mkdir()

    data = rand_bytes(1 * MIB + 5, 6)
    upload("pair/sub/f.bin", data, mtime_ns=1_400_000_000_000_000_000)
    upload("pair/other.txt", b"untouched")
    dst = f"pair/{TRASH_DIR}/2024-01-01T000000Z/sub/f.bin"   # parents do not exist yet
    base.move(r, "pair/sub/f.bin", dst, tmp_dir=str(move_tmp))

    assert_bytes_equal(peek.read(dst), data)
    assert not peek.exists("pair/sub/f.bin")
    with pytest.raises(NotFound):
        remote.stat("pair/sub/f.bin")
    assert remote.stat(dst).size == len(data)
    assert_bytes_equal(peek.read("pair/other.txt"), b"untouched")
    if via == "native" and remote.caps.mtime_precision_ns > 0:
        assert same_time(remote.stat(dst).mtime_ns, 1_400_000_000_000_000_000,
                         remote.caps.mtime_precision_ns)

    # A rename within one directory, and a missing source.
    upload("pair/a.txt", b"a")
    base.move(r, "pair/a.txt", "pair/b.txt", tmp_dir=str(move_tmp))
    assert_bytes_equal(peek.read("pair/b.txt"), b"a")
    assert not peek.exists("pair/a.txt")
    with pytest.raises(NotFound):
        base.move(r, "pair/missing.txt", "pair/elsewhere.txt", tmp_dir=str(move_tmp))
    assert not peek.exists("pair/elsewhere.txt")

    assert list(move_tmp.iterdir()) == []       # the fallback's local temp files are gone
    assert temp_names(peek, "pair") == set()
    assert set(files_of(listing(remote, "pair"))) == {"other.txt", "b.txt"}


@pytest.mark.parametrize("via", ["native", "fallback"])
def test_move_never_replaces_an_existing_entry(remote: Remote, peek: Peek, upload: Upload,
                                               tmp_path: Path, via: str) -> None:
    """Trashing the same path twice under one trash folder (an index lost, two state dirs
    on one remote) keeps both versions: the second goes to the next free name."""
    r: Any = remote if via == "native" else NoMoveRemote(remote)
    move_tmp = tmp_path / "move-tmp"
    move_tmp.mkdir()
    dst = f"pair/{TRASH_DIR}/2024-01-01T000000Z/f.txt"
    got = []
    for version in (b"first", b"second", b"third"):
        upload("pair/f.txt", version)
        got.append(base.move(r, "pair/f.txt", dst, tmp_dir=str(move_tmp)))
    assert got == [dst, base.alt_name(dst, 1), base.alt_name(dst, 2)]
    for path, version in zip(got, (b"first", b"second", b"third"), strict=True):
        assert_bytes_equal(peek.read(path), version)
    assert not peek.exists("pair/f.txt")
    assert temp_names(peek, "pair") == set()


# --- paths that leave the root -------------------------------------------------------------

BAD_PATHS = ["../x", "/etc/passwd", "a/../../x", "", "a//b", "..", ".", "./x", "a/./b", "a/",
             "../outside/victim.txt", "a\\..\\..\\x", "a\x00b"]
SYSTEM_FILE = "/etc/passwd"


def _snapshot_all(peek: Peek) -> dict[str, dict[str, bytes | str]]:
    system = Path(SYSTEM_FILE).read_bytes() if os.path.exists(SYSTEM_FILE) else b""
    return {"inside the root": peek.tree(), "outside the root": peek.outside_snapshot(),
            "system": {SYSTEM_FILE: system}}


def _damage(before: dict[str, dict[str, bytes | str]],
            after: dict[str, dict[str, bytes | str]]) -> list[str]:
    """What changed between two _snapshot_all()s, one line per path."""
    out = []
    for where, b in before.items():
        a = after[where]
        for path in sorted(set(a) | set(b)):
            if a.get(path) != b.get(path):
                was, now = b.get(path, "<absent>"), a.get(path, "<absent>")
                out.append(f"{where}: {path!r} changed: {was!r:.60} -> {now!r:.60}")
    return out


READ_OPS = frozenset({"stat", "get", "list"})


def _refusals(remote: Remote, bad: str, good_file: str, src: Path, dest: Path,
              include_list: bool = True, only: frozenset[str] | None = None) -> list[str]:
    """Every protocol call naming `bad` (or those in `only`) must raise PathEscape; returns
    one line per call that did not."""
    calls: list[tuple[str, Callable[[], object]]] = [
        ("stat", lambda: remote.stat(bad)),
        ("get", lambda: remote.get(bad, str(dest))),
        ("put", lambda: _put(remote, bad, src)),
        ("mkdir", lambda: remote.mkdir(bad)),
        ("delete", lambda: remote.delete([bad])),
        ("rmdir", lambda: remote.rmdir(bad)),
        ("move from", lambda: remote.move(bad, "moved-here.txt")),
        ("move to", lambda: remote.move(good_file, bad)),
    ]
    if include_list:
        calls.append(("list", lambda: list(remote.list(bad))))
    problems = []
    for what, call in calls:
        if only is not None and what not in only:
            continue
        try:
            call()
        except PathEscape:
            continue
        except SyncdError as e:
            problems.append(f"{what}({bad!r}) raised {type(e).__name__} ({e}), not PathEscape")
        except Exception as e:
            problems.append(f"{what}({bad!r}) raised a non-syncd {type(e).__name__}: {e}")
        else:
            problems.append(f"{what}({bad!r}) did not raise PathEscape")
    return problems


def _put(remote: Remote, path: str, src: Path) -> RemoteEntry:
    with Source(str(src), "local-name") as s:
        return remote.put(path, s)


@pytest.mark.parametrize("bad", BAD_PATHS, ids=[repr(p) for p in BAD_PATHS])
def test_path_escape_refused(remote: Remote, peek: Peek, upload: Upload, local_dir: Path,
                             bad: str) -> None:
    upload("ok.txt", b"ok")
    upload("a/b/file.txt", b"file")
    peek.outside_write("victim.txt", b"victim")
    src = local_dir / "payload"
    src.write_bytes(b"PAYLOAD")
    dest = local_dir / "dest"
    before = _snapshot_all(peek)
    problems = []
    if "\\" in bad and remote.caps.backslash:
        # A POSIX directory or S3: '\\' is an ordinary character, the name a file's own.
        upload(bad, b"a plain name")
        assert peek.read(bad) == b"a plain name"
        del before["inside the root"]
        after = _snapshot_all(peek)
        del after["inside the root"]
        assert _damage(before, after) == []
        return
    if bad == SYSTEM_FILE:
        # Only reads aim at the real system file; writes aim at an absolute path we own.
        problems += _refusals(remote, bad, "ok.txt", src, dest, only=READ_OPS)
        problems += _refusals(remote, peek.outside_abs("victim.txt"), "ok.txt", src, dest)
    else:
        problems += _refusals(remote, bad, "ok.txt", src, dest, include_list=bad != "")
    problems += _damage(before, _snapshot_all(peek))
    assert not problems, "\n".join(problems)
    assert not dest.exists() or dest.read_bytes() == b""


def test_path_escape_refused_through_symlinked_parent(remote: Remote, peek: Peek, upload: Upload,
                                                      local_dir: Path) -> None:
    if not peek.supports_symlinks:
        pytest.skip(getattr(peek, "no_symlinks_why", "cannot plant symlinks on this backend"))
    peek.outside_write("victim.txt", b"victim")
    peek.outside_mkdir("emptydir")                      # rmdir would succeed if followed
    peek.symlink("link", peek.outside_abs())            # root/link -> outside
    upload("real/here.txt", b"here")
    peek.symlink("real/link2", peek.outside_abs())      # a deeper one
    src = local_dir / "payload"
    src.write_bytes(b"PAYLOAD")
    dest = local_dir / "dest"
    before = _snapshot_all(peek)

    problems = []
    for bad in ("link/victim.txt", "link/new.txt", "link/deep/new.txt", "link/emptydir",
                "real/link2/victim.txt", "real/link2/new.txt", "real/link2/emptydir"):
        problems += _refusals(remote, bad, "real/here.txt", src, dest)
    for prefix in ("link", "real/link2"):
        problems += _refusals(remote, prefix, "real/here.txt", src, dest, only=frozenset({"list"}))
    problems += _damage(before, _snapshot_all(peek))
    assert not problems, "\n".join(problems)
    assert not dest.exists() or b"victim" not in dest.read_bytes()
    listed = listing(remote)                     # the root listing does not descend into them
    assert not any(p.startswith(("link/", "real/link2/")) for p in listed), sorted(listed)


def test_symlink_leaf_is_not_followed(remote: Remote, peek: Peek, upload: Upload,
                                      local_dir: Path) -> None:
    if not peek.supports_symlinks:
        pytest.skip(getattr(peek, "no_symlinks_why", "cannot plant symlinks on this backend"))
    peek.outside_write("victim.txt", b"victim")
    peek.symlink("leaf.txt", peek.outside_abs("victim.txt"))
    outside_before = peek.outside_snapshot()
    dest = local_dir / "dest"
    with pytest.raises(RemoteError):
        remote.get("leaf.txt", str(dest))
    assert not dest.exists() or b"victim" not in dest.read_bytes()
    upload("leaf.txt", b"replaces the link, not its target")
    assert peek.outside_snapshot() == outside_before
    assert_bytes_equal(peek.read("leaf.txt"), b"replaces the link, not its target")


def test_path_escape_refused_when_parent_swapped_for_symlink(remote: Remote, peek: Peek,
                                                             upload: Upload,
                                                             local_dir: Path) -> None:
    """A directory the backend has used before is replaced by a symlink (another user on the
    NAS, say): the next operations below it must still refuse to follow it."""
    if not peek.supports_symlinks:
        pytest.skip(getattr(peek, "no_symlinks_why", "cannot plant symlinks on this backend"))
    upload("d/first.txt", b"first")
    upload("keep.txt", b"keep")
    assert set(files_of(listing(remote, "d"))) == {"first.txt"}
    peek.remove_tree("d")
    peek.outside_write("victim.txt", b"victim")
    peek.outside_mkdir("emptydir")
    peek.symlink("d", peek.outside_abs())
    src = local_dir / "payload"
    src.write_bytes(b"PAYLOAD")
    before = _snapshot_all(peek)
    problems = []
    for bad in ("d/victim.txt", "d/new.txt", "d/emptydir"):
        problems += _refusals(remote, bad, "keep.txt", src, local_dir / "dest")
    problems += _refusals(remote, "d", "keep.txt", src, local_dir / "dest",
                          only=frozenset({"list"}))
    problems += _damage(before, _snapshot_all(peek))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("op", ["put", "mkdir", "move"])
def test_parent_removed_out_of_band_is_recreated(remote: Remote, peek: Peek, upload: Upload,
                                                 op: str) -> None:
    """Someone removes a remote directory the backend created earlier; the next write
    below it must recreate it, not fail or pretend."""
    upload("t/s/one.txt", b"one")
    upload("keep.txt", b"keep")
    peek.remove_tree("t")
    if op == "put":
        upload("t/s/two.txt", b"two")
        assert_bytes_equal(peek.read("t/s/two.txt"), b"two")
    elif op == "mkdir":
        need_dirs(remote)
        remote.mkdir("t/s")
        assert peek.is_dir("t/s"), "mkdir() returned but the directory does not exist"
    else:
        if not remote.caps.move:
            pytest.skip("backend has no server-side move")
        remote.move("keep.txt", "t/s/kept.txt")
        assert_bytes_equal(peek.read("t/s/kept.txt"), b"keep")


# --- get -----------------------------------------------------------------------------------


def test_get_to_local_file(remote: Remote, upload: Upload, local_dir: Path) -> None:
    data = rand_bytes(300_000, 7)
    e = upload("g/file.bin", data, mtime_ns=1_300_000_000_000_000_000)
    dest = local_dir / "dest.bin"
    dest.write_bytes(b"x" * 1_000_000)            # longer than the remote file: must truncate
    g = remote.get("g/file.bin", str(dest))
    assert_bytes_equal(dest.read_bytes(), data)
    assert (g.path, g.kind, g.size) == ("g/file.bin", FILE, len(data))
    assert g.fp == e.fp == remote.stat("g/file.bin").fp
    if remote.caps.mtime_precision_ns > 0:
        assert same_time(g.mtime_ns, 1_300_000_000_000_000_000, remote.caps.mtime_precision_ns)

    fresh = local_dir / "fresh.bin"                # a dest that does not exist yet
    remote.get("g/file.bin", str(fresh))
    assert_bytes_equal(fresh.read_bytes(), data)

    with pytest.raises(NotFound):
        remote.get("g/missing.bin", str(local_dir / "never.bin"))
    with pytest.raises(NotFound):
        remote.get("nodir/missing.bin", str(local_dir / "never2.bin"))


def test_put_many_publishes_each_and_isolates_failures(remote: Remote, peek: Peek, upload: Upload,
                                                       local_dir: Path) -> None:
    put_many = getattr(remote, "put_many", None)
    if put_many is None:
        pytest.skip("backend has no batched put (optional capability)")
    old = b"intact old content\n" * 10
    upload("b/changing.bin", old)
    datas = {f"b/f{i}.bin": rand_bytes(1000 + i, 20 + i) for i in range(5)}
    srcs = []
    for i, (target, data) in enumerate(datas.items()):
        p = local_dir / f"many-{i}"
        p.write_bytes(data)
        srcs.append((target, Source(str(p), target)))
    grow = local_dir / "many-grow"
    grow.write_bytes(rand_bytes(3 * MIB, 99))

    def append(s: HookedSource, n: int) -> None:
        if n and s.reads == 1:
            with open(s.abspath, "ab") as f:
                f.write(b"more")

    hooked = HookedSource(str(grow), "b/changing.bin", append)
    items = [*srcs[:2], ("b/changing.bin", hooked), *srcs[2:], ("../escape.bin", srcs[0][1])]
    try:
        results = put_many(items)
    finally:
        for _, s in items:
            s.close()
    assert len(results) == len(items)
    assert isinstance(results[2], SourceChanged) and isinstance(results[-1], PathEscape)
    for (target, _), r in zip(items, results, strict=True):
        if target in datas:
            assert isinstance(r, RemoteEntry) and r.size == len(datas[target])
            assert_bytes_equal(peek.read(target), datas[target])
    assert_bytes_equal(peek.read("b/changing.bin"), old)
    assert temp_names(peek, "b") == set()


def test_fingerprint_tells_kind(remote: Remote, upload: Upload) -> None:
    """Protocol rule the reconcile relies on: a directory's fp is exactly DIR_FP, a file's
    never is (bases store only the fp)."""
    from syncd.listing import DIR_FP

    upload("k/dir/file.txt", b"x")
    for e in listing(remote, "k").values():
        assert (e.fp == DIR_FP) == (e.kind == Kind.DIR), e


def local_view(remote: Remote, peek: Peek, cap: str, why: str) -> Path:
    """The local directory behind a backend with capability `cap` (else skip: `why`)."""
    if not getattr(remote.caps, cap):
        pytest.skip(why)
    root = getattr(peek, "root", None)
    if root is None:   # pragma: no cover - every backend with attributes has a local view
        pytest.skip("no local view of this backend's files")
    return Path(root)


def planted_link(peek: Peek, rel: str, outside: str) -> Path:
    """A symlink at `rel` on the remote to a new file outside its root; that file."""
    peek.outside_write(outside, b"victim")
    victim = Path(peek.outside_abs(outside))
    peek.symlink(rel, str(victim))
    return victim


def test_set_attrs_changes_the_permission_bits_alone(remote: Remote, peek: Peek,
                                                      upload: Upload) -> None:
    """A chmod synced without the content: bits changed, same file (inode), same bytes,
    same fingerprint; a missing file is NotFound; a symlink or directory there is a
    Conflict, and a symlink's target keeps its mode."""
    root = local_view(remote, peek, "modes",
                      "this backend keeps no permission bits (caps.modes is off)")
    e = upload("d/m.txt", b"mode", mtime_ns=1_700_000_000_000_000_000)
    p = root / "d" / "m.txt"
    ino = p.stat().st_ino
    got = remote.set_attrs("d/m.txt", mode=0o640)
    assert p.stat().st_mode & 0o777 == 0o640 and p.stat().st_ino == ino
    assert got.fp == e.fp == remote.stat("d/m.txt").fp
    assert peek.read("d/m.txt") == b"mode"
    with pytest.raises(NotFound):
        remote.set_attrs("d/none.txt", mode=0o600)
    remote.mkdir("d/sub")
    with pytest.raises(Conflict):
        remote.set_attrs("d/sub", mode=0o700)
    if peek.supports_symlinks:
        victim = planted_link(peek, "d/link.txt", "victim.txt")
        os.chmod(victim, 0o644)
        with pytest.raises(Conflict):
            remote.set_attrs("d/link.txt", mode=0o600)
        assert victim.stat().st_mode & 0o777 == 0o644


def test_set_attrs_many_answers_each_file_on_its_own(remote: Remote, peek: Peek,
                                                     upload: Upload) -> None:
    """The batched form (optional): per item its entry or its own error, in order, and
    only the good ones are changed: a missing file or folder (NotFound), another version
    (RemoteChanged), a directory (Conflict), a path escape (PathEscape)."""
    many = getattr(remote, "set_attrs_many", None)
    if many is None or not (remote.caps.modes and remote.caps.mtimes):
        pytest.skip("backend has no batched set_attrs (optional capability)")
    root = Path(peek.root)   # type: ignore[attr-defined]
    ents = [upload(f"b/f{i}.txt", b"x" * i, mtime_ns=1_700_000_000_000_000_000)
            for i in range(12)]
    remote.mkdir("b/sub")
    new = 1_760_000_000 * 10**9
    reqs = [(f"b/f{i}.txt", 0o600, new, ents[i].fp) for i in range(10)]
    reqs += [("b/none.txt", 0o600, new, None), ("b/f10.txt", 0o600, new, "other"),
             ("b/sub", 0o700, new, None), ("nodir/f.txt", 0o600, new, None),
             ("../x.txt", 0o600, new, None)]
    got = many(reqs)
    assert len(got) == len(reqs)
    for i in range(10):
        e = got[i]
        assert isinstance(e, RemoteEntry) and e == remote.stat(f"b/f{i}.txt"), (i, e)
        st = (root / "b" / f"f{i}.txt").stat()
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o600, new)
    assert [type(e) for e in got[10:]] == [NotFound, RemoteChanged, Conflict, NotFound,
                                           PathEscape]
    assert remote.stat("b/f10.txt").fp == ents[10].fp   # left alone
    assert (root / "b" / "f11.txt").stat().st_mtime_ns == 1_700_000_000_000_000_000


def test_set_attrs_changes_the_mtime_alone(remote: Remote, peek: Peek, upload: Upload) -> None:
    """A touch synced without the content: the mtime (at the backend's precision) and the
    fingerprint change as a listing shows them, same file, same bytes, same mode. With
    expect_fp, a file that is not that version is left alone (RemoteChanged); a symlink
    there is a Conflict and its target keeps its mtime."""
    root = local_view(remote, peek, "mtimes",
                      "this backend cannot set an mtime alone (caps.mtimes is off)")
    e = upload("d/t.txt", b"touch", mtime_ns=1_700_000_000_000_000_000)
    p = root / "d" / "t.txt"
    ino, mode = p.stat().st_ino, p.stat().st_mode
    new = 1_750_000_000_123_456_789
    prec = remote.caps.mtime_precision_ns
    with pytest.raises(RemoteChanged):
        remote.set_attrs("d/t.txt", mtime_ns=new, expect_fp=e.fp + "x")
    assert remote.stat("d/t.txt").fp == e.fp
    got = remote.set_attrs("d/t.txt", mtime_ns=new, expect_fp=e.fp)
    assert p.stat().st_mtime_ns == new // prec * prec
    assert (p.stat().st_ino, p.stat().st_mode) == (ino, mode)
    assert got.fp != e.fp and got._replace(path="t.txt") == listing(remote, "d")["t.txt"]
    assert got.fp == remote.stat("d/t.txt").fp
    assert peek.read("d/t.txt") == b"touch"
    # A time the backend cannot hold as given (SFTP v3: 32-bit seconds, so 2128 wraps):
    # the entry returned is what a listing shows, never a guess that would look like drift.
    got = remote.set_attrs("d/t.txt", mtime_ns=5_000_000_000 * 10**9)
    assert got._replace(path="t.txt") == listing(remote, "d")["t.txt"]
    with pytest.raises(NotFound):
        remote.set_attrs("d/none.txt", mtime_ns=new)
    if peek.supports_symlinks:
        victim = planted_link(peek, "d/link2.txt", "victim2.txt")
        before = victim.stat().st_mtime_ns
        with pytest.raises(Conflict):
            remote.set_attrs("d/link2.txt", mtime_ns=new)
        assert victim.stat().st_mtime_ns == before




# --- a dead server -------------------------------------------------------------------------


def test_a_dead_server_is_connection_lost(dead_remote: Remote, local_dir: Path) -> None:
    """Port closed: every call says the remote is unreachable (ConnectionLost, which the
    circuit breaker counts), never a per-path error; check() says unavailable (exit 3)."""
    src = local_dir / "f"
    src.write_bytes(b"x")
    calls: list[Callable[[], object]] = [
        lambda: list(dead_remote.list("")), lambda: dead_remote.stat("f"),
        lambda: dead_remote.delete(["f"])]
    for call in calls:
        with pytest.raises(ConnectionLost) as e:
            call()
        assert "test" in str(e.value)
    with Source(str(src), "f") as s, pytest.raises(ConnectionLost):
        dead_remote.put("f", s)
    with pytest.raises(UnavailableError):
        dead_remote.check()
