#!/usr/bin/env bash
# The test command: set-up (idempotent), lint, then the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
