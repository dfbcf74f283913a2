"""An SSH server that accepts and then goes silent: every phase of an SFTP connection ends
within the remote's timeout with ConnectionLost (or UnavailableError from check()), and
nothing is left behind for the next call (run several times in a row)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from syncd.errors import ConnectionLost, RemoteError, UnavailableError
from syncd.remotes.sftp import SFTPOptions, SFTPRemote
from tests.servers import SSHServer
from tests.silent import SilentServer, closed_port
from tests.silent import bounded as _bounded

TIMEOUT = 2.0
BOUND = 4 * TIMEOUT   # a hang is what these tests catch, not speed
BANNER = b"SSH-2.0-OpenSSH_9.2\r\n"


def silent_opts(port: int, tmp_path: Path, timeout: float = TIMEOUT) -> SFTPOptions:
    kh = tmp_path / "known_hosts"
    kh.touch()
    return SFTPOptions(host="127.0.0.1", port=port, user="nobody", root="/",
                       known_hosts=str(kh), use_agent=False, timeout=timeout)


def bounded(fn: Callable[[], object], bound: float = BOUND) -> tuple[BaseException | None, float]:
    """What fn() raised and the seconds it took; a failure if it runs past `bound`."""
    t0 = time.monotonic()
    err = _bounded(fn, bound)
    return err, time.monotonic() - t0


@pytest.mark.parametrize("greeting", [BANNER, b""], ids=["banner-then-silence", "no-banner"])
def test_check_against_a_silent_server_ends_unavailable_within_the_timeout(
        greeting: bytes, tmp_path: Path) -> None:
    with SilentServer(greeting) as srv:
        r = SFTPRemote("box", silent_opts(srv.port, tmp_path))
        for _ in range(3):   # nothing left behind: the same remote, again and again
            err, _ = bounded(r.check)
            assert isinstance(err, UnavailableError), repr(err)
            assert "127.0.0.1" in str(err) and "box" in str(err)
        r.close()
    assert srv.accepted >= 3


@pytest.mark.parametrize("greeting", [BANNER, b""], ids=["banner-then-silence", "no-banner"])
def test_operations_against_a_silent_server_raise_connection_lost(
        greeting: bytes, tmp_path: Path) -> None:
    with SilentServer(greeting) as srv:
        r = SFTPRemote("box", silent_opts(srv.port, tmp_path))
        for _ in range(3):
            err, _ = bounded(lambda: list(r.list("")))
            assert isinstance(err, ConnectionLost), repr(err)
        r.close()


def test_waiters_for_a_failing_connection_share_its_error(tmp_path: Path) -> None:
    """A background connect (prepare) that meets a silent server: a call that waits for it
    gets its error instead of waiting forever, and calls after it connect anew."""
    with SilentServer(BANNER) as srv:
        r = SFTPRemote("box", silent_opts(srv.port, tmp_path))
        for _ in range(3):
            r.prepare()
            time.sleep(0.05)   # let the background attempt start first
            err, took = bounded(lambda: r.stat("x"))
            assert isinstance(err, ConnectionLost), repr(err)
            assert took < 2 * TIMEOUT + 1.5, f"{took:.1f} s: waited on a second attempt"
        r.close()


def test_a_closed_port_is_connection_lost(tmp_path: Path) -> None:
    r = SFTPRemote("box", silent_opts(closed_port(), tmp_path))
    err, _ = bounded(lambda: r.stat("x"))
    assert isinstance(err, ConnectionLost), repr(err)
    assert "refused" in str(err).lower()
    err, _ = bounded(r.check)
    assert isinstance(err, UnavailableError), repr(err)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[SSHServer]:
    s = SSHServer(tmp_path / "sshd").start()
    try:
        yield s
    finally:
        s.stop()


def _sessions(srv: SSHServer) -> list[int]:
    assert srv.proc is not None
    out = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_server_that_freezes_mid_session_is_connection_lost(srv: SSHServer,
                                                              tmp_path: Path) -> None:
    """The session's server processes stopped (SIGSTOP): TCP stays up, nothing answers.
    The next request ends within the timeout; once they are gone, the remote reconnects."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    r = SFTPRemote("box", SFTPOptions(host=srv.host, port=srv.port, user=srv.user,
                                      root=str(root), key_file=str(srv.client_key),
                                      known_hosts=str(srv.known_hosts), use_agent=False,
                                      timeout=TIMEOUT))
    try:
        assert r.stat("f").size == 1
        stopped = _sessions(srv)
        assert stopped
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            err, _ = bounded(lambda: r.stat("f"))
            assert isinstance(err, ConnectionLost), repr(err)
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        err, _ = bounded(lambda: r.stat("f"))   # a fresh connection
        assert err is None or not isinstance(err, RemoteError), repr(err)
        assert r.stat("f").size == 1
    finally:
        r.close()
