"""bench.quality's simulated reviewer and controls on a tiny BEIR folder, with the FakeEmbedder.

The whole benchmark trains real models (minutes); here its pieces run on exact keyword
similarity: the reviewer's accept / pick / reject answers, its budget, BM25 and the JSON figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bench.common import Beir, SimulatedReviewer, bm25_report, summary, vs
from loop.evalsets import evalset_from_beir
from loop.evaluate import EvalReport, evaluate
from loop.review import pending
from loop.rounds import LoopConfig, Rounds
from loop.trainer import cpu_has_native_bf16
from tests.fakes import FakeEmbedder
from tests.reliability_report import case

DOCS = {
    "d1": "Indemnification clauses allocate losses between the parties for third party claims.",
    "d2": "Limitation of liability clauses cap the damages a party can recover from the other.",
    "d3": "Termination for convenience lets a party end the agreement early with written notice.",
    "d4": "Confidential information must not be disclosed to third parties by the receiving party.",
    "d5": "The governing law clause chooses the law of Delaware and the courts of Wilmington.",
    "d6": "Invoices are payable within thirty days and late payments bear monthly interest.",
    "d7": "The supplier warrants that the goods conform to the specification for twelve months.",
    "d8": "Force majeure excuses delays caused by floods, wars and strikes beyond control.",
}
# q1's top hit is its relevant document (accept); q2 is worded so that another document wins
# the top-1, while its relevant one is in the top-k (pick); q3 is judged, but its relevant document is not on top.
QUERIES = {
    "q1": ("indemnification clauses losses third party claims", {"d1": 1}),
    "q2": ("cap on damages recover limitation", {"d2": 2}),
    "q3": ("indemnification losses between parties", {"d7": 1}),
    "t1": ("late payments interest invoices", {"d6": 1}),
    "t2": ("floods wars strikes delays", {"d8": 1}),
}
TRAIN, TEST = ("q1", "q2", "q3"), ("t1", "t2")


@pytest.fixture
def beir_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w") as f:
        for d, text in DOCS.items():
            f.write(json.dumps({"_id": d, "title": "", "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for q, (text, _) in QUERIES.items():
            f.write(json.dumps({"_id": q, "text": text}) + "\n")
    for split, ids in (("train", TRAIN), ("test", TEST)):
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q in ids for d, g in QUERIES[q][1].items()]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def _ingested(workspace, beir_dir: Path) -> Beir:
    workspace.ingest([beir_dir])
    workspace.import_queries(beir_dir, split="train")
    return Beir.read(beir_dir)


def test_beir_reader_keeps_splits_apart(beir_dir):
    beir = Beir.read(beir_dir)
    assert set(beir.qrels["train"]) == set(TRAIN) and set(beir.qrels["test"]) == set(TEST)
    gold = beir.gold_pairs("train")
    assert len(gold) == 3 and all(q in {QUERIES[i][0] for i in TRAIN} for q, _ in gold)
    # A judged document without text (cranfield has one) is a pair only where the caller takes empty texts.
    beir.corpus["d2"] = ""
    assert len(beir.gold_pairs("train")) == 3
    assert [q for q, _ in beir.gold_pairs("train", skip_empty=True)] == [QUERIES["q1"][0], QUERIES["q3"][0]]
    beir.queries["q3"] = ""  # nor an empty query
    assert [q for q, _ in beir.gold_pairs("train", skip_empty=True)] == [QUERIES["q1"][0]]


def test_reviewer_marks_every_relevant_shown_passage_from_train_qrels(workspace, beir_dir):
    beir = _ingested(workspace, beir_dir)
    reviewer = SimulatedReviewer(workspace, beir.queries, beir.qrels["train"], k=5)
    pid = {d: workspace.store.first_passage_of_docs([d])[d] for d in DOCS}
    outcome, marked, shown = reviewer.answer(QUERIES["q1"][0], pid["d1"])
    assert (outcome, marked) == ("accept", [pid["d1"]]) and shown[0] == pid["d1"] and len(shown) == 6
    # A wrong positive: the relevant passage is marked among the shown top-k, the rest are negatives.
    outcome, marked, shown = reviewer.answer(QUERIES["q2"][0], pid["d5"])
    assert (outcome, marked) == ("pick", [pid["d2"]]) and len(shown) == 6
    # Not a judged train query (a synthetic one, or a test query): only its own passage is judged.
    assert reviewer.answer("who pays for floods", pid["d8"]) == ("reject", [], [pid["d8"]])
    assert reviewer.answer(QUERIES["t1"][0], pid["d6"]) == ("reject", [], [pid["d6"]])  # test qrels never used
    # Judged, but neither the positive nor the shown top-k (here the top 1) is relevant.
    narrow = SimulatedReviewer(workspace, beir.queries, beir.qrels["train"], k=1)
    outcome, marked, shown = narrow.answer(QUERIES["q3"][0], pid["d1"])
    assert (outcome, marked) == ("reject", []) and len(shown) == 2


def test_reviewer_decides_a_real_round_queue_within_budget(workspace, beir_dir):
    beir = _ingested(workspace, beir_dir)
    loop = Rounds(workspace, LoopConfig(generate_max=6, review_budget=50, routing={"random_fraction": 1.0}))
    loop.advance(until="review")
    queued = int(workspace.store.scalar("SELECT count(*) FROM pairs WHERE status = 'pending'"))
    assert queued >= 3  # the three mined train queries at least
    reviewer = SimulatedReviewer(workspace, beir.queries, beir.qrels["train"], k=5)
    assert reviewer.review(limit=2) == 2
    done = reviewer.review(limit=100)
    # A mark judges every shown passage: one that has its own card answers that card too (not asked again).
    answered = sum(len(json.loads(p)["resolved_pairs"]) for (p,) in workspace.store.execute(
        "SELECT payload FROM decisions").fetchall() if "resolved_pairs" in json.loads(p))
    assert done == queued - 2 - answered  # review(limit) decides `limit` cards, fetching again when a mark answered some
    decided = sum(reviewer.counts[k] for k in ("accept", "pick", "reject"))
    assert decided == queued - answered == int(workspace.store.scalar("SELECT count(*) FROM decisions"))
    assert reviewer.counts["passages_judged"] > decided  # a judged query's card shows its top passages too
    # Mined train queries are labelled from qrels: q1 accepted, q2 picked (a new accepted pair).
    accepted = {r["anchor"] for r in workspace.store.rows("SELECT anchor FROM pairs WHERE status = 'accepted'")}
    assert {QUERIES["q1"][0], QUERIES["q2"][0]} <= accepted
    assert reviewer.counts["accept"] >= 1 and reviewer.counts["pick"] >= 1
    assert reviewer.review(limit=10) == 0  # the queue is empty


def test_bm25_and_figures_are_comparable_with_the_embedding_reports(beir_dir):
    beir = Beir.read(beir_dir)
    evalset = evalset_from_beir(beir_dir, "test")
    base = evaluate(FakeEmbedder("base"), evalset, dims=(None,), gain="exponential")
    bm = bm25_report(beir, evalset, base)
    assert bm.metrics["ndcg@10"] == pytest.approx(1.0)  # both test queries share words with their document only
    s = summary(bm, base)
    assert set(s) == {"ndcg@10", "recall@100", "mrr@10", "delta_vs_base", "ci95_vs_base"}
    assert s["ci95_vs_base"][0] <= s["delta_vs_base"] <= s["ci95_vs_base"][1]
    assert vs(base, bm)["delta"] == s["delta_vs_base"]


class CountingEncoder:
    """The bundled model, counting the texts it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.version, self.texts = inner, inner.version, 0

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        self.texts += len(texts)
        return self.inner.encode(texts)


@pytest.mark.slow
def test_the_judge_searches_the_workspace_passages_and_reuses_a_models_vectors(beir_dir, tmp_path):
    from bench.quality import _eval, ingested
    from loop.config import bundled_model_path
    from loop.embed import Embedder

    judge = evalset_from_beir(beir_dir, "test")
    _, evalset, vectors = ingested(Beir.read(beir_dir), tmp_path / "ws", judge)
    assert (evalset.query_ids, evalset.queries, evalset.qrels) == (judge.query_ids, judge.queries, judge.qrels)
    assert set(vectors) == set(evalset.passage_ids) and evalset.passage_docs  # passages grouped by document
    assert {d for docs in evalset.passage_docs.values() for d in docs} == set(DOCS)
    emb = CountingEncoder(Embedder(bundled_model_path(), "base"))
    reused = _eval(emb, evalset, vectors)  # the base's vectors from the workspace's index
    assert emb.texts == len(evalset.queries)  # the corpus was not encoded again
    fresh = _eval(emb, evalset, {p: v for p, v in list(vectors.items())[1:]})  # one missing: encode it all
    assert emb.texts == 2 * len(evalset.queries) + len(evalset.passages)
    assert reused.per_query["ndcg@10"] == pytest.approx(fresh.per_query["ndcg@10"], abs=1e-6)
    assert reused.evalset_fingerprint == fresh.evalset_fingerprint


@pytest.mark.slow
def test_a_run_stopped_after_a_seed_keeps_the_seeds_it_finished(beir_dir, tmp_path, monkeypatch):
    import bench.quality as quality

    out = tmp_path / "run.json"
    argv = ["--data", str(beir_dir), "--budget", "2", "--seeds", "2", "--skip", "loop", "random", "stock",
            "--out", str(out)]
    assert quality.main(argv) == 0
    done = json.loads(out.read_text())
    assert done["seeds"] == [0, 1] and "seeds_planned" not in done
    assert all(s["seed_wall_s"] >= 0 for s in done["per_seed"]) and "seed_wall_s" in done
    finish = quality.seed_result

    def second_seed_fails(seed, *a, **k):
        if seed == 1:
            raise RuntimeError("stopped")
        return finish(seed, *a, **k)

    monkeypatch.setattr(quality, "seed_result", second_seed_fails)
    out.unlink()
    with pytest.raises(RuntimeError, match="stopped"):
        quality.main(argv)
    partial = json.loads(out.read_text())  # what seed 0 left behind
    assert partial["seeds"] == [0] and partial["seeds_planned"] == [0, 1] and len(partial["per_seed"]) == 1
    assert partial["base"] == done["base"] and partial["wall_s"]["total"] > 0


def test_dev_split_judges_on_train_queries_only(beir_dir, tmp_path):
    from bench.common import make_dev_split

    dev = Beir.read(make_dev_split(beir_dir, tmp_path / "dev", 0.34, seed=0))
    assert set(dev.qrels["train"]) | set(dev.qrels["test"]) == set(TRAIN)
    assert not set(dev.qrels["train"]) & set(dev.qrels["test"]) and len(dev.qrels["test"]) == 1


# Several seeds: pooled intervals and seed means ------------------------------------------------
def test_pooled_bootstrap_resamples_seeds_and_queries():
    from bench.common import pooled_bootstrap
    from loop.metrics import paired_bootstrap

    a = np.full((2, 50), 0.5)
    assert pooled_bootstrap(a, a + 0.1) == pytest.approx((0.1, 0.1, 0.1))  # a constant gain has no spread
    # One seed gains 1 on every query, the other loses 1: a query bootstrap alone would say 0 +- 0;
    # resampling the seeds gives means -1, 0, +1 with chances 1/4, 1/2, 1/4.
    b = np.vstack([np.ones(50), -np.ones(50)]) + 0.5
    assert pooled_bootstrap(a, b) == pytest.approx((0.0, -1.0, 1.0))
    # One seed: the usual paired bootstrap over queries (same mean, an interval of the same width).
    rng = np.random.default_rng(1)
    x, y = rng.random((1, 300)), rng.random((1, 300))
    delta, lo, hi = pooled_bootstrap(x, y)
    d2, lo2, hi2 = paired_bootstrap(x[0], y[0])
    assert delta == pytest.approx(d2) and lo < delta < hi
    assert hi - lo == pytest.approx(hi2 - lo2, rel=0.15)
    assert pooled_bootstrap(x, y) == (delta, lo, hi)  # deterministic
    with pytest.raises(ValueError, match="seeds x queries"):
        pooled_bootstrap(x[0], y[0])


def test_stratified_bootstrap_resamples_queries_within_each_seed():
    """Seeds judged on different queries (each its own dev split): queries are resampled within
    their seed, seeds are kept (strata); the mean is over every seed's queries."""
    from bench.common import pooled_bootstrap, stratified_bootstrap

    assert stratified_bootstrap([np.full(10, 0.1), np.full(30, 0.3)]) == pytest.approx((0.25, 0.25, 0.25))
    rng = np.random.default_rng(2)
    x, y = rng.random(300), rng.random(300)
    # One seed: the same interval as the one-seed pooled bootstrap, up to resampling noise.
    delta, lo, hi = stratified_bootstrap([y - x])
    d2, lo2, hi2 = pooled_bootstrap(x[None], y[None])
    assert delta == pytest.approx(d2) and hi - lo == pytest.approx(hi2 - lo2, rel=0.15)
    # Two seeds of the same spread: narrower than one (more queries), centred on the pooled mean.
    z = rng.random(300)
    d3, lo3, hi3 = stratified_bootstrap([y - x, z - x])
    assert d3 == pytest.approx(np.concatenate([y - x, z - x]).mean()) and lo3 < d3 < hi3 and hi3 - lo3 < hi - lo
    assert stratified_bootstrap([y - x, z - x]) == (d3, lo3, hi3)  # deterministic
    for bad in ([], [np.zeros(0)], [np.zeros((2, 2))]):
        with pytest.raises(ValueError, match="per seed"):
            stratified_bootstrap(bad)


def test_seed_means_keep_the_keys():
    from bench.common import seed_means

    runs = [
        {"seed": 0, "base": {"ndcg@10": 0.5}, "rounds": [{"round": 1, "ndcg@10": 0.7, "promoted": True,
                                                          "active_model": "r1-a", "decisions": {"accept": 4}}],
         "ci": [0.1, 0.3], "note": "same", "learning_rate": 5e-05},
        {"seed": 1, "base": {"ndcg@10": 0.5}, "rounds": [{"round": 1, "ndcg@10": 0.6, "promoted": False,
                                                          "active_model": "base", "decisions": {"accept": 2}}],
         "ci": [0.0, 0.2], "note": "same", "learning_rate": 5e-05},
    ]
    assert type(seed_means(runs)["rounds"][0]["round"]) is int
    assert seed_means(runs) == {
        "seed": 0.5, "base": {"ndcg@10": 0.5},
        # a bool becomes a share of seeds; a string that differs between seeds is left out
        "rounds": [{"round": 1, "ndcg@10": 0.65, "promoted": 0.5, "decisions": {"accept": 3}}],
        "ci": [0.05, 0.25], "note": "same",
        "learning_rate": 5e-05,  # a number every seed shares is kept as it is, not rounded to 4 decimals
    }


def _report(name: str, values: list[float]) -> EvalReport:
    return EvalReport(model_version=name, evalset="tiny", evalset_fingerprint="f", n_queries=len(values), n_docs=10,
                      dim=4, k=100, metrics={"ndcg@10": float(np.mean(values)), "recall@100": 1.0, "mrr@10": 0.5},
                      per_query={"ndcg@10": values}, query_ids=[f"q{i}" for i in range(len(values))],
                      gain="exponential")


def test_seeds_combine_into_means_promotions_and_pooled_intervals_of_the_active_model():
    from bench.quality import combine_seeds, round_row, seed_result

    base = _report("base", [0.5] * 4)
    seeds = []
    # Seed 0: the gate promotes round 1 (active = the candidate); seed 1: it does not (active = base).
    for seed, cand, promoted, stock in ((0, 0.7, True, 0.6), (1, 0.6, False, 0.4)):
        c = _report(f"r1-{seed}", [cand] * 4)
        rounds = [round_row(1, c, c if promoted else base, base, reviews=10, promoted=promoted)]
        randoms = [round_row(1, _report("rand", [0.55] * 4), base, base, reviews=10, promoted=False)]
        reports = {"base": base, "bm25": _report("bm25", [0.45] * 4), "stock": _report("stock", [stock] * 4)}
        seeds.append(seed_result(seed, reports, rounds, randoms, stock_pairs=10))
    one = seeds[0][0]
    assert one["rounds"][0]["ndcg@10"] == 0.7 and one["rounds"][0]["active_ndcg@10"] == 0.7
    assert one["loop_vs"]["base"]["delta"] == pytest.approx(0.2)              # the active model after the last round
    assert one["candidate_vs"]["random"]["delta"] == pytest.approx(0.15)      # candidate vs candidate
    assert seeds[1][0]["loop_vs"]["base"]["delta"] == 0.0                     # nothing promoted: the user has the base
    out = combine_seeds(seeds)
    assert out["seeds"] == [0, 1] and out["promotions_per_seed"] == [1, 0]
    assert [s["seed"] for s in out["per_seed"]] == [0, 1] and "_report" not in json.dumps(out)
    r = out["rounds"][0]
    assert (r["ndcg@10"], r["active_ndcg@10"], r["promoted"]) == (pytest.approx(0.65), pytest.approx(0.6), 0.5)
    assert out["stock_finetune"]["ndcg@10"] == pytest.approx(0.5)
    # Pooled over seeds and queries: active - base is +0.2 in seed 0 and 0 in seed 1.
    assert out["loop_vs"]["base"] == {"delta": 0.1, "ci95": [0.0, 0.2], "significant": False}
    assert out["loop_vs"]["bm25"]["delta"] == pytest.approx(0.15)
    assert out["loop_vs"]["stock"] == {"delta": 0.1, "ci95": [0.1, 0.1], "significant": True}  # +0.1 in both
    assert out["candidate_vs"]["base"]["delta"] == pytest.approx(0.15)
    assert out["stock_finetune"]["delta_vs_base"] == 0.0 and out["stock_finetune"]["ci95_vs_base"] == [-0.1, 0.1]
    assert out["targets"]["beats_all_controls"] is True
    assert out["per_query_ndcg@10"]["loop"] == [0.6] * 4
    json.dumps(out)  # plain JSON
    # bench/README.md's tables are printed from such a JSON (bench.table), never typed by hand.
    from bench.table import tables

    text = tables({**out, "dataset": "tiny", "budget": 10, "n_rounds": 1, "n_test_queries": 4,
                   "machine": {"commit": "abc", "date": "today"}, "wall_s": {"total": 1.0}})
    assert "| loop, round 1 | 10 | 0.6500 | **0.6000** |" in text
    assert "| (c) stock fine-tune, 10 gold pairs | 10 | 0.5000 |" in text
    assert "stock +0.1000 [+0.100, +0.100]" in text and "Promotions per seed (loop): [1, 0]." in text


def test_seeds_run_as_separate_processes_combine_into_the_same_figures(tmp_path):
    from bench.quality import combine_seeds, main, round_row, seed_result

    base = _report("base", [0.5, 0.4, 0.6, 0.5])
    seeds = []
    for seed, first, last in ((0, [0.6, 0.4, 0.6, 0.5], [0.7, 0.5, 0.6, 0.6]), (1, [0.5, 0.5, 0.6, 0.4], [0.6, 0.4, 0.7, 0.5])):
        r1, r2 = _report(f"r1-{seed}", first), _report(f"r2-{seed}", last)
        rounds = [round_row(1, r1, base, base, reviews=5, promoted=False),
                  round_row(2, r2, r2, base, reviews=10, promoted=True)]
        reports = {"base": base, "stock": _report("stock", [0.5, 0.5, 0.5, 0.5])}
        seeds.append(seed_result(seed, reports, rounds, None, stock_pairs=10))
    together = combine_seeds(seeds)
    protocol = {"dataset": "tiny", "budget": 10, "n_rounds": 2, "n_test_queries": 4, "gain": "exponential"}
    files = []
    for result, _ in seeds:  # each seed written by its own `bench.quality --seed S --seeds 1` run
        files.append(tmp_path / f"seed{result['seed']}.json")
        files[-1].write_text(json.dumps({**protocol, "per_seed": [result], "wall_s": {"total": 1.0}}))
    assert main(["--combine", *map(str, files), "--out", str(tmp_path / "all.json")]) == 0
    combined = json.loads((tmp_path / "all.json").read_text())
    for key in ("loop_vs", "candidate_vs", "promotions_per_seed", "seeds", "stock_finetune", "targets"):
        assert combined[key] == together[key], key
    assert [r["ci95_vs_base"] for r in combined["rounds"]] == [r["ci95_vs_base"] for r in together["rounds"]]
    assert combined["dataset"] == "tiny" and [c["seeds"] for c in combined["combined_from"]] == [[0], [1]]
    # A file written before every round's per-query figures were kept: the last round still pools.
    old = json.loads(files[1].read_text())
    del old["per_seed"][0]["per_query_ndcg@10"]["loop_rounds"]
    files[1].write_text(json.dumps(old))
    assert main(["--combine", *map(str, files), "--out", str(tmp_path / "old.json")]) == 0
    old_combined = json.loads((tmp_path / "old.json").read_text())
    rows = old_combined["rounds"]
    assert "ci95_vs_base" not in rows[0] and rows[1]["ci95_vs_base"] == together["rounds"][1]["ci95_vs_base"]
    from bench.table import tables

    text = tables({**old_combined, "machine": {"commit": "abc", "date": "today"}})
    assert "| loop, round 1 | 5 |" in text and "(seed mean) |" in text and "Combined from seed0.json (seeds [0]" in text
    # Runs of different protocols, or the same seed twice, do not combine.
    files[1].write_text(json.dumps({**old, "budget": 20}))
    with pytest.raises(SystemExit, match="budget"):
        main(["--combine", *map(str, files), "--out", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit, match="seed repeated"):
        main(["--combine", str(files[0]), str(files[0]), "--out", str(tmp_path / "bad.json")])
    elsewhere = json.loads(files[0].read_text())  # e.g. a --dev-split run of another --seed: another split
    elsewhere["per_seed"][0]["seed"] = 5
    elsewhere["per_seed"][0]["per_query_ndcg@10"]["query_ids"][0] = "another"
    (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
    with pytest.raises(SystemExit, match="judged on different queries"):
        main(["--combine", str(files[0]), str(tmp_path / "elsewhere.json"), "--out", str(tmp_path / "bad.json")])
    # Files that are not results: a clear error, and no output file.
    (tmp_path / "broken.json").write_text("{bad")
    (tmp_path / "other.json").write_text("{}")
    (tmp_path / "cut.json").write_text(json.dumps({"per_seed": [{"seed": 3}]}))
    for name, message in (("missing.json", "cannot read"), ("broken.json", "cannot read"),
                          ("other.json", "not a bench.quality result"), ("cut.json", r"per_seed\[0\] has no per-query")):
        with pytest.raises(SystemExit, match=message):
            main(["--combine", str(files[0]), str(tmp_path / name), "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_arms_table_pairs_two_loop_settings_by_seed_and_query(tmp_path, capsys):
    from bench.quality import round_row, seed_result
    from bench.table import main

    base = _report("base", [0.5, 0.4, 0.6, 0.5])
    protocol = {"dataset": "tiny", "budget": 10, "n_rounds": 1, "n_test_queries": 4, "gain": "exponential"}

    def write(name: str, loop_config: dict, lift: float, promote: bool, seeds=(0, 1), split: str = "") -> str:
        per_seed = []
        for seed in seeds:
            c = _report(f"{name}-{seed}", [v + lift + 0.01 * seed for v in (0.5, 0.4, 0.6, 0.5)])
            start = base.model_copy(update={"query_ids": [f"{split}{q}" for q in base.query_ids]})
            c.query_ids = list(start.query_ids)  # a dev-split run (`split`): the seed's own queries
            rounds = [round_row(1, c, c if promote else start, start, reviews=10, promoted=promote)]
            per_seed.append(seed_result(seed, {"base": start}, rounds, None, stock_pairs=10)[0])
        (tmp_path / name).write_text(json.dumps({**protocol, "loop_config": loop_config, "per_seed": per_seed}))
        return str(tmp_path / name)

    a = write("a.json", {}, 0.0, promote=False)
    b = write("b.json", {"train": {"epochs": 1}}, 0.1, promote=True)
    assert main(["--arms", a, b]) == 0
    text = capsys.readouterr().out
    assert "tiny, seeds [0, 1], 4 judged queries. A: {}; B: {\"train\": {\"epochs\": 1}}." in text
    assert "| candidate, round 1 | 0.5050 | 0.6050 | +0.1000 [+0.100, +0.100] |" in text
    assert "| active after round 1 | 0.5000 | 0.6050 | +0.1050 [+0.100, +0.110] |" in text  # A kept the base
    assert "| promotions per seed | [0, 0] | [1, 1] | |" in text
    # Dev-split runs of other seeds (each its own queries) pool with them: queries resampled per seed.
    a2 = write("a2.json", {}, 0.0, promote=False, seeds=(2,), split="dev2-")
    b2 = write("b2.json", {"train": {"epochs": 1}}, 0.2, promote=False, seeds=(2,), split="dev2-")
    assert main(["--arms", a, b, a2, b2]) == 0
    text = capsys.readouterr().out
    assert "tiny, seeds [0, 1, 2], 4 judged queries per seed (each seed its own dev split" in text
    # Every seed's per-query differences are constant (0.1, 0.1, 0.2): seeds are strata, never resampled.
    assert "| candidate, round 1 | 0.5100 | 0.6433 | +0.1333 [+0.133, +0.133] |" in text
    assert "| active after round 1 | 0.5000 | 0.5700 | +0.0700 [+0.070, +0.070] |" in text
    assert "| promotions per seed | [0, 0, 0] | [1, 1, 0] | |" in text
    for args, message in (([a, b, a2], "A/B pairs"), ([a, b, b2, a2], "another loop_config"),
                          ([a, b, a, b], "seed repeated")):
        with pytest.raises(SystemExit, match=message):
            main(["--arms", *args])
    # Runs that cannot be paired: a clear error naming why.
    other = json.loads(Path(b).read_text())
    for change, message in (({"budget": 20}, "differ in 'budget'"), ({"per_seed": other["per_seed"][:1]}, "different seeds")):
        (tmp_path / "c.json").write_text(json.dumps({**other, **change}))
        with pytest.raises(SystemExit, match=message):
            main(["--arms", a, str(tmp_path / "c.json")])
    # An A/B pair run on two kinds of CPU is refused (another CPU, another model), unless asked for.
    (tmp_path / "c.json").write_text(json.dumps({**other, "machine": {"cpu": "AMD EPYC"}}))
    (tmp_path / "d.json").write_text(json.dumps({**json.loads(Path(a).read_text()), "machine": {"cpu": "Intel Xeon"}}))
    pair = [str(tmp_path / "d.json"), str(tmp_path / "c.json")]
    with pytest.raises(SystemExit, match=r"different CPUs \(Intel Xeon vs AMD EPYC\)"):
        main(["--arms", *pair])
    assert main(["--arms", *pair, "--mixed-machines"]) == 0
    text = capsys.readouterr().out
    assert "CAUTION: pairs ran on different CPUs (Intel Xeon vs AMD EPYC)." in text and "| +0.1000 [" in text
    other["per_seed"][1]["per_query_ndcg@10"]["query_ids"][0] = "elsewhere"
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different queries"):
        main(["--arms", a, str(tmp_path / "c.json")])
    # JSONs written before each round's per-query figures were kept: round 1 says so, the last round still pairs.
    for name, lift in (("old-a.json", 0.0), ("old-b.json", 0.1)):
        c = _report(name, [v + lift for v in (0.5, 0.4, 0.6, 0.5)])
        rounds = [round_row(i, c, base, base, reviews=5 * i, promoted=False) for i in (1, 2)]
        result = seed_result(0, {"base": base}, rounds, None, stock_pairs=10)[0]
        del result["per_query_ndcg@10"]["loop_rounds"]
        (tmp_path / name).write_text(json.dumps({**protocol, "n_rounds": 2, "per_seed": [result]}))
    assert main(["--arms", str(tmp_path / "old-a.json"), str(tmp_path / "old-b.json")]) == 0
    text = capsys.readouterr().out
    assert "| candidate, round 1 | - | - | no per-query figures |" in text
    assert "| candidate, round 2 | 0.5000 | 0.6000 | +0.1000 [+0.100, +0.100] |" in text


def test_reviewer_order_follows_its_seed(workspace, beir_dir):
    beir = _ingested(workspace, beir_dir)
    Rounds(workspace, LoopConfig(generate_max=6, review_budget=50, routing={"random_fraction": 1.0})).advance(
        until="review")
    cards = [c.pair_id for c in pending(workspace.store, limit=3)]
    orders = [SimulatedReviewer(workspace, beir.queries, beir.qrels["train"], seed=s).order(3) for s in (0, 1, 2, 3)]
    assert all(sorted(c.pair_id for c in o) == sorted(cards) for o in orders)  # the same top cards ...
    assert len({tuple(c.pair_id for c in o) for o in orders}) > 1              # ... in a seeded order
    again = SimulatedReviewer(workspace, beir.queries, beir.qrels["train"], seed=1).order(3)
    assert [c.pair_id for c in again] == [c.pair_id for c in orders[1]]
    unseeded = SimulatedReviewer(workspace, beir.queries, beir.qrels["train"]).order(3)
    assert [c.pair_id for c in unseeded] == cards  # no seed: queue order, highest priority first


GPU_COLUMNS = [  # bench/gpu.py's table and JSON, per model size
    "weights", "train_stock_default_pairs_s", "train_stock_best_pairs_s", "train_stock_cached_pairs_s",
    "train_project_pairs_s", "train_project_trainer_pairs_s", "train_project_wall_s", "train_ratio",
    "train_ratio_vs_default", "train_stock_best_peak_gpu_mb", "train_project_peak_gpu_mb",
    "encode_stock_passages_s", "encode_project_passages_s", "encode_ratio", "encode_cosine_min",
    "reindex_stock_passages_s", "reindex_project_passages_s", "reindex_ratio", "seconds",
]


@case("What a user hits", "the GPU benchmark's smoke mode on a CPU",
      "`python bench/gpu.py --smoke` runs every row (stock trainer at its defaults, bf16/batch 256 and "
      "CachedMNRL; loop/train.py itself; stock and project encode; re-index) on toy models and prints "
      "every column, in its table and its JSON, for both model sizes")
def test_gpu_bench_smoke_runs_every_path_on_a_cpu(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(root / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SMOKE RUN" in proc.stdout and "meaningless" in proc.stdout
    table = {line.split("|")[0].strip() for line in proc.stdout.splitlines() if "|" in line}
    assert set(GPU_COLUMNS) <= table
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["device"] == "cpu"
    assert [r["size"] for r in data["rows"]] == ["MiniLM-L6", "BERT-base"]
    for row in data["rows"]:
        assert row["errors"] == {}
        assert set(GPU_COLUMNS) <= set(row)
        measured = [c for c in GPU_COLUMNS if c.endswith(("_pairs_s", "_passages_s", "_ratio", "_wall_s"))]
        assert all(isinstance(row[c], (int, float)) and row[c] > 0 for c in measured), row
        # the project's trainer at precision auto: bf16 autocast where the CPU has bf16 in hardware
        cpu_precision = "bf16" if cpu_has_native_bf16() else "fp32"
        assert row["train_stock_best_peak_gpu_mb"] is None and row["project_train"]["precision"] == cpu_precision
        assert row["encode_cosine_min"] > 0.999  # the sorted encode path gives the stock vectors (fp32 here)


# bench.speed's encode part: the project's backends and sentence-transformers' own ONNX path --------------
SPEED_TEXTS = [DOCS[d] for d in sorted(DOCS)] * 2


# A folder holding sentence-transformers 5 + optimum-onnx (bench/README.md); read at import, since every
# test runs without EMBEDLOOP_ variables (conftest).
ST_ONNX_SITE = os.environ.get("EMBEDLOOP_ST_ONNX_SITE") or None


@pytest.mark.slow
@case("What a user hits", "bench.speed encode with sentence-transformers' ONNX arms where optimum-onnx is missing",
      "every arm has its row: the project's backends their passages/s, ratio_vs_stock and NDCG@10; a library arm "
      "that cannot load says why and how to install it, and the run goes on")
def test_bench_encode_puts_the_library_arms_beside_the_projects(beir_dir, tmp_path):
    from bench.speed import bench_encode

    out = bench_encode(SPEED_TEXTS, ["onnx-int8", "st-onnx-qint8"], tmp_path / "cache", batch_size=8,
                       data=beir_dir, st_onnx_site=ST_ONNX_SITE)
    assert out["onnx-int8"]["ratio_vs_stock"] > 0 and 0 <= out["onnx-int8"]["ndcg@10"] <= 1
    lib = out["st-onnx-qint8"]
    if "error" in lib:  # the library's ONNX path is not installable beside sentence-transformers >= 6
        assert "optimum" in lib["error"] and "--st-onnx-site" in lib["error"]
    else:
        assert lib["ratio_vs_stock"] > 0 and lib["cosine_to_stock_min"] >= 0.95 and "ndcg@10" in lib
    assert out["stock_torch_passages_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(ST_ONNX_SITE is None, reason="needs EMBEDLOOP_ST_ONNX_SITE (bench/README.md)")
def test_bench_encode_measures_sentence_transformers_onnx_arms(beir_dir, tmp_path):
    from bench.speed import bench_encode

    arms = ["st-onnx", "st-onnx-O3", "st-onnx-qint8"]  # st-onnx-O3-qint8: the library's quantiser fails on its O3 graph
    out = bench_encode(SPEED_TEXTS, arms, tmp_path / "cache", batch_size=8, data=beir_dir, st_onnx_site=ST_ONNX_SITE)
    for arm in arms:
        assert "error" not in out[arm], out[arm]
        floor = 0.95 if "qint8" in arm else 0.999
        assert out[arm]["ratio_vs_stock"] > 0 and out[arm]["cosine_to_stock_min"] >= floor
        assert 0 <= out[arm]["ndcg@10"] <= 1


def test_gate_calibration_counts_false_promotions_and_refusals_per_rule():
    from bench.quality import gate_calibration

    def row(p, delta, test_delta, test_lo):
        return {"gate": {"p_better": p, "delta": delta, "n_queries": 20, "test_delta_vs_active": test_delta,
                         "test_ci95_vs_active": [test_lo, test_delta + 0.01]}}

    rows = [row(0.99, 0.05, 0.03, 0.01),    # promoted by every rule, rightly
            row(0.85, 0.02, -0.01, -0.03),  # worse on test: a false promotion under rules up to 0.85
            row(0.6, 0.01, 0.02, 0.005),    # better on test: refused by the strict rules
            {"gate": {"n_queries": None}}]  # a round without a gate is not counted
    cal = gate_calibration(rows)
    assert cal["rounds"] == 3 and cal["better_on_test"] == 2 and cal["significantly_better_on_test"] == 2
    assert cal["p>=0.975"] == {"promoted": 1, "false_promotions": 0, "false_refusals": 1, "refused_better": 1}
    assert cal["p>=0.8"] == {"promoted": 2, "false_promotions": 1, "false_refusals": 1, "refused_better": 1}
    assert cal["p>=0.5"] == {"promoted": 3, "false_promotions": 1, "false_refusals": 0, "refused_better": 0}
    assert not any(k.startswith("sign-flip") for k in cal)  # rounds that did not record the test
    for r, p in zip(rows, (0.01, 0.15, 0.3), strict=False):
        r["gate"]["p_sign_flip"] = p
    cal = gate_calibration(rows)
    assert cal["sign-flip p<=0.05"] == {"promoted": 1, "false_promotions": 0, "false_refusals": 1, "refused_better": 1}
    assert cal["sign-flip p<=0.2"] == cal["p>=0.8"]
    from bench.table import tables

    text = tables({"dataset": "tiny", "budget": 10, "n_rounds": 1, "n_test_queries": 4, "gate_calibration": cal,
                   "base": {"ndcg@10": 0.5, "recall@100": 0.9, "mrr@10": 0.5},
                   "machine": {"commit": "abc", "date": "today"}, "wall_s": {"total": 1.0}})
    assert "| bootstrap share of wins >= 0.975 | 1 | 0 | 1 | 1 |" in text
    assert "| sign-flip test p <= 0.05 | 1 | 0 | 1 | 1 |" in text
    assert cal["p>=0.95 & sign-flip p<=0.1"] == cal["p>=0.975"]  # both tests: only the first round
    assert "| bootstrap share of wins >= 0.95 and sign-flip test p <= 0.1 | 1 | 0 | 1 | 1 |" in text


def test_the_wise_probe_compares_the_folds_choice_with_each_fixed_weight(tmp_path, capsys):
    from bench.quality import main, wise_probe_summary
    from bench.table import main as table_main
    from bench.table import tables

    def probe(chosen, per_weight):
        return {"wise_probe": {"chosen": chosen, "judge": {a: {"ndcg@10": float(np.mean(v)), "per_query": v}
                                                           for a, v in per_weight.items()}}}

    rows = [probe(0.5, {"0.5": [0.2, 0.4], "1": [0.4, 0.6]}),   # the fold chose 0.5; 1.0 was better by 0.2
            probe(1.0, {"0.5": [0.5, 0.5], "1": [0.5, 0.7]}),   # the fold chose 1.0
            {"round": 3}]                                         # a round without WiSE-FT is not counted
    out = wise_probe_summary(rows)
    assert out["rounds"] == 2 and out["chosen"] == [0.5, 1.0]
    assert out["development_fold_choice"] == pytest.approx(np.mean([0.2, 0.4, 0.5, 0.7]))
    assert out["fixed 1"]["vs_fold_choice"] == pytest.approx(0.1)  # 0.2 better in round 1, the same in round 2
    assert out["fixed 0.5"]["vs_fold_choice"] == pytest.approx(-0.05)
    assert wise_probe_summary([{"round": 1}]) is None
    text = tables({"dataset": "tiny", "budget": 10, "n_rounds": 2, "n_test_queries": 2, "wise_probe": out,
                   "base": {"ndcg@10": 0.5, "recall@100": 0.9, "mrr@10": 0.5},
                   "machine": {"commit": "abc", "date": "today"}, "wall_s": {"total": 1.0}})
    assert "| fixed 1 | 0.5500 | +0.1000" in text
    with pytest.raises(ValueError, match="different WiSE-FT grids"):
        wise_probe_summary(rows[:1] + [probe(1.0, {"0.25": [0.1, 0.1], "1": [0.1, 0.1]})])
    assert wise_probe_summary(rows[:1] + [probe(1.0, {"0.5": [0.1], "1": [0.4]})])["rounds"] == 2  # other queries
    files = [tmp_path / "a.json", tmp_path / "b.json"]  # two runs (seeds, dev splits) pooled
    for f, part in zip(files, (rows[:1], rows[1:]), strict=True):
        f.write_text(json.dumps({"per_seed": [{"rounds": part}]}), encoding="utf-8")
    capsys.readouterr()
    assert table_main(["--wise-probe", *map(str, files)]) == 0
    assert "over 2 loop rounds" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a weight picked on the test split would be tuning on it
        main(["--data", "x", "--budget", "10", "--out", "o.json", "--probe-wise"])
    assert "never on qrels/test" in capsys.readouterr().err


def test_bench_table_pools_the_gate_calibration_over_runs(tmp_path, capsys):
    from bench.table import main

    def row(p, sf, delta, test_delta):
        return {"gate": {"p_better": p, "p_sign_flip": sf, "delta": delta, "n_queries": 20,
                         "test_delta_vs_active": test_delta, "test_ci95_vs_active": [test_delta - 0.01, test_delta + 0.01]}}

    seeds = {"dataset": "a", "seeds": [0, 1], "per_seed": [  # a run of two seeds: loop and random-control rounds
        {"rounds": [row(0.99, 0.01, 0.05, 0.03)], "random_control": {"rounds": [row(0.96, 0.3, 0.04, -0.02)]}},
        {"rounds": [row(0.5, 0.6, 0.0, 0.01)]}]}
    single = {"dataset": "b", "seeds": [0], "per_seed": [{"rounds": [row(0.97, 0.05, 0.02, 0.02)]}]}  # one seed
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for f, d in zip(files, (seeds, single), strict=True):
        f.write_text(json.dumps(d))
    assert main(["--calibration", *map(str, files)]) == 0
    text = capsys.readouterr().out
    assert "Gate calibration over 4 rounds (a.json: a, seeds [0, 1]; b.json: b, seeds [0]; 3 candidates better" in text
    assert "| bootstrap share of wins >= 0.95 | 3 | 1 | 0 | 1 |" in text  # the random round at 0.96 was worse
    assert "| bootstrap share of wins >= 0.95 and sign-flip test p <= 0.1 | 2 | 0 | 0 | 1 |" in text
    assert main(["--calibration"]) == 2
    with pytest.raises(SystemExit, match="--calibration: cannot read .*missing.json as JSON"):
        main(["--calibration", str(tmp_path / "missing.json")])


@pytest.mark.slow
def test_pseudo_label_probe_counts_agreements_and_their_precision_on_train_qrels(beir_dir):
    from bench.pseudo import probe

    out = probe(beir_dir, "train")
    # q1 and q2: BM25 and the model both put the judged document first; q3 is worded after d1,
    # which both put first, while the qrels judge d7: an agreement that would be a wrong label.
    assert out["queries"] == 3 and out["agree"] == {"coverage": 1.0, "labels": 3, "precision": pytest.approx(0.6667)}
    assert out["dense_top1_precision"] == out["bm25_top1_precision"] == pytest.approx(0.6667)
    assert out["agree_margin_0.05"]["labels"] <= out["agree_margin_0.02"]["labels"] <= 3


def test_pool_probe_compares_the_model_top_with_the_interleaved_pool_on_train_qrels(beir_dir):
    from bench.pool import probe

    # One passage per card: the interleaved pool starts with the model's top, so both pools agree
    # (q3's judged d7 is first for neither: see the pseudo-label probe above).
    one = probe(beir_dir, "train", k=1)
    assert one["queries"] == 3 and one["interleaved"] == one["model"]
    assert one["model"]["coverage"] == pytest.approx(0.6667) and one["model"]["queries_only_outside_model_top"] == 0
    # Every document shown: each pool finds every judged answer, none outside the model's top.
    every = probe(beir_dir, "train", k=len(DOCS))
    for pool in ("model", "interleaved"):
        assert every[pool]["coverage"] == 1.0 and every[pool]["queries_only_outside_model_top"] == 0
    assert every["interleaved"]["relevant_shown_per_query"] == every["model"]["relevant_shown_per_query"] >= 1


def test_bench_ann_reports_recall_and_build_to_build_differences(beir_dir, tmp_path, monkeypatch):
    from bench.ann import main

    monkeypatch.setenv("EMBEDLOOP_ENCODE_BACKEND", "torch")  # no ONNX export for a handful of texts
    out = tmp_path / "ann.json"
    assert main(["--data", str(beir_dir), "--k", "2", "--builds", "2", "--ef", "50", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    ef = d["ef_search"]["50"]
    assert d["docs"] == len(DOCS) and d["queries"] == len(QUERIES)
    # A few vectors: the graph search is exhaustive, so every build is exact and every build agrees.
    assert ef["recall_vs_exact"] == [1.0, 1.0] and ef["queries_differing_from_build_1"] == [0]
    assert len(ef["search_ms_per_query"]) == 2 and all(ms > 0 for ms in ef["search_ms_per_query"])
    for bad in (["--builds", "1"], ["--ef", "100", "0"]):
        with pytest.raises(SystemExit):
            main(["--data", str(beir_dir), *bad])


@pytest.mark.parametrize("args, message", [
    (["--pairs", "0"], "--pairs: pairs must be a positive whole number, got 0"),
    (["--arms", '{"all": {"pairs": "many"}}'], "--arms 'all': pairs must be a positive whole number, got 'many'"),
    (["--arms", '{"half": {"pairs": 2.5}}'], "--arms 'half': pairs must be a positive whole number, got 2.5"),
    (["--arms", '["a", "b"]'], "--arms: a JSON object of arm name -> object"),
])
def test_recipe_refuses_a_bad_pair_count_before_any_work(tmp_path, capsys, args, message):
    from bench.recipe import main

    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(tmp_path / "not-read"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_arms_train_in_the_trainer_subprocess_and_compare_on_the_dev_split(tmp_path):
    from bench.recipe import run

    root = tmp_path / "recipe"  # a train query per document: enough pairs for the trainer's own eval split
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in DOCS.items()))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{d}", "text": " ".join(t.split()[:4])}) + "\n"
                                                for d, t in DOCS.items()))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{d}\t{d}\t1\n" for d in DOCS))
    arms = {"short": {"epochs": 1, "max_seq_length": 32},
            "lr1e-4": {"epochs": 1, "max_seq_length": 32, "learning_rate": 1e-4, "pairs": 4}}
    out = run(root, pairs=6, dev_split=0.25, seeds=1, arms=arms, log=lambda *_: None)
    assert (out["n_dev_queries"], out["seeds"]) == (2, 1) and 0 <= out["base_ndcg@10"] <= 1
    assert list(out["arms"]) == ["short", "lr1e-4"] and "vs_short" in out["arms"]["lr1e-4"]
    assert [arm["runs"][0]["pairs"] for arm in out["arms"].values()] == [6, 4]  # the arm's own count
    assert out["arms"]["lr1e-4"]["config"] == {"epochs": 1, "max_seq_length": 32, "learning_rate": 1e-4, "pairs": 4}
    for arm in out["arms"].values():
        assert 0 <= arm["ndcg@10"] <= 1 and set(arm["vs_base"]) >= {"delta", "ci95"}
        (one,) = arm["runs"]
        assert one["steps"] >= 1 and 0 < one["peak_rss_mb"] < 3000  # the trainer's own RSS, not this process's


def test_a_benchmark_stopped_with_sigterm_removes_its_scratch_folder_and_stops_its_trainers(tmp_path):
    """`kill` used to leave a stopped benchmark's workspaces (GBs) behind, and its trainer, which
    runs in its own session, training on: bench.common.scratch removes the one and stops the other."""
    import signal
    import subprocess
    import sys

    from loop.procs import pid_alive

    script = (
        "import subprocess, sys, time\n"
        "from pathlib import Path\n"
        "from bench.common import scratch\n"
        "with scratch('bench-t-', Path(sys.argv[1])) as d:\n"
        "    (d / 'workspace.duckdb').write_bytes(b'x' * 1024)\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], cwd=d,\n"
        "                             start_new_session=True)  # as loop.train.start runs a trainer\n"
        "    print(d, child.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    folder, child = proc.stdout.readline().split()
    assert Path(folder).is_dir() and pid_alive(int(child))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not Path(folder).exists()
    assert not pid_alive(int(child))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_threads_times_one_process_against_one_thread_processes_side_by_side(beir_dir, tmp_path):
    from bench.threads import main

    out = tmp_path / "threads.json"
    assert main(["--data", str(beir_dir), "--steps", "1", "--passages", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cores = len(os.sched_getaffinity(0))
    runs = [result[f"one_process_{cores}_threads"], result["one_process_1_thread"], *result[f"{cores}_processes_1_thread_each"]]
    assert len(runs) == 2 + cores
    assert all(r["train_s_per_step"] > 0 and r["encode_passages_per_s"] > 0 for r in runs)
    side = result["side_by_side_vs_one_process"]
    whole = runs[0]
    assert side["encode"] == pytest.approx(sum(r["encode_passages_per_s"] for r in runs[2:]) / whole["encode_passages_per_s"], abs=1e-3)
    assert side["train"] == pytest.approx(sum(1 / r["train_s_per_step"] for r in runs[2:]) * whole["train_s_per_step"], abs=1e-3)
    with pytest.raises(SystemExit):
        main(["--data", str(beir_dir), "--steps", "0", "--out", str(out)])


def test_bench_threads_refuses_a_folder_it_cannot_read_before_starting_a_process(tmp_path, capsys):
    from bench.threads import main

    with pytest.raises(SystemExit, match="--data: .*corpus.jsonl: no such file"):
        main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o.json")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": "a text"}) + "\n")
    (tmp_path / "empty" / "queries.jsonl").write_text("")
    with pytest.raises(SystemExit, match="--data: .*queries.jsonl: the file is empty"):
        main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()
