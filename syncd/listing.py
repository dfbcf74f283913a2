"""The remote side of a reconcile: list the pair's remote path and compare it with what the
bases say should be there, returning only the differences.

For a directory remote the walk runs in a forked child process, so it overlaps the local
walk on another core instead of queueing behind it on the GIL; a child that fails for any
reason other than a syncd error falls back to listing in-process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from syncd import errors
from syncd.model import Kind, RemoteEntry, utf8_ok

if TYPE_CHECKING:   # remotes import this module
    from syncd.remotes.base import Capabilities

FILE = int(Kind.FILE)
# Protocol rule: a directory's fingerprint is exactly DIR_FP and no file's ever is, so a
# fingerprint alone tells kind and version (expected maps path -> fingerprint).
DIR_FP = "dir"


@dataclass
class RemoteDiff:
    """The listing, relative to the bases: `changed` holds entries that are new or whose
    fingerprint differs from their base; `gone` holds base paths the listing lacks.
    Every other base path is on the remote exactly as recorded."""

    changed: dict[str, RemoteEntry] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)
    files: int = 0          # files on the remote (for max_delete percentages)
    entries: int = 0
    unnamed: list[str] = field(default_factory=list)   # left out: see drop_unnamed
    # The remote's capabilities as the lister's session found them (an SFTP server
    # without lsetstat sets no mtime alone): the plan follows them, not the class's.
    caps: Capabilities | None = None


def diff_listing(entries: Iterable[RemoteEntry], expected: dict[str, str],
                 keep: Callable[[RemoteEntry], bool] | None = None) -> RemoteDiff:
    d = RemoteDiff()
    changed = d.changed
    get = expected.get
    matched: set[str] = set()
    files = n = 0
    for e in entries:
        if keep is not None and not keep(e):
            continue
        n += 1
        if e.kind == FILE:
            files += 1
        b = get(e.path)
        if b is not None and b == e.fp:
            matched.add(e.path)
        else:
            changed[e.path] = e
            if b is not None:
                matched.add(e.path)
    if len(matched) < len(expected):
        d.gone = [p for p in expected if p not in matched]
    d.files, d.entries = files, n
    return d


def drop_ignored_dirs(d: RemoteDiff, expected: dict[str, str], names: frozenset[str]) -> RemoteDiff:
    """`d` as if the listing had skipped these directories (paths, at any depth) and
    everything under them (what diff_listing's `keep` does), without a call per listed
    entry: on an idle reconcile only the few changed entries and the bases are looked at."""
    if not names:
        return d
    # One inside another ("a" and "a/b"): the outer one hides it all.
    names = frozenset(n for n in names if not any(n.startswith(m + "/") for m in names))
    below = tuple(n + "/" for n in names)
    dropped = [p for p, e in d.changed.items()
               if p.startswith(below) or (p in names and e.kind != FILE)]
    for p in dropped:
        e = d.changed.pop(p)
        d.entries -= 1
        d.files -= e.kind == FILE
    # A base in there that was listed (matched, or changed and dropped above) would have
    # been hidden by keep(), so it is gone. At the top only a listed directory is hidden:
    # a base there matched as one if its fingerprint is a directory's.
    gone, was_changed = set(d.gone), set(dropped)
    for p in [p for p in expected if p.startswith(below) or p in names]:
        if p in gone or (p in names and p not in was_changed
                         and (p in d.changed or expected[p] != DIR_FP)):
            continue
        d.gone.append(p)
        if p not in was_changed:
            d.entries -= 1
            d.files -= expected[p] != DIR_FP
    return d


def drop_unnamed(d: RemoteDiff) -> RemoteDiff:
    """`d` without entries whose name is not valid UTF-8 (listed with surrogate escapes):
    no file syncd syncs can have that name (the scanner refuses them), the index cannot
    store it, so they are the remote's own and never touched. Their paths go to
    `d.unnamed`, for the caller to report. They are never bases, so only `changed` holds
    them."""
    for p in [p for p in d.changed if not utf8_ok(p)]:
        e = d.changed.pop(p)
        d.entries -= 1
        d.files -= e.kind == FILE
        d.unnamed.append(p)
    return d


class Listing:
    """A listing under way: `result()` returns the RemoteDiff or raises its error."""

    def __init__(self, run: Callable[[], RemoteDiff], fork: bool,
                 detach: Callable[[], Any] | None = None):
        self._run = run
        self._pid = 0
        self._fd = -1
        self._result: RemoteDiff | None = None
        if fork and hasattr(os, "fork"):
            if detach is None:
                self._start_child()
            else:
                with detach():   # e.g. close the SQLite connection across the fork
                    self._start_child()

    def _start_child(self) -> None:
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:   # EAGAIN/ENOMEM: list in-process instead
            os.close(r)
            os.close(w)
            return
        if pid == 0:  # child: list, send, leave without running any parent cleanup
            code = 0
            # The parent's objects leave the collector's view: a collection here would
            # write to each of their headers and so copy every page of the parent's heap.
            gc.freeze()
            try:
                os.close(r)
                try:
                    payload: Any = ("ok", self._run())
                except errors.RemoteError as e:
                    payload = ("remote_error", type(e).__name__, e.reason, e.remote, e.path)
                except Exception as e:
                    payload = ("crash", f"{type(e).__name__}: {e}")
                data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
                with os.fdopen(w, "wb") as f:
                    f.write(struct.pack("!Q", len(data)))
                    f.write(data)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        self._pid, self._fd = pid, r

    def result(self) -> RemoteDiff:
        if self._result is not None:
            return self._result
        if self._pid:
            payload = self._collect()
            if payload is not None and payload[0] == "ok":
                self._result = payload[1]
                return payload[1]
            if payload is not None and payload[0] == "remote_error":
                _, name, reason, remote, path = payload
                cls = getattr(errors, name, errors.RemoteError)
                raise cls(reason, remote=remote, path=path)
            # The child died or hit something unexpected: list here instead.
        self._result = self._run()
        return self._result

    def close(self) -> None:
        """Stop and reap a child whose result was never asked for (the parent failed)."""
        if self._pid:
            with contextlib.suppress(OSError):
                os.kill(self._pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
            self._pid = 0

    def _collect(self) -> Any:
        try:
            with os.fdopen(self._fd, "rb") as f:
                head = f.read(8)
                data = f.read(struct.unpack("!Q", head)[0]) if len(head) == 8 else b""
        finally:
            os.waitpid(self._pid, 0)
            self._pid = 0
        try:
            return pickle.loads(data) if data else None
        except Exception:
            return None
