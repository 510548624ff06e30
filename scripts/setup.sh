#!/usr/bin/env bash
# Create ./.venv and install embedloop into it. Usage: bash scripts/setup.sh [--dev]
#
# torch is installed first, deliberately:
#   - a machine with an NVIDIA GPU (nvidia-smi works) gets PyPI's default CUDA build;
#   - a CPU machine gets torch==2.13.0, the CPU wheel this workplace's pip finds locally;
#     elsewhere set TORCH_INDEX_URL to a CPU wheel index to avoid the multi-GB CUDA build.
#   - EMBEDLOOP_TORCH="<pip requirement>" overrides both.
# The project itself asks only for torch>=2.4, which the installed build satisfies, so pip
# never swaps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${EMBEDLOOP_TORCH:-}" ]; then
    "${PIP[@]}" "$EMBEDLOOP_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" --index-url "$TORCH_INDEX_URL" "torch==2.13.0"
  else
    "${PIP[@]}" "torch==2.13.0"
  fi
fi
if [ "${1:-}" = "--dev" ]; then
  "${PIP[@]}" -e ".[dev]"
else
  "${PIP[@]}" -e .
fi
echo "embedloop installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
