"""Quality benchmark: the real loop against four controls at the same label budget.

    python -m bench.quality --data DIR --budget N --rounds R --out FILE.json [--seed-pairs K]
                            [--generator offline|llm] [--skip ARM ...]

Protocol (any BEIR folder): ingest the corpus into a temporary workspace; import K seed pairs
drawn from qrels/train and the train queries as a query log; run R rounds of the real loop
(`Rounds.advance`) with `SimulatedReviewer` answering from qrels/train, N reviews in all;
judge each round's candidate model on qrels/test only. Controls, same budget, same run:
(a) the off-the-shelf model; (b) the same loop with routing replaced by a uniform random
choice of which candidates are reviewed (every candidate is a random-control card, nothing
auto-accepted or dropped); (c) the stock sentence-transformers fine-tune (MNRL, batch 32,
1 epoch, defaults) on N random gold train pairs; (d) BM25. NDCG uses exponential gains
(2**grade - 1) throughout; see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (GAIN, Beir, SimulatedReviewer, Timer, bm25_report, machine, sample, stock_finetune,
                          summary, vs)
from loop.config import bundled_model_path
from loop.embed import Embedder
from loop.evaluate import EvalReport, EvalSet, evalset_from_beir, evaluate


def _eval(emb: Any, evalset: EvalSet) -> EvalReport:
    return evaluate(emb, evalset, k=100, dims=(None,), gain=GAIN)


def ingested(beir: Beir, workdir: Path) -> Path:
    """A closed workspace holding the ingested corpus: every arm starts from a copy of it, so the
    corpus is chunked and encoded once per benchmark instead of once per arm."""
    from loop.workspace import Workspace

    if not (workdir / "embedloop.duckdb").exists():
        with Workspace.open(workdir) as ws:
            ws.ingest([beir.folder])
    return workdir


def run_loop(beir: Beir, evalset: EvalSet, base: EvalReport, *, budget: int, rounds: int, workdir: Path,
             seed_pairs: int = 0, generator: str = "offline", random_control: bool = False, seed: int = 0,
             loop_overrides: dict[str, Any] | None = None, log=print, embedder_factory=None,
             template: Path | None = None) -> dict[str, Any]:
    """R rounds of the real loop with the simulated reviewer; per-round test figures.

    `template`: an `ingested` workspace to start from (copied); None = ingest here.
    `embedder_factory(path, version)` replaces `Embedder` for the test evaluation (tests pass a fake).
    """
    from loop.rounds import LoopConfig, Rounds
    from loop.workspace import Workspace

    t0 = time.perf_counter()
    if template is not None:
        shutil.copytree(template, workdir)
    ws = Workspace.open(workdir)
    try:
        if embedder_factory is not None:  # tests: the workspace's models are fakes too
            ws._embedders[ws.base_version] = embedder_factory(ws.settings.base_model_path, ws.base_version)
        if template is None:
            ws.ingest([beir.folder])
        if seed_pairs:
            ws.import_pairs(beir.folder, split="train", limit=seed_pairs, seed=seed)
        ws.import_queries(beir.folder, split="train")
        llm = None
        if generator == "llm":
            llm = ws.llm()
            if llm is None:
                raise SystemExit("--generator llm needs an endpoint: set EMBEDLOOP_LLM_BASE_URL and EMBEDLOOP_LLM_MODEL.")
        overrides = dict(loop_overrides or {})
        if random_control:
            overrides["routing"] = {**overrides.get("routing", {}), "random_fraction": 1.0}
        reviewer = SimulatedReviewer(ws, beir.queries, beir.qrels["train"], k=overrides.get("k", 20))
        reviews = 0
        out_rounds = []
        for n in range(1, rounds + 1):
            per_round = math.ceil((budget - reviews) / (rounds - n + 1))
            cfg = LoopConfig(**{**overrides, "review_budget": max(0, per_round), "seed": seed})
            loop = Rounds(ws, cfg, log=lambda m: log(f"    [{'random' if random_control else 'loop'} r{n}] {m}"),
                          llm=llm)
            loop.advance(until="review")
            reviews += reviewer.review(max(0, budget - reviews))
            r = loop.advance(until="done", force=True)
            if r["state"] == "train":  # a killed trainer (e.g. the OOM killer) pauses the round: resume once
                log(f"  round {n}: training stopped without a result; resuming from its last checkpoint")
                r = loop.advance(until="done", force=True)
            if r["state"] != "done":
                raise RuntimeError(f"round {n} stopped at {r['state']}: {r['manifest'].get('failure') or r.get('error')}")
            model = r["manifest"]["model"]
            emb = (embedder_factory or Embedder)(model["path"], model["version"])
            report = _eval(emb, evalset)
            promoted = bool(r["manifest"].get("promotion", {}).get("promote"))
            row = {"round": n, "reviews": reviews, **summary(report, base), "promoted": promoted,
                   "train_pairs": r["manifest"].get("train_config") and _n_train(loop.run_dir(r)),
                   "decisions": dict(reviewer.counts), "select": r["manifest"]["steps"].get("select", {}),
                   "internal_eval": {k: round(v, 4) for k, v in r["manifest"].get("metrics", {}).get("candidate", {}).items()
                                     if k in ("ndcg@10",)}}
            row["_report"] = report
            out_rounds.append(row)
            log(f"  {'random' if random_control else 'loop'} round {n}: {reviews} reviews, NDCG@10 "
                f"{report.metrics['ndcg@10']:.4f} (base {base.metrics['ndcg@10']:.4f}), promoted={promoted}")
        return {"rounds": out_rounds, "wall_s": round(time.perf_counter() - t0, 1)}
    finally:
        ws.close()


def _n_train(run: Path) -> int | None:
    try:
        return json.loads((run / "snapshot.json").read_text())["n_train"]
    except (OSError, ValueError, KeyError):
        return None


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--budget", required=True, type=int, help="reviews (labels) in all")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed-pairs", type=int, default=0, help="gold train pairs imported before round 1")
    p.add_argument("--generator", choices=["offline", "llm"], default="offline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["loop", "random", "stock", "bm25"])
    p.add_argument("--loop-config", type=json.loads, default={}, help="LoopConfig overrides as JSON (tuning)")
    p.add_argument("--eval-split", default="test", help="judge split (test; a dev split when tuning)")
    p.add_argument("--train-split", default="train", help="qrels split the reviewer and (c) draw from")
    p.add_argument("--workdir", type=Path, default=None, help="where temporary workspaces go (deleted after)")
    p.add_argument("--dev-split", type=float, default=0.0,
                   help="tuning: judge on this share of the TRAIN queries (as 'test') and draw labels from the "
                        "rest; qrels/test is not read")
    args = p.parse_args(argv)
    dev_root: Path | None = None
    if args.dev_split:
        from bench.common import make_dev_split

        dev_root = Path(tempfile.mkdtemp(prefix="bench-dev-", dir=args.workdir))
        args.data = make_dev_split(args.data, dev_root / args.data.name, args.dev_split, args.seed)

    t_all = time.perf_counter()
    timer = Timer()
    beir = Beir.read(args.data, splits=tuple(dict.fromkeys((args.train_split, args.eval_split))))
    if args.train_split != "train":
        beir.qrels["train"] = beir.qrels[args.train_split]
    evalset = evalset_from_beir(args.data, args.eval_split)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quality-", dir=args.workdir))
    log = lambda m: print(m, flush=True)  # noqa: E731
    result: dict[str, Any] = {"dataset": args.data.name, "budget": args.budget, "n_rounds": args.rounds,
                              "seed_pairs": args.seed_pairs, "generator": args.generator, "gain": GAIN,
                              "eval_split": args.eval_split, "n_test_queries": len(evalset.query_ids),
                              "loop_config": args.loop_config, "machine": machine(),
                              "encode_backend": Embedder(bundled_model_path(), "base").backend}
    try:
        base_path = bundled_model_path()
        with timer("base"):
            base = _eval(Embedder(base_path, "base"), evalset)
        result["base"] = summary(base)
        log(f"base NDCG@10 {base.metrics['ndcg@10']:.4f}")
        reports: dict[str, EvalReport] = {"base": base}
        if "bm25" not in args.skip:
            with timer("bm25"):
                bm = bm25_report(beir, evalset, base)
            result["bm25"] = summary(bm, base)
            reports["bm25"] = bm
            log(f"bm25 NDCG@10 {bm.metrics['ndcg@10']:.4f}")
        if "stock" not in args.skip:
            with timer("stock_finetune"):
                pairs = sample(beir.gold_pairs("train"), args.budget, args.seed)
                model = stock_finetune(base_path, pairs, tmp / "stock", seed=args.seed)
                st = _eval(Embedder(model, "stock"), evalset)
            result["stock_finetune"] = {**summary(st, base), "train_pairs": len(pairs)}
            reports["stock"] = st
            log(f"stock fine-tune ({len(pairs)} gold pairs) NDCG@10 {st.metrics['ndcg@10']:.4f}")
        common = dict(budget=args.budget, rounds=args.rounds, seed_pairs=args.seed_pairs, generator=args.generator,
                      seed=args.seed, loop_overrides=args.loop_config, log=log)
        if {"loop", "random"} - set(args.skip):
            with timer("ingest"):
                common["template"] = ingested(beir, tmp / "ingested")
        if "loop" not in args.skip:
            with timer("loop"):
                lp = run_loop(beir, evalset, base, workdir=tmp / "loop", **common)
            result["rounds"] = _strip(lp["rounds"])
            reports["loop"] = lp["rounds"][-1]["_report"]
        if "random" not in args.skip:
            with timer("random_control"):
                rc = run_loop(beir, evalset, base, workdir=tmp / "random", random_control=True, **common)
            result["random_control"] = {**{k: v for k, v in rc["rounds"][-1].items() if not k.startswith("_")},
                                        "rounds": _strip(rc["rounds"])}
            reports["random"] = rc["rounds"][-1]["_report"]
        # Per-query values, so runs of separate invocations can still be compared with intervals.
        result["per_query_ndcg@10"] = {"query_ids": list(base.query_ids),
                                       **{n: [round(v, 5) for v in r.per_query["ndcg@10"]] for n, r in reports.items()}}
        if "loop" in reports:
            result["loop_vs"] = {name: vs(reports[name], reports["loop"]) for name in reports if name != "loop"}
            lv = result["loop_vs"]
            result["targets"] = {
                "beats_all_controls": all(lv[n]["delta"] > 0 for n in lv),
                "beats_stock_by_0.03_ci_excludes_0": bool(
                    "stock" in lv and lv["stock"]["delta"] >= 0.03 and lv["stock"]["ci95"][0] > 0),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if dev_root is not None:
            shutil.rmtree(dev_root, ignore_errors=True)
    result["wall_s"] = {**timer.t, "total": round(time.perf_counter() - t_all, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    log(json.dumps({k: result[k] for k in ("base", "bm25", "stock_finetune", "rounds", "loop_vs", "targets", "wall_s")
                    if k in result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
