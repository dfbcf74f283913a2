"""A server that hangs: a TCP listener on 127.0.0.1 that accepts, says its greeting (maybe
nothing) and then nothing more, for tests of remotes that must not wait on it forever."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable


class SilentServer:
    """Accepts every connection on a free loopback port, sends `greeting` (an SSH banner,
    say; b"" for none) and then stays silent: it reads and drops whatever the client sends
    (so the client's writes never block) until `stop()`, which closes every connection."""

    def __init__(self, greeting: bytes = b""):
        self.greeting = greeting
        self.accepted = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept, daemon=True,
                                          name=f"silent-{self.port}")

    def start(self) -> SilentServer:
        self._accepter.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
                t = threading.Thread(target=self._hold, args=(conn,), daemon=True)
                self._threads.append(t)
            t.start()

    def _hold(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        with contextlib.suppress(OSError):
            if self.greeting:
                conn.sendall(self.greeting)
            while not self._stop.is_set():
                try:
                    if not conn.recv(65536):
                        return
                except TimeoutError:
                    continue

    def stop(self) -> None:
        self._stop.set()
        self._accepter.join(5)
        with self._lock:
            threads, conns = list(self._threads), list(self._conns)
        for t in threads:
            t.join(5)
        for c in conns:
            with contextlib.suppress(OSError):
                c.close()
        self._sock.close()

    def __enter__(self) -> SilentServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bounded(fn: Callable[[], object], bound: float) -> BaseException | None:
    """Run fn() in a thread and return what it raised (None: nothing). Fails the test if
    it is still running after `bound` seconds: a hang (the thread is a daemon and cannot
    hold the test run)."""
    import pytest

    out: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:   # handed to the test
            out[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(bound)
    if t.is_alive():
        pytest.fail(f"still waiting after {bound:g} s: a hang")
    return out[0]
