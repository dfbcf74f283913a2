"""SFTP version 3 on an SSH channel, pipelined: requests go out in batches, replies are
matched by id, so many files are in flight at once on one channel.

paramiko does SSH (transport, ciphers, auth, host keys); this module speaks SFTP itself
because paramiko's SFTPClient waits for each reply in turn and builds a Message object per
field, which makes small files round-trip bound and CPU-heavy. Nothing here knows syncd.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any, NamedTuple

# Packet types (draft-ietf-secsh-filexfer-02)
INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH = 9, 10, 11, 12, 13, 14, 15, 16
STAT, RENAME = 17, 18
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
EXTENDED, EXTENDED_REPLY = 200, 201

# Open flags
O_READ, O_WRITE, O_APPEND, O_CREAT, O_TRUNC, O_EXCL = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

# Attribute flags
A_SIZE, A_UIDGID, A_PERMISSIONS, A_ACMODTIME, A_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000

# Status codes
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE = 0, 1, 2, 3, 4, 5
NO_CONNECTION, CONNECTION_LOST, OP_UNSUPPORTED = 6, 7, 8
STATUS_NAMES = {0: "ok", 1: "end of file", 2: "no such file", 3: "permission denied",
                4: "failure", 5: "bad message", 6: "no connection", 7: "connection lost",
                8: "operation unsupported"}

S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HDR = struct.Struct(">IBI")         # length, type, request id
_OFFLEN = struct.Struct(">QI")
_NO_ATTRS = b"\0\0\0\0"
MIN_WRITE = 32768                     # every server must take writes this big (the spec's floor)


class WireError(Exception):
    pass


class ConnectionLost(WireError):
    """The channel closed, timed out or sent garbage: the session is unusable."""


class StatusError(WireError):
    def __init__(self, code: int, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{STATUS_NAMES.get(code, f'status {code}')}"
                         + (f" ({message})" if message and message.lower() != STATUS_NAMES.get(code)
                            else ""))


class Attrs(NamedTuple):
    size: int | None
    perms: int | None
    mtime: int | None      # whole seconds: SFTP v3 has no finer time

    @property
    def kind(self) -> int:
        return (self.perms or 0) & S_IFMT


def s(b: bytes) -> bytes:
    return _U32.pack(len(b)) + b


def encode_attrs(*, perms: int | None = None, mtime: int | None = None) -> bytes:
    flags = 0
    parts = []
    if perms is not None:
        flags |= A_PERMISSIONS
        parts.append(_U32.pack(perms))
    if mtime is not None:
        flags |= A_ACMODTIME
        parts.append(struct.pack(">II", mtime & 0xFFFFFFFF, mtime & 0xFFFFFFFF))
    return _U32.pack(flags) + b"".join(parts)


def decode_attrs(buf: bytes, off: int) -> tuple[Attrs, int]:
    flags = _U32.unpack_from(buf, off)[0]
    off += 4
    size = perms = mtime = None
    if flags & A_SIZE:
        size = _U64.unpack_from(buf, off)[0]
        off += 8
    if flags & A_UIDGID:
        off += 8
    if flags & A_PERMISSIONS:
        perms = _U32.unpack_from(buf, off)[0]
        off += 4
    if flags & A_ACMODTIME:
        mtime = _U32.unpack_from(buf, off + 4)[0]
        off += 8
    if flags & A_EXTENDED:
        count = _U32.unpack_from(buf, off)[0]
        off += 4
        for _ in range(2 * count):
            off += 4 + _U32.unpack_from(buf, off)[0]
    return Attrs(size, perms, mtime), off


def _string(buf: bytes, off: int) -> tuple[bytes, int]:
    n = _U32.unpack_from(buf, off)[0]
    off += 4
    return buf[off:off + n], off + n


class Session:
    """One SFTP session on one SSH channel. Not thread-safe: one user at a time.

    `send_*` methods queue a request and return its id; `flush()` writes the queue to the
    channel; `wait(id)` returns (type, body) of that request's reply, reading (and keeping)
    other replies that arrive first. At most `max_inflight` requests are outstanding: a
    sender over the limit first reads replies, so neither side's window can fill with
    unread replies while we block on sending (the classic pipelining deadlock)."""

    def __init__(self, channel: Any, max_inflight: int = 256):
        self.ch = channel
        self.max_inflight = max_inflight
        self._next = 1
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._pending: set[int] = set()
        self._replies: dict[int, tuple[int, bytes]] = {}
        self._buf = bytearray()
        self.extensions: dict[str, bytes] = {}
        self.version = 0
        self.broken = False
        self.timed_out = False   # the server stopped answering: its connection is suspect
        self.max_write = MIN_WRITE
        self.max_read = MIN_WRITE
        self._chunk = max(1024, int(getattr(channel, "out_max_packet_size", 32768)) - 64)
        # Something with .send(data) that writes all of data faster than ch.sendall
        # (compat.paramiko.DataSender); None: the channel's own sendall.
        self.sender: Any = None

    # --- framing --------------------------------------------------------------------------

    def start(self) -> None:
        """INIT/VERSION handshake, then the server's limits where it announces them."""
        self._write(_HDR.pack(5, INIT, 3))
        while True:
            pkt = self._next_packet()
            if pkt is not None:
                break
            self._fill()
        if pkt[0] != VERSION:
            raise ConnectionLost(f"expected SFTP VERSION, got packet type {pkt[0]}")
        body = pkt[1]
        self.version = _U32.unpack_from(body, 0)[0]
        off = 4
        while off < len(body):
            name, off = _string(body, off)
            data, off = _string(body, off)
            self.extensions[name.decode("ascii", "replace")] = data
        if "limits@openssh.com" in self.extensions:
            t, b = self.wait(self.send(EXTENDED, s(b"limits@openssh.com")))
            if t == EXTENDED_REPLY and len(b) >= 32:
                _, max_read, max_write, _ = struct.unpack_from(">QQQQ", b, 0)
                # Leave room for the WRITE header inside the server's message limit.
                self.max_write = max(MIN_WRITE, min(int(max_write), 1 << 20))
                self.max_read = max(MIN_WRITE, min(int(max_read), 1 << 20))

    def send(self, ptype: int, payload: bytes, data: bytes | memoryview | None = None) -> int:
        """Queue one request; `data` (a WRITE's bytes) is appended after the payload."""
        if len(self._pending) >= self.max_inflight:
            self._drain_some()
        rid = self._next
        self._next = (rid + 1) & 0xFFFFFFFF or 1
        extra = len(data) if data is not None else 0
        self._out.append(_HDR.pack(len(payload) + extra + 5, ptype, rid))
        self._out.append(payload)
        if data is not None:
            self._out.append(bytes(data))
        self._out_bytes += len(payload) + extra + 9
        self._pending.add(rid)
        if self._out_bytes >= 1 << 20:
            self.flush()
        return rid

    @property
    def idle(self) -> bool:
        """No request outstanding and no reply unread: safe to hand to another user."""
        return not self._pending and not self._replies and not self._out

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.broken:
            raise ConnectionLost("session already failed")
        n = self._chunk
        try:
            if self.sender is not None:
                self.sender.send(data)
            elif len(data) <= n:
                self.ch.sendall(data)
            else:
                mv = memoryview(data)
                for i in range(0, len(data), n):
                    self.ch.sendall(bytes(mv[i:i + n]))
        except (OSError, EOFError) as e:   # socket.timeout is an OSError
            self.broken = True
            self.timed_out = isinstance(e, socket.timeout)
            raise ConnectionLost(_why(e, "sending")) from None
        except Exception as e:   # paramiko raises its own SSHException on a dead transport
            self.broken = True
            raise ConnectionLost(_why(e, "sending")) from None

    def _fill(self) -> None:
        try:
            data = self.ch.recv(1 << 20)
        except Exception as e:
            self.broken = True
            self.timed_out = isinstance(e, socket.timeout)
            raise ConnectionLost(_why(e, "waiting for a reply")) from None
        if not data:
            self.broken = True
            raise ConnectionLost("the server closed the SFTP channel")
        self._buf += data

    def _next_packet(self) -> tuple[int, bytes] | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        n = _U32.unpack_from(buf, 0)[0]
        if n > (64 << 20) or n < 1:
            self.broken = True
            raise ConnectionLost(f"malformed SFTP packet (length {n})")
        if len(buf) < 4 + n:
            return None
        ptype = buf[4]
        body = bytes(buf[5:4 + n])
        del buf[:4 + n]
        return ptype, body

    def _read_replies(self) -> None:
        """Read at least one chunk from the channel and file every complete reply."""
        self._fill()
        while (pkt := self._next_packet()) is not None:
            ptype, body = pkt
            if len(body) < 4:
                self.broken = True
                raise ConnectionLost("malformed SFTP reply")
            rid = _U32.unpack_from(body, 0)[0]
            if rid not in self._pending:
                self.broken = True
                raise ConnectionLost(f"reply to unknown request {rid}")
            self._pending.discard(rid)
            self._replies[rid] = (ptype, body[4:])

    def _drain_some(self) -> None:
        self.flush()
        limit = self.max_inflight // 2
        while len(self._pending) > limit:
            self._read_replies()

    def wait(self, rid: int) -> tuple[int, bytes]:
        r = self._replies.pop(rid, None)
        if r is not None:
            return r
        self.flush()
        while rid not in self._replies:
            if rid not in self._pending:
                raise WireError(f"no request {rid} outstanding")
            self._read_replies()
        return self._replies.pop(rid)

    def discard(self, rids: list[int]) -> None:
        """Wait for replies nobody needs any more (keeps the id bookkeeping exact)."""
        for rid in rids:
            if rid in self._pending or rid in self._replies:
                self.wait(rid)

    # --- typed replies --------------------------------------------------------------------

    def status(self, rid: int) -> None:
        t, b = self.wait(rid)
        _check_status(t, b)

    def handle(self, rid: int) -> bytes:
        t, b = self.wait(rid)
        if t == HANDLE:
            return _string(b, 0)[0]
        _check_status(t, b)
        raise ConnectionLost(f"expected HANDLE, got packet type {t}")

    def attrs(self, rid: int) -> Attrs:
        t, b = self.wait(rid)
        if t == ATTRS:
            return decode_attrs(b, 0)[0]
        _check_status(t, b)
        raise ConnectionLost(f"expected ATTRS, got packet type {t}")

    def names(self, rid: int) -> list[tuple[bytes, Attrs]] | None:
        """Entries of a NAME reply; None at end of directory."""
        t, b = self.wait(rid)
        if t == NAME:
            count = _U32.unpack_from(b, 0)[0]
            off = 4
            out = []
            for _ in range(count):
                name, off = _string(b, off)
                off += 4 + _U32.unpack_from(b, off)[0]     # longname: for humans only
                a, off = decode_attrs(b, off)
                out.append((name, a))
            return out
        if t == STATUS and _U32.unpack_from(b, 0)[0] == EOF:
            return None
        _check_status(t, b)
        raise ConnectionLost(f"expected NAME, got packet type {t}")

    def data(self, rid: int) -> bytes:
        """A READ's bytes; b'' at end of file."""
        t, b = self.wait(rid)
        if t == DATA:
            return _string(b, 0)[0]
        if t == STATUS and _U32.unpack_from(b, 0)[0] == EOF:
            return b""
        _check_status(t, b)
        raise ConnectionLost(f"expected DATA, got packet type {t}")

    # --- requests -------------------------------------------------------------------------

    def open(self, path: bytes, flags: int, attrs: bytes = _NO_ATTRS) -> int:
        return self.send(OPEN, s(path) + _U32.pack(flags) + attrs)

    def close(self, handle: bytes) -> int:
        return self.send(CLOSE, s(handle))

    def read(self, handle: bytes, offset: int, length: int) -> int:
        return self.send(READ, s(handle) + _OFFLEN.pack(offset, length))

    def write(self, handle: bytes, offset: int, data: bytes | memoryview) -> int:
        return self.send(WRITE, s(handle) + _U64.pack(offset) + _U32.pack(len(data)), data)

    def lstat(self, path: bytes) -> int:
        return self.send(LSTAT, s(path))

    def stat(self, path: bytes) -> int:
        return self.send(STAT, s(path))

    def fstat(self, handle: bytes) -> int:
        return self.send(FSTAT, s(handle))

    def setstat(self, path: bytes, attrs: bytes) -> int:
        return self.send(SETSTAT, s(path) + attrs)

    def fsetstat(self, handle: bytes, attrs: bytes) -> int:
        return self.send(FSETSTAT, s(handle) + attrs)

    def lsetstat(self, path: bytes, attrs: bytes) -> int:
        """SETSTAT that does not follow a symlink (lsetstat@openssh.com, OpenSSH 8.0+);
        only where the server announces it (`has_lsetstat`)."""
        return self.send(EXTENDED, s(b"lsetstat@openssh.com") + s(path) + attrs)

    @property
    def has_lsetstat(self) -> bool:
        return "lsetstat@openssh.com" in self.extensions

    def opendir(self, path: bytes) -> int:
        return self.send(OPENDIR, s(path))

    def readdir(self, handle: bytes) -> int:
        return self.send(READDIR, s(handle))

    def remove(self, path: bytes) -> int:
        return self.send(REMOVE, s(path))

    def mkdir(self, path: bytes, attrs: bytes = _NO_ATTRS) -> int:
        return self.send(MKDIR, s(path) + attrs)

    def rmdir(self, path: bytes) -> int:
        return self.send(RMDIR, s(path))

    def realpath(self, path: bytes) -> int:
        return self.send(REALPATH, s(path))

    def rename(self, old: bytes, new: bytes) -> int:
        """posix-rename@openssh.com (replaces the target atomically) where the server has
        it; otherwise plain RENAME, which fails when the target exists."""
        if "posix-rename@openssh.com" in self.extensions:
            return self.send(EXTENDED, s(b"posix-rename@openssh.com") + s(old) + s(new))
        return self.send(RENAME, s(old) + s(new))

    def rename_noreplace(self, old: bytes, new: bytes) -> int:
        """Plain RENAME: fails (FAILURE) when `new` exists, whatever the server offers."""
        return self.send(RENAME, s(old) + s(new))

    @property
    def atomic_rename(self) -> bool:
        return "posix-rename@openssh.com" in self.extensions

    def fsync(self, handle: bytes) -> int:
        return self.send(EXTENDED, s(b"fsync@openssh.com") + s(handle))

    def realpath_name(self, rid: int) -> bytes:
        names = self.names(rid)
        if not names:
            raise ConnectionLost("REALPATH returned no name")
        return names[0][0]

    def close_channel(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):   # a dead channel may raise anything on close
            self.ch.close()


def _check_status(t: int, b: bytes) -> None:
    if t != STATUS:   # the caller's session context marks the session broken
        raise ConnectionLost(f"expected STATUS, got packet type {t}")
    code = _U32.unpack_from(b, 0)[0]
    if code == OK:
        return
    msg = ""
    if len(b) >= 8:
        msg = _string(b, 4)[0].decode("utf-8", "replace")
    raise StatusError(code, msg)


def _why(e: BaseException, doing: str) -> str:
    if isinstance(e, socket.timeout):
        return f"timed out {doing}"
    text = str(e) or type(e).__name__
    return f"connection lost while {doing}: {text}"
