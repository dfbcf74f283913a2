"""The `local` remote: a directory (a NAS mount, a second disk) written atomically.

Every write goes to a temp name in the target directory, is fsynced, then renamed over the
target. No path may leave the root: '..', absolute paths and symlinked parents are refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from syncd.errors import (
    Conflict,
    NotFound,
    PathEscape,
    PermanentError,
    RemoteChanged,
    RemoteError,
    TransientError,
    UnavailableError,
)
from syncd.listing import DIR_FP, RemoteDiff, diff_listing
from syncd.model import TMP_PREFIX, TRASH_DIR, Kind, RemoteEntry
from syncd.remotes.base import (
    Capabilities,
    Source,
    Staged,
    check_rel_path,
    join,
    names_for,
    temp_name,
)

_TRANSIENT = {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.ETIMEDOUT, errno.ESTALE,
              errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ENOENT, errno.ENOTCONN,
              errno.EHOSTDOWN, errno.ECONNRESET}
_BUF = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _load_syncfs() -> Any:
    """syncfs(2) from libc (Linux), or None where it is missing."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    return fn


_syncfs = _load_syncfs()
# Up to this many staged files are made durable by one fsync each, not by a syncfs.
FSYNC_EACH_MAX = 8
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# set_attrs: a path-only descriptor of the entry itself, never a symlink's target.
_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _fsync_ok(fd: int) -> bool:
    try:
        os.fsync(fd)
    except OSError as e:
        ctypes.set_errno(e.errno or 0)
        return False
    return True


def _read_umask() -> int:
    """This process's umask, without setting it (os.umask would, for every thread);
    all bits (= always chmod) where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777


_UMASK = _read_umask()


def _default_acl(dfd: int) -> bool:
    """Whether a directory has a default ACL: new files then take their mode from it, not
    from the umask, so a file's mode must always be set explicitly there."""
    try:
        os.getxattr(dfd, "system.posix_acl_default")
    except OSError as e:
        return e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
    return True


_FILE, _DIR = int(Kind.FILE), int(Kind.DIR)


def _fp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"   # diff() inlines this on its hot path



class _EntryError(Exception):
    """An entry of a listed directory could not be read (which one, and why)."""

    def __init__(self, rel: str, error: OSError):
        super().__init__(rel)
        self.rel = rel
        self.error = error

class LocalRemote:
    caps = Capabilities(dirs=True, move=True, mtime_precision_ns=1, atomic_put=True,
                        cpu_bound=True, backslash=True, modes=True,
                        mtimes=True)

    def __init__(self, name: str, root: os.PathLike[str] | str, fsync: bool = True):
        self.name = name
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self.tmp_owner = ""   # set by open_remote: the state dir's tag (see temp_name)

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

    # --- paths ---------------------------------------------------------------------------
    #
    # Every operation walks from the root with openat(O_NOFOLLOW|O_DIRECTORY), one component
    # at a time, and then acts relative to the parent's fd: a symlink anywhere on the way is
    # refused, and swapping a directory for a symlink mid-operation cannot redirect a write.

    def _open_dir(self, rel_dir: str, create: bool) -> int:
        """An fd on root/rel_dir; FileNotFoundError if missing and not `create`."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for comp in rel_dir.split("/") if rel_dir else ():
                try:
                    nfd = os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except NotADirectoryError:
                    st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise PathEscape("a parent directory is a symlink; refusing to follow it",
                                         remote=self.name, path=rel_dir) from None
                    raise Conflict("a parent path exists and is not a directory",
                                   remote=self.name, path=rel_dir) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent_fd(self, path: str, create: bool) -> tuple[int, str]:
        """(fd of the parent directory, final name) of a checked relative path."""
        check_rel_path(self.name, path, backslash=self.caps.backslash)
        parent, _, name = path.rpartition("/")
        try:
            return self._open_dir(parent, create), name
        except (PathEscape, Conflict):
            raise
        except FileNotFoundError:
            raise NotFound("no such file or directory", remote=self.name, path=path) from None
        except OSError as e:
            raise self._err(e, path) from None

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

    def _walk(self, prefix: str) -> Iterator[tuple[str, os.stat_result | None]]:
        """(relative path, stat) of every regular file and (path, None) of every directory
        under root/prefix; symlinks and the pair's trash are skipped. A missing prefix is
        an empty tree."""
        if prefix:
            check_rel_path(self.name, prefix, backslash=self.caps.backslash)
            try:
                os.close(self._open_dir(prefix, create=False))
            except FileNotFoundError:
                return
            except OSError as e:
                raise self._err(e, prefix) from None
        top = os.path.join(self.root, prefix) if prefix else self.root
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                found = self._read_dir(os.path.join(top, rel_dir) if rel_dir else top, rel_dir)
            except _EntryError as e:
                raise self._err(e.error, e.rel) from None
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise self._err(e, rel_dir or prefix) from None
                # Deeper than PATH_MAX as one string: opened component by component.
                try:
                    fd = self._open_dir(join(prefix, rel_dir.rstrip("/")), create=False)
                except FileNotFoundError:
                    continue
                except OSError as e2:
                    raise self._err(e2, rel_dir or prefix) from None
                try:
                    found = self._read_dir(fd, rel_dir)
                except _EntryError as e2:
                    raise self._err(e2.error, e2.rel) from None
                except OSError as e2:
                    raise self._err(e2, rel_dir or prefix) from None
                finally:
                    os.close(fd)
            if found is None:
                continue
            for rel, st in found:
                if st is None:
                    stack.append(rel + "/")
                yield rel, st

    @staticmethod
    def _read_dir(where: str | int, rel_dir: str) -> list[tuple[str, os.stat_result | None]] | None:
        """(path, stat) of the regular files and (path, None) of the directories in one
        directory (`where`: its path, or an fd on it); None if it is gone. Symlinks, other
        kinds and the pair's trash are left out."""
        out: list[tuple[str, os.stat_result | None]] = []
        try:
            it = os.scandir(where)
        except FileNotFoundError:
            return None
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
                        out.append((rel, None))
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENAMETOOLONG:
                        raise   # the directory is read again through an fd
                    raise _EntryError(rel, e) from None
                if (st.st_mode & 0o170000) == 0o100000:
                    out.append((rel, st))
        return out

    def list(self, prefix: str) -> Iterator[RemoteEntry]:
        for rel, st in self._walk(prefix):
            if st is None:
                yield RemoteEntry(rel, _DIR, 0, 0, DIR_FP)
            else:
                yield RemoteEntry(rel, _FILE, st.st_size, st.st_mtime_ns, _fp(st))

    def diff(self, prefix: str, expected: dict[str, str],
             keep: Callable[[RemoteEntry], bool] | None = None) -> RemoteDiff:
        """What list() + listing.diff_listing() return, without building a RemoteEntry for
        an entry matching its base: on an idle reconcile that is every entry, and this
        loop is the remote half of the no-op's critical path."""
        if keep is not None:   # ignore rules need entries; take the general path
            return diff_listing(self.list(prefix), expected, keep)
        d = RemoteDiff()
        changed, get = d.changed, expected.get
        matched: set[str] = set()
        files = n = 0
        for rel, st in self._walk(prefix):
            n += 1
            b = get(rel)
            if b is not None:
                matched.add(rel)
            if st is None:
                if b != DIR_FP:
                    changed[rel] = RemoteEntry(rel, _DIR, 0, 0, DIR_FP)
                continue
            files += 1
            fp = f"{st.st_size}:{st.st_mtime_ns}"
            if b != fp:
                changed[rel] = RemoteEntry(rel, _FILE, st.st_size, st.st_mtime_ns, fp)
        if len(matched) < len(expected):
            d.gone = [p for p in expected if p not in matched]
        d.files, d.entries = files, n
        return d

    def stat(self, path: str) -> RemoteEntry:
        dfd, name = self._parent_fd(path, create=False)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            raise self._err(e, path) from None
        finally:
            os.close(dfd)
        if stat.S_ISDIR(st.st_mode):
            return RemoteEntry(path, _DIR, 0, 0, DIR_FP)
        if not stat.S_ISREG(st.st_mode):
            raise Conflict("not a regular file", remote=self.name, path=path)
        return RemoteEntry(path, _FILE, st.st_size, st.st_mtime_ns, _fp(st))

    def set_attrs(self, path: str, *, mode: int | None = None, mtime_ns: int | None = None,
                  expect_fp: str | None = None) -> RemoteEntry:
        return self._set_attrs(path, mode, mtime_ns, expect_fp, sync=self.fsync)[0]

    def set_attrs_many(self, items: Sequence[tuple[str, int | None, int | None, str | None]]
                       ) -> list[RemoteEntry | Exception]:
        """set_attrs for each (path, mode, mtime_ns, expect_fp); with fsync, a few are
        synced one by one, more by one syncfs per filesystem after all of them (as
        flush() does for uploads: a `chmod -R` must not cost an fsync per file). Per
        item its entry or error."""
        each = not self.fsync or len(items) <= FSYNC_EACH_MAX or _syncfs is None
        out: list[RemoteEntry | Exception] = []
        devs: dict[int, list[int]] = {}   # st_dev -> positions in out
        for path, mode, mtime_ns, expect_fp in items:
            try:
                e, dev = self._set_attrs(path, mode, mtime_ns, expect_fp,
                                         sync=self.fsync and each)
            except RemoteError as err:
                out.append(err)
                continue
            devs.setdefault(dev, []).append(len(out))
            out.append(e)
        if not each:
            paths = {dev: [out[i].path for i in pos]   # type: ignore[union-attr]
                     for dev, pos in devs.items()}
            failed, gone = self._sync_devs(paths, "attribute change(s)")
            for dev in gone:   # every folder of these files went meanwhile: so did they
                failed[dev] = TransientError("its folder vanished meanwhile",
                                             remote=self.name, path=paths[dev][0])
            for dev, e in failed.items():
                for i in devs[dev]:
                    out[i] = e
        return out

    def _set_attrs(self, path: str, mode: int | None, mtime_ns: int | None,
                   expect_fp: str | None, sync: bool) -> tuple[RemoteEntry, int]:
        """set_attrs; also returns the file's st_dev (what a syncfs must cover)."""
        dfd, name = self._parent_fd(path, create=False)
        try:
            # A path-only descriptor, opened without following a symlink: nothing can swap
            # the entry between the look and the change, and no device is ever opened.
            fd = os.open(name, _PATH_NOFOLLOW, dir_fd=dfd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise Conflict("a symlink is in the way" if stat.S_ISLNK(st.st_mode)
                                   else "not a regular file", remote=self.name, path=path)
                if expect_fp is not None and _fp(st) != expect_fp:
                    raise RemoteChanged("the file changed since the plan", remote=self.name,
                                        path=path)
                # fchmod and futimens refuse a path-only descriptor; its /proc link is the
                # file itself, never a symlink's target.
                proc = f"/proc/self/fd/{fd}"
                if mode is not None:
                    os.chmod(proc, mode & 0o777)
                if mtime_ns is not None:
                    os.utime(proc, ns=(mtime_ns, mtime_ns))   # as put() stamps it
                    st = os.fstat(fd)
                if sync:
                    self._sync_inode(proc, dfd, path)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._err(e, path) from None
        finally:
            os.close(dfd)
        return RemoteEntry(path, _FILE, st.st_size, st.st_mtime_ns, _fp(st)), st.st_dev

    def _sync_inode(self, proc: str, dfd: int, path: str) -> None:
        """Make a metadata change of the file at `proc` durable: an fsync of it, or where
        we may not open it for reading, a sync of its file system."""
        try:
            rfd = os.open(proc, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            if _syncfs is not None and _syncfs(dfd) != 0:
                raise self._disk_error("syncfs", ctypes.get_errno(), path) from None
            return
        try:
            if not _fsync_ok(rfd):
                raise self._disk_error("fsync", ctypes.get_errno(), path)
        finally:
            os.close(rfd)

    def put(self, path: str, source: Source) -> RemoteEntry:
        dfd, name = self._parent_fd(path, create=True)
        try:
            tmp = self._write_temp(dfd, name, path, source, fsync=self.fsync)
            return self._publish(dfd, tmp, name, path, source.sent)
        finally:
            os.close(dfd)

    @property
    def stages(self) -> bool:
        """Whether uploads go through stage_many/flush/publish_many (fsync on, syncfs there):
        the runner then writes new files while earlier ones are being made durable."""
        return self.fsync and _syncfs is not None

    def put_many(self, items: Sequence[tuple[str, Source]]) -> list[RemoteEntry | Exception]:
        """Publish several files with one flush for all of them: stage_many, flush,
        publish_many. Same guarantees as put() one by one: readers never see a partial
        file, and no file is renamed before its bytes are durable. Returns, per item, its
        RemoteEntry or the error it raised."""
        if not self.stages or len(items) < 2:
            out: list[RemoteEntry | Exception] = []
            for path, src in items:
                try:
                    out.append(self.put(path, src))
                except Exception as e:
                    out.append(e)
            return out
        staged = self.stage_many(items)
        ok = [s for s in staged if isinstance(s, Staged)]
        try:
            self.flush(ok)
        except Exception as e:
            self.discard(ok)
            return [e if isinstance(s, Staged) else s for s in staged]
        published = iter(self.publish_many(ok))
        return [next(published) if isinstance(s, Staged) else s for s in staged]

    def stage_many(self, items: Sequence[tuple[str, Source]]) -> list[Staged | Exception]:
        """Write and verify each source into a temp file beside its target, without making
        it durable and without publishing it: flush() then publish_many() (or discard())
        finish the job. Per item, its Staged record or the error it raised."""
        out: list[Staged | Exception] = []
        dirs: dict[str, tuple[int, int, bool]] = {}   # parent -> (fd, st_dev, default ACL)
        try:
            for path, src in items:
                try:
                    check_rel_path(self.name, path, backslash=self.caps.backslash)
                    parent, _, name = path.rpartition("/")
                    d = dirs.get(parent)
                    if d is None:
                        dfd = self._parent_fd(path, create=True)[0]
                        d = dirs[parent] = (dfd, os.fstat(dfd).st_dev, _default_acl(dfd))
                    tmp = self._write_temp(d[0], name, path, src, fsync=False, chmod=d[2])
                    out.append(Staged(path, tmp, src.sent, d[1]))
                except Exception as e:
                    out.append(e)
        finally:
            for dfd, _, _ in dirs.values():
                os.close(dfd)
        return out

    def flush(self, staged: Sequence[Staged]) -> None:
        """Make the staged files durable: a few are fsynced one by one; more take one
        syncfs per filesystem they are on (a subdirectory may be another mount).
        TransientError if the system says it failed.

        syncfs writes out everything dirty on the filesystem, other programs' data too:
        for the daemon's usual handful of files on a busy disk, one fsync each is cheaper.
        A staged file whose directory or temp is gone is left to publish_many, which
        reports it (its rename fails): nothing else in the batch fails with it."""
        if len(staged) <= FSYNC_EACH_MAX and self._fsync_each(staged):
            return
        devs: dict[int, list[str]] = {}
        for s in staged:
            devs.setdefault(s.dev, []).append(s.path)
        # A file system none of whose folders is left: none of its files can be published.
        failed, _ = self._sync_devs(devs, "written file(s)")
        if failed:
            raise next(iter(failed.values()))

    def _sync_devs(self, devs: dict[int, list[str]], what: str
                   ) -> tuple[dict[int, RemoteError], list[int]]:
        """One syncfs per file system (st_dev -> the relative paths on it that must be
        durable). Returns the file systems whose sync failed, with why, and those of
        which no folder of these paths can be opened any more."""
        failed: dict[int, RemoteError] = {}
        gone: list[int] = []
        for dev, paths in devs.items():
            try:
                dfd = self._dev_fd(dev, paths)
            except OSError as e:   # the root itself cannot be opened (unmounted?)
                failed[dev] = TransientError(f"the root {self.root} cannot be opened: "
                                             f"{e.strerror}; is the disk mounted?",
                                             remote=self.name)
                continue
            if dfd < 0:
                gone.append(dev)
                continue
            try:
                if _syncfs(dfd) != 0:
                    failed[dev] = self._disk_error(
                        "syncfs", ctypes.get_errno(), paths[0] if len(paths) == 1 else "",
                        f" (making {len(paths)} {what} durable)")
            finally:
                os.close(dfd)
        return failed, gone

    def _disk_error(self, call: str, err: int, path: str, what: str = "") -> TransientError:
        return TransientError(f"{call} failed: {os.strerror(err)}{what}; check the disk "
                              f"under {self.root} (dmesg)", remote=self.name, path=path)

    def settle(self, prefix: str, folders: set[str] | None = None) -> None:
        """The end of a run that changed this remote: with `fsync`, its renames, new
        folders and deletes are made durable too, not only the files' bytes (those were
        synced before each rename); ext4 would otherwise commit them within 5 s, other file
        systems later. A few `folders` (relative to `prefix`) are fsynced one by one; more,
        or None, take one syncfs of the pair's file system, which also writes out other
        programs' data there (the daemon's handful of changes must not wait for that).
        A no-op with fsync = false."""
        if not self.fsync:
            return
        if folders is not None and len(folders) <= FSYNC_EACH_MAX:
            for d in sorted(folders):
                rel = "/".join(x for x in (prefix, d) if x)
                while True:   # the folder itself, or the nearest one left (it was removed)
                    try:
                        fd = self._open_dir(rel, create=False)
                        break
                    except (RemoteError, OSError):
                        if not rel:
                            return
                        rel = rel.rpartition("/")[0]
                try:
                    if not _fsync_ok(fd):
                        raise self._disk_error("fsync", ctypes.get_errno(), rel)
                finally:
                    os.close(fd)
            return
        try:
            fd = self._open_dir(prefix, create=False)
        except (RemoteError, OSError):
            return   # nothing of the pair there (it was all deleted): nothing to make durable
        try:
            ok = _syncfs(fd) == 0 if _syncfs is not None else _fsync_ok(fd)
            if not ok:
                raise self._disk_error("syncfs", ctypes.get_errno(), prefix)
        finally:
            os.close(fd)

    def _fsync_each(self, staged: Sequence[Staged]) -> bool:
        """fsync each staged file; False if one cannot be opened for it (its owner may not
        read it: the caller then syncs the whole filesystem instead)."""
        for s in staged:
            try:
                dfd = self._parent_fd(s.path, create=False)[0]
            except NotFound:
                continue   # gone: its publish fails and says so
            except RemoteError:
                return False   # a symlink or a file in the way: syncfs still covers the rest
            try:
                fd = os.open(s.tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError:
                return False
            finally:
                os.close(dfd)
            try:
                os.fsync(fd)
            except OSError as e:
                raise self._disk_error("fsync", e.errno or 0, s.path) from None
            finally:
                os.close(fd)
        return True

    def _dev_fd(self, dev: int, paths: list[str]) -> int:
        """A directory fd on filesystem `dev`: the root, or the first openable parent of
        `paths`; -1 if none can be opened."""
        fd = os.open(self.root, _DIR_FLAGS)
        if os.fstat(fd).st_dev == dev:
            return fd
        os.close(fd)
        for path in paths:
            try:
                return self._parent_fd(path, create=False)[0]
            except RemoteError:
                continue
        return -1

    def publish_many(self, staged: Sequence[Staged]) -> list[RemoteEntry | Exception]:
        """Rename flushed temp files over their targets; per item its RemoteEntry or error."""
        out: list[RemoteEntry | Exception] = []
        dirs: dict[str, int] = {}
        try:
            for s in staged:
                try:
                    parent, _, name = s.path.rpartition("/")
                    dfd = dirs.get(parent, -1)
                    if dfd < 0:
                        dfd = dirs[parent] = self._parent_fd(s.path, create=False)[0]
                    out.append(self._publish(dfd, s.tmp, name, s.path, s.sent))
                except Exception as e:
                    out.append(e)
        finally:
            for dfd in dirs.values():
                os.close(dfd)
        return out

    def discard(self, staged: Sequence[Staged]) -> None:
        """Remove staged temp files that will not be published (best effort: a temp left
        behind is removed by the next reconcile, which plans cleanup of its own temps)."""
        for s in staged:
            with contextlib.suppress(Exception):
                dfd = self._parent_fd(s.path, create=False)[0]
                try:
                    os.unlink(s.tmp, dir_fd=dfd)
                finally:
                    os.close(dfd)

    def _write_temp(self, dfd: int, name: str, path: str, source: Source, fsync: bool,
                    chmod: bool = True) -> str:
        """Stream the source into this target's temp file and verify it; returns the temp
        name. Nothing is left behind on failure. `chmod` False: the mode given at creation
        is trusted where the umask kept its bits (the caller checked that the directory
        has no default ACL, which would replace the umask)."""
        tmp = temp_name(name, self.tmp_owner)
        mode = source.mode & 0o777
        try:   # O_EXCL: a name clash (never seen) fails instead of sharing a file
            fd = os.open(tmp, _TMP_FLAGS, mode, dir_fd=dfd)
        except FileExistsError:   # someone else's temp: not ours to remove
            raise TransientError(f"temp name in use by another writer ({tmp}); retried "
                                 "with another name", remote=self.name, path=path) from None
        except OSError as e:
            raise self._err(e, path) from None
        try:
            # One read takes a small file whole: a short read marks its end.
            buf = bytearray(min(_BUF, source.size + 1))
            mv = memoryview(buf)
            while n := source.readinto(buf):
                off = 0
                while off < n:
                    off += os.write(fd, mv[off:n])
            source.verify()
            if chmod or mode & _UMASK:   # bits the umask (or a default ACL) took away
                os.fchmod(fd, mode)
            os.utime(fd, ns=(source.mtime_ns, source.mtime_ns))
            if fsync:
                os.fsync(fd)
            # Linux frees the descriptor even when close() fails (NFS, CIFS report write
            # errors there): never close that number twice, it may be another thread's now.
            closing, fd = fd, -1
            os.close(closing)
            return tmp
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            if isinstance(e, OSError):
                raise self._err(e, path) from None
            raise

    def _publish(self, dfd: int, tmp: str, name: str, path: str, sent: int) -> RemoteEntry:
        try:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise self._err(e, path) from None
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            raise self._err(e, path) from None
        if st.st_size != sent:
            raise TransientError(f"size after publish is {st.st_size}, sent {sent}",
                                 remote=self.name, path=path)
        return RemoteEntry(path, _FILE, st.st_size, st.st_mtime_ns, _fp(st))

    def get(self, path: str, dest: str) -> RemoteEntry:
        dfd, name = self._parent_fd(path, create=False)
        try:
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            raise self._err(e, path) from None
        finally:
            os.close(dfd)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise Conflict("not a regular file", remote=self.name, path=path)
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
        check_rel_path(self.name, path, backslash=self.caps.backslash)
        try:
            os.close(self._open_dir(path, create=True))
        except OSError as e:
            raise self._err(e, path) from None
        return RemoteEntry(path, _DIR, 0, 0, DIR_FP)

    def delete(self, paths: Sequence[str]) -> None:
        for path in paths:
            try:
                dfd, name = self._parent_fd(path, create=False)
            except NotFound:
                continue
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._err(e, path) from None
            finally:
                os.close(dfd)

    def rmdir(self, path: str) -> bool:
        try:
            dfd, name = self._parent_fd(path, create=False)
        except NotFound:
            return True
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                raise Conflict("not a directory", remote=self.name, path=path)
            os.rmdir(name, dir_fd=dfd)
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise self._err(e, path) from None
        finally:
            os.close(dfd)
        return True

    def move(self, src: str, dst: str) -> str:
        """A file is hard-linked to its new name, then unlinked: link() fails on an
        existing target, where rename() would replace it. A directory, or a file system
        without hard links, is renamed after a look that the target is free (a window a
        concurrent writer of the same trash name could hit; nothing of syncd's does)."""
        sfd, sname = self._parent_fd(src, create=False)
        try:
            for target in names_for(self.name, dst):
                dfd, dname = self._parent_fd(target, create=True)
                try:
                    if self._move_no_replace(sfd, sname, dfd, dname):
                        return target
                except FileNotFoundError:
                    raise NotFound("no such file or directory", remote=self.name,
                                   path=src) from None
                except OSError as e:
                    raise self._err(e, f"{src} -> {target}") from None
                finally:
                    os.close(dfd)
        finally:
            os.close(sfd)
        raise AssertionError("unreachable: names_for raises when it runs out")

    @staticmethod
    def _move_no_replace(sfd: int, sname: str, dfd: int, dname: str) -> bool:
        """Move sname to dname unless dname exists (then False)."""
        st = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            try:
                os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                                   errno.EXDEV):
                    raise
            else:
                os.unlink(sname, dir_fd=sfd)
                return True
        try:
            os.stat(dname, dir_fd=dfd, follow_symlinks=False)
            return False
        except FileNotFoundError:
            pass
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return True

    def close(self) -> None:
        pass


__all__ = ["TMP_PREFIX", "LocalRemote"]
