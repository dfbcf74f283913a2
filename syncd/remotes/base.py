"""The Remote protocol every backend implements, its capabilities, and shared fallbacks.

Paths given to a remote are '/'-separated and relative to the remote's root; `list`
yields paths relative to the prefix it was given. Backends raise only syncd errors.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import xxhash

from syncd.errors import NotFound, PathEscape, PermanentError, SourceChanged
from syncd.model import TMP_PREFIX, RemoteEntry


@dataclass(frozen=True, slots=True)
class Capabilities:
    dirs: bool = True               # real directories: mkdir/rmdir mean something
    move: bool = True               # server-side move/rename
    mtime_precision_ns: int = 1     # how exactly put() keeps the source mtime; 0 = not kept
    atomic_put: bool = True         # readers never see a partial object
    cpu_bound: bool = False         # work is local syscalls, not network waits: list in a
                                    # forked child and transfer in worker processes
    backslash: bool = False         # '\\' is an ordinary character in names (check_rel_path)
    modes: bool = False             # put() gives the file the source's permission bits,
                                    # and set_attrs() changes them alone
    mtimes: bool = False            # set_attrs() changes a file's mtime alone
    case_sensitive: bool = False    # names differing by case only are always two (S3); else
                                    # maybe one (an SMB share, macOS): see plan.BEFORE_WRITES
    resumes_temps: bool = False     # put() may go on from its own temp of an interrupted
                                    # upload (FTP's APPE): such a temp is kept for it


class Staged(NamedTuple):
    """An upload written to a temp file beside its target, not yet durable nor published
    (the optional stage_many / flush / publish_many capability of a directory remote)."""

    path: str       # the target, relative to the remote's root
    tmp: str        # the temp file's name in the target's directory
    sent: int       # bytes written (and hashed)
    dev: int        # st_dev of the target's directory: what flush() must sync


class Source:
    """One local file opened for upload: its bytes are hashed as the backend reads them.

    A backend calls `verify()` after the last byte and *before* publishing: it raises
    SourceChanged if the file changed while it was read, so torn content never lands."""

    def __init__(self, abspath: str, rel: str, follow_symlinks: bool = False):
        self.abspath = abspath
        self.rel = rel
        # O_NONBLOCK: the file may have become a FIFO since the scan, and a blocking open
        # would wait for a writer forever (reads of regular files ignore the flag).
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        if not follow_symlinks:
            flags |= getattr(os, "O_NOFOLLOW", 0)
        try:
            self.fd = os.open(abspath, flags)
        except OSError as e:
            if e.errno == errno.ELOOP and not follow_symlinks:   # a symlink since the scan
                raise SourceChanged(rel, "is no longer a regular file") from None
            raise
        try:
            self.before = os.fstat(self.fd)
            if not _isreg(self.before.st_mode):
                raise SourceChanged(rel, "is no longer a regular file")
        except BaseException:
            os.close(self.fd)
            raise
        self.size = self.before.st_size
        self.mtime_ns = self.before.st_mtime_ns
        self.mode = self.before.st_mode & 0o7777
        self._h = xxhash.xxh3_128()
        self.sent = 0
        self.digest: bytes | None = None
        # The hash the scan computed, when known: a backend that must state the hash
        # before reading (S3 multipart metadata) checks the bytes it sent against it.
        self.expected: bytes | None = None
        self.after: os.stat_result | None = None
        self.eof = False

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Read into buf; 0 at the end. A short read that reaches the size fstat gave
        sets `eof`: the caller can stop without one more read (a small file then takes
        one call with a buffer of size + 1), and verify() skips its check read."""
        if self.eof:
            return 0
        try:
            n = os.readv(self.fd, [buf])
        except OSError as e:
            raise self._read_failed(e) from None
        self._took(memoryview(buf)[:n], len(buf))
        return n

    def read(self, size: int = 1 << 20) -> bytes:
        """Up to `size` bytes; b"" at the end. A short read that reaches the size fstat
        gave sets `eof`, as in readinto()."""
        if self.eof:
            return b""
        try:
            b = os.read(self.fd, size)
        except OSError as e:
            raise self._read_failed(e) from None
        self._took(b, size)
        return b

    def _took(self, data: bytes | memoryview, asked: int) -> None:
        """Hash and count what a read returned."""
        if data:
            self._h.update(data)
            self.sent += len(data)
        if len(data) < asked and self.sent == self.size:
            # The end, where fstat put it: growth after this read shows in verify()'s
            # fstat (size, mtime, ctime). A short read before that (a FUSE or network
            # mount may cap each read) is not the end: reading goes on.
            self.eof = True

    def _read_failed(self, e: OSError) -> SourceChanged:
        # A local read error is not the remote's fault: the job is retried, and the
        # message names the local file.
        return SourceChanged(self.rel, f"reading the local file failed: {e.strerror} (retried)")

    def prehash(self) -> bytes:
        """Hash the whole file without moving the read position, for a backend that must
        state the hash before sending (verify() later proves the bytes sent match)."""
        h = xxhash.xxh3_128()
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        off = 0
        try:
            while n := os.preadv(self.fd, [buf], off):
                h.update(view[:n])
                off += n
        except OSError as e:
            raise self._read_failed(e) from None
        return h.digest()

    def verify(self) -> bytes:
        """Digest of the bytes read; raises SourceChanged on a torn or short read."""
        try:
            if not self.eof and os.read(self.fd, 1):
                raise SourceChanged(self.rel, "grew while being read")
            after = os.fstat(self.fd)
        except OSError as e:   # a local read error is not the remote's fault
            raise self._read_failed(e) from None
        b = self.before
        if (after.st_size != b.st_size or after.st_mtime_ns != b.st_mtime_ns
                or after.st_ctime_ns != b.st_ctime_ns or self.sent != b.st_size):
            raise SourceChanged(self.rel)
        self.after = after
        self.digest = self._h.digest()
        return self.digest

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Remote(Protocol):
    name: str
    caps: Capabilities

    def check(self) -> None:
        """Raise UnavailableError (or AuthError, HostKeyError) if the remote can't be used."""

    def list(self, prefix: str) -> Iterator[RemoteEntry]: ...

    def stat(self, path: str) -> RemoteEntry: ...

    def put(self, path: str, source: Source) -> RemoteEntry:
        """Publish atomically; call source.verify() before the publish step."""

    def get(self, path: str, dest: str) -> RemoteEntry:
        """Write the remote file's bytes to the local file `dest` (created/truncated)."""

    def mkdir(self, path: str) -> RemoteEntry: ...

    def set_attrs(self, path: str, *, mode: int | None = None, mtime_ns: int | None = None,
                  expect_fp: str | None = None) -> RemoteEntry:
        """Give a file these permission bits (& 0o777; only with caps.modes) and/or this
        mtime (only with caps.mtimes), content untouched; returns its entry as it is now.
        With expect_fp, a file whose fingerprint is not that one is left alone:
        RemoteChanged. A symlink or directory there is a Conflict, nothing there NotFound."""

    def delete(self, paths: Sequence[str]) -> None:
        """Remove files; a path that is already gone is not an error."""

    def rmdir(self, path: str) -> bool:
        """Remove an empty directory; False if it is not empty."""

    def move(self, src: str, dst: str) -> str:
        """Server-side move (only when caps.move); creates dst's parents. Never replaces
        an existing entry: when dst exists, the first free `alt_name(dst, n)` is used.
        Returns the path moved to."""

    def close(self) -> None: ...


MAX_ALT_NAMES = 1000   # alt_name(dst, 1..) tried before a move gives up


def alt_name(dst: str, n: int) -> str:
    """The n-th other name for a move target that exists (n >= 1): `dst.n`, in the same
    folder. A move into the trash never replaces an earlier trashed version."""
    return f"{dst}.{n}" if n else dst


def names_for(remote: str, dst: str) -> Iterator[str]:
    """dst, then its alternative names; PermanentError once they are all taken."""
    for n in range(MAX_ALT_NAMES):
        yield alt_name(dst, n)
    raise PermanentError(f"{dst} and {MAX_ALT_NAMES - 1} alternative names are taken; "
                         "empty the trash", remote=remote, path=dst)


class _Stats(Protocol):
    name: str

    def stat(self, path: str) -> RemoteEntry: ...


def free_name(remote: _Stats, dst: str) -> str:
    """The first of dst, dst.1, dst.2, … that `remote` does not hold (by stat), for a
    write that must not replace anything but has no no-replace primitive."""
    for target in names_for(remote.name, dst):
        try:
            remote.stat(target)
        except NotFound:
            return target
    raise AssertionError("names_for raises once every name is taken")


def move(remote: Remote, src: str, dst: str, tmp_dir: str | None = None) -> str:
    """Move through the backend when it can, else copy (download + upload) and delete;
    either way an existing dst is never replaced (see Remote.move). Returns the path
    moved to."""
    if remote.caps.move:
        return remote.move(src, dst)
    remote.stat(src)   # a missing source is NotFound before anything is written
    target = free_name(remote, dst)
    fd, tmp = tempfile.mkstemp(prefix=".syncd-move-", dir=tmp_dir)
    os.close(fd)
    try:
        e = remote.get(src, tmp)
        if e.mtime_ns:
            os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns))
        with Source(tmp, target) as s:
            remote.put(target, s)
        remote.delete([src])
    finally:
        os.unlink(tmp)
    return target


def join(prefix: str, rel: str) -> str:
    if not prefix:
        return rel
    return f"{prefix}/{rel}" if rel else prefix


def check_rel_path(remote: str, path: str, backslash: bool = False) -> list[str]:
    """Components of a remote path, refusing anything that could leave the root.

    `backslash`: the remote takes '\\' as an ordinary character (a POSIX directory, S3
    keys). Servers on Windows (SFTP, FTP) take it as a separator, so elsewhere a name
    holding one could climb out of the root ('..\\..\\x') and is refused."""
    if not path or path.startswith("/") or "\x00" in path:
        raise PathEscape("absolute, empty or malformed path refused", remote=remote, path=path)
    if not backslash and "\\" in path:
        raise PathEscape("the name contains '\\', which servers on Windows take as a folder "
                         "separator (so it could lead out of the root); rename it, or add it "
                         "to the pair's ignore", remote=remote, path=path)
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PathEscape("path with '.', '..' or empty components refused", remote=remote,
                         path=path)
    return parts


def unlistable(remote: str, path: str, why: str) -> PermanentError:
    """A remote folder the login may not list: it must not pass for empty (its files would
    be sent again every run, its deletes planned blind), so the listing fails, naming it."""
    return PermanentError(f"this folder cannot be listed ({why}); give the login read "
                          "access to it", remote=remote, path=path)


def temp_name(name: str, owner: str = "") -> str:
    """A temp name for a target, unique per attempt: two writers of one target (a worker
    orphaned by a killed syncd, a second syncd on another machine) then never write into
    the same temp file and rename it half-done. `owner` (the state dir's tag) lets the
    next reconcile of the same state dir remove temps of interrupted uploads at once."""
    n = (_tmp[0] + next(_tmp[1])) & 0xFFFFFFFFFFFF   # next() of a count is atomic (GIL)
    return f"{TMP_PREFIX}{owner or 'x'}-{n:012x}"


def _tmp_reseed() -> None:
    """48 random bits per process and a counter: a name as unique as a fresh random token
    per file, without a getrandom() call each. Re-drawn in a forked child."""
    import itertools
    import secrets

    global _tmp
    _tmp = (secrets.randbits(48), itertools.count(1))


_tmp: tuple[int, Any] = (0, None)
_tmp_reseed()
os.register_at_fork(after_in_child=_tmp_reseed)


def owner_tag(state_dir: str) -> str:
    """A short random tag for this state dir, created once (state_dir/tmp-owner)."""
    import secrets

    if not state_dir:
        return ""
    path = os.path.join(state_dir, "tmp-owner")
    try:
        with open(path, encoding="ascii") as f:
            tag = f.read().strip()
        if tag.isalnum():
            return tag
    except FileNotFoundError:
        pass
    except OSError:
        return ""
    tag = secrets.token_hex(4)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:   # created meanwhile: use that one
        return owner_tag(state_dir)
    except OSError:
        return ""
    with os.fdopen(fd, "w") as f:
        f.write(tag + "\n")
    return tag


def _isreg(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)
