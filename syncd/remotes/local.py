"""The `local` remote: a directory (a NAS mount, a second disk) written atomically.

Every write goes to a temp name in the target directory, is fsynced, then renamed over the
target. No path may leave the root: '..', absolute paths and symlinked parents are refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator, Sequence

from syncd.errors import (
    Conflict,
    NotFound,
    PathEscape,
    PermanentError,
    RemoteError,
    TransientError,
    UnavailableError,
)
from syncd.model import TMP_PREFIX, TRASH_DIR, Kind, RemoteEntry
from syncd.remotes.base import Capabilities, Source, check_rel_path, temp_name

_TRANSIENT = {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.ETIMEDOUT, errno.ESTALE,
              errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ENOENT, errno.ENOTCONN,
              errno.EHOSTDOWN, errno.ECONNRESET}
_BUF = 1 << 20
_FILE, _DIR = int(Kind.FILE), int(Kind.DIR)


def _fp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


class LocalRemote:
    caps = Capabilities(dirs=True, move=True, mtime_precision_ns=1, atomic_put=True)

    def __init__(self, name: str, root: os.PathLike[str] | str, fsync: bool = True):
        self.name = name
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self._dirs: set[str] = {""}   # relative dirs verified to be real dirs inside root
        self._lock = threading.Lock()

    # --- errors ---------------------------------------------------------------------------

    def _err(self, e: OSError, path: str) -> RemoteError:
        msg = e.strerror or str(e)
        if isinstance(e, FileNotFoundError):
            return NotFound(msg, remote=self.name, path=path)
        if e.errno in _TRANSIENT:
            return TransientError(msg, remote=self.name, path=path)
        if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY):
            return Conflict(msg, remote=self.name, path=path)
        return PermanentError(msg, remote=self.name, path=path)

    # --- paths ----------------------------------------------------------------------------

    def _abs(self, path: str) -> str:
        check_rel_path(self.name, path)
        return os.path.join(self.root, path)

    def _dir_ok(self, rel_dir: str, create: bool) -> bool:
        """Make sure every component of rel_dir is a real directory (not a symlink) inside
        the root, creating missing ones if asked. False if missing and not created."""
        if rel_dir in self._dirs:
            return True
        parent = rel_dir.rpartition("/")[0]
        if not self._dir_ok(parent, create):
            return False
        full = os.path.join(self.root, rel_dir)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(full, 0o755)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode):
            raise PathEscape("a parent directory is a symlink; refusing to follow it",
                             remote=self.name, path=rel_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise Conflict("a parent path exists and is not a directory", remote=self.name,
                           path=rel_dir)
        with self._lock:
            self._dirs.add(rel_dir)
        return True

    def _parent(self, path: str, create: bool) -> bool:
        check_rel_path(self.name, path)
        return self._dir_ok(path.rpartition("/")[0], create)

    def _forget_dirs(self, rel_dir: str) -> None:
        with self._lock:
            self._dirs = {d for d in self._dirs if d != rel_dir and not d.startswith(rel_dir + "/")}
            self._dirs.add("")

    # --- protocol -------------------------------------------------------------------------

    def check(self) -> None:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise UnavailableError(f"root directory {self.root} does not exist (is the disk "
                                   "mounted?); syncd never creates a remote root",
                                   remote=self.name) from None
        except OSError as e:
            raise UnavailableError(f"root directory {self.root}: {e.strerror}",
                                   remote=self.name) from None
        if not stat.S_ISDIR(st.st_mode):
            raise UnavailableError(f"root {self.root} is not a directory", remote=self.name)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise UnavailableError(f"root directory {self.root} is not writable by this user",
                                   remote=self.name)

    def list(self, prefix: str) -> Iterator[RemoteEntry]:
        if prefix:
            check_rel_path(self.name, prefix)
            try:
                if not self._dir_ok(prefix, create=False):
                    return
            except Conflict:
                raise
        top = os.path.join(self.root, prefix) if prefix else self.root
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                it = os.scandir(os.path.join(top, rel_dir) if rel_dir else top)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._err(e, rel_dir or prefix) from None
            with it:
                for entry in it:
                    name = entry.name
                    rel = rel_dir + name
                    if not rel_dir and name == TRASH_DIR:
                        continue
                    try:
                        if entry.is_symlink():
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            yield RemoteEntry(rel, _DIR, 0, 0, "dir")
                            stack.append(rel + "/")
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        raise self._err(e, rel) from None
                    if stat.S_ISREG(st.st_mode):
                        yield RemoteEntry(rel, _FILE, st.st_size, st.st_mtime_ns, _fp(st))

    def stat(self, path: str) -> RemoteEntry:
        full = self._abs(path)
        try:
            if not self._parent(path, create=False):
                raise NotFound("no such file", remote=self.name, path=path)
            st = os.lstat(full)
        except OSError as e:
            raise self._err(e, path) from None
        if stat.S_ISDIR(st.st_mode):
            return RemoteEntry(path, _DIR, 0, 0, "dir")
        if not stat.S_ISREG(st.st_mode):
            raise Conflict("not a regular file", remote=self.name, path=path)
        return RemoteEntry(path, _FILE, st.st_size, st.st_mtime_ns, _fp(st))

    def put(self, path: str, source: Source) -> RemoteEntry:
        full = self._abs(path)
        try:
            self._parent(path, create=True)
        except OSError as e:
            raise self._err(e, path) from None
        d, _, base = full.rpartition("/")
        tmp = f"{d}/{temp_name(base)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise self._err(e, path) from None
        published = False
        try:
            buf = bytearray(min(_BUF, max(source.size, 1)))
            mv = memoryview(buf)
            while n := source.readinto(buf):
                off = 0
                while off < n:
                    off += os.write(fd, mv[off:n])
            source.verify()
            os.fchmod(fd, source.mode & 0o777)
            os.utime(fd, ns=(source.mtime_ns, source.mtime_ns))
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, full)
            published = True
            st = os.lstat(full)
        except OSError as e:
            raise self._err(e, path) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if not published:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        if st.st_size != source.sent:
            raise TransientError(f"size after publish is {st.st_size}, sent {source.sent}",
                                 remote=self.name, path=path)
        return RemoteEntry(path, _FILE, st.st_size, st.st_mtime_ns, _fp(st))

    def get(self, path: str, dest: str) -> RemoteEntry:
        full = self._abs(path)
        try:
            if not self._parent(path, create=False):
                raise NotFound("no such file", remote=self.name, path=path)
            src = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise self._err(e, path) from None
        try:
            st = os.fstat(src)
            with open(dest, "wb") as out:
                while b := os.read(src, _BUF):
                    out.write(b)
                out.flush()
                os.fsync(out.fileno())
        except OSError as e:
            raise self._err(e, path) from None
        finally:
            os.close(src)
        return RemoteEntry(path, _FILE, st.st_size, st.st_mtime_ns, _fp(st))

    def mkdir(self, path: str) -> RemoteEntry:
        check_rel_path(self.name, path)
        try:
            self._dir_ok(path, create=True)
        except OSError as e:
            raise self._err(e, path) from None
        return RemoteEntry(path, _DIR, 0, 0, "dir")

    def delete(self, paths: Sequence[str]) -> None:
        for path in paths:
            full = self._abs(path)
            try:
                if not self._parent(path, create=False):
                    continue
                os.unlink(full)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._err(e, path) from None

    def rmdir(self, path: str) -> bool:
        full = self._abs(path)
        try:
            if not self._parent(path, create=False):
                return True
            st = os.lstat(full)
            if not stat.S_ISDIR(st.st_mode):
                raise Conflict("not a directory", remote=self.name, path=path)
            os.rmdir(full)
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise self._err(e, path) from None
        finally:
            self._forget_dirs(path)
        return True

    def move(self, src: str, dst: str) -> None:
        s, d = self._abs(src), self._abs(dst)
        try:
            if not self._parent(src, create=False):
                raise NotFound("no such file", remote=self.name, path=src)
            self._parent(dst, create=True)
            os.rename(s, d)
        except OSError as e:
            raise self._err(e, src) from None
        self._forget_dirs(src)

    def close(self) -> None:
        pass


__all__ = ["TMP_PREFIX", "LocalRemote"]
