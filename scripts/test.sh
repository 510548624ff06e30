#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# The browser test drives Debian's Chromium with Playwright (never `playwright install`).
# Install it when it is missing and apt-get is there (CI images install Chromium themselves).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium \
    || echo "scripts/test.sh: could not install chromium; the browser test will be skipped" >&2
fi
if [ $# -eq 0 ]; then set -- -m "slow or not slow"; fi
exec .venv/bin/python -m pytest "$@"
