#!/usr/bin/env bash
# Create .venv/ and install syncd into it (with extras, e.g. "[test]"). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "bootstrap: $PY not found; install Python >= 3.11 (Debian: apt-get install python3)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: syncd needs Python >= 3.11; $PY is $("$PY" --version 2>&1)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    else
        echo "bootstrap: the venv module is missing; install it (Debian: sudo apt-get install python3-venv)" >&2
        exit 2
    fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
# Recent setuptools warns on every editable install that a folder named like the package
# in the working directory could shadow it (that folder is the package here): drop that
# block (up to its second "!!" and the source line after it), keep every other message.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 \
    | grep -v '^WARNING: Location' \
    | awk '/BuildBackendWarning: Editable installation/ {skip = 1; bangs = 0; next}
           skip && /^ *!!$/ {bangs++; next}
           skip && bangs < 2 && /^ / {next}
           skip && bangs == 2 && /with strategy, WheelFile/ {skip = 0; next}
           {skip = 0; print}' >&2 || true
.venv/bin/python -c 'import syncd' || { echo "bootstrap: installation failed" >&2; exit 1; }
# Byte-compile syncd now: the install is editable, and where __pycache__ is never written
# (PYTHONDONTWRITEBYTECODE, or a read-only tree under systemd's ProtectSystem) every run
# would otherwise compile the sources again (~50 ms of each start-up).
.venv/bin/python -m compileall -q syncd >/dev/null || true
