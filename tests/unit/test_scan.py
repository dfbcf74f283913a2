"""Scanner: stat cache (unchanged files are never opened), racy mtimes, ignore rules,
special files, symlinks, non-UTF-8 names, vanishing and unreadable files."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

import pathspec
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.model import Kind, LocalState
from syncd.scan import RACY_WINDOW_NS, Matcher, hash_file, hash_paths, prior_rows, walk

F = int(Kind.FILE)


def mk(root: Path, rel: str, data: bytes = b"x") -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def full_scan(root: Path, prior: dict[str, LocalState] | None = None, racy: set[str] | None = None,
              ignore: tuple[str, ...] = (), now_ns: int | None = None, **kw: bool):
    w = walk(str(root), *prior_rows(prior or {}, racy or set()), Matcher(ignore), **kw)
    clock = (lambda: now_ns) if now_ns is not None else None
    hashed = hash_paths(str(root), w, w.dirty, follow_symlinks=kw.get("follow_symlinks", False),
                        **({"now_ns": clock} if clock else {}))
    return w, hashed


class OpenCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, under: Path):
        self.paths: list[str] = []
        real = os.open

        def counting(path, *a, **k):  # type: ignore[no-untyped-def]
            if str(path).startswith(str(under)):
                self.paths.append(str(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "open", counting)


def test_hashes_are_xxh3_128_of_content(tmp_path: Path) -> None:
    mk(tmp_path, "a.txt", b"hello")
    big = os.urandom(3 * (1 << 20) + 17)
    mk(tmp_path, "d/big.bin", big)
    w, hashed = full_scan(tmp_path)
    assert w.states["a.txt"].hash == xxhash.xxh3_128_digest(b"hello")
    assert w.states["d/big.bin"].hash == xxhash.xxh3_128_digest(big)
    assert w.states["d"].kind == int(Kind.DIR)
    assert hashed.files == 2 and hashed.bytes == 5 + len(big)


def test_unchanged_file_is_not_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(20):
        mk(tmp_path, f"d{i % 3}/f{i}", b"data %d" % i)
    old = 1_600_000_000_000_000_000
    for p in tmp_path.rglob("f*"):
        os.utime(p, ns=(old, old))   # old mtimes: not racy
    w1, _ = full_scan(tmp_path)
    counter = OpenCounter(monkeypatch, tmp_path)
    w2, h2 = full_scan(tmp_path, prior=w1.states)
    assert counter.paths == []
    assert w2.dirty == [] and h2.files == 0
    assert w2.states == w1.states
    # ...and a changed one is opened, exactly once
    mk(tmp_path, "d1/f4", b"changed!")
    w3, _h3 = full_scan(tmp_path, prior=w2.states)
    assert w3.dirty == ["d1/f4"] and len(counter.paths) == 1 and counter.paths[0].endswith("d1/f4")
    assert w3.states["d1/f4"].hash == xxhash.xxh3_128_digest(b"changed!")


def test_racy_file_is_rehashed_even_with_identical_stat(tmp_path: Path) -> None:
    p = mk(tmp_path, "f", b"AAAA")
    st = p.stat()
    # Hashed within the timestamp-granularity window of its mtime: racy.
    w1, h1 = full_scan(tmp_path, now_ns=st.st_mtime_ns + RACY_WINDOW_NS // 2)
    ((_rel, _state, racy),) = h1.updates
    assert racy is True
    # Same size, same mtime, different content: only the racy flag catches this.
    p.write_bytes(b"BBBB")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    w2, h2 = full_scan(tmp_path, prior=w1.states, racy={"f"},
                       now_ns=st.st_mtime_ns + 10 * RACY_WINDOW_NS)
    assert w2.dirty == ["f"]
    assert w2.states["f"].hash == xxhash.xxh3_128_digest(b"BBBB")
    assert h2.updates[0][2] is False   # now old enough to trust


def test_file_changing_while_hashed_is_marked_racy(tmp_path: Path) -> None:
    p = mk(tmp_path, "f", b"v1")
    w = walk(str(tmp_path), {}, {}, Matcher([]))

    def hasher(path: str, follow: bool = False):  # the file changes between the two fstat calls
        digest, before, _ = hash_file(path)
        p.write_bytes(b"v2 longer")
        return digest, before, os.stat(path)

    hashed = hash_paths(str(tmp_path), w, w.dirty, hasher=hasher,
                        now_ns=lambda: p.stat().st_mtime_ns + 100 * RACY_WINDOW_NS)
    assert hashed.updates[0][2] is True


def test_ignore_rules_gitignore_semantics(tmp_path: Path) -> None:
    for rel in [".git/HEAD", "a/.git/x", "keep.txt", "x.tmp", "build/out.o", "src/build.c",
                "logs/a.log", "logs/important.log"]:
        mk(tmp_path, rel)
    w, _ = full_scan(tmp_path, ignore=(".git/", "*.tmp", "build/", "logs/*.log", "!logs/important.log"))
    files = sorted(p for p, s in w.states.items() if s.kind == F)
    assert files == ["keep.txt", "logs/important.log", "src/build.c"]


def test_ignored_dir_is_not_descended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mk(tmp_path, "node_modules/pkg/index.js")
    mk(tmp_path, "app.js")
    seen: list[str] = []
    real = os.scandir

    def spy(path):  # type: ignore[no-untyped-def]
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", spy)
    w, _ = full_scan(tmp_path, ignore=("node_modules/",))
    assert "app.js" in w.states and not any("node_modules" in s for s in seen)


pattern_st = st.sampled_from(["*.tmp", ".git/", "build/", "/top.txt", "a/**/b", "*.log", "d?",
                              "!keep.tmp", "logs/", "**/cache"])
path_st = st.lists(st.sampled_from(["a", "b", "d1", "x.tmp", "keep.tmp", ".git", "build", "top.txt",
                                    "y.log", "logs", "cache"]), min_size=1, max_size=4).map("/".join)


@settings(max_examples=400, deadline=None)
@given(patterns=st.lists(pattern_st, max_size=5), path=path_st, is_dir=st.booleans())
def test_matcher_agrees_with_pathspec_where_gitignore_does(patterns: list[str], path: str,
                                                           is_dir: bool) -> None:
    # Without negations, everywhere (the fused regex); with them, at the top level: below
    # it pathspec lets a negation re-include what a rule excluded under the path it names
    # ("!/vendor" re-including vendor/node_modules/), which git does not (tested against
    # git itself below).
    rel = path + "/" if is_dir else path
    if "/" in path and any(p.startswith("!") for p in patterns):
        return
    assert Matcher(patterns)(rel) == pathspec.GitIgnoreSpec.from_lines(patterns).match_file(rel)


GIT_NAMES = ["a", "b", "x.log", "build", "keep.txt", "d", "node_modules", "vendor", "c d"]
GIT_PATTERNS = ["*.log", "!x.log", "build/", "/build/", "!build/keep.txt", "a/b", "/a", "a/",
                "**/d", "d/**", "!d/", "b", "!/b", "keep.txt", "a/**/x.log", "/a/b/",
                "!a/b/keep.txt", "*", "!*/", "!keep.txt", "d/*", "/d/", "b/", "!b/",
                "node_modules", "!/vendor", "!vendor/", "/*/x.log", "c d/", "!node_modules/",
                "/**", "**", "d/**/b", "!a", "d/**/"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to compare with")
def test_walk_keeps_exactly_what_git_keeps(tmp_path: Path) -> None:
    """Random trees and rule sets: the files a walk keeps are the untracked files git does
    not ignore (`git ls-files -o --exclude-standard`), negations included."""
    import random
    import subprocess

    for seed in range(int(os.environ.get("GIT_SEEDS", "60"))):
        rng = random.Random(seed)
        root = tmp_path / str(seed)
        files: list[str] = []

        def grow(prefix: str, depth: int, rng: random.Random = rng,
                 files: list[str] = files) -> None:
            for n in rng.sample(GIT_NAMES, rng.randint(1, 4)):
                if depth < 3 and rng.random() < 0.45:
                    grow(f"{prefix}{n}/", depth + 1)
                else:
                    files.append(prefix + n)

        grow("", 0)
        for rel in files:
            mk(root, rel, rel.encode())
        rules = rng.sample(GIT_PATTERNS, rng.randint(1, 4))
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        (root / ".git" / "info").mkdir(parents=True, exist_ok=True)
        (root / ".git" / "info" / "exclude").write_text("\n".join(rules) + "\n")
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-o", "--exclude-standard",
                              "-z"], capture_output=True, check=True).stdout
        git_keeps = {p.decode() for p in out.split(b"\0") if p}
        w, _ = full_scan(root, ignore=(*rules, "/.git/"))
        walk_keeps = {p for p, s in w.states.items() if s.kind == Kind.FILE}
        assert walk_keeps == git_keeps, (seed, rules)


def test_special_files_are_skipped_with_reason(tmp_path: Path) -> None:
    mk(tmp_path, "ok")
    os.mkfifo(tmp_path / "pipe")
    s = socket.socket(socket.AF_UNIX)
    sock_path = tmp_path / "sock"
    try:
        s.bind(str(sock_path))
        w, _ = full_scan(tmp_path)
    finally:
        s.close()
    assert set(w.states) == {"ok"}
    assert sorted(w.skipped) == [("pipe", "fifo"), ("sock", "socket")]


def test_symlinks_skipped_by_default_followed_when_asked(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    mk(outside, "o.txt", b"outside")
    mk(root, "real.txt", b"real")
    (root / "link.txt").symlink_to(root / "real.txt")
    (root / "dirlink").symlink_to(outside)
    (root / "loop").symlink_to(root)
    (root / "broken").symlink_to(tmp_path / "nope")
    w, _ = full_scan(root)
    assert set(w.states) == {"real.txt"}
    assert sorted(r for r, _ in w.skipped) == ["broken", "dirlink", "link.txt", "loop"]
    w, _ = full_scan(root, follow_symlinks=True)
    assert w.states["dirlink/o.txt"].hash == xxhash.xxh3_128_digest(b"outside")
    assert w.states["link.txt"].hash == xxhash.xxh3_128_digest(b"real")
    assert ("loop", "symlink loop") in w.skipped and ("broken", "broken symlink") in w.skipped


def test_a_link_that_resolves_to_itself_is_a_skipped_loop_not_an_error(tmp_path: Path) -> None:
    """`ln -s loopself loopself` and a -> b -> a, followed: no file to sync, and not an
    error (an error blocks the pair's deletes and fails every run, for good)."""
    root = tmp_path / "root"
    mk(root, "real.txt", b"real")
    (root / "loopself").symlink_to("loopself")
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    mk(root / "sub", "x.txt", b"x")
    (root / "sub" / "deep").symlink_to(root / "sub" / "deep")
    w, _ = full_scan(root, follow_symlinks=True)
    assert w.errors == [] and w.error_prefixes == []
    assert sorted(w.skipped) == [("a", "symlink loop"), ("b", "symlink loop"),
                                 ("loopself", "symlink loop"), ("sub/deep", "symlink loop")]
    assert {r for r, st in w.states.items() if st.kind == Kind.FILE} == {"real.txt", "sub/x.txt"}


@pytest.mark.parametrize("link", ["alias", "zzz"])
def test_a_followed_link_beside_its_target_is_not_a_loop(tmp_path: Path, link: str) -> None:
    """data/ and a symlink to it beside it (latest -> data): two paths to one directory,
    not a loop; both are synced, as rsync -L does. Only a link back to an ancestor is a
    loop. (Every directory seen anywhere used to count: whichever path the listing gave
    first was synced, the other skipped, and the real folder could lose its remote copy.)"""
    root = tmp_path / "root"
    mk(root / "data" / "sub", "a.txt", b"a")
    (root / link).symlink_to(root / "data")
    (root / "data" / "sub" / "up").symlink_to(root / "data")
    w, _ = full_scan(root, follow_symlinks=True)
    files = {r for r, st in w.states.items() if st.kind == Kind.FILE}
    assert files == {"data/sub/a.txt", f"{link}/sub/a.txt"}
    assert set(w.skipped) == {("data/sub/up", "symlink loop"),
                              (f"{link}/sub/up", "symlink loop")}


def test_non_utf8_name_is_reported_not_crashed(tmp_path: Path) -> None:
    mk(tmp_path, "good.txt")
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xff.txt"), "wb") as f:
        f.write(b"x")
    w, _ = full_scan(tmp_path)
    assert set(w.seen) == {"good.txt"}
    ((shown, why),) = w.unsyncable
    assert shown == "bad\\xff.txt" and "UTF-8" in why


def test_reserved_names_are_not_synced(tmp_path: Path) -> None:
    mk(tmp_path, ".syncd-trash/x")
    mk(tmp_path, "d/.syncd-tmp-123")
    mk(tmp_path, "d/.syncd-trash")   # only reserved at the top
    w, _ = full_scan(tmp_path)
    assert set(w.states) == {"d", "d/.syncd-trash"}
    assert sorted(r for r, _ in w.unsyncable) == [".syncd-trash", "d/.syncd-tmp-123"]


def test_vanished_file_is_dropped_silently(tmp_path: Path) -> None:
    p = mk(tmp_path, "gone")
    mk(tmp_path, "stays")
    w = walk(str(tmp_path), {}, {}, Matcher([]))
    p.unlink()
    hashed = hash_paths(str(tmp_path), w, w.dirty)
    assert set(w.states) == {"stays"} and hashed.errors == []


def test_unreadable_file_is_an_error_others_continue(tmp_path: Path) -> None:
    mk(tmp_path, "secret", b"s")
    mk(tmp_path, "fine", b"f")
    w = walk(str(tmp_path), {}, {}, Matcher([]))

    def hasher(path: str, follow: bool = False):
        if path.endswith("secret"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return hash_file(path)

    hashed = hash_paths(str(tmp_path), w, w.dirty, hasher=hasher)
    assert hashed.errors == [("secret", "Permission denied")]
    assert set(w.states) == {"fine"}


@pytest.mark.parametrize("name", [".local/state/syncd", "a [b]*?/x", "!bang/#hash", "back\\slash"])
def test_the_state_dir_inside_a_pair_is_ignored_whatever_its_name(tmp_path: Path,
                                                                   name: str) -> None:
    # local = "~" with the default state dir: the index, written on every run, would be
    # synced half-written and wake the daemon again forever.
    from syncd.scan import pair_matcher

    state = tmp_path / name
    state.mkdir(parents=True)
    m = pair_matcher([], tmp_path, state)
    assert m(name + "/") and m(name + "/index.sqlite3")
    assert not m(name + "x/") and not m("other/")
    assert not pair_matcher([], tmp_path / "elsewhere", state)(name + "/")
    assert not pair_matcher([], tmp_path, tmp_path)("x/")   # state dir == root: no rule


def test_mount_points_inside_a_root_come_from_mountinfo(tmp_path: Path) -> None:
    from syncd.scan import local_mounts

    root = tmp_path / "src"
    root.mkdir()
    top = str(root).replace(" ", "\\040")
    info = tmp_path / "mountinfo"
    info.write_bytes("\n".join([
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw",
        f"40 22 8:2 / {top} rw - ext4 /dev/sdb1 rw",                  # the root itself
        f"41 40 8:3 / {top}/photos rw - ext4 /dev/sdc1 rw",
        f"42 40 0:5 / {top}/my\\040music rw - tmpfs tmpfs rw",        # a space, escaped
        f"43 22 0:6 / {top}x/other rw - tmpfs tmpfs rw",              # a sibling, not inside
    ]).encode())
    assert local_mounts(str(root), str(info)) == ["my music", "photos"]
    assert local_mounts(str(root), str(tmp_path / "none")) is None

