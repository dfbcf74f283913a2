"""FTP remote behaviour against a real pyftpdlib server: keepalive, transparent reconnect,
fewer connections after "421 too many", secrets out of errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.errors import AuthError, UnavailableError
from syncd.remotes import ftp as ftpmod
from syncd.remotes.ftp import FTPOptions, FTPRemote
from tests.servers import FTPServer


def make(srv: FTPServer, **kw: object) -> FTPRemote:
    o = dict(host="127.0.0.1", port=srv.port, user=srv.USER, password_env=srv.PASSWORD_ENV,
             tls=srv.tls, ca_file=str(srv.ca_file) if srv.tls != "none" else "", timeout=5.0)
    o.update(kw)
    return FTPRemote("partner", FTPOptions(**o), env={srv.PASSWORD_ENV: srv.PASSWORD})  # type: ignore[arg-type]


@pytest.fixture
def short_idle(tmp_path: Path) -> Iterator[FTPServer]:
    """A server that hangs up on a control connection idle for 1 s."""
    srv = FTPServer(tmp_path / "srv", tls="none", extra=("--idle-timeout", "1")).start()
    try:
        yield srv
    finally:
        srv.stop()


def count_connects(r: FTPRemote, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    n: list[int] = []
    real = r._connect

    def counting() -> object:
        n.append(1)
        return real()

    monkeypatch.setattr(r, "_connect", counting)
    return n


def test_noop_keepalive_outlives_the_server_idle_timeout(short_idle: FTPServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ftpmod, "KEEPALIVE_S", 0.3)
    r = make(short_idle, transfers=1)
    connects = count_connects(r, monkeypatch)
    r.check()
    time.sleep(2.5)                      # 2.5x the server's idle timeout
    assert list(r.list("")) == []
    assert len(connects) == 1            # the same connection, kept alive by NOOPs
    r.close()


def test_connection_dropped_while_idle_is_replaced_transparently(
        short_idle: FTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ftpmod, "KEEPALIVE_S", 3600.0)   # no keepalive: the server hangs up
    monkeypatch.setattr(ftpmod, "STALE_S", 0.5)
    r = make(short_idle, transfers=1)
    connects = count_connects(r, monkeypatch)
    r.check()
    time.sleep(2.0)
    assert list(r.list("")) == []        # no error: the dead connection was noticed first
    assert len(connects) == 2
    r.close()


def test_too_many_connections_means_fewer_not_failure(tmp_path: Path) -> None:
    srv = FTPServer(tmp_path / "srv", tls="none", extra=("--max-cons-per-ip", "2")).start()
    try:
        (srv.root / "d").mkdir()
        for i in range(12):
            (srv.root / "d" / f"sub{i}").mkdir()
        r = make(srv, transfers=6)
        listed = list(r.list(""))
        assert len([e for e in listed if e.path.startswith("d/sub")]) == 12
        assert r._max <= 2
        r.close()
    finally:
        srv.stop()


def test_wrong_password_and_missing_root_are_unavailable(ftpserver: FTPServer) -> None:
    r = FTPRemote("partner", FTPOptions(host="127.0.0.1", port=ftpserver.port,
                                        user=ftpserver.USER, password_env="PW",
                                        ca_file=str(ftpserver.ca_file)),
                  env={"PW": "wrong-secret"})
    with pytest.raises(AuthError) as e:
        r.check()
    assert "530" in str(e.value) and "wrong-secret" not in str(e.value)
    assert "partner" in str(e.value)
    with pytest.raises(UnavailableError, match="does not exist"):
        make(ftpserver, root="/no/such/root").check()
    with pytest.raises(AuthError, match="PW_UNSET"):
        FTPRemote("partner", FTPOptions(host="127.0.0.1", port=ftpserver.port, user="u",
                                        password_env="PW_UNSET"), env={}).check()


def test_explicit_tls_refused_by_a_plain_server_never_falls_back(ftpserver_plain: FTPServer) -> None:
    r = make(ftpserver_plain, tls="explicit")
    with pytest.raises(UnavailableError, match="refused TLS"):
        r.check()
