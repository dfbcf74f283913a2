"""A TCP fault proxy for tests: loopback listeners in front of real servers (sshd, moto,
pyftpdlib) whose behaviour the test switches at run time.

Modes (`set_mode`), applied to new and established connections alike:

- ``pass``: forward both ways.
- ``refuse``: the listeners are closed (a connect gets ECONNREFUSED) and established
  connections are reset: a server that went down.
- ``cut``: every connection is closed (FIN, both sides) once it has forwarded `cut_after`
  more bytes, counting both directions: a link that drops mid-transfer.
- ``stall``: connections are accepted and kept open, nothing is forwarded either way and
  new ones are not connected upstream: a black hole that never answers (no banner, no
  reply). Leaving the mode lets the held bytes through.
- ``trickle``: at most `rate` bytes per second per direction per connection.
- ``reset``: established connections are reset (RST); new ones are accepted, then reset.

One thread runs a selector loop over every socket (no thread per connection), so `stop()`
ends everything: it sets a flag the loop checks at least every 20 ms, joins the thread and
closes every socket. Listens on 127.0.0.1 only and forwards to loopback addresses only.

FTP: a passive data connection goes to the port the server announces, at the control
connection's peer address (ftplib ignores the announced address). The FTP server therefore
listens on 127.0.0.2, and the proxy listens on 127.0.0.1 at the control port and at the same
port numbers as the server's passive range (`ports=`): data connections cross the proxy
without reading the control channel, which FTPS encrypts (no PASV reply to rewrite).
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

MODES = ("pass", "refuse", "cut", "stall", "trickle", "reset")
_TICK = 0.02          # the longest the loop waits before it looks at the stop flag again
_CHUNK = 65536
# Per direction, bytes the proxy holds before it stops reading that side, and the kernel
# buffers of its sockets: small, so a trickle pushes back on the sender as a slow link does
# (with megabytes parked in buffers a sender would finish "sending" long before the server
# saw the bytes, and then time out waiting for the reply).
_MAX_BUFFER = 64 * 1024
_SOCK_BUFFER = 64 * 1024


def _loopback(host: str) -> None:
    if not host.startswith("127."):
        raise ValueError(f"the fault proxy forwards to loopback only, not {host!r}")


def _rst(sock: socket.socket | None) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class Stats:
    """What the proxy did, for tests to check that a fault really happened."""

    accepted: int = 0
    cut: int = 0
    reset: int = 0
    bytes_up: int = 0       # client -> server
    bytes_down: int = 0     # server -> client
    held_while_stalled: int = 0   # connections accepted or open during a stall
    by_mode: dict[str, int] = field(default_factory=dict)   # connections accepted per mode


class _Side:
    """One direction of a connection: bytes read from `src`, waiting to go to the peer."""

    __slots__ = ("buf", "eof", "shut", "tokens")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False      # the source side sent FIN
        self.shut = False     # we passed the FIN on (shutdown SHUT_WR on the peer)
        self.tokens = 0.0     # trickle budget


class _Conn:
    __slots__ = ("client", "cut_left", "down", "target", "up", "upstream")

    def __init__(self, client: socket.socket, target: tuple[str, int]):
        self.client = client
        self.target = target
        self.upstream: socket.socket | None = None
        self.up = _Side()     # client -> upstream
        self.down = _Side()   # upstream -> client
        self.cut_left: int | None = None


class TcpFaultProxy:
    """Listeners on 127.0.0.1 forwarding to loopback targets, with switchable faults.

    `TcpFaultProxy(("127.0.0.1", 2222))` listens on a free port (`.port`) and forwards it
    to the target; with `same_ports=[...]` it also listens on 127.0.0.1 at each of those
    ports and forwards each to the same port of the target's host (FTP passive ports)."""

    def __init__(self, target: tuple[str, int], same_ports: list[int] | None = None):
        host, port = target
        _loopback(host)
        self._routes: list[tuple[int, tuple[str, int]]] = []
        self._listeners: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._mode = "pass"
        self.cut_after = 0
        self.rate = 0
        self.stats = Stats()
        self._conns: list[_Conn] = []
        self._stop = threading.Event()
        self._applied = threading.Event()
        self._sel = selectors.DefaultSelector()
        sock = self._listen(0)
        self.port = sock.getsockname()[1]
        self._listeners[self.port] = sock
        self._routes.append((self.port, (host, port)))
        try:
            for p in same_ports or ():
                self._listeners[p] = self._listen(p)
                self._routes.append((p, (host, p)))
        except OSError:
            for s in self._listeners.values():
                s.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="faultproxy", daemon=True)
        self._thread.start()

    # -- control (any thread) ------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str, *, cut_after: int = 0, rate: int = 0) -> None:
        """Switch every connection, established and new, to `mode` (see the module doc)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        with self._lock:
            self._mode = mode
            self.cut_after = cut_after
            self.rate = rate
            self._pending = True
            self._applied.clear()
        # Return once the loop runs in the new mode: a connect right after this call meets it.
        if not self._applied.wait(5):
            raise RuntimeError("fault proxy loop did not apply the mode within 5 s")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._thread.is_alive():   # pragma: no cover - the loop checks the flag every tick
            raise RuntimeError("fault proxy thread did not stop")
        for c in self._conns:
            self._close(c, rst=True, count=False)
        self._conns.clear()
        for s in self._listeners.values():
            with contextlib.suppress(OSError):
                s.close()
        self._listeners.clear()
        self._sel.close()

    def __enter__(self) -> TcpFaultProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def connections(self) -> int:
        return len(self._conns)

    # -- the loop (its own thread) -------------------------------------------------------

    _pending = True

    @staticmethod
    def _listen(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUFFER)   # accepted ones inherit
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUFFER)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        s.setblocking(False)
        return s

    def _apply_mode(self, mode: str) -> None:
        """Run once in the loop after a mode change: open or close listeners, reset or arm
        the established connections."""
        if mode == "refuse":
            for p, s in list(self._listeners.items()):
                s.close()
                del self._listeners[p]
        else:
            for p, _ in self._routes:
                if p not in self._listeners:
                    for _ in range(50):   # a port can linger briefly after close: bounded retry
                        try:
                            self._listeners[p] = self._listen(p)
                            break
                        except OSError as e:
                            if e.errno != errno.EADDRINUSE:
                                raise
                            time.sleep(_TICK)
        if mode in ("refuse", "reset"):
            for c in list(self._conns):
                self._close(c, rst=True)
        for c in list(self._conns):
            c.cut_left = self.cut_after if mode == "cut" else None
            if c.cut_left == 0:
                self.stats.cut += 1
                self._close(c, rst=False, count=False)
                continue
            if mode == "stall":
                self.stats.held_while_stalled += 1

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                pending, self._pending = self._pending, False
                mode, rate = self._mode, self.rate
            if pending:
                self._apply_mode(mode)
                self._applied.set()
            now = time.monotonic()
            if mode == "trickle":
                for c in self._conns:
                    for side in (c.up, c.down):
                        # At most one second of budget: a pause never turns into a burst.
                        side.tokens = min(float(rate), side.tokens + rate * (now - last))
            last = now
            self._register(mode)
            try:
                events = self._sel.select(_TICK)
            except OSError:
                events = []
            for key, mask in events:
                if key.data is None:
                    self._accept(key.fileobj, mode)   # type: ignore[arg-type]
                else:
                    conn, which = key.data
                    if conn in self._conns:
                        self._io(conn, which, mask, mode)
            for c in list(self._conns):
                self._finish(c)

    def _register(self, mode: str) -> None:
        """Re-register every socket with the events it should wait for now (cheap at the
        handful of sockets a test opens, and never stale after a mode change)."""
        for key in list(self._sel.get_map().values()):
            self._sel.unregister(key.fileobj)
        for s in self._listeners.values():
            self._sel.register(s, selectors.EVENT_READ, None)
        if mode == "stall":
            return   # nothing is read, written or connected: silence both ways
        for c in self._conns:
            if c.upstream is None:
                self._connect(c)
                if c.upstream is None:
                    continue
            # rx: where bytes read from this socket wait; tx: bytes waiting to be written to it
            for sock, which, rx, tx in ((c.client, "c", c.up, c.down),
                                        (c.upstream, "u", c.down, c.up)):
                ev = 0
                if not rx.eof and len(rx.buf) < _MAX_BUFFER:
                    ev |= selectors.EVENT_READ
                if tx.buf and (mode != "trickle" or tx.tokens >= 1):
                    ev |= selectors.EVENT_WRITE
                if ev:
                    self._sel.register(sock, ev, (c, which))

    def _accept(self, listener: socket.socket, mode: str) -> None:
        try:
            client, _ = listener.accept()
        except (BlockingIOError, OSError):
            return
        port = listener.getsockname()[1]
        target = next(t for p, t in self._routes if p == port)
        self.stats.accepted += 1
        self.stats.by_mode[mode] = self.stats.by_mode.get(mode, 0) + 1
        if mode == "reset":
            self.stats.reset += 1
            _rst(client)
            return
        client.setblocking(False)
        c = _Conn(client, target)
        if mode == "cut":
            c.cut_left = self.cut_after
        if mode == "stall":
            self.stats.held_while_stalled += 1
        self._conns.append(c)

    def _connect(self, c: _Conn) -> None:
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUFFER)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUFFER)
            # Loopback: a connect succeeds or is refused at once; the timeout is a backstop.
            up.settimeout(2)
            up.connect(c.target)
        except OSError:
            up.close()
            self._close(c, rst=True, count=False)
            return
        up.setblocking(False)
        c.upstream = up

    def _io(self, c: _Conn, which: str, mask: int, mode: str) -> None:
        src = c.client if which == "c" else c.upstream
        dst = c.upstream if which == "c" else c.client
        rx = c.up if which == "c" else c.down    # read from src, goes to the peer
        tx = c.down if which == "c" else c.up    # pending bytes to write into src
        assert src is not None and dst is not None
        if mask & selectors.EVENT_READ:
            try:
                data = src.recv(_CHUNK)
            except BlockingIOError:
                data = None
            except OSError:
                self._close(c, rst=True, count=False)
                return
            if data == b"":
                rx.eof = True
            elif data:
                rx.buf += data
        if mask & selectors.EVENT_WRITE and tx.buf:
            n = len(tx.buf)
            if mode == "trickle":
                n = min(n, int(tx.tokens))
            if c.cut_left is not None:
                n = min(n, c.cut_left)
            if n > 0:
                try:
                    sent = src.send(bytes(tx.buf[:n]))
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(c, rst=True, count=False)
                    return
                del tx.buf[:sent]
                if mode == "trickle":
                    tx.tokens -= sent
                if which == "c":
                    self.stats.bytes_down += sent
                else:
                    self.stats.bytes_up += sent
                if c.cut_left is not None:
                    c.cut_left -= sent
        if c.cut_left is not None and c.cut_left <= 0:
            self.stats.cut += 1
            self._close(c, rst=False, count=False)

    def _finish(self, c: _Conn) -> None:
        """Pass a FIN on once its side's bytes are through; drop a connection closed both ways."""
        if c not in self._conns or c.upstream is None:
            return
        for side, peer in ((c.up, c.upstream), (c.down, c.client)):
            if side.eof and not side.buf and not side.shut:
                side.shut = True
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_WR)
        if c.up.shut and c.down.shut:
            self._close(c, rst=False, count=False)

    def _close(self, c: _Conn, *, rst: bool, count: bool = True) -> None:
        if c in self._conns:
            self._conns.remove(c)
        if rst and count:
            self.stats.reset += 1
        for s in (c.client, c.upstream):
            if s is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            if rst:
                _rst(s)
            else:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
