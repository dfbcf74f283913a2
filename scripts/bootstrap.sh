#!/usr/bin/env bash
# Create a venv and install syncd into it (editable) with the exact versions of a committed
# lock. Safe to re-run: a venv already in step with its lock is left as it is.
#   bootstrap.sh            .venv/ from requirements/run.lock (syncd alone)
#   bootstrap.sh test       .venv/ from requirements/test.lock (syncd + the test tools)
#   bootstrap.sh latest     .venv-latest/ with the newest versions pyproject.toml's ranges
#                           allow, tests included (scripts/test.sh --latest)
#   VENV=DIR bootstrap.sh … another venv (scripts/test.sh --with)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-run}"
PY="${PYTHON:-python3}"
case "$what" in
    run|test) VENV="${VENV:-.venv}" ;;
    latest) VENV="${VENV:-.venv-latest}" ;;
    *) echo "bootstrap: unknown set '$what' (run, test or latest)" >&2; exit 2 ;;
esac

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "bootstrap: $PY not found; install Python >= 3.11 (Debian: apt-get install python3)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: syncd needs Python >= 3.11; $PY is $("$PY" --version 2>&1)" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    else
        echo "bootstrap: the venv module is missing; install it (Debian: sudo apt-get install python3-venv)" >&2
        exit 2
    fi
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() {
    # pip's notes about extra index locations configured on this machine are noise here.
    local rc=0
    "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" > "$VENV/.pip.log" 2>&1 || rc=$?
    grep -v "^WARNING: Location '.*' is ignored" "$VENV/.pip.log" >&2 || true
    return "$rc"
}

if [ "$what" = latest ]; then
    pip install --upgrade pip
    pip install --upgrade --upgrade-strategy eager -r requirements/build.in
    pip install --upgrade --upgrade-strategy eager --no-build-isolation -e ".[test]"
else
    lock="requirements/$what.lock"
    stamp="$VENV/.syncd-lock"
    # The lock's own hash, and pyproject's (the editable install's entry points and metadata).
    want="$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # Exactly the lock: what the venv holds beyond it (an earlier lock, a package
        # installed by hand) is removed, so a green run here is a green run on a new machine.
        pip install --require-hashes --no-deps -r "$lock"
        extra="$("$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
            | sed 's/[=@ ].*//' | tr 'A-Z_' 'a-z-' | sort -u \
            | comm -23 - <(grep -oE '^[A-Za-z0-9_.-]+==' "$lock" | sed 's/==//' | tr 'A-Z_' 'a-z-' | sort -u) \
            | grep -vE '^(pip|syncd)$' || true)"
        if [ -n "$extra" ]; then
            # shellcheck disable=SC2086
            pip uninstall -y $extra
        fi
        pip install --no-deps --no-build-isolation -e .
        "$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null \
            || { "$VENV/bin/python" -m pip check >&2; exit 1; }
        echo "$want" > "$stamp"
    fi
fi
"$VENV/bin/python" -c 'import syncd' || { echo "bootstrap: installation failed" >&2; exit 1; }
# Byte-compile syncd now: the install is editable, and where __pycache__ is never written
# (PYTHONDONTWRITEBYTECODE, or a read-only tree under systemd's ProtectSystem) every run
# would otherwise compile the sources again (~50 ms of each start-up).
"$VENV/bin/python" -m compileall -q syncd >/dev/null || true
