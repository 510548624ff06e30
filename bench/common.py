"""Shared pieces of the benchmarks: BEIR reading, the simulated reviewer, the controls.

The simulated reviewer stands in for a person in `bench.quality`: it answers from a BEIR
`qrels/train.tsv` (never the test split), at document level. A card is accepted when its
positive passage belongs to a document judged relevant to that query (queries matched by
text); otherwise, when one of the model's top-k passages for the anchor belongs to such a
document, it is picked (the shown passage becomes a hard negative); otherwise rejected. A
synthetic query that is not a judged query has no answer in the qrels: it is rejected,
which is pessimistic (a person would accept a good synthetic query) and is said in the README.
With a seed, it decides the cards it is given (the queue's highest-priority ones) in a seeded
order, so seeds differ in which cards a pick answers without a review.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from loop.evaluate import EvalReport, compare
from loop.metrics import Gain, ir_metrics, metric_names
from loop.procs import pid_alive
from loop.readers import iter_jsonl, read_qrels
from loop.review import REVIEW_SHOWN, DecisionIn, ReviewConflict, decide, pending

MAX_BYTES = 8 * 2**30
GAIN: Gain = "exponential"  # matches the cranfield reference (0.355); scifact's grades are all 1


def norm(text: str) -> str:
    return " ".join(text.lower().split())


# BEIR ------------------------------------------------------------------------------------------
@dataclass
class Beir:
    """A BEIR folder read once: corpus texts (title + text, as ingest builds them), queries, qrels."""

    folder: Path
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str | Path, splits: tuple[str, ...] = ("train", "test")) -> Beir:
        folder = Path(folder)
        corpus: dict[str, str] = {}
        for _, rec in iter_jsonl(folder / "corpus.jsonl", MAX_BYTES):
            title, text = rec.get("title") or "", rec.get("text") or ""
            corpus.setdefault(str(rec["_id"]), f"{title}\n\n{text}" if title else text)
        queries = {str(r["_id"]): r["text"].strip() for _, r in iter_jsonl(folder / "queries.jsonl", MAX_BYTES)}
        qrels: dict[str, dict[str, dict[str, float]]] = {}
        for split in splits:
            if (folder / "qrels" / f"{split}.tsv").is_file():
                q: dict[str, dict[str, float]] = {}
                for _, qid, cid, score in read_qrels(folder, split, MAX_BYTES):
                    q.setdefault(qid, {})[cid] = score
                qrels[split] = q
        return cls(folder, corpus, queries, qrels)

    def gold_pairs(self, split: str = "train", skip_empty: bool = False) -> list[tuple[str, str]]:
        """(query text, document text) for every judged-relevant pair of `split` in the corpus;
        `skip_empty`: without pairs whose query or document has no text (the project's trainer refuses them)."""
        return [(self.queries[q], self.corpus[d]) for q, docs in sorted(self.qrels[split].items())
                for d in sorted(docs) if d in self.corpus and q in self.queries
                and (not skip_empty or (self.queries[q].strip() and self.corpus[d].strip()))]


def make_dev_split(src: Path, dst: Path, fraction: float, seed: int = 0) -> Path:
    """A BEIR folder for tuning: `fraction` of the TRAIN queries become its 'test' (a dev set),
    the rest its 'train'. The corpus and queries are linked, not copied; qrels/test is never read."""
    src, dst = Path(src), Path(dst)
    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (dst / name).exists():
            (dst / name).symlink_to((src / name).resolve())
    rows = read_qrels(src, "train", MAX_BYTES)
    qids = sorted({q for _, q, _, _ in rows})
    dev = set(random.Random(seed).sample(qids, max(1, round(len(qids) * fraction))))
    for split, keep in (("train", lambda q: q not in dev), ("test", lambda q: q in dev)):
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g:g}" for _, q, d, g in rows if keep(q)]
        (dst / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


# The simulated reviewer --------------------------------------------------------------------------
class SimulatedReviewer:
    """Answers review cards from judged qrels, at document level (see the module docstring).

    Args:
        ws: the workspace (its store, and `ws.search` for the shown top-k).
        queries, qrels: the judged queries and their relevant documents (train split only).
        k: how many passages the reviewer is shown for a pick.
        seed: the order in which it decides the cards it takes (None: queue order).
        pool: the card's passages (`LoopConfig.review_pool`), as the app shows them.
    """

    name = "simulated-qrels"

    def __init__(self, ws: Any, queries: dict[str, str], qrels: dict[str, dict[str, float]], k: int = REVIEW_SHOWN,
                 seed: int | None = None, pool: str = "interleaved"):
        self.ws = ws
        self.k = k
        self.pool = pool
        self.rng = random.Random(seed) if seed is not None else None
        self.relevant: dict[str, set[str]] = {}
        for qid, docs in qrels.items():
            if qid in queries:
                self.relevant.setdefault(norm(queries[qid]), set()).update(d for d, g in docs.items() if g > 0)
        self.counts = {"accept": 0, "pick": 0, "reject": 0, "passages_judged": 0, "positives": 0}

    def answer(self, anchor: str, positive_id: str | None) -> tuple[str, list[str], list[str]]:
        """(outcome, marked passage ids, shown passage ids) for one card.

        A judged query is reviewed as the app shows it: the card's own passage and `k`
        (`REVIEW_SHOWN`) more of its review pool, every one that belongs to a relevant document marked. Outcome:
        accept (its own passage marked), pick (only others marked) or reject (none marked). A
        query with no judgement (synthetic) is rejected on sight of its own passage."""
        rel = self.relevant.get(norm(anchor))
        own = [positive_id] if positive_id else []
        if not rel:
            return "reject", [], own  # a mark of nothing: its own passage becomes a negative, as a reject would
        pool = self.ws.review_pool([anchor], self.k + 1, self.pool)[0]
        shown = own + [h.passage_id for h in pool if h.passage_id != positive_id][:self.k]
        docs = self.ws.store.docs_of_passages(shown)
        marked = [p for p in shown if set(docs.get(p, [])) & rel]
        outcome = "accept" if positive_id in marked else "pick" if marked else "reject"
        return outcome, marked, shown

    def order(self, limit: int) -> list[Any]:
        """The `limit` highest-priority pending cards, in the order this reviewer decides them."""
        cards = pending(self.ws.store, limit=limit)
        if self.rng is not None:
            self.rng.shuffle(cards)
        return cards

    def review(self, limit: int) -> int:
        """Decide up to `limit` pending cards (the highest-priority ones); returns how many.

        `counts` keeps the outcomes, `passages_judged` (every passage shown) and `positives`
        (passages marked relevant): one review judges several passages."""
        done = 0
        while done < limit:
            cards = self.order(limit - done)  # a mark can answer cards further down the queue: fetch again
            decided = self._decide(cards) if cards else 0
            if not decided:
                break
            done += decided
        return done

    def _decide(self, cards: list[Any]) -> int:
        done = 0
        for card in cards:
            outcome, marked, shown = self.answer(card.anchor, card.positive_id)
            decision = DecisionIn(pair_id=card.pair_id, action="mark", reviewer=self.name, passage_ids=marked,
                                  shown=shown)
            try:
                decide(self.ws.store, decision)
            except ReviewConflict:
                continue
            self.counts[outcome] += 1
            self.counts["passages_judged"] += len(shown)
            self.counts["positives"] += len(marked)
            done += 1
        return done


# Metrics ---------------------------------------------------------------------------------------
def summary(report: EvalReport, base: EvalReport | None = None) -> dict[str, Any]:
    """The figures a bench JSON holds for one system (and its 95% CI vs the base, if given)."""
    out: dict[str, Any] = {m: round(report.metrics[m], 4) for m in ("ndcg@10", "recall@100", "mrr@10")}
    if base is not None:
        c = compare(base, report)
        out["delta_vs_base"] = round(c.delta, 4)
        out["ci95_vs_base"] = [round(c.ci_low, 4), round(c.ci_high, 4)]
    return out


def vs(a: EvalReport, b: EvalReport) -> dict[str, Any]:
    """b - a on NDCG@10, paired over test queries."""
    c = compare(a, b)
    return {"delta": round(c.delta, 4), "ci95": [round(c.ci_low, 4), round(c.ci_high, 4)], "significant": c.significant}


def pooled_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of `b - a` over seeds and queries, and its 95% interval from resampling both.

    `a` and `b` are (seeds x queries) arrays of one metric: row s is seed s's run, column q the
    same test query in every row. Each resample draws seeds and queries with replacement (a
    two-way bootstrap), so the interval covers both the seed-to-seed spread of training and the
    choice of test queries; with one seed it is the usual paired bootstrap over queries.

    Returns:
        (mean difference, 2.5th percentile, 97.5th percentile). Deterministic for a seed.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"pooled_bootstrap needs two seeds x queries arrays of one shape, got {a.shape} "
                         f"and {b.shape}.")
    diff = b - a
    n_seeds, n_queries = diff.shape
    rng = np.random.default_rng(seed)
    seed_w = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot).astype(np.float64)
    query_w = rng.multinomial(n_queries, np.full(n_queries, 1 / n_queries), size=n_boot).astype(np.float64)
    means = ((seed_w @ diff) * query_w).sum(axis=1) / (n_seeds * n_queries)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def _ndcg_in_order(report: EvalReport, order: list[str]) -> list[float]:
    """The report's per-query NDCG@10 in `order`; a report judged on other queries is an error."""
    if set(report.query_ids) != set(order):
        raise ValueError(f"{report.model_version} was judged on other queries; evaluate every seed alike.")
    pos = {q: i for i, q in enumerate(report.query_ids)}
    return [report.per_query["ndcg@10"][pos[q]] for q in order]


def _vs(delta: float, lo: float, hi: float) -> dict[str, Any]:
    return {"delta": round(delta, 4), "ci95": [round(lo, 4), round(hi, 4)], "significant": bool(lo > 0 or hi < 0)}


def pooled_vs(a: list[EvalReport], b: list[EvalReport]) -> dict[str, Any]:
    """`vs` over several seeds: b - a on NDCG@10, `a[s]` and `b[s]` being seed s's reports."""
    order = list(a[0].query_ids)
    rows = [np.asarray([_ndcg_in_order(r, order) for r in reports], dtype=np.float64) for reports in (a, b)]
    return _vs(*pooled_bootstrap(*rows))


def stratified_bootstrap(diffs: list[np.ndarray], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-query differences pooled over seeds judged on different queries (each seed's
    own dev split), and its 95% interval from resampling queries within each seed (seeds are
    strata, not resampled: their query sets cannot be lined up).

    Returns:
        (mean difference over every seed's queries, 2.5th percentile, 97.5th percentile).
    """
    diffs = [np.asarray(d, dtype=np.float64) for d in diffs]
    if not diffs or any(d.ndim != 1 or d.size == 0 for d in diffs):
        raise ValueError("stratified_bootstrap needs one non-empty vector of per-query differences per seed.")
    rng = np.random.default_rng(seed)
    total = sum(d.size for d in diffs)
    sums = sum(rng.multinomial(d.size, np.full(d.size, 1 / d.size), size=n_boot) @ d for d in diffs)
    lo, hi = np.percentile(sums / total, [2.5, 97.5])
    return float(np.concatenate(diffs).mean()), float(lo), float(hi)


def paired_vs(a: list[EvalReport], b: list[EvalReport]) -> dict[str, Any]:
    """b - a on NDCG@10 over seeds, `a[s]` and `b[s]` being seed s's reports on the same queries:
    `pooled_vs` when every seed was judged on the same queries, else the stratified bootstrap
    (each seed on its own dev split)."""
    if len({frozenset(r.query_ids) for r in a}) == 1:
        return pooled_vs(a, b)
    diffs = [np.subtract(_ndcg_in_order(rb, list(ra.query_ids)), ra.per_query["ndcg@10"]) for ra, rb in zip(a, b, strict=True)]
    return _vs(*stratified_bootstrap(diffs))


_DROP = object()


def seed_means(items: list[Any]) -> Any:
    """Per-seed results folded into one, in the same keys: a number becomes its mean over seeds
    (4 decimals; a number all seeds share stays as it is), a bool the share of seeds where it
    holds; dicts and lists of one length are
    folded entry by entry; anything else (a model version, say) stays when every seed has the
    same value and is left out otherwise, as is a key some seed lacks."""
    out = _fold(items)
    return None if out is _DROP else out


def _fold(items: list[Any]) -> Any:
    if all(type(v) in (int, float) for v in items) and len(set(items)) == 1:
        return items[0]  # a round number, a budget, a learning rate: the same in every seed
    if all(isinstance(v, bool) for v in items) or all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in items):
        return round(float(np.mean([float(v) for v in items])), 4)
    if all(isinstance(v, dict) for v in items):
        keys = [k for k in items[0] if all(k in v for v in items)]
        folded = {k: _fold([v[k] for v in items]) for k in keys}
        return {k: v for k, v in folded.items() if v is not _DROP}
    if all(isinstance(v, list) for v in items) and len({len(v) for v in items}) == 1:
        folded = [_fold([v[i] for v in items]) for i in range(len(items[0]))]
        return _DROP if any(v is _DROP for v in folded) else folded
    return items[0] if all(v == items[0] for v in items) else _DROP


def report_from_rankings(name: str, template: EvalReport, ranked: list[list[str]],
                         qrels: list[dict[str, float]], gain: Gain = GAIN) -> EvalReport:
    """An EvalReport for a non-embedding system (BM25), comparable with `template`'s."""
    per = ir_metrics(ranked, qrels, (1, 5, 10, 100), gain=gain)
    return EvalReport(
        model_version=name, evalset=template.evalset, evalset_fingerprint=template.evalset_fingerprint,
        n_queries=template.n_queries, n_docs=template.n_docs, dim=0, k=100,
        metrics={m: float(per[m].mean()) for m in metric_names()}, per_query={m: v.tolist() for m, v in per.items()},
        query_ids=list(template.query_ids), gain=gain,
    )


# Controls --------------------------------------------------------------------------------------
def bm25_report(beir: Beir, evalset: Any, template: EvalReport) -> EvalReport:
    """BM25 (`loop.lexical.Lexical`: bm25s, English stopwords, default k1/b) on the eval set's corpus."""
    from loop.lexical import Lexical

    ranked = Lexical(list(evalset.passage_ids), list(evalset.passages)).search(list(evalset.queries), 100)
    return report_from_rankings("bm25", template, ranked, [evalset.qrels[q] for q in evalset.query_ids])


def stock_finetune(base_model: str | Path, pairs: list[tuple[str, str]], out_dir: Path, seed: int = 0,
                   batch_size: int = 32, epochs: int = 1) -> Path:
    """The stock sentence-transformers recipe: MNRL, batch 32, 1 epoch, trainer defaults otherwise."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(base_model), device="cpu", local_files_only=True)
    data = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    args = Args(output_dir=str(out_dir / "checkpoints"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                seed=seed, report_to="none", disable_tqdm=True, save_strategy="no", logging_strategy="no",
                dataloader_num_workers=0)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=MultipleNegativesRankingLoss(model))
    trainer.train()
    model.save(str(out_dir / "model"))
    return out_dir / "model"


def n_train(run: Path) -> int | None:
    """How many rows a round's trainer had (its snapshot.json), or None."""
    try:
        return json.loads((run / "snapshot.json").read_text())["n_train"]
    except (OSError, ValueError, KeyError):
        return None


def trainer_summary(train_step: dict[str, Any]) -> dict[str, Any]:
    """Where a round's train step went: a round manifest's `train` step, less the WiSE-FT record."""
    return {k: train_step.get(k) for k in ("train_seconds", "steps", "epochs_run", "stopped_early", "batch_size",
                                           "learning_rate", "max_seq_length", "pairs_per_second", "precision")} | {
        "wise_s": (train_step.get("wise") or {}).get("seconds")}


def sample(items: list[Any], n: int, seed: int) -> list[Any]:
    return random.Random(seed).sample(items, min(n, len(items)))


# Provenance ------------------------------------------------------------------------------------
def probe_args(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The arguments every train-split probe (bench.pseudo, bench.pool) takes: --data, --split, --out."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--split", default="train", help="a qrels split to measure on (never test when tuning)")
    p.add_argument("--out", type=Path, default=None)
    return p


def emit(result: dict[str, Any], out: Path | None) -> int:
    """A probe's result with the machine it ran on: printed, and written to `out` when given."""
    text = json.dumps({**result, "machine": machine()}, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")
    return 0


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """A benchmark's result, as written to the file its `--out` names (nothing when there is none)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")


def machine() -> dict[str, Any]:
    import torch

    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent.parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg_1m": round(load[0], 2), "python": platform.python_version(),
            "torch": torch.__version__, "commit": commit}


@contextmanager
def scratch(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A temporary folder for a benchmark's workspaces, removed when the block ends: also when the
    run is stopped with SIGTERM or SIGHUP (`kill`, a closed terminal), which Python does not unwind
    by itself, as it does Ctrl-C; killed runs used to leave their workspaces (GBs) behind.
    Processes working in the folder (a round's trainer runs in its own session, so that a UI reload
    does not kill it) are stopped first."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, _exit_on_signal)
    try:
        yield path
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_processes_in(path)
        shutil.rmtree(path, ignore_errors=True)


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: `finally` blocks run, the exit code says which signal


def stop_processes_in(folder: Path, grace_s: float = 10.0) -> list[int]:
    """Stop every process (with its process group, when it leads one) whose working directory is
    in `folder`: SIGTERM, then SIGKILL to those still alive after `grace_s`. Linux only (reads
    /proc); returns the pids found."""
    root = os.path.realpath(folder)
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or not ours to read
            continue
        if int(entry.name) != os.getpid() and (cwd == root or cwd.startswith(root + os.sep)):
            found.append(int(entry.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in found if _alive(pid)]  # never signal a pid that died (and may be reused)
        for pid in alive:
            try:
                os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline and any(_alive(pid) for pid in alive):
            time.sleep(0.1)
    return found


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    return pid_alive(pid)


class Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = round(timer.t.get(name, 0.0) + time.perf_counter() - self.t0, 1)

        return _T()
