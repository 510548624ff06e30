#!/usr/bin/env bash
# The GPU check, one prepared script: under 6 minutes on one H100 / H200 (bench/README.md, "GPU").
#
#   bash bench/gpu_check.sh [OUT_DIR]      # from the repository root; OUT_DIR defaults to $OUT, else .
#
# 1. installs carried wheels from .whl/ when `datasets` or `pydantic` is missing (the device image);
# 2. checks that the trainer's per-step loss watch and the CUDA encode path do not wait for the GPU
#    (torch.cuda sync debug mode);
# 3. runs bench/gpu.py: MiniLM-L6 and BERT-base shapes, stock sentence-transformers vs this project,
#    training and encode (re-index too where chromadb and duckdb are installed).
# Writes OUT_DIR/gpu.json and OUT_DIR/gpu.log.
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}

if ! $py -c "import datasets, pydantic" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "datasets or pydantic is missing and no wheels are in .whl/: see bench/README.md (GPU)." >&2
    exit 2
  fi
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.log"

timeout 60 $py - <<'EOF' 2>&1 | tee -a "$out/gpu.log"
import warnings

import torch

from loop.embed import Embedder
from loop.train_monitor import Faults, Watch

loss = torch.ones((), device="cuda") * 2
watch = Watch(Faults(), poll_every=10)
watch.record(loss, 1)  # the first call allocates its flag tensor once
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for step in range(2, 12):
        watch.record(loss * step, step)
    torch.cuda.set_sync_debug_mode(0)
print(f"sync check: Watch.record, 10 steps: {len(caught)} host syncs (want 0)")

import pathlib, sys, tempfile  # noqa: E401,E402
sys.path.insert(0, "bench")
import gpu  # noqa: E402

path, _ = gpu.model_dir("MiniLM-L6", pathlib.Path(tempfile.mkdtemp()), 64, smoke=True)
emb = Embedder(path, "v", "cuda")
texts = gpu.texts(1024, 5, 60, 0)
emb.encode(texts[:256])
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    emb.encode(texts)
    torch.cuda.set_sync_debug_mode(0)
print(f"sync check: Embedder.encode on CUDA, 4 batches of 256: {len(caught)} host syncs "
      "(about 3 at the end are its own: the non-finite check and the copy back; more = per batch)")
for w in caught[:8]:
    print("   ", str(w.message)[:160], f"({pathlib.Path(w.filename).name}:{w.lineno})")
EOF

timeout 330 $py bench/gpu.py --out "$out/gpu.json" 2>&1 | tee -a "$out/gpu.log"
exit "${PIPESTATUS[0]}"
