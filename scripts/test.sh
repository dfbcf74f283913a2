#!/usr/bin/env bash
# Install everything the tests need and run the whole suite: lint, type check, pytest.
#   test.sh [PYTEST ARGS]            the locked versions (requirements/test.lock) in .venv/
#   test.sh --latest [PYTEST ARGS]   the newest versions pyproject.toml's ranges allow, in
#                                    .venv-latest/: upstream breakage shows here first
#   test.sh --with SPEC [PYTEST ARGS]  the lock with one package changed (e.g.
#                                    --with watchdog==7.0.0 tests/unit/test_watch.py), in
#                                    .venv-with/: checks a version syncd.compat supports
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=.venv
case "${1:-}" in
    --latest) shift; VENV=.venv-latest; bash scripts/bootstrap.sh latest ;;
    --with)
        spec="${2:?--with needs a requirement, e.g. watchdog==7.0.0}"; shift 2
        VENV=.venv-with
        rm -f "$VENV/.syncd-lock"
        bash scripts/bootstrap.sh test
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$spec" \
            > "$VENV/.pip.log" 2>&1 || { cat "$VENV/.pip.log" >&2; exit 1; }
        rm -f "$VENV/.syncd-lock"   # no longer the lock: the next run reinstalls it
        ;;
    *) bash scripts/bootstrap.sh test ;;
esac
echo "test: $("$VENV/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(watchdog|paramiko|boto3|typer|structlog)==' | tr '\n' ' ')" >&2

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
# systemd-analyze checks the units in syncd/data/systemd/ (tests/e2e/test_daemon.py).
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing systemd (for systemd-analyze verify of the units)" >&2
    apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >&2 \
        || echo "test: could not install systemd; the unit test will say so" >&2
fi
# A missing server is a failure here, never a silent skip.
export SYNCD_TEST_REQUIRE_SERVERS=1
"$VENV/bin/ruff" check syncd tests bench
"$VENV/bin/mypy"   # what it checks: [tool.mypy] in pyproject.toml
# A hung test (or a thread left running at exit) must fail the run, not hold CI until its
# own limit: pytest dumps every thread's stack after 5 minutes in one test, and the whole
# suite (about 10 minutes here) is stopped after 30.
exec timeout --kill-after=30s 30m "$VENV/bin/python" -m pytest -o faulthandler_timeout=300 "$@"
