"""Walking a local root: stat-cache against the index, ignore rules, xxh3-128 hashing.

A file whose (size, mtime_ns, inode) matches the index and is not racy is never opened.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import stat as st_mod
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pathspec
import xxhash

from syncd.model import LOST_FOUND, TMP_PREFIX, TRASH_DIR, Kind, LocalState, printable, utf8_ok

# A file modified this close to the moment it was hashed may change again without its
# mtime changing (coarse timestamps: ext4 ticks, FAT's 2 s); re-hash it on the next scan.
RACY_WINDOW_NS = 2_000_000_000
BUF_SIZE = 1 << 20
# O_NONBLOCK: a path the walk saw as a file may be a FIFO by now, and a blocking open of
# a FIFO waits for a writer forever (reads of regular files ignore the flag).
_O_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_S_IFMT, _S_IFREG = st_mod.S_IFMT(0o777777), st_mod.S_IFREG


class Matcher:
    """gitignore semantics over '/'-separated relative paths (directories end in '/').

    Parses with pathspec, matches as git does (see __init__ and __call__).
    """

    def __init__(self, patterns: Iterable[str]):
        lines = list(patterns)
        # Per rule: pathspec's regex (which also matches everything below what the rule
        # names), and our own, anchored at the end: the rule must name the path itself
        # (see __call__). Two rule forms pathspec reads otherwise than git: "x/**" is
        # "^x/" to pathspec, naming x itself, while git names only what is inside x ("/**"
        # alone is ".": everything); "x/**/" is "x/" to pathspec, and to git the
        # directories inside x at any depth (not x, not its files).
        self._rules: list[tuple[re.Pattern[str], bool]] = []
        fusable: list[str] = []   # pathspec's regexes of include rules that agree with git
        fuse = True
        for line in lines:
            body, inside = line.strip(), ""
            if body.endswith("/**/") and body.lstrip("!/") != "**/":
                line, inside = body[:-1], ".+/"
            for p in pathspec.GitIgnoreSpec.from_lines([line]).patterns:
                if p.include is None:
                    continue
                rx = p.regex.pattern  # type: ignore[union-attr]
                if not inside and body.endswith("/**") and rx.endswith("/"):
                    inside = ".+"
                self._rules.append((re.compile(f"(?:{rx}){inside}\\Z"), bool(p.include)))
                fuse = fuse and bool(p.include) and not inside
                fusable.append(re.sub(r"\(\?P<\w+>", "(?:", rx))
        self.empty = not self._rules
        # Without negations (nor the two forms above) the rules only add up: one fused
        # regex does for all of them, a file costing one search, not one per rule.
        self._fused: re.Pattern[str] | None = (
            re.compile("|".join(f"(?:{x})" for x in fusable)) if self._rules and fuse else None)
        # Every rule names one directory by its literal path ("/lost+found/", "!/build/",
        # the state dir's "/.local/state/syncd/"): no file needs a check, a directory only
        # a set lookup, and the listing can skip whole subtrees after the fact (engine:
        # listing.drop_ignored_dirs) instead of filtering each entry.
        lits = [_literal_dir(x) for x in lines if x.strip() and not x.startswith("#")]
        self.literal_only = not self.empty and all(lits)
        self.ignored_dirs = frozenset(
            t for t in lits if t and self(t + "/")) if self.literal_only else frozenset()

    def __call__(self, rel: str) -> bool:
        """Whether `rel` ("a/b" for a file, "a/b/" for a directory) is excluded, its
        parent directories taken as not excluded: callers walk top-down and never look
        inside an excluded directory, as git does.

        With negations, each rule is matched against the entry's own path only: pathspec
        also lets a rule match every path below what it names, so "!/vendor" re-included
        vendor/node_modules/ although "node_modules" excludes it (git keeps it excluded:
        nothing re-includes a path whose own rule did not name it). Without negations the
        two agree, and one fused regex does for all rules."""
        if self.empty:
            return False
        if self._fused is not None:   # search, as pathspec: some rules are unanchored
            return self._fused.search(rel) is not None
        hit = False
        for rx, include in self._rules:
            if rx.search(rel) is not None:
                hit = include
        return hit


    def covers(self, rel: str) -> bool:
        """Whether a path anywhere in the tree (a watched event's, say) is excluded, by its
        own rule or by an excluded parent directory; its kind unknown."""
        if self.empty:
            return False
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if self("/".join(parts[:i]) + "/"):
                return True
        return self(rel) or self(rel + "/")


def _literal_dir(line: str) -> str | None:
    """The directory path of a "/a/b/" or "!/a/b/" rule with no wildcard or escape (any
    depth), else None."""
    body = line.strip().removeprefix("!")
    name = body[1:-1] if body.startswith("/") and body.endswith("/") else ""
    ok = name and "//" not in name and not name.startswith("/") and not name.endswith("/")
    return name if ok and not any(c in name for c in "*?[\\") else None


# Outside every pair, on both sides, unless a pattern re-includes it ("!/lost+found/"): a
# filesystem's top-level lost+found belongs to fsck. A pair rooted at a mount point would
# otherwise delete from the remote the files fsck recovered there, or upload the local ones.
BUILTIN_IGNORE = (f"/{LOST_FOUND}/",)


def pair_matcher(patterns: Iterable[str], root: str | os.PathLike[str] | None = None,
                 state_dir: str | os.PathLike[str] | None = None,
                 remote_dir: str | os.PathLike[str] | None = None) -> Matcher:
    """A pair's matcher: the built-in rules first, so the pair's own patterns can override
    them. With `root` and `state_dir`: also syncd's own state dir when it lies inside the
    pair's root (`local = "~"` with the default state dir). Its database changes on every
    run: synced, it would be uploaded half-written, and wake the daemon again forever.
    With `remote_dir` (a directory remote's side of the pair): also the state dir inside
    that, which the config refuses; should it get there anyway, it is never listed as
    remote content to remove."""
    return Matcher((*BUILTIN_IGNORE, *_state_dir_rule(root, state_dir),
                    *_state_dir_rule(remote_dir, state_dir), *patterns))


def _state_dir_rule(root: str | os.PathLike[str] | None,
                    state_dir: str | os.PathLike[str] | None) -> tuple[str, ...]:
    if root is None or state_dir is None:
        return ()
    top, own = os.path.realpath(root).rstrip("/"), os.path.realpath(state_dir)
    if not own.startswith(top + "/"):
        return ()
    rel = own[len(top) + 1:]
    # A literal path as a gitignore pattern: wildcard and escape characters escaped, and a
    # name's leading '!' or '#' too (pathspec honours backslash escapes).
    esc = "/".join(("\\" + c if c[:1] and c[:1] in "!#" else c) for c in
                   "".join("\\" + ch if ch in "\\*?[]" else ch for ch in rel).split("/"))
    return (f"/{esc}/",)


def local_mounts(root: str, mountinfo: str = "/proc/self/mountinfo") -> list[str] | None:
    """Mount points strictly inside `root`, relative to it, sorted; None where the system
    does not say (no /proc). One read of a small file: no stat per directory."""
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    top = os.fsencode(os.path.realpath(root)).rstrip(b"/") + b"/"
    out = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        # Field 5 is the mount point, with space, tab, newline and backslash as \ooo.
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
        if point.startswith(top) and len(point) > len(top):
            out.add(os.fsdecode(point[len(top):]))
    return sorted(out)


# A prior row, as Index.load_prior returns it:
# (path, kind, size, mtime_ns, inode, mode, hash, racy, synced)
PriorRow = tuple[Any, ...]


def prior_rows(states: dict[str, LocalState], racy: set[str] | frozenset[str] = frozenset(),
               ) -> tuple[dict[str, int], dict[str, PriorRow]]:
    """(clean, other) in Index.load_prior's shape from LocalStates, none of them synced."""
    return {}, {p: (p, *s, int(p in racy), 0) for p, s in states.items()}


@dataclass
class Walk:
    """What one walk saw.

    `seen` holds every syncable path found. `states` holds only the entries that need
    planning: new, changed, racy, or not yet confirmed on the remote. A path in `seen` but
    not in `states` is clean: unchanged since the index and synced as it is. A file in
    `states` whose hash is None still needs hashing (it is listed in `dirty`)."""

    root_dev: int
    seen: set[str] = field(default_factory=set)
    states: dict[str, LocalState] = field(default_factory=dict)
    dirty: list[str] = field(default_factory=list)
    seen_prior: int = 0                                              # prior paths found again
    errors: list[tuple[str, str]] = field(default_factory=list)     # I/O errors: block deletes
    unsyncable: list[tuple[str, str]] = field(default_factory=list)  # names we refuse to sync
    # Of those, names that are not UTF-8 (rel, is a directory): maybe renamed from a name
    # the remote still has.
    odd_names: list[tuple[str, bool]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)     # by policy (symlink, fifo)
    error_prefixes: list[str] = field(default_factory=list)  # subtrees we could not read

    def under_error(self, rel: str) -> bool:
        return any(p == "" or rel == p or rel.startswith(p + "/") for p in self.error_prefixes)

    def removed(self, clean: dict[str, int], other: dict[str, PriorRow]) -> list[str]:
        """Prior paths not found now (excluding subtrees we could not read)."""
        if self.seen_prior == len(clean) + len(other):
            return []
        seen = self.seen
        return [p for p in (*clean, *other) if p not in seen and not self.under_error(p)]


def walk(root: str, clean: dict[str, int], prior: dict[str, PriorRow], ignore: Matcher,
         follow_symlinks: bool = False,
         sink: Callable[[list[tuple[str, LocalState]]], None] | None = None) -> Walk:
    """Stat every entry under `root`; a file whose (size, mtime_ns, inode) matches its
    prior row and is not racy is not opened, and if it is also synced, not planned.

    `sink`, if given, gets the states each directory's listing added, as it goes (a first
    sync starts uploading before the walk ends); an exception it raises ends the walk."""
    root_st = os.stat(root)
    w = Walk(root_dev=root_st.st_dev)
    states = w.states
    seen = w.seen
    dirty = w.dirty
    get_prior = prior.get
    get_clean = clean.get
    seen_add = seen.add
    seen_prior = 0
    FILE, DIR = int(Kind.FILE), int(Kind.DIR)
    # Per directory still to list, the (st_dev, st_ino) of it and its ancestors: a followed
    # symlink back to one of them is a loop. Another path to a directory that is not an
    # ancestor (a link beside its target) is not, and is synced there too, as rsync -L does.
    ancestors: dict[str, frozenset[tuple[int, int]]] = {
        "": frozenset({(root_st.st_dev, root_st.st_ino)})}
    literal = ignore.ignored_dirs if ignore.literal_only else None
    # No rule check for files when every rule names a directory by its literal path
    # (directories then take a set lookup: `literal`).
    no_ignore = ignore.empty or ignore.literal_only
    stack: list[str] = [""]
    while stack:
        prefix = stack.pop()
        above = ancestors.pop(prefix, None)
        top = os.path.join(root, prefix) if prefix else root
        try:
            it = os.scandir(top)
        except OSError as e:
            rel_dir = prefix.rstrip("/")
            w.errors.append((rel_dir or ".", _oserr(e)))
            w.error_prefixes.append(rel_dir)
            continue
        mark = len(states)
        try:
            with it:
                for entry in it:
                    name = entry.name
                    if not utf8_ok(name):
                        is_dir = False
                        with contextlib.suppress(OSError):
                            is_dir = entry.is_dir(follow_symlinks=False)
                        w.odd_names.append((prefix + printable(name), is_dir))
                        w.unsyncable.append((prefix + printable(name),
                                             "name is not valid UTF-8; rename it to sync it"))
                        continue
                    rel = prefix + name
                    if name.startswith(TMP_PREFIX) or (not prefix and name == TRASH_DIR):
                        w.unsyncable.append((rel, "name is reserved for syncd's own use"))
                        continue
                    is_link = False
                    try:
                        is_link = entry.is_symlink()
                        if is_link:
                            if not follow_symlinks:
                                w.skipped.append((rel, "symlink"))
                                continue
                            s = entry.stat(follow_symlinks=True)
                        elif entry.is_dir(follow_symlinks=False) and not follow_symlinks:
                            s = None   # d_type says directory: no stat needed
                        else:
                            s = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        if is_link:
                            w.skipped.append((rel, "broken symlink"))
                        continue  # vanished between listing and stat: it is simply not there
                    except OSError as e:
                        if is_link and e.errno == errno.ELOOP:
                            # A link that resolves to itself (x -> x, a -> b -> a) names no
                            # file: like a link back to a directory above, nothing to sync.
                            w.skipped.append((rel, "symlink loop"))
                            continue
                        w.errors.append((rel, _oserr(e)))
                        w.error_prefixes.append(rel)
                        continue
                    if s is not None and (s.st_mode & _S_IFMT) == _S_IFREG:
                        if not no_ignore and ignore(rel):
                            continue
                        seen_add(rel)
                        sig = get_clean(rel)
                        if sig is not None:
                            seen_prior += 1
                            if sig == hash((s.st_size, s.st_mtime_ns, s.st_ino,  # = stat_sig()
                                            s.st_mode & 0o7777)):
                                continue
                            states[rel] = LocalState(FILE, s.st_size, s.st_mtime_ns, s.st_ino,
                                                     s.st_mode & 0o7777, None)
                            dirty.append(rel)
                            continue
                        p = get_prior(rel)
                        if p is not None:
                            seen_prior += 1
                            if (p[1] == FILE and p[2] == s.st_size and p[3] == s.st_mtime_ns
                                    and p[4] == s.st_ino and p[5] == s.st_mode & 0o7777
                                    and p[6] is not None and not p[7]):
                                if not p[8]:
                                    states[rel] = LocalState(FILE, p[2], p[3], p[4], p[5], p[6])
                                continue
                        states[rel] = LocalState(FILE, s.st_size, s.st_mtime_ns, s.st_ino,
                                                 s.st_mode & 0o7777, None)
                        dirty.append(rel)
                    elif s is None or st_mod.S_ISDIR(s.st_mode):
                        if literal is not None:
                            if rel in literal:
                                continue
                        elif not no_ignore and ignore(rel + "/"):
                            continue
                        if s is not None and above is not None:
                            key = (s.st_dev, s.st_ino)
                            if key in above:   # only reachable through followed symlinks
                                w.skipped.append((rel, "symlink loop"))
                                continue
                            ancestors[rel + "/"] = above | {key}
                        seen_add(rel)
                        stack.append(rel + "/")
                        p = get_prior(rel)
                        if p is not None:
                            seen_prior += 1
                            if p[1] == DIR:
                                if not p[8]:
                                    states[rel] = LocalState(DIR, 0, 0, p[4], p[5], None)
                                continue
                        states[rel] = LocalState(DIR, 0, 0, entry.inode(), 0o755 if s is None
                                                 else s.st_mode & 0o7777, None)
                    else:
                        w.skipped.append((rel, _special_kind(s.st_mode)))
        except OSError as e:  # a directory that vanished or failed mid-listing
            rel_dir = prefix.rstrip("/")
            w.errors.append((rel_dir or ".", _oserr(e)))
            w.error_prefixes.append(rel_dir)
        if sink is not None and len(states) > mark:
            # The newest insertions of a dict, without walking the older ones.
            sink(list(itertools.islice(reversed(states.items()), len(states) - mark))[::-1])
    w.seen_prior = seen_prior
    return w


def hash_file(path: str, follow_symlinks: bool = False) -> tuple[bytes, os.stat_result, os.stat_result]:
    """xxh3-128 of a file, streamed; returns (digest, fstat before, fstat after)."""
    fd = os.open(path, _O_FLAGS if follow_symlinks else _O_FLAGS | _O_NOFOLLOW)
    try:
        before = os.fstat(fd)
        if not st_mod.S_ISREG(before.st_mode):   # no longer a file: the caller drops it
            return b"", before, before
        if before.st_size <= BUF_SIZE:
            chunks = []
            while True:
                b = os.read(fd, BUF_SIZE + 1)
                if not b:
                    break
                chunks.append(b)
            digest = xxhash.xxh3_128_digest(b"".join(chunks) if len(chunks) != 1 else chunks[0])
        else:
            h = xxhash.xxh3_128()
            buf = bytearray(BUF_SIZE)
            mv = memoryview(buf)
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    h.update(mv[:n])
            digest = h.digest()
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return digest, before, after


def stable(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size == after.st_size and before.st_mtime_ns == after.st_mtime_ns
            and before.st_ctime_ns == after.st_ctime_ns)


def is_racy(mtime_ns: int, hashed_at_ns: int) -> bool:
    return mtime_ns >= hashed_at_ns - RACY_WINDOW_NS


@dataclass
class Hashed:
    updates: list[tuple[str, LocalState, bool]] = field(default_factory=list)  # (path, state, racy)
    errors: list[tuple[str, str]] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def hash_paths(root: str, w: Walk, paths: Iterable[str], now_ns: Callable[[], int] = time.time_ns,
               threads: int = 4, hasher: Callable[..., Any] = hash_file,
               follow_symlinks: bool = False) -> Hashed:
    """Hash `paths` (a subset of w.dirty) in a small thread pool; fill w.states in place.

    A file that vanished is dropped; one that cannot be read is an error (and is kept out
    of the plan); one that changed while it was read is hashed again next scan (racy)."""
    out = Hashed()
    paths = list(paths)

    def one(rel: str) -> tuple[str, Any, int]:
        t0 = now_ns()
        try:
            full = os.path.join(root, rel)
            return rel, (hasher(full, True) if follow_symlinks else hasher(full)), t0
        except OSError as e:
            return rel, e, t0

    def consume(results: Iterable[tuple[str, Any, int]]) -> None:
        for rel, res, t0 in results:
            if isinstance(res, FileNotFoundError):
                w.states.pop(rel, None)
                w.seen.discard(rel)
                continue
            if isinstance(res, OSError):
                out.errors.append((rel, _oserr(res)))
                w.states.pop(rel, None)
                continue
            digest, before, after = res
            if not st_mod.S_ISREG(after.st_mode):
                w.states.pop(rel, None)
                w.seen.discard(rel)
                continue
            state = LocalState(int(Kind.FILE), after.st_size, after.st_mtime_ns, after.st_ino,
                               after.st_mode & 0o7777, digest)
            racy = not stable(before, after) or is_racy(after.st_mtime_ns, t0)
            w.states[rel] = state
            out.updates.append((rel, state, racy))
            out.files += 1
            out.bytes += after.st_size

    if threads <= 1 or len(paths) < 64:
        consume(map(one, paths))
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hash") as pool:
            consume(pool.map(one, paths, chunksize=32))
    return out


def _special_kind(mode: int) -> str:
    if st_mod.S_ISFIFO(mode):
        return "fifo"
    if st_mod.S_ISSOCK(mode):
        return "socket"
    if st_mod.S_ISCHR(mode) or st_mod.S_ISBLK(mode):
        return "device"
    return "special file"


def _oserr(e: OSError) -> str:
    return e.strerror or str(e)
