#!/usr/bin/env bash
# Install syncd into .venv/ and run the demo: a local folder synced into a local directory
# remote (no server needed), under ./syncd-demo/. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/syncd demo "$@"
