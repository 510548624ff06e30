"""Quality benchmark: the real loop against four controls at the same label budget.

    python -m bench.quality --data DIR --budget N --rounds R --out FILE.json [--seeds S] [--seed SEED]
                            [--seed-pairs K] [--generator offline|llm] [--skip ARM ...]
    python -m bench.quality --combine A.json B.json ... --out FILE.json   # seeds run apart, pooled

Protocol (any BEIR folder): ingest the corpus into a temporary workspace; import K seed pairs
drawn from qrels/train and the train queries as a query log; run R rounds of the real loop
(`Rounds.advance`) with `SimulatedReviewer` answering from qrels/train, N reviews in all;
judge each round's candidate model on qrels/test only, searching the workspace's passages (a
document scores as its best passage, as the product searches; the loop's own held-out evaluation
encoded them already, so the judge reuses those vectors). Controls, same budget, same run:
(a) the off-the-shelf model; (b) the same loop with routing replaced by a uniform random
choice of which candidates are reviewed (every candidate is a random-control card, nothing
auto-accepted or dropped); (c) the stock sentence-transformers fine-tune (MNRL, batch 32,
1 epoch, defaults) on N random gold train pairs; (d) BM25. NDCG uses exponential gains
(2**grade - 1) throughout; see bench/README.md.

Each trained arm runs once per seed (`--seeds`, default 3; seed s = `--seed` + s offsets the
loop's seed, the stock arm's, the random control's sampling and the simulated reviewer's order).
The loop reports, per round, its candidate and the model its user would have (the active one:
the base while nothing was promoted). The figures are seed means, with paired bootstrap
intervals pooled over seeds and test queries; `per_seed` keeps each seed's own result.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from bench.common import (GAIN, Beir, SimulatedReviewer, Timer, bm25_report, machine, make_dev_split, n_train,
                          pooled_bootstrap, pooled_vs, sample, scratch, seed_means, stock_finetune, summary,
                          trainer_summary, vs, write_json)
from loop.config import bundled_model_path
from loop.embed import Embedder
from loop.evalsets import EvalSet, evalset_from_beir
from loop.evaluate import CorpusEmbeddings, EvalReport, evaluate, paired_differences


def _eval(emb: Any, evalset: EvalSet, vectors: dict[str, np.ndarray] | None = None) -> EvalReport:
    """`emb` judged on `evalset`; `vectors` (passage id -> vector, made by this model version, e.g.
    the loop's own held-out evaluation) spare the corpus encode when they cover the corpus."""
    corpus = None
    if vectors is not None and all(p in vectors for p in evalset.passage_ids):
        corpus = CorpusEmbeddings(emb.version, evalset.corpus_fingerprint,
                                  np.stack([vectors[p] for p in evalset.passage_ids]).astype(np.float32))
    return evaluate(emb, evalset, k=100, dims=(None,), gain=GAIN, corpus_emb=corpus)


def ingested(beir: Beir, workdir: Path, judge: EvalSet) -> tuple[Path, EvalSet, dict[str, np.ndarray]]:
    """A closed workspace holding the ingested corpus (every loop arm starts from a copy of it, so
    the corpus is chunked and encoded once per benchmark, not once per arm); the judge's queries
    and qrels over that workspace's passages (a document scores as its best passage, as the
    product searches); and the base model's passage vectors from its index."""
    from loop import indexing
    from loop.evalsets import workspace_corpus
    from loop.workspace import Workspace

    with Workspace.open(workdir) as ws:
        if not ws.store.scalar("SELECT count(*) FROM passages"):
            ws.ingest([beir.folder])
        evalset = EvalSet(name=f"{judge.name} over the workspace's passages", query_ids=judge.query_ids,
                          queries=judge.queries, qrels=judge.qrels, **workspace_corpus(ws.store))
        vectors = ws.index.embeddings(indexing.collection_for(ws.store, ws.base_version), evalset.passage_ids)
    return workdir, evalset, dict(zip(evalset.passage_ids, vectors, strict=True))


def run_loop(beir: Beir, evalset: EvalSet, base: EvalReport, *, budget: int, rounds: int, workdir: Path,
             seed_pairs: int = 0, generator: str = "offline", random_control: bool = False, seed: int = 0,
             loop_overrides: dict[str, Any] | None = None, log=print, embedder_factory=None,
             template: Path | None = None, probe_wise: bool = False) -> dict[str, Any]:
    """R rounds of the real loop with the simulated reviewer; per-round test figures.

    `template`: an `ingested` workspace to start from (copied); None = ingest here.
    `probe_wise`: also judge each round's fine-tune at other WiSE-FT weights (`wise_probe`).
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
        reviewer = SimulatedReviewer(ws, beir.queries, beir.qrels["train"], seed=seed,
                                     pool=LoopConfig(**overrides).review_pool)
        reviews = 0
        out_rounds = []
        judged = {ws.base_version: base}  # model version -> its test report
        for n in range(1, rounds + 1):
            before_version = ws.active_model
            before = judged[before_version]  # what the user had going into this round
            per_round = math.ceil((budget - reviews) / (rounds - n + 1))
            cfg = LoopConfig(**{**overrides, "review_budget": max(0, per_round), "seed": seed})
            loop = Rounds(ws, cfg, log=lambda m: log(f"    [{'random' if random_control else 'loop'} r{n}] {m}"),
                          llm=llm)
            loop.advance(until="review")
            reviews += reviewer.review(max(0, budget - reviews))
            r = loop.advance(until="done", force=True)
            if r.state == "train":  # a killed trainer (e.g. the OOM killer) pauses the round: resume once
                log(f"  round {n}: training stopped without a result; resuming from its last checkpoint")
                r = loop.advance(until="done", force=True)
            if r.state != "done":
                raise RuntimeError(f"round {n} stopped at {r.state}: {r.manifest.failure or r.error}")
            model = r.manifest.model
            emb = embedder_factory(model.path, model.version) if embedder_factory else ws.embedder(model.version)
            t_judge = time.perf_counter()
            report = _eval(emb, evalset, loop.heldout.corpus_vectors(model.version))  # no second corpus encode
            steps_s = {step: v["seconds"] for step, v in r.manifest.steps.items() if isinstance(v, dict) and "seconds" in v}
            judged[model.version] = report
            promotion = r.manifest.promotion
            promoted = bool(promotion and promotion.promote)
            res = (promotion.resolution if promotion else None) or {}
            test_vs_before = vs(before, report)
            active = ws.active_model  # what the user has after this round: base until a candidate is promoted
            row = round_row(
                n, report, judged[active], base, reviews=reviews, promoted=promoted,
                active_model="base" if active == ws.base_version else active,
                train_pairs=r.manifest.train_config and n_train(loop.run_dir(r)),
                decisions=dict(reviewer.counts), select=r.manifest.steps.get("select", {}),
                internal_eval={k: round(v, 4) for k, v in (r.manifest.metrics or {}).get("candidate", {}).items()
                               if k in ("ndcg@10",)},
                wise=(r.manifest.steps.get("train") or {}).get("wise"),
                trainer=trainer_summary(r.manifest.steps.get("train") or {}),
                # where the round's time went (issue 10): each step of the round, then the test judge
                steps_s={**steps_s, "judge_on_test": round(time.perf_counter() - t_judge, 2)},
                gate={"p_better": round(res.get("p_better", 0.0), 4),
                      "delta": round((r.manifest.vs_active or {}).get("delta", 0.0), 4),
                      "n_queries": res.get("n_queries"),
                      "half_width": round(res.get("half_width", 0.0), 4),
                      "more_queries_for_0.02": res.get("more_queries_for_0.02"),
                      "p_sign_flip": res.get("p_sign_flip"),
                      # the promotion set's per-query differences: any other rule can be calibrated later
                      "heldout_deltas": heldout_deltas(loop, before_version, model.version) if promotion else None,
                      "test_delta_vs_active": test_vs_before["delta"], "test_ci95_vs_active": test_vs_before["ci95"]})
            if probe_wise:
                row["wise_probe"] = wise_probe(ws, r, model, evalset, report, workdir / "wise-probe")
            out_rounds.append(row)
            log(f"  {'random' if random_control else 'loop'} round {n}: {reviews} reviews, NDCG@10 "
                f"{report.metrics['ndcg@10']:.4f} (base {base.metrics['ndcg@10']:.4f}), promoted={promoted}, "
                f"active {row['active_model']} {row['active_ndcg@10']:.4f}")
        return {"rounds": out_rounds, "wall_s": round(time.perf_counter() - t0, 1)}
    finally:
        ws.close()


PROBE_GRID = (0.25, 0.5, 0.75, 1.0)  # the WiSE-FT weights `--probe-wise` judges every round at


def wise_probe(ws: Any, r: Any, model: Any, evalset: EvalSet, report: EvalReport, tmp: Path) -> dict[str, Any]:
    """The round's fine-tune judged at every weight of `PROBE_GRID`, to choose how the WiSE-FT
    weight is picked (tuning: `--probe-wise` runs on dev splits only). The saved model is
    (1-a)*base + a*tuned with `a` the round's weight (1 when it ran no WiSE-FT step), so the tuned
    weights are base + (saved - base) / a; each other weight is mixed from them and judged with
    the workspace's own encoder, as the candidate (`report`, the round's own weight) was."""
    from sentence_transformers import SentenceTransformer

    from loop.wise import mix, unmix

    choice = (r.manifest.steps.get("train") or {}).get("wise") or {}
    chosen = float(choice.get("alpha", 1.0))
    st = SentenceTransformer(str(model.path), device="cpu", local_files_only=True)
    saved = {k: v.detach().clone() for k, v in st.state_dict().items()}
    base = SentenceTransformer(str(ws.settings.base_model_path), device="cpu", local_files_only=True).state_dict()
    tuned = unmix(base, saved, chosen)
    judged: dict[str, Any] = {}
    for a in sorted({*PROBE_GRID, chosen}):
        rep = report
        if a != chosen:
            st.load_state_dict(mix(base, tuned, a))
            path = tmp / f"a{a:g}"
            shutil.rmtree(path, ignore_errors=True)
            st.save(str(path))
            rep = _eval(Embedder(path, f"{model.version}-a{a:g}", ws.settings.device, ws.settings.encode_batch_size,
                                 backend=ws.settings.encode_backend, cache_dir=tmp / "onnx"), evalset)
            shutil.rmtree(path, ignore_errors=True)
        judged[f"{a:g}"] = {"ndcg@10": round(rep.metrics["ndcg@10"], 4),
                            "per_query": [round(v, 5) for v in rep.per_query["ndcg@10"]]}
    return {"chosen": chosen, "dev_fold_ndcg@10": choice.get("dev_ndcg@10"), "n_dev_queries": choice.get("n_dev_queries"),
            "judge": judged}


def wise_probe_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each way of picking the WiSE-FT weight over every probed round of `rows` (any seeds or dev
    splits): the round's own weight (the loop's rule: `chosen`) and each fixed weight, as the mean
    judge NDCG@10 over (round, query) pairs and the paired difference from the round's weight, with
    a bootstrap interval over those pairs."""
    probes = [row["wise_probe"] for row in rows if row.get("wise_probe")]
    if not probes:
        return None
    grids = {tuple(sorted(p["judge"])) for p in probes}
    if len(grids) != 1:
        raise ValueError(f"the probed rounds used different WiSE-FT grids: {sorted(grids)}")
    rule = np.concatenate([p["judge"][f"{p['chosen']:g}"]["per_query"] for p in probes])
    out: dict[str, Any] = {"rounds": len(probes), "chosen": [p["chosen"] for p in probes],
                           "development_fold_choice": round(float(rule.mean()), 4)}
    for a in sorted(grids.pop(), key=float):
        fixed = np.concatenate([p["judge"][a]["per_query"] for p in probes])
        delta, lo, hi = pooled_bootstrap(rule[None, :], fixed[None, :])
        out[f"fixed {a}"] = {"ndcg@10": round(float(fixed.mean()), 4), "vs_fold_choice": round(delta, 4),
                             "ci95": [round(lo, 4), round(hi, 4)]}
    return out


def heldout_deltas(loop: Any, active: str, candidate: str) -> list[float]:
    """Candidate minus active NDCG@10 on each query of the loop's promotion set (its stored reports)."""
    evalset = loop.heldout.evalset()
    diff = paired_differences(loop.heldout.report_for(active, evalset), loop.heldout.report_for(candidate, evalset))
    return [round(float(d), 5) for d in diff]


def round_row(n: int, report: EvalReport, active: EvalReport, base: EvalReport, **extra: Any) -> dict[str, Any]:
    """One round's figures: the candidate's (`ndcg@10`, `delta_vs_base` ...) and `active_ndcg@10`,
    the model the user has after the round (the base while nothing was promoted). The reports
    themselves ride along as `_report` / `_active` for the pooled figures (not written out)."""
    row = {"round": n, **extra, **summary(report, base), "active_ndcg@10": round(active.metrics["ndcg@10"], 4)}
    return {**row, "_report": report, "_active": active}


def _strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _targets(loop_vs: dict[str, dict[str, Any]]) -> dict[str, bool]:
    return {
        "beats_all_controls": all(v["delta"] > 0 for v in loop_vs.values()),
        "beats_stock_by_0.03_ci_excludes_0": bool(
            "stock" in loop_vs and loop_vs["stock"]["delta"] >= 0.03 and loop_vs["stock"]["ci95"][0] > 0),
    }


def seed_result(seed: int, reports: dict[str, EvalReport], rounds: list[dict[str, Any]] | None,
                randoms: list[dict[str, Any]] | None, stock_pairs: int | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One seed's result (its JSON) and the reports that the pooled figures need.

    Args:
        reports: "base", and "bm25" / "stock" when those arms ran.
        rounds, randoms: `round_row`s of the loop and of the random control (None: skipped).

    `loop_vs` compares the loop's active model after the last round (what its user has) with
    each control (the random control's active model too); `candidate_vs` compares the last
    candidates (the random control's last candidate too).
    """
    base = reports["base"]
    result: dict[str, Any] = {"seed": seed, "base": summary(base)}
    if "bm25" in reports:
        result["bm25"] = summary(reports["bm25"], base)
    if "stock" in reports:
        result["stock_finetune"] = {**summary(reports["stock"], base), "train_pairs": stock_pairs}
    active, candidate = dict(reports), dict(reports)
    if rounds:
        result["rounds"] = _strip(rounds)
        active["loop"], candidate["loop"] = rounds[-1]["_active"], rounds[-1]["_report"]
    if randoms:
        result["random_control"] = {**_strip(randoms)[-1], "rounds": _strip(randoms)}
        active["random"], candidate["random"] = randoms[-1]["_active"], randoms[-1]["_report"]
    # Per-query values, so runs of separate invocations can still be compared with intervals.
    per_query = lambda r: [round(v, 5) for v in r.per_query["ndcg@10"]]  # noqa: E731
    result["per_query_ndcg@10"] = {
        "query_ids": list(base.query_ids),
        **{n: per_query(r) for n, r in active.items()},
        **{f"{n}_candidate": per_query(candidate[n]) for n in ("loop", "random") if n in candidate},
        # every round's candidate, so that separate runs' seeds can be combined (`--combine`)
        **{f"{n}_rounds": [per_query(r["_report"]) for r in rows] for n, rows in (("loop", rounds), ("random", randoms))
           if rows},
    }
    probe = wise_probe_summary(rounds or [])
    if probe:
        result["wise_probe"] = probe
    if "loop" in active:
        result["loop_vs"] = {n: vs(r, active["loop"]) for n, r in active.items() if n != "loop"}
        result["candidate_vs"] = {n: vs(r, candidate["loop"]) for n, r in candidate.items() if n != "loop"}
        result["targets"] = _targets(result["loop_vs"])
    return result, {"active": active, "candidate": candidate, "rounds": [r["_report"] for r in rounds or []],
                    "random_rounds": [r["_report"] for r in randoms or []]}


RULES = (0.975, 0.95, 0.9, 0.8, 0.7, 0.5)
SIGN_FLIP_RULES = (0.025, 0.05, 0.1, 0.2)
BOTH_RULES = ((0.95, 0.1), (0.9, 0.1), (0.95, 0.2))  # the bootstrap share and the sign-flip test together


def calibration_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every round of a `bench.quality` result, the loop's and the random control's, over every seed."""
    return [row for r in result.get("per_seed") or [result]
            for row in r.get("rounds", []) + r.get("random_control", {}).get("rounds", [])]


def gate_calibration(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How each promotion rule would have decided every round of `rows` (loop and random-control
    rounds over all seeds), judged against `qrels/test`: a false promotion is a candidate promoted
    that scores below the model active before its round on the test split; a false refusal is one
    refused that scores above it with the test interval above zero. Rule `p>=t`: promote when the
    candidate wins in at least t of the held-out set's bootstrap resamples (and its mean is ahead);
    rule `sign-flip p<=a` (rounds that recorded it): when the paired sign-flip test's p is at most a;
    rule `p>=t & sign-flip p<=a`: both."""
    gates = [r["gate"] for r in rows if r.get("gate") and r["gate"].get("n_queries")]
    out: dict[str, Any] = {"rounds": len(gates),
                           "better_on_test": sum(g["test_delta_vs_active"] > 0 for g in gates),
                           "significantly_better_on_test": sum(g["test_ci95_vs_active"][0] > 0 for g in gates)}
    rules: list[tuple[str, list[bool]]] = [(f"p>={t:g}", [g["p_better"] >= t and g["delta"] > 0 for g in gates])
                                           for t in RULES]
    if gates and all(g.get("p_sign_flip") is not None for g in gates):  # recorded since 2026-12-01 afternoon
        rules += [(f"sign-flip p<={a:g}", [g["p_sign_flip"] <= a and g["delta"] > 0 for g in gates])
                  for a in SIGN_FLIP_RULES]
        rules += [(f"p>={t:g} & sign-flip p<={a:g}",
                   [g["p_better"] >= t and g["p_sign_flip"] <= a and g["delta"] > 0 for g in gates])
                  for t, a in BOTH_RULES]
    for name, promote in rules:
        out[name] = {
            "promoted": sum(promote),
            "false_promotions": sum(p and g["test_delta_vs_active"] < 0 for p, g in zip(promote, gates, strict=True)),
            "false_refusals": sum(not p and g["test_ci95_vs_active"][0] > 0 for p, g in zip(promote, gates, strict=True)),
            "refused_better": sum(not p and g["test_delta_vs_active"] > 0 for p, g in zip(promote, gates, strict=True)),
        }
    return out


def combine_seeds(seeds: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """The seeds' results as one: seed means in the same keys (`seed_means`), with every interval
    (`ci95_vs_base`, `loop_vs`, `candidate_vs`) replaced by the paired bootstrap pooled over seeds
    and test queries; plus `seeds`, `promotions_per_seed` and `per_seed` (each seed's own result)."""
    results = [r for r, _ in seeds]
    reports = [rep for _, rep in seeds]
    out = seed_means(results)
    out.pop("seed", None)
    base = [rep["active"]["base"] for rep in reports]

    def vs_base(entry: dict[str, Any], others: list[EvalReport]) -> None:
        pooled = pooled_vs(base, others)
        entry["delta_vs_base"], entry["ci95_vs_base"] = pooled["delta"], pooled["ci95"]

    for key, name in (("bm25", "bm25"), ("stock_finetune", "stock")):
        if key in out:
            vs_base(out[key], [rep["active"][name] for rep in reports])
    def rounds_vs_base(rows: list[dict[str, Any]], key: str) -> None:
        for i, row in enumerate(rows):
            others = [rep[key][i] for rep in reports]
            if all(others):
                vs_base(row, others)
            else:  # combined from a JSON written before it kept every round's per-query figures
                row.pop("ci95_vs_base", None)

    rounds_vs_base(out.get("rounds", []), "rounds")
    if "random_control" in out:
        rounds_vs_base(out["random_control"]["rounds"], "random_rounds")
        vs_base(out["random_control"], [rep["random_rounds"][-1] for rep in reports])
    out["seeds"] = [r["seed"] for r in results]
    if "rounds" in results[0]:
        out["promotions_per_seed"] = [sum(bool(row["promoted"]) for row in r["rounds"]) for r in results]
    if "loop" in reports[0]["active"]:
        for key, which in (("loop_vs", "active"), ("candidate_vs", "candidate")):
            out[key] = {n: pooled_vs([rep[which][n] for rep in reports], [rep[which]["loop"] for rep in reports])
                        for n in reports[0][which] if n != "loop"}
        out["targets"] = _targets(out["loop_vs"])
    probe = wise_probe_summary([row for r in results for row in r.get("rounds", [])])
    if probe:
        out["wise_probe"] = probe
    every_round = [row for r in results for row in calibration_rows(r)]
    if every_round:
        out["gate_calibration"] = gate_calibration(every_round)
    out["per_seed"] = results
    return out


def reports_from_json(result: dict[str, Any]) -> dict[str, Any]:
    """The per-query reports `combine_seeds` pools, rebuilt from one seed's JSON result (its
    `per_query_ndcg@10`); a round without per-query figures (older JSON) is None, except the last."""
    pq = result["per_query_ndcg@10"]
    qids = pq["query_ids"]

    def report(name: str, values: list[float]) -> EvalReport:
        return EvalReport(model_version=name, evalset="json", evalset_fingerprint="json", n_queries=len(qids),
                          n_docs=0, dim=0, k=100, metrics={"ndcg@10": float(np.mean(values))},
                          per_query={"ndcg@10": list(values)}, query_ids=list(qids), gain=GAIN)

    fixed = {n: report(n, pq[n]) for n in ("base", "bm25", "stock") if n in pq}
    out: dict[str, Any] = {"active": dict(fixed), "candidate": dict(fixed), "rounds": [], "random_rounds": []}
    for name, rows, key in (("loop", result.get("rounds"), "rounds"),
                            ("random", (result.get("random_control") or {}).get("rounds"), "random_rounds")):
        if not rows:
            continue
        out["active"][name] = report(name, pq[name])
        out["candidate"][name] = report(f"{name}_candidate", pq[f"{name}_candidate"])
        kept = pq.get(f"{name}_rounds")
        out[key] = ([report(f"{name}_r{i + 1}", v) for i, v in enumerate(kept)] if kept else
                    [None] * (len(rows) - 1) + [out["candidate"][name]])
    return out


# What makes two `bench.quality` results comparable query by query (besides the seeds and the loop's settings).
PROTOCOL_KEYS = ("dataset", "budget", "n_rounds", "seed_pairs", "generator", "gain", "eval_split", "n_test_queries",
                 "judged_on")


def read_result(path: str | Path, flag: str, per_query: bool = False) -> dict[str, Any]:
    """A `bench.quality` JSON, or SystemExit naming `flag` and the file when it is missing,
    malformed or not such a result (no `per_seed` list; with `per_query`, a seed without its
    per-query figures, which pooling and pairing need)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag}: cannot read {path} as JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("per_seed"), list) or not doc["per_seed"]:
        raise SystemExit(f"{flag}: {path} is not a bench.quality result (no per_seed list); nothing written.")
    if per_query:
        for i, seed in enumerate(doc["per_seed"]):
            if not isinstance(seed, dict) or not isinstance((seed.get("per_query_ndcg@10") or {}).get("query_ids"), list):
                raise SystemExit(f"{flag}: {path} per_seed[{i}] has no per-query figures (per_query_ndcg@10.query_ids); "
                                 f"not a whole bench.quality result; nothing written.")
    return doc


def combine_files(paths: list[Path]) -> dict[str, Any]:
    """Several `bench.quality` JSONs of one protocol (e.g. seeds run as separate processes) as one:
    every seed of every file pooled as if one run had made them (`combine_seeds`)."""
    docs = [read_result(p, "--combine", per_query=True) for p in paths]
    same = (*PROTOCOL_KEYS, "loop_config")
    for key in same:
        if len({json.dumps(d.get(key), sort_keys=True) for d in docs}) > 1:
            raise SystemExit(f"--combine: the files differ in {key!r}; only runs of one protocol combine.")
    seeds = [(r, reports_from_json(r)) for d in docs for r in d["per_seed"]]
    numbers = [r["seed"] for r, _ in seeds]
    if len(set(numbers)) != len(numbers):
        raise SystemExit(f"--combine: seed repeated across the files ({numbers}).")
    judged = {tuple(sorted(r["per_query_ndcg@10"]["query_ids"])) for r, _ in seeds}
    if len(judged) > 1:
        raise SystemExit("--combine: the runs were judged on different queries (a --dev-split run's split follows "
                         "its --seed: run such seeds in one process, or compare them seed by seed); nothing written.")
    seeds.sort(key=lambda item: item[0]["seed"])
    head = {k: docs[0][k] for k in (*same, "machine", "encode_backend") if k in docs[0]}
    return {**head, **combine_seeds(seeds), "combined_from": [
        {"file": Path(p).name, "seeds": [r["seed"] for r in d["per_seed"]], "machine": d.get("machine"),
         "wall_s": d.get("wall_s")} for p, d in zip(paths, docs, strict=True)]}


def _run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every arm of every seed, with its workspaces in the scratch folder `tmp`."""
    t_all = time.perf_counter()
    timer = Timer()
    wall_s = lambda: {**timer.t, "total": round(time.perf_counter() - t_all, 1)}  # noqa: E731
    beir = Beir.read(args.data, splits=tuple(dict.fromkeys((args.train_split, args.eval_split))))
    if args.train_split != "train":
        beir.qrels["train"] = beir.qrels[args.train_split]
    judge = evalset_from_beir(args.data, args.eval_split)
    log = lambda m: print(m, flush=True)  # noqa: E731
    result: dict[str, Any] = {"dataset": args.data.name, "budget": args.budget, "n_rounds": args.rounds,
                              "seed_pairs": args.seed_pairs, "generator": args.generator, "gain": GAIN,
                              "eval_split": args.eval_split, "n_test_queries": len(judge.query_ids),
                              "judged_on": "workspace passages (a document scores as its best passage)",
                              "loop_config": args.loop_config, "machine": machine(),
                              "encode_backend": Embedder(bundled_model_path(), "base").backend}
    base_path = bundled_model_path()
    with timer("ingest"):
        template, evalset, base_vectors = ingested(beir, tmp / "ingested", judge)
    with timer("base"):
        base = _eval(Embedder(base_path, "base"), evalset, base_vectors)
    log(f"base NDCG@10 {base.metrics['ndcg@10']:.4f}")
    fixed: dict[str, EvalReport] = {"base": base}  # the arms that do not depend on a seed
    if "bm25" not in args.skip:
        with timer("bm25"):  # lexical over whole documents, reported on the same queries
            fixed["bm25"] = bm25_report(beir, judge, base)
        log(f"bm25 NDCG@10 {fixed['bm25'].metrics['ndcg@10']:.4f}")
    common = dict(budget=args.budget, rounds=args.rounds, seed_pairs=args.seed_pairs, generator=args.generator,
                  loop_overrides=args.loop_config, log=log, template=template)
    seeds = []
    planned = list(range(args.seed, args.seed + args.seeds))
    for seed in planned:
        log(f"seed {seed}")
        t_seed = time.perf_counter()
        reports, stock_pairs, lp, rc = dict(fixed), None, None, None
        if "stock" not in args.skip:
            with timer("stock_finetune"):
                pairs = sample(beir.gold_pairs("train"), args.budget, seed)
                model = stock_finetune(base_path, pairs, tmp / f"stock-{seed}", seed=seed)
                reports["stock"] = _eval(Embedder(model, "stock"), evalset)
            stock_pairs = len(pairs)
            shutil.rmtree(tmp / f"stock-{seed}", ignore_errors=True)
            log(f"stock fine-tune ({len(pairs)} gold pairs) NDCG@10 {reports['stock'].metrics['ndcg@10']:.4f}")
        if "loop" not in args.skip:
            with timer("loop"):
                lp = run_loop(beir, evalset, base, workdir=tmp / f"loop-{seed}", seed=seed,
                              probe_wise=args.probe_wise, **common)["rounds"]
            shutil.rmtree(tmp / f"loop-{seed}", ignore_errors=True)
        if "random" not in args.skip:
            with timer("random_control"):
                rc = run_loop(beir, evalset, base, workdir=tmp / f"random-{seed}", random_control=True, seed=seed,
                              **common)["rounds"]
            shutil.rmtree(tmp / f"random-{seed}", ignore_errors=True)
        seeds.append(seed_result(seed, reports, lp, rc, stock_pairs))
        seeds[-1][0]["seed_wall_s"] = round(time.perf_counter() - t_seed, 1)
        result.update(combine_seeds(seeds))
        if len(seeds) < len(planned):  # a run stopped later keeps the seeds it finished
            write_json(args.out, {**result, "seeds_planned": planned, "wall_s": wall_s()})
    result["wall_s"] = wall_s()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--budget", type=int, help="reviews (labels) in all")
    p.add_argument("--combine", nargs="+", type=Path, default=None, metavar="JSON",
                   help="instead of running: pool the seeds of these result files (runs of one protocol, e.g. "
                        "seeds run as separate processes) into --out")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed-pairs", type=int, default=0, help="gold train pairs imported before round 1")
    p.add_argument("--generator", choices=["offline", "llm"], default="offline")
    p.add_argument("--seed", type=int, default=0, help="the first seed (also the dev split's)")
    p.add_argument("--seeds", type=int, default=3,
                   help="run each trained arm with seeds SEED, SEED+1, ...: this many (figures are seed means)")
    p.add_argument("--skip", nargs="*", default=[], choices=["loop", "random", "stock", "bm25"])
    p.add_argument("--loop-config", type=json.loads, default={}, help="LoopConfig overrides as JSON (tuning)")
    p.add_argument("--eval-split", default="test", help="judge split (test; a dev split when tuning)")
    p.add_argument("--train-split", default="train", help="qrels split the reviewer and (c) draw from")
    p.add_argument("--workdir", type=Path, default=None, help="where temporary workspaces go (deleted after)")
    p.add_argument("--probe-wise", action="store_true",
                   help="tuning (needs --dev-split): judge each loop round's fine-tune at WiSE-FT weights 0.25-1")
    p.add_argument("--dev-split", type=float, default=0.0,
                   help="tuning: judge on this share of the TRAIN queries (as 'test') and draw labels from the "
                        "rest; qrels/test is not read")
    args = p.parse_args(argv)
    if args.combine:
        out = combine_files(args.combine)
        write_json(args.out, out)
        log_keys = ("promotions_per_seed", "loop_vs", "targets")
        print(json.dumps({k: out[k] for k in log_keys if k in out}, indent=1))
        return 0
    if args.data is None or args.budget is None:
        p.error("--data and --budget are required (unless --combine)")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    if args.probe_wise and not args.dev_split:
        p.error("--probe-wise picks how the loop chooses a weight: tune on a --dev-split, never on qrels/test")
    with ExitStack() as scratch_dirs:  # removed at the end, also when the run is killed (bench.common.scratch)
        if args.dev_split:
            dev_root = scratch_dirs.enter_context(scratch("bench-dev-", args.workdir))
            args.data = make_dev_split(args.data, dev_root / args.data.name, args.dev_split, args.seed)
        result = _run(args, scratch_dirs.enter_context(scratch("bench-quality-", args.workdir)))
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("base", "bm25", "stock_finetune", "rounds", "promotions_per_seed",
                                            "loop_vs", "gate_calibration", "targets", "wall_s") if k in result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
