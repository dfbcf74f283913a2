"""An FTP(S) server that never greets, stops answering mid-session, or refuses: each call
ends within the timeout with ConnectionLost (UnavailableError from check()), and the
remote works again once the server does."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from syncd.errors import ConnectionLost, UnavailableError
from syncd.remotes.ftp import FTPOptions, FTPRemote
from tests.servers import FTPServer
from tests.silent import SilentServer, closed_port
from tests.silent import bounded as _bounded

TIMEOUT = 2.0
BOUND = 4 * TIMEOUT   # a hang is what these tests catch, not speed


def bounded(fn: Callable[[], object], bound: float = BOUND) -> BaseException | None:
    return _bounded(fn, bound)


def remote(port: int, tls: str, **kw: object) -> FTPRemote:
    o: dict[str, object] = dict(host="127.0.0.1", port=port, user="u", password_env="PW",
                                tls=tls, timeout=TIMEOUT, transfers=2)
    o.update(kw)
    return FTPRemote("partner", FTPOptions(**o), env={"PW": "x"})  # type: ignore[arg-type]


@pytest.mark.parametrize("tls", ["none", "explicit", "implicit"])
@pytest.mark.parametrize("greeting", [b"", b"220 hello\r\n"], ids=["no-greeting",
                                                                  "greeting-then-silence"])
def test_a_silent_server_is_connection_lost(tls: str, greeting: bytes) -> None:
    with SilentServer(greeting) as srv:
        r = remote(srv.port, tls)
        for _ in range(2):   # nothing left behind: the same remote, again
            err = bounded(lambda: r.stat("a.txt"))
            assert isinstance(err, ConnectionLost), repr(err)
            assert f"127.0.0.1:{srv.port}" in str(err)
            err = bounded(r.check)
            assert isinstance(err, UnavailableError), repr(err)
        r.close()


def test_a_closed_port_is_connection_lost() -> None:
    r = remote(closed_port(), "explicit")
    err = bounded(lambda: list(r.list("")))
    assert isinstance(err, ConnectionLost), repr(err)
    assert "refused" in str(err).lower()


@pytest.fixture
def own(tmp_path: Path) -> Iterator[FTPServer]:
    srv = FTPServer(tmp_path / "srv", tls="explicit").start()
    try:
        yield srv
    finally:
        if srv.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(srv.proc.pid, signal.SIGCONT)
        srv.stop()


def test_a_server_that_freezes_mid_session_is_connection_lost(own: FTPServer) -> None:
    """The server process stopped (SIGSTOP): connections stay open, nothing answers. The
    next call ends within the timeout; once it runs again, the remote reconnects."""
    (own.root / "a.txt").write_bytes(b"a")
    r = FTPRemote("partner", FTPOptions(host="127.0.0.1", port=own.port, user=own.USER,
                                        password_env=own.PASSWORD_ENV, tls=own.tls,
                                        ca_file=str(own.ca_file), timeout=TIMEOUT),
                  env={own.PASSWORD_ENV: own.PASSWORD})
    try:
        assert r.stat("a.txt").size == 1
        assert own.proc is not None
        os.kill(own.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.1)
            err = bounded(lambda: r.stat("a.txt"), bound=2 * BOUND)   # maybe a NOOP first
            assert isinstance(err, ConnectionLost), repr(err)
        finally:
            os.kill(own.proc.pid, signal.SIGCONT)
        assert r.stat("a.txt").size == 1
    finally:
        r.close()
