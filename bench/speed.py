"""Speed benchmark (CPU): the project's paths side by side with the stock way, in one run.

(Longer than the project's ~400 lines on purpose: one file per benchmark command, each part —
encode, reindex, train, review, llm, demo — with its stock comparison beside it.)

    python -m bench.speed [--data DIR] [--passages N] [--train-pairs N] [--only PART ...] [--out FILE.json]
                          [--backends B ...] [--st-onnx-site DIR]

Parts (each prints a ratio project / stock):
  encode   passages/s: Embedder (torch, onnx, onnx-int8 backends) and sentence-transformers' own ONNX path
           (st-onnx, st-onnx-O3, st-onnx-qint8, st-onnx-O3-qint8: bench/st_onnx.py, in a child process with
           --st-onnx-site first on its path) vs stock SentenceTransformer.encode; NDCG@10 of each on --data's test split.
  reindex  passages/s: loop.indexing.build + activate (encode + Chroma write + verify + switch) vs
           stock model.encode + collection.add.
  train    pairs/s: the project's training subprocess (loop.train) vs a stock SentenceTransformerTrainer,
           same rows, same model, MNRL, batch 32, 1 epoch.
  review   next-card latency p50/p95 of loop.review.claim_next on a DuckDB file with 100,000 pending pairs.
  llm      generation throughput (loop.generate.llm_pairs through LLMClient) vs sequential calls, against a
           local OpenAI-protocol server answering after 200 ms (tests/openai_server.py).
  demo     one whole round on the app's embedded default (bundled model, demo corpus, offline generator,
           default [loop] settings), generate -> reindex; the reviewer accepts every queued card at once,
           so the figure is the machine's time, not a person's. Target: <= 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MAX_BYTES, machine, scratch
from loop.config import bundled_model_path
from loop.readers import iter_jsonl

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "cranfield"


def corpus_texts(data: Path | None, n: int) -> list[str]:
    """`n` passages: from a BEIR corpus when there is one, else synthetic sentences."""
    texts: list[str] = []
    if data is not None and (data / "corpus.jsonl").is_file():
        for _, rec in iter_jsonl(data / "corpus.jsonl", MAX_BYTES):
            t = f"{rec.get('title') or ''}\n\n{rec.get('text') or ''}".strip()
            if t:
                texts.append(t)
            if len(texts) >= n:
                break
    rng = np.random.default_rng(0)
    words = "flow pressure wing boundary layer shock heat transfer laminar turbulent mach number body".split()
    while len(texts) < n:
        texts.append(" ".join(rng.choice(words, size=int(rng.integers(20, 180)))))
    return texts


def _rate(n: int, seconds: float) -> float:
    return round(n / max(seconds, 1e-9), 2)


# Encode ----------------------------------------------------------------------------------------
class LibraryArms:
    """sentence-transformers' own ONNX path (`bench/st_onnx.py`), in a child process whose PYTHONPATH
    starts with `site` (None: this environment). `arm(name)` is an encoder `loop.evaluate` can use."""

    HOW_TO = ("it needs optimum-onnx, which requires transformers < 4.58 while this project's "
              "sentence-transformers needs >= 5; pass --st-onnx-site DIR, a folder with sentence-transformers 5 "
              "and optimum-onnx installed in it (bench/README.md)")

    def __init__(self, site: str | Path | None, model: Path, folder: Path):
        import os
        import subprocess

        import torch

        env = dict(os.environ)
        if site:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "st-onnx.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "st_onnx.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env)
        try:
            self.versions = self.call("setup", model=str(model), folder=str(folder / "model"),
                                      threads=torch.get_num_threads())
        except Exception:
            self.close()
            raise

    def call(self, op: str, **kw: Any) -> Any:
        import pickle

        assert self.proc.stdin and self.proc.stdout
        try:
            pickle.dump({"op": op, **kw}, self.proc.stdin)
            self.proc.stdin.flush()
            answer = pickle.load(self.proc.stdout)
        except (EOFError, BrokenPipeError, OSError) as e:
            raise RuntimeError(f"the sentence-transformers worker died ({e}); see {self.log}") from e
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["ok"]

    def arm(self, name: str, dim: int, batch_size: int) -> Any:
        parent = self

        class Arm:
            version = name

            def __init__(self) -> None:
                self.dim = dim
                self.seconds = 0.0  # the child's own timing of the last encode (no pipe transfer)

            def encode(self, texts: list[str]) -> np.ndarray:
                emb, self.seconds = parent.call("encode", arm=name, texts=list(texts), batch_size=batch_size)
                return emb

        return Arm()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self._log.close()


def bench_encode(texts: list[str], backends: list[str], cache_dir: Path, batch_size: int = 64,
                 data: Path | None = None, st_onnx_site: str | Path | None = None, repeats: int = 1) -> dict[str, Any]:
    """Passages/s per backend vs stock; with a BEIR `data` folder that has qrels/test, also each
    backend's NDCG@10 on it next to the torch backend's (the int8 target: within 0.005).

    A backend is one of `Embedder`'s (torch, onnx, onnx-int8) or a library arm (`st-onnx`,
    `st-onnx-O3`, `st-onnx-qint8`, `st-onnx-O3-qint8`: sentence-transformers' own ONNX path,
    bench/st_onnx.py, run with `st_onnx_site` first on the path). An arm that cannot run gets
    {"error": why} and the others go on.

    Every arm is set up (exported, warmed up) first; then the timed passes run in turn, stock
    included, `repeats` times round, and each arm's figure is its median pass: on a shared machine
    a burst of someone else's load then costs every arm alike rather than whichever ran during it."""
    from sentence_transformers import SentenceTransformer

    from bench.common import GAIN
    from bench.st_onnx import ARMS
    from loop.embed import Embedder
    from loop.evalsets import evalset_from_beir
    from loop.evaluate import evaluate

    path = bundled_model_path()
    stock = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    stock.encode(texts[:32], batch_size=batch_size)  # warm-up

    class Stock:
        def encode(self, batch: list[str]) -> np.ndarray:
            return stock.encode(batch, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)

    out: dict[str, Any] = {"passages": len(texts), "repeats": repeats}
    dim = int(stock.get_embedding_dimension())
    library: LibraryArms | None = None
    encoders: dict[str, Any] = {}
    setup: dict[str, float] = {}
    try:
        for be in backends:
            try:
                if be in ARMS:
                    if library is None:
                        library = LibraryArms(st_onnx_site, path, cache_dir / "st-onnx")
                        out["st_onnx_versions"] = library.versions
                    t0 = time.perf_counter()
                    library.call("prepare", arm=be)
                    emb = library.arm(be, dim, batch_size)
                else:
                    t0 = time.perf_counter()
                    emb = Embedder(path, "bench", "cpu", batch_size, backend=be, cache_dir=cache_dir)
                emb.encode(texts[:32])  # warm-up; the first ONNX call exports (timed separately)
                setup[be] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - one arm that cannot run must not lose the others
                if be not in ARMS:
                    raise
                msg = str(e)
                missing = "install" in msg.lower() and "optimum" in msg.lower()  # the library's own words
                out[be] = {"error": f"{msg}; {LibraryArms.HOW_TO}" if missing else msg}
                continue
            encoders[be] = emb
        runs: dict[str, list[float]] = {name: [] for name in ["stock", *encoders]}
        got: dict[str, np.ndarray] = {}
        for _ in range(repeats):
            for name in runs:
                emb = Stock() if name == "stock" else encoders[name]
                t0 = time.perf_counter()
                got[name] = emb.encode(texts)
                runs[name].append(getattr(emb, "seconds", 0.0) or time.perf_counter() - t0)
        secs = {name: float(np.median(r)) for name, r in runs.items()}
        out["stock_torch_passages_s"] = _rate(len(texts), secs["stock"])
        out["stock_torch_passages_s_runs"] = [_rate(len(texts), x) for x in runs["stock"]]
        ref = got["stock"]
        for be in encoders:
            cos = np.einsum("ij,ij->i", got[be], ref)
            out[be] = {"passages_s": _rate(len(texts), secs[be]), "ratio_vs_stock": round(secs["stock"] / secs[be], 2),
                       "passages_s_runs": [_rate(len(texts), x) for x in runs[be]],
                       "setup_s": round(setup[be], 1), "cosine_to_stock_min": round(float(cos.min()), 4),
                       "cosine_to_stock_mean": round(float(cos.mean()), 5)}
        if data is not None and (data / "qrels" / "test.tsv").is_file():
            evalset = evalset_from_beir(data, "test")
            ndcg = {}
            for be in dict.fromkeys(["torch", *encoders]):
                emb = encoders.get(be) or Embedder(path, "bench", "cpu", batch_size, backend=be, cache_dir=cache_dir)
                ndcg[be] = evaluate(emb, evalset, k=100, dims=(None,), gain=GAIN).metrics["ndcg@10"]
            for be in encoders:
                out[be]["ndcg@10"] = round(ndcg[be], 4)
                out[be]["ndcg@10_vs_torch"] = round(ndcg[be] - ndcg["torch"], 4)
            out["ndcg_data"] = f"{data.name} test ({len(evalset.query_ids)} queries)"
    finally:
        if library is not None:
            library.close()
    return {k: out[k] for k in ["passages", "repeats", "stock_torch_passages_s", "stock_torch_passages_s_runs",
                                "st_onnx_versions", *backends, "ndcg_data"] if k in out}


# Re-index --------------------------------------------------------------------------------------
def bench_reindex(texts: list[str], backend: str, cache_dir: Path, tmp: Path, path: Path | None = None,
                  device: str = "cpu", batch_size: int = 64) -> dict[str, Any]:
    """`path`: the model (default the bundled one); `device` and `batch_size`: both sides'
    (on CUDA the project's Embedder batches at least 256, see loop.embed.CUDA_BATCH)."""
    import chromadb
    from sentence_transformers import SentenceTransformer

    from loop import indexing
    from loop.embed import Embedder
    from loop.records import Document
    from loop.workspace import Workspace

    path = path or bundled_model_path()
    ws = Workspace.open(tmp / "ws")
    try:
        ws._embedders[ws.base_version] = Embedder(path, ws.base_version, device, batch_size, backend=backend, cache_dir=cache_dir)
        docs = [Document(doc_id=f"d{i}", title="", text=t, source="bench") for i, t in enumerate(texts)]
        ws.add_documents(docs, "bench")  # the base index (not timed)
        n = int(ws.store.scalar("SELECT count(*) FROM passages"))
        version = "bench-v2"
        ws.store.execute("INSERT INTO model_versions (version, path, parent, sha256, status) VALUES (?, ?, ?, 'x', 'candidate')",
                         [version, str(path), ws.base_version])
        emb = Embedder(path, version, device, batch_size, backend=backend, cache_dir=cache_dir)
        emb.encode(["warm-up"])
        t0 = time.perf_counter()
        name = indexing.build(ws.store, ws.index, emb)
        indexing.activate(ws.store, name)
        project_s = time.perf_counter() - t0
        ptexts = [r[0] for r in ws.store.execute("SELECT text FROM passages ORDER BY passage_id").fetchall()]
    finally:
        ws.close()
    model = SentenceTransformer(str(path), device=device, local_files_only=True)
    model.encode(["warm-up"])
    client = chromadb.PersistentClient(path=str(tmp / "stock-chroma"))
    t0 = time.perf_counter()
    coll = client.create_collection("stock", metadata={"hnsw:space": "cosine"}, embedding_function=None)
    vecs = model.encode(ptexts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    step = client.get_max_batch_size()
    ids = [f"p{i}" for i in range(len(ptexts))]
    for s in range(0, len(ptexts), step):
        coll.add(ids=ids[s : s + step], embeddings=vecs[s : s + step], documents=ptexts[s : s + step])
    stock_s = time.perf_counter() - t0
    return {"passages": n, "backend": backend, "project_passages_s": _rate(n, project_s),
            "stock_passages_s": _rate(len(ptexts), stock_s), "ratio": round((n / project_s) / (len(ptexts) / stock_s), 2)}


# Training --------------------------------------------------------------------------------------
def bench_train(pairs: list[dict[str, str]], tmp: Path, batch_size: int = 32) -> dict[str, Any]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from loop import train

    path = bundled_model_path()
    n_eval = max(2, len(pairs) // 10)
    tr, ev = pairs[n_eval:], pairs[:n_eval]
    run = tmp / "run"
    train.write_snapshot(run, tr, ev, {"base_model": str(path), "epochs": 1, "batch_size": batch_size})
    t0 = time.perf_counter()
    result = train.run_to_end(run, nproc=1)
    project_wall = time.perf_counter() - t0

    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    cols = ["anchor", "positive"] + (["negative"] if "negative" in tr[0] else [])
    data = Dataset.from_dict({c: [r[c] for r in tr] for c in cols})
    args = Args(output_dir=str(tmp / "stock"), num_train_epochs=1, per_device_train_batch_size=batch_size,
                report_to="none", disable_tqdm=True, save_strategy="no", logging_strategy="no", dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model))
    t0 = time.perf_counter()
    trainer.train()
    stock_train = time.perf_counter() - t0
    stock_pps = len(tr) / stock_train
    project_pps = float(result.get("pairs_per_second") or 0)
    return {"train_pairs": len(tr), "negatives": "negative" in tr[0], "batch_size": batch_size,
            "project_pairs_s": round(project_pps, 2), "project_wall_s": round(project_wall, 1),
            "project_peak_rss_mb": result.get("peak_rss_mb"), "project_micro_batch": result.get("micro_batch_size"),
            "project_pairs_s_wall": _rate(len(tr), project_wall),
            "stock_pairs_s": round(stock_pps, 2), "ratio": round(project_pps / stock_pps, 2),
            "note": "project pairs/s is its trainer loop (incl. per-epoch eval + checkpoint); wall adds process start "
                    "and model load"}


# Review queue ----------------------------------------------------------------------------------
def bench_review(tmp: Path, n_pending: int = 100_000, n_claims: int = 200) -> dict[str, Any]:
    from loop.review import DecisionIn, claim_next, decide
    from storage.db import Store

    store = Store.open(tmp / "review.duckdb")
    try:
        rng = np.random.default_rng(0)
        prio = rng.random(n_pending)
        t0 = time.perf_counter()
        rows = [{"pair_id": f"p{i:07d}", "anchor": f"query number {i} about flow", "positive_id": f"d{i % 5000}",
                 "positive_text": f"passage {i} text " * 20, "source": "synthetic", "status": "pending",
                 "split": "train", "priority": float(prio[i]), "meta": json.dumps({"features": {"rank": 1}})}
                for i in range(n_pending)]
        with store.transaction() as cur:
            store.insert_ignore(cur, "pairs", rows)
        fill_s = time.perf_counter() - t0
        lat, dec = [], []
        for j in range(n_claims):
            t0 = time.perf_counter()
            card = claim_next(store, f"reviewer-{j % 3}")
            lat.append(time.perf_counter() - t0)
            assert card is not None
            t0 = time.perf_counter()
            decide(store, DecisionIn(pair_id=card.pair_id, action="accept" if j % 2 else "reject",
                                     reviewer=f"reviewer-{j % 3}"))
            dec.append(time.perf_counter() - t0)
    finally:
        store.close()
    ms = lambda a, q: round(float(np.percentile(a, q)) * 1000, 1)  # noqa: E731
    return {"pending": n_pending, "claims": n_claims, "fill_s": round(fill_s, 1),
            "claim_next_ms_p50": ms(lat, 50), "claim_next_ms_p95": ms(lat, 95),
            "decide_ms_p50": ms(dec, 50), "decide_ms_p95": ms(dec, 95)}


# LLM generation --------------------------------------------------------------------------------
def bench_llm(texts: list[str], latency: float = 0.2, n: int = 256) -> dict[str, Any]:
    import openai

    sys.path.insert(0, str(ROOT))
    from tests.openai_server import MODEL, FakeOpenAI

    from loop.generators import llm_pairs
    from loop.llm import LLMClient, LLMSettings
    from loop.prompts import fence, load_prompt
    from loop.records import Passage

    server = FakeOpenAI().start()
    server.latency = latency
    try:
        passages = [Passage(passage_id=f"p{i}", text=t, n_tokens=len(t.split())) for i, t in enumerate(texts[:n])]
        prompt = load_prompt("generate_queries")
        # Sequential: one plain SDK call after another, the way a script would do it.
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-bench", max_retries=0)
        n_seq = min(16, n)
        t0 = time.perf_counter()
        for p in passages[:n_seq]:
            msgs = prompt.render(domain="aeronautics", examples="", passage=fence(p.text, "passage"), n=3)
            client.chat.completions.create(model=MODEL, messages=msgs, response_format={"type": "json_object"})
        seq_rate = n_seq / (time.perf_counter() - t0)
        out: dict[str, Any] = {"server_latency_s": latency, "passages": len(passages),
                               "sequential_passages_s": round(seq_rate, 2)}
        for label, kw in (("defaults", {}), ("concurrency_32_rpm_60000", {"concurrency": 32, "requests_per_minute": 60000})):
            llm = LLMClient(LLMSettings(base_url=server.base_url, model=MODEL, **kw))
            t0 = time.perf_counter()
            results, _ = llm_pairs(llm, passages, domain="aeronautics", per_passage=3)
            secs = time.perf_counter() - t0
            failed = sum(isinstance(r, Exception) for r in results)
            s = llm.settings
            out[label] = {"concurrency": s.concurrency, "requests_per_minute": s.requests_per_minute,
                          "passages_s": _rate(len(passages), secs), "ratio_vs_sequential": round(len(passages) / secs / seq_rate, 2),
                          "failed": failed}
        return out
    finally:
        server.stop()


# Demo round ------------------------------------------------------------------------------------
def bench_demo(workdir: Path) -> dict[str, Any]:
    """One round as a new user runs it: the app's first-start demo (corpus + query log), generate
    and select, every queued card accepted (the largest training set the default budget allows),
    then the Train button: train -> evaluate -> promote -> re-index."""
    from bench.common import n_train, trainer_summary
    from loop.demo import ingest_demo
    from loop.review import DecisionIn, decide, pending
    from loop.rounds import Rounds
    from loop.workspace import Workspace

    with Workspace.open(workdir) as ws:
        t0 = time.perf_counter()
        report, queries = ingest_demo(ws)
        ingest_s = time.perf_counter() - t0
        loop = Rounds(ws)
        t0 = time.perf_counter()
        loop.advance(until="review")
        to_review_s = time.perf_counter() - t0
        cards = pending(ws.store, limit=loop.config.review_budget)
        for card in cards:
            decide(ws.store, DecisionIn(pair_id=card.pair_id, action="accept", reviewer="bench"))
        t1 = time.perf_counter()
        r = loop.advance(until="done", force=True)
        train_to_done_s = time.perf_counter() - t1
        steps = {k: v.get("seconds") for k, v in r.manifest.steps.items()}
        train = r.manifest.steps.get("train", {})
    return {"passages": report.passages_added, "logged_queries": queries.queries_added,
            "ingest_s": round(ingest_s, 1), "reviewed": len(cards), "state": r.state,
            "round_s": round(to_review_s + train_to_done_s, 1), "train_to_done_s": round(train_to_done_s, 1),
            "steps_s": steps, "train_pairs": r.manifest.train_config and n_train(loop.run_dir(r)),
            "peak_rss_mb": train.get("peak_rss_mb"),
            "trainer": trainer_summary(train),
            "promoted": bool(r.manifest.promotion and r.manifest.promotion.promote), "target_s": 120}


def _save(path: Path | None, out: dict[str, Any]) -> None:
    """Write what is measured so far: a later part that fails keeps the earlier figures."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a BEIR folder whose corpus supplies passages")
    p.add_argument("--passages", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="encode: timed passes per arm, in turn (median kept)")
    p.add_argument("--train-pairs", type=int, default=256)
    p.add_argument("--train-negatives", action="store_true", help="train on triplets (a negative per pair)")
    p.add_argument("--backends", nargs="*", default=["torch", "onnx", "onnx-int8", "st-onnx", "st-onnx-O3",
                                                     "st-onnx-qint8", "st-onnx-O3-qint8"])
    p.add_argument("--st-onnx-site", default=os.environ.get("EMBEDLOOP_ST_ONNX_SITE"),
                   help="a folder with sentence-transformers 5 + optimum-onnx, first on the library arms' PYTHONPATH "
                        "(default: EMBEDLOOP_ST_ONNX_SITE; bench/README.md)")
    p.add_argument("--reindex-backend", default="onnx-int8")
    p.add_argument("--only", nargs="*", default=["encode", "reindex", "train", "review", "llm", "demo"])
    p.add_argument("--pending", type=int, default=100_000)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out: dict[str, Any] = {"machine": machine(), "command": "python -m bench.speed " + " ".join(argv or sys.argv[1:])}
    texts = corpus_texts(args.data, args.passages)
    with scratch("bench-speed-") as tmp:
        cache = tmp / "onnx-cache"
        if "encode" in args.only:
            out["encode"] = bench_encode(texts, args.backends, cache, data=args.data, st_onnx_site=args.st_onnx_site,
                                         repeats=args.repeats)
            print("encode", json.dumps(out["encode"]), flush=True)
            _save(args.out, out)
        if "reindex" in args.only:
            out["reindex"] = bench_reindex(texts, args.reindex_backend, cache, tmp / "reindex")
            print("reindex", json.dumps(out["reindex"]), flush=True)
            _save(args.out, out)
        if "train" in args.only:
            from bench.common import Beir

            rows: list[dict[str, str]] = []
            if args.data and (args.data / "qrels" / "train.tsv").is_file():
                beir = Beir.read(args.data, ("train",))
                rows = [{"anchor": a, "positive": b} for a, b in beir.gold_pairs("train", skip_empty=True)]
            rows = (rows or [{"anchor": t[:60], "positive": t} for t in texts])[: args.train_pairs]
            if args.train_negatives:  # triplets, as the loop trains: the next row's positive as the negative
                rows = [{**r, "negative": rows[(i + 1) % len(rows)]["positive"]} for i, r in enumerate(rows)]
            out["train"] = bench_train(rows, tmp / "train")
            print("train", json.dumps(out["train"]), flush=True)
            _save(args.out, out)
        if "review" in args.only:
            out["review"] = bench_review(tmp, args.pending)
            print("review", json.dumps(out["review"]), flush=True)
            _save(args.out, out)
        if "llm" in args.only:
            out["llm"] = bench_llm(texts)
            print("llm", json.dumps(out["llm"]), flush=True)
            _save(args.out, out)
        if "demo" in args.only:
            out["demo"] = bench_demo(tmp / "demo")
            print("demo", json.dumps(out["demo"]), flush=True)
            _save(args.out, out)
    out["machine"]["load_avg_1m_end"] = machine()["load_avg_1m"]
    _save(args.out, out)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
