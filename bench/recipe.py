"""Training recipe arms on a dev split: what the trainer's defaults cost and give.

    python -m bench.recipe --data DIR [--pairs 200] [--dev-split 0.3] [--seeds 2] [--arms JSON] [--out FILE.json]

A dev split of the TRAIN queries judges (`make_dev_split`: `qrels/test` is never read); N gold
(query, relevant document) pairs drawn per seed from the other train queries are the labels. An
arm may set its own `pairs` (e.g. every gold pair of the train queries: how far more labels take
the model), drawn with the same seed; the others train on the same pairs. Each trains with the
product's own trainer, started as the loop starts it (`loop.train.run_to_end`: a `python -m
loop.trainer` subprocess, so its peak RSS is the trainer's alone), and is judged on the dev queries
with the workspace default encoder; arms run side by side in one run, per seed, and the table
gives each arm's dev NDCG@10, its paired interval against the base (and against the first arm)
pooled over seeds and queries, training seconds and the trainer's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import GAIN, Beir, machine, make_dev_split, pooled_vs, sample, scratch, write_json
from loop import train
from loop.config import bundled_model_path
from loop.embed import Embedder
from loop.evalsets import evalset_from_beir
from loop.evaluate import evaluate

ARMS = {
    "seq256-3ep-lr3e-5": {"max_seq_length": 256, "epochs": 3, "learning_rate": 3e-5},
    "seq128-3ep-lr3e-5": {"max_seq_length": 128, "epochs": 3, "learning_rate": 3e-5},
    "seq128-1ep-lr5e-5": {"max_seq_length": 128, "epochs": 1, "learning_rate": 5e-5},
}


def run(data: Path, pairs: int, dev_split: float, seeds: int, arms: dict[str, dict[str, Any]], log=print) -> dict:
    base_path = bundled_model_path()
    with scratch("bench-recipe-") as tmp_path:
        dev = make_dev_split(data, tmp_path / "dev" / data.name, dev_split, seed=0)
        beir = Beir.read(dev, splits=("train",))
        evalset = evalset_from_beir(dev, "test")
        base = evaluate(Embedder(base_path, "base"), evalset, k=100, dims=(None,), gain=GAIN)
        log(f"base: dev NDCG@10 {base.metrics['ndcg@10']:.4f} on {len(evalset.query_ids)} dev queries")
        reports: dict[str, list] = {name: [] for name in arms}
        timing: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
        gold = beir.gold_pairs("train", skip_empty=True)
        for seed in range(seeds):
            for name, arm in arms.items():
                overrides = {k: v for k, v in arm.items() if k != "pairs"}
                rows = [{"anchor": a, "positive": p} for a, p in sample(gold, arm.get("pairs", pairs), seed)]
                run_dir = tmp_path / f"{name}-s{seed}"
                train.write_snapshot(run_dir, rows, None, {"base_model": str(base_path), "seed": seed, **overrides})
                t0 = time.perf_counter()
                result = train.run_to_end(run_dir)
                wall = time.perf_counter() - t0
                report = evaluate(Embedder(result["model_dir"], f"{name}-s{seed}"), evalset, k=100, dims=(None,),
                                  gain=GAIN)
                reports[name].append(report)
                timing[name].append({"seed": seed, "pairs": len(rows), "wall_s": round(wall, 1),
                                     "train_seconds": result["train_seconds"],
                                     "peak_rss_mb": result.get("peak_rss_mb"), "steps": result["steps"]})
                log(f"  seed {seed} {name}: dev NDCG@10 {report.metrics['ndcg@10']:.4f}, train {wall:.0f}s, "
                    f"peak RSS {result.get('peak_rss_mb')} MB")
        out_arms = {}
        first = next(iter(arms))
        for name in arms:
            mean = sum(r.metrics["ndcg@10"] for r in reports[name]) / len(reports[name])
            out_arms[name] = {"config": arms[name], "ndcg@10": round(mean, 4),
                              "vs_base": pooled_vs([base] * seeds, reports[name]), "runs": timing[name]}
            if name != first:  # arms trained on the same pairs and seeds: their own paired difference
                out_arms[name][f"vs_{first}"] = pooled_vs(reports[first], reports[name])
        return {"dataset": data.name, "dev_split": dev_split, "n_dev_queries": len(evalset.query_ids),
                "pairs": pairs, "seeds": seeds, "base_ndcg@10": round(base.metrics["ndcg@10"], 4), "arms": out_arms}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a BEIR folder (only its train qrels are read)")
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--dev-split", type=float, default=0.3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--arms", type=json.loads, default=None,
                   help="JSON: name -> TrainConfig overrides, and optionally that arm's own \"pairs\"")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    arms = args.arms or ARMS
    if not isinstance(arms, dict) or not all(isinstance(a, dict) for a in arms.values()):
        p.error("--arms: a JSON object of arm name -> object of TrainConfig overrides")
    for name, n in [("--pairs", args.pairs), *((f"--arms {k!r}", a["pairs"]) for k, a in arms.items() if "pairs" in a)]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            p.error(f"{name}: pairs must be a positive whole number, got {n!r}")
    t0 = time.perf_counter()
    out = {"machine": machine(), "command": "python -m bench.recipe " + " ".join(argv or sys.argv[1:]),
           **run(args.data, args.pairs, args.dev_split, args.seeds, arms)}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
