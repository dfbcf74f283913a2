#!/usr/bin/env bash
# Install everything the tests need (into .venv/) and run the whole suite: lint + pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k plan).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh "[test]"

# The suites start real servers on 127.0.0.1: OpenSSH's sshd (+ ssh-keygen, ssh-agent).
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing openssh-server (the SFTP tests run a throwaway sshd)" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            openssh-server openssh-client >&2
    else
        echo "test: OpenSSH sshd is missing; install it (Debian: sudo apt-get install openssh-server)" >&2
        exit 2
    fi
fi
# systemd-analyze checks the units in systemd/ (tests/e2e/test_daemon.py).
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing systemd (for systemd-analyze verify of the units)" >&2
    apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >&2 \
        || echo "test: could not install systemd; the unit test will say so" >&2
fi
# A missing server is a failure here, never a silent skip.
export SYNCD_TEST_REQUIRE_SERVERS=1
.venv/bin/ruff check syncd tests bench
# A hung test (or a thread left running at exit) must fail the run, not hold CI until its
# own limit: pytest dumps every thread's stack after 5 minutes in one test, and the whole
# suite (about 3 minutes here) is stopped after 30.
exec timeout --kill-after=30s 30m .venv/bin/python -m pytest -o faulthandler_timeout=300 "$@"
