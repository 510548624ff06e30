#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if [ $# -eq 0 ]; then set -- -m "slow or not slow"; fi
exec .venv/bin/python -m pytest "$@"
