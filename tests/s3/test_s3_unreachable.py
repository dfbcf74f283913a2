"""An S3 endpoint that never answers, or refuses: one timeout per call (botocore does not
retry it), ConnectionLost for the calls and UnavailableError from check(); a throttled or
failing request for one key stays a plain TransientError."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from syncd.errors import ConnectionLost, TransientError, UnavailableError
from syncd.remotes.s3 import S3Options, S3Remote
from tests.servers import FaultProxy, S3Server
from tests.silent import SilentServer, closed_port
from tests.silent import bounded as _bounded

TIMEOUT = 2.0
# A hang (or botocore's retries of a silent endpoint, one timeout each) is what this
# catches: one call must end within a few timeouts, not RETRY_ATTEMPTS x 6 of them.
BOUND = 3 * TIMEOUT


def bounded(fn: Callable[[], object], bound: float = BOUND) -> BaseException | None:
    return _bounded(fn, bound)


def remote(endpoint: str, timeout: float = TIMEOUT) -> S3Remote:
    return S3Remote("bucket", S3Options(bucket="unreachable", endpoint_url=endpoint,
                                        region="us-east-1", addressing_style="path",
                                        timeout=timeout))


@pytest.fixture(autouse=True)
def _creds(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in S3Server.ENV.items():
        monkeypatch.setenv(k, v)


def test_a_silent_endpoint_costs_one_timeout_per_call() -> None:
    with SilentServer() as srv:
        r = remote(f"http://127.0.0.1:{srv.port}")
        for _ in range(3):
            err = bounded(r.check)
            assert isinstance(err, UnavailableError), repr(err)
            assert "bucket 'unreachable'" in str(err)
            err = bounded(lambda: r.stat("a.txt"))
            assert isinstance(err, ConnectionLost), repr(err)
        r.close()


def test_a_closed_port_is_connection_lost() -> None:
    r = remote(f"http://127.0.0.1:{closed_port()}")
    err = bounded(lambda: list(r.list("")))
    assert isinstance(err, ConnectionLost), repr(err)
    err = bounded(r.check)
    assert isinstance(err, UnavailableError), repr(err)


def test_a_failing_request_is_transient_not_connection_lost(s3server: S3Server) -> None:
    """503 SlowDown on every request: the endpoint answers, so it is about the requests
    (retried by the queue), not a lost connection."""
    proxy = FaultProxy(s3server.port, fail_first=1000)
    try:
        r = remote(proxy.endpoint)
        err = bounded(lambda: r.stat("a.txt"), bound=60)
        assert isinstance(err, TransientError) and not isinstance(err, ConnectionLost), repr(err)
        assert "503" in str(err)
    finally:
        proxy.stop()
