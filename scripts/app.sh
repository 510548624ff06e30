#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the app on http://127.0.0.1:8501 with the embedded
# default: the bundled all-MiniLM-L6-v2, the demo corpus and the offline generator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/streamlit run app.py "$@"
