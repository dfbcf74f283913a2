#!/usr/bin/env bash
# Install everything the tests need (into .venv/) and run the whole suite: lint + pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k plan).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh "[test]"
.venv/bin/ruff check syncd tests bench
exec .venv/bin/python -m pytest "$@"
