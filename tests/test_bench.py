"""bench.quality's simulated reviewer and controls on a tiny BEIR folder, with the FakeEmbedder.

The whole benchmark trains real models (minutes); here its pieces run on exact keyword
similarity: the reviewer's accept / pick / reject answers, its budget, BM25 and the JSON figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import Beir, SimulatedReviewer, bm25_report, summary, vs
from loop.evaluate import evalset_from_beir, evaluate
from loop.rounds import LoopConfig, Rounds
from tests.fakes import FakeEmbedder

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


def test_reviewer_accepts_picks_and_rejects_from_train_qrels(workspace, beir_dir):
    beir = _ingested(workspace, beir_dir)
    reviewer = SimulatedReviewer(workspace, beir.queries, beir.qrels["train"], k=5)
    pid = {d: workspace.store.first_passage_of_docs([d])[d] for d in DOCS}
    assert reviewer.answer(QUERIES["q1"][0], pid["d1"]) == ("accept", None)
    # A wrong positive: the relevant passage is picked from the shown top-k.
    assert reviewer.answer(QUERIES["q2"][0], pid["d5"]) == ("pick", pid["d2"])
    # Not a judged train query (a synthetic one, or a test query): no answer in the qrels.
    assert reviewer.answer("who pays for floods", pid["d8"]) == ("reject", None)
    assert reviewer.answer(QUERIES["t1"][0], pid["d6"]) == ("reject", None)  # test qrels are never used
    # Judged, but neither the positive nor the shown top-k (here the top 1) is relevant.
    narrow = SimulatedReviewer(workspace, beir.queries, beir.qrels["train"], k=1)
    assert narrow.answer(QUERIES["q3"][0], pid["d1"]) == ("reject", None)


def test_reviewer_decides_a_real_round_queue_within_budget(workspace, beir_dir):
    beir = _ingested(workspace, beir_dir)
    loop = Rounds(workspace, LoopConfig(generate_max=6, review_budget=50, routing={"random_fraction": 1.0}))
    loop.advance(until="review")
    queued = int(workspace.store.scalar("SELECT count(*) FROM pairs WHERE status = 'pending'"))
    assert queued >= 3  # the three mined train queries at least
    reviewer = SimulatedReviewer(workspace, beir.queries, beir.qrels["train"], k=5)
    assert reviewer.review(limit=2) == 2
    done = reviewer.review(limit=100)
    # A pick of a passage that has its own card answers that card too (it is not asked again).
    answered_by_pick = int(workspace.store.scalar(
        "SELECT count(*) FROM decisions WHERE json_extract(payload, '$.resolved_pair') IS NOT NULL"))
    assert done == queued - 2 - answered_by_pick
    assert sum(reviewer.counts.values()) == queued - answered_by_pick
    rows = workspace.store.rows("SELECT action, count(*) AS n FROM decisions GROUP BY action")
    assert {r["action"]: r["n"] for r in rows} == {k: v for k, v in reviewer.counts.items() if v}
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


def test_dev_split_judges_on_train_queries_only(beir_dir, tmp_path):
    from bench.common import make_dev_split

    dev = Beir.read(make_dev_split(beir_dir, tmp_path / "dev", 0.34, seed=0))
    assert set(dev.qrels["train"]) | set(dev.qrels["test"]) == set(TRAIN)
    assert not set(dev.qrels["train"]) & set(dev.qrels["test"]) and len(dev.qrels["test"]) == 1
