"""Session-wide fixtures: real servers on 127.0.0.1 shared by the conformance and e2e suites."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.servers import REQUIRE_ENV, FTPServer, S3Server, ServerMissing, SSHServer, sshd_binary


def _missing(e: Exception) -> None:
    # In CI (scripts/test.sh) a missing server is a failure: the core suites never skip.
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(str(e))
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """One OpenSSH sshd for the session (tests that stop or restart a server start their own)."""
    try:
        sshd_binary()
    except ServerMissing as e:
        _missing(e)
    srv = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def s3server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 over HTTP, with fake credentials in the environment
    (boto3 in this process and syncd subprocesses read them from there)."""
    old = {k: os.environ.get(k) for k in S3Server.ENV}
    os.environ.update(S3Server.ENV)
    try:
        srv = S3Server().start()
    except ServerMissing as e:
        _missing(e)
    try:
        yield srv
    finally:
        srv.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ftp(tmp_path_factory: pytest.TempPathFactory, tls: str) -> Iterator[FTPServer]:
    try:
        srv = FTPServer(tmp_path_factory.mktemp(f"ftp-{tls}"), tls=tls).start()
    except ServerMissing as e:
        _missing(e)
    old = os.environ.get(FTPServer.PASSWORD_ENV)
    os.environ[FTPServer.PASSWORD_ENV] = FTPServer.PASSWORD
    try:
        yield srv
    finally:
        srv.stop()
        if old is None:
            os.environ.pop(FTPServer.PASSWORD_ENV, None)
        else:
            os.environ[FTPServer.PASSWORD_ENV] = old


@pytest.fixture(scope="session")
def ftpserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPServer]:
    """pyftpdlib over explicit FTPS (certificate from a throwaway CA) on 127.0.0.1, with
    the password in the environment (as a user would set password_env)."""
    yield from _ftp(tmp_path_factory, "explicit")


@pytest.fixture(scope="session")
def ftpserver_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FTPServer]:
    """The same, plain FTP (tls = "none")."""
    yield from _ftp(tmp_path_factory, "none")
