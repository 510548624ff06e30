"""The round state machine on a real workspace (DuckDB file + Chroma folder).

Fast tests use the FakeEmbedder (exact keyword similarity); the slow test trains the bundled
MiniLM in a real subprocess and runs a whole round to the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loop.rounds import LeakageError, LoopConfig, RoundError, Rounds
from loop.records import query_key
from loop.review import DecisionIn, decide, pending
from tests.reliability_report import case

TOPICS = {
    "indemnity": "Indemnification clauses allocate losses between the parties. The indemnifying party "
                 "pays the losses of the indemnified party arising from third party claims.",
    "liability": "Limitation of liability clauses cap the damages a party can recover. Consequential "
                 "damages are often excluded and the cap is tied to the fees paid.",
    "termination": "Termination for convenience lets a party end the agreement with notice. Termination "
                   "for cause requires a material breach that is not cured within thirty days.",
    "confidentiality": "Confidential information must not be disclosed to third parties. The receiving "
                       "party protects it with reasonable care and returns it on request.",
    "governing": "The governing law clause chooses the law of Delaware. Disputes go to the courts of "
                 "Wilmington, and the parties waive a jury trial.",
    "payment": "Invoices are payable within thirty days. Late payments bear interest at one percent "
               "per month, and disputed amounts must be raised in writing.",
    "warranty": "The supplier warrants that the goods conform to the specification for twelve months. "
                "Remedies for breach of warranty are repair or replacement.",
    "assignment": "Neither party may assign the agreement without consent, except to a successor in a "
                  "merger. Any other assignment is void.",
    "force": "Force majeure excuses delays caused by events beyond a party's control, such as floods, "
             "wars and strikes, while the event lasts.",
    "audit": "The customer may audit the supplier's records once a year on thirty days' notice, at "
             "the customer's own cost, during business hours.",
    "insurance": "The supplier keeps general liability insurance of at least five million dollars and "
                 "names the customer as an additional insured.",
    "notices": "Notices must be in writing and are effective when delivered by hand or by courier to "
               "the addresses in the agreement.",
}


def _seed(ws, tmp_path: Path, n_pairs: int = 10) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in TOPICS.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    ws.ingest([folder])
    pairs = tmp_path / "pairs.jsonl"
    questions = [f"what does the {name} clause say" for name in TOPICS][:n_pairs]
    with pairs.open("w") as f:
        for q, name in zip(questions, TOPICS, strict=False):
            f.write(json.dumps({"anchor": q, "positive_id": f"{name}.txt"}) + "\n")
    ws.import_pairs(pairs)
    log = tmp_path / "log.txt"
    log.write_text("who pays for third party claims\ncap on damages\nlate payment interest\n"
                   "jury trial waiver\nhow to end the agreement early\n", encoding="utf-8")
    ws.import_queries(log)


def _rounds(ws, **kw) -> tuple[Rounds, list[str]]:
    lines: list[str] = []
    cfg = LoopConfig(**{"generate_max": 20, "review_budget": 50, **kw})
    return Rounds(ws, cfg, log=lines.append), lines


def test_round_until_review_fills_the_queue(workspace, tmp_path):
    _seed(workspace, tmp_path)
    rounds, lines = _rounds(workspace)
    r = rounds.advance(until="review")
    assert r.state == "review"
    steps = r.manifest.steps
    assert steps["generate"]["generator"] == "offline" and steps["generate"]["written"] > 0
    assert steps["select"]["mined"] == 5 * rounds.config.mine_top  # every query-log line proposes its top passages
    counts = workspace.store.counts()["pairs"]
    # A logged (real) query's answer is never auto-accepted: every mined card waits for a person.
    assert counts["mined"] == {"pending": 5 * rounds.config.mine_top}
    cards = pending(workspace.store)
    assert cards and all(c.reason for c in cards) and all("rank" in c.features for c in cards)
    # Cards come highest expected value first.
    prios = [c.priority for c in cards]
    assert prios == sorted(prios, reverse=True)
    assert any("Routed:" in line for line in lines)
    # The review gate holds the round until the queue is empty.
    with pytest.raises(RoundError, match="waiting for review"):
        rounds.advance(until="train")
    # Re-running does not redo finished steps.
    again = rounds.advance(until="review")
    assert again.manifest.steps == r.manifest.steps


def test_random_control_slice_goes_to_review(workspace, tmp_path):
    _seed(workspace, tmp_path)
    rounds, _ = _rounds(workspace, routing={"random_fraction": 0.5})
    rounds.advance(until="review")
    controls = [c for c in pending(workspace.store) if "random control" in (c.reason or "")]
    assert controls, "the random control slice must reach the review queue"


def test_eval_split_is_fixed_once_and_leakage_is_refused(workspace, tmp_path):
    _seed(workspace, tmp_path)
    rounds, _ = _rounds(workspace, eval_fraction=0.25)
    held = rounds.heldout.ensure()
    assert held == 5  # max(5, 25% of 10)
    assert rounds.heldout.ensure() == 0  # fixed: never moves again
    evalset = rounds.heldout.evalset()
    assert len(evalset.query_ids) == 5
    # A training pair that reuses a held-out query is refused.
    eval_anchor = evalset.queries[0]
    workspace.store.execute(
        "INSERT INTO pairs (pair_id, anchor, positive_text, source, status, split) "
        "VALUES ('leak', ?, 'x', 'seed', 'accepted', 'train')", [eval_anchor.upper()]
    )
    with pytest.raises(LeakageError, match="held-out query"):
        rounds.data.rows()


@case("Stuck or wrong state", "the held-out set stays at the 10-20 queries of round 1 while reviews verify ~150",
      "before each round trains, the same share of the verified queries no training snapshot held joins it (a "
      "query any model was trained on never does); an imported eval set and a resumed run never grow")
def test_held_out_set_grows_by_queries_no_model_was_trained_on(workspace, tmp_path):
    _seed(workspace, tmp_path)
    rounds, lines = _rounds(workspace, eval_fraction=0.25)
    assert rounds.heldout.ensure(1) == 5  # first fixed: max(5, 25% of 10)
    first = rounds.heldout.folds()
    trained = [a for (a,) in workspace.store.execute(
        "SELECT anchor FROM pairs WHERE status = 'accepted' AND split = 'train'").fetchall()]
    rounds.heldout.record_trained(trained, 1)  # what round 1's train step records with its snapshot
    new = [f"which clause covers topic {i}" for i in range(8)]
    pid = workspace.store.passage_ids()[0]
    with workspace.store.transaction() as cur:  # verified since: imported (seed) pairs count as verified
        workspace.store.insert_ignore(cur, "pairs", [
            {"pair_id": f"new-{i}", "anchor": q, "positive_id": pid, "positive_text": "x",
             "source": "seed", "status": "accepted", "split": "train"} for i, q in enumerate(new)])
    assert rounds.heldout.ensure(None) == 0  # a resumed train step: the set stays
    assert rounds.heldout.ensure(2) == 2  # 25% of the 8 untrained queries
    held = rounds.heldout.folds()
    grown = (held[0] | held[1]) - (first[0] | first[1])
    assert len(grown) == 2 and grown <= {query_key(q) for q in new}  # never a query round 1 trained on
    assert not {query_key(a) for a in trained} & (held[0] | held[1])
    assert any("Added 2 of the 8 verified queries not yet trained on" in line for line in lines)
    assert len(held[0] | held[1]) == 7 and len(held[0]) == 2  # 7 queries now leave a development fold
    assert len(rounds.heldout.evalset().query_ids) == len(held[1])
    rounds.heldout.record_trained([q for q in new if query_key(q) not in grown], 2)
    assert rounds.heldout.ensure(3) == 0  # nothing new was verified


def test_a_workspace_from_before_trained_queries_counts_its_training_queries_as_trained(workspace, tmp_path):
    """Migration 4 cannot know which queries older rounds trained on: every accepted training
    query then counts as trained, so none of them can join the held-out set."""
    from loop.workspace import Workspace

    _seed(workspace, tmp_path)
    rounds, _ = _rounds(workspace, eval_fraction=0.25)
    rounds.heldout.ensure(1)
    before = rounds.heldout.folds()
    workspace.store.execute("DROP TABLE trained_queries")  # as a workspace made before migration 4
    workspace.store.execute("DELETE FROM schema_migrations WHERE version = 4")
    path = workspace.settings.workspace
    workspace.close()
    with Workspace.open(path) as ws:
        rounds, _ = _rounds(ws, eval_fraction=0.25)
        assert ws.store.scalar("SELECT count(*) FROM trained_queries") == 5  # the 10 seed queries less 5 held out
        assert rounds.heldout.ensure(2) == 0 and rounds.heldout.folds() == before


def test_an_imported_eval_set_never_grows(workspace, tmp_path):
    _seed(workspace, tmp_path)
    workspace.store.execute("UPDATE pairs SET split = 'eval' WHERE anchor LIKE '%indemnity%' OR anchor LIKE '%payment%'")
    rounds, _ = _rounds(workspace, eval_fraction=0.5)
    assert rounds.heldout.ensure(2) == 0 and len(rounds.heldout.folds()[1]) == 2


def test_the_development_fold_keeps_its_queries_when_the_set_grows():
    from loop.evalsets import dev_fold

    keys = {f"query {i}" for i in range(20)}
    more = keys | {f"later query {i}" for i in range(10)}
    small, large = dev_fold(keys, 0.35, seed=3), dev_fold(more, 0.35, seed=3)
    assert len(small) == 7 and len(large) == round(30 * 0.35)
    old_in_large = large & keys  # one seeded order: the old keys move only at the margin, never reshuffle
    assert old_in_large <= small or small <= old_in_large
    assert dev_fold(more, 0.35, seed=3) == large and dev_fold(more, 0.35, seed=4) != large


def test_open_cards_of_held_out_queries_are_dropped_not_asked(workspace, tmp_path):
    """A logged query proposes several passages; once it is held out, its other cards must not
    become training labels (a round-2 accept of one made training refuse to run)."""
    _seed(workspace, tmp_path)
    rounds, _ = _rounds(workspace, eval_fraction=0.25)
    anchors = [a for (a,) in workspace.store.execute("SELECT DISTINCT anchor FROM pairs ORDER BY anchor").fetchall()]
    with workspace.store.transaction() as cur:
        workspace.store.insert_ignore(cur, "pairs", [
            {"pair_id": f"open-{i}", "anchor": a, "positive_text": "another passage", "source": "mined",
             "status": "candidate" if i % 2 else "pending", "split": "train"} for i, a in enumerate(anchors)])
    rounds.heldout.ensure()
    held = set(rounds.heldout.evalset().queries)
    rows = workspace.store.rows("SELECT anchor, status, reason FROM pairs WHERE pair_id LIKE 'open-%'")
    assert {r["anchor"] for r in rows if r["status"] == "dropped"} == held
    assert all(r["reason"] == "its query is held out for evaluation" for r in rows if r["status"] == "dropped")
    # A new candidate that repeats an evaluation query (any case) is dropped when routed.
    query = sorted(held)[0]
    workspace.store.execute("INSERT INTO pairs (pair_id, anchor, positive_id, positive_text, source, status, split) "
                            "VALUES ('again', ?, 'payment.txt#0', 'x', 'synthetic', 'candidate', 'train')", [query.upper()])
    rounds.select(rounds.open())
    assert workspace.store.scalar("SELECT status FROM pairs WHERE pair_id = 'again'") == "dropped"
    rounds.data.rows()  # no leak


def test_training_rows_prefer_reviewer_negatives_and_never_use_own_document(workspace, tmp_path):
    _seed(workspace, tmp_path)
    rounds, _ = _rounds(workspace)
    rounds.config.mine_top = 3  # a card per passage of a logged query's top 3
    rounds.advance(until="review")
    rounds.heldout.ensure()  # held out first: the reviewed query below stays a training query
    # A logged query proposes several passages: reject one, accept another, so the query has an
    # accepted training pair whose negative can come from the reviewer.
    by_query: dict[str, list] = {}
    for c in pending(workspace.store):
        if c.source == "mined":
            by_query.setdefault(c.anchor, []).append(c)
    rejected, accepted = next(cards for cards in by_query.values() if len(cards) >= 2)[:2]
    decide(workspace.store, DecisionIn(pair_id=rejected.pair_id, action="reject", reviewer="ann"))
    decide(workspace.store, DecisionIn(pair_id=accepted.pair_id, action="accept", reviewer="ann"))
    rows = rounds.data.rows()
    assert rows and all(r["anchor"] and r["positive"] for r in rows)
    by_anchor = {r["anchor"]: r for r in rows}
    assert by_anchor[rejected.anchor]["positive"] == accepted.positive_text
    assert by_anchor[rejected.anchor]["negatives"] == [rejected.positive_text]  # the reviewer's, not a mined one
    for r in rows:
        assert r["positive"] not in r["negatives"]


def test_too_few_verified_pairs_for_an_eval_split(workspace, tmp_path):
    _seed(workspace, tmp_path, n_pairs=3)
    rounds, _ = _rounds(workspace)
    with pytest.raises(RoundError, match="at least 10"):
        rounds.heldout.ensure()


@pytest.mark.slow
def test_whole_round_trains_evaluates_and_decides(tmp_path, minilm_path):
    """A real round: bundled MiniLM, training subprocess, evaluation with CIs, promotion gate."""
    from loop.workspace import Workspace

    with Workspace.open(tmp_path / "ws") as ws:
        _seed(ws, tmp_path)
        rounds, lines = _rounds(ws, train={"epochs": 1, "batch_size": 8, "max_seq_length": 64})
        r = rounds.advance(until="review")
        for card in pending(ws.store):
            decide(ws.store, DecisionIn(pair_id=card.pair_id, action="accept", reviewer="ann"))
        r = rounds.advance(until="done")
        assert r.state == "done", r.error
        m = r.manifest
        assert m.data_snapshot and m.model.sha256 and Path(m.model.path, "modules.json").exists()
        # Five held-out queries leave no development fold: the trainer's eval loss runs on a share of
        # the training rows, never on the promotion set.
        snap = json.loads((rounds.run_dir(r) / "snapshot.json").read_text())
        assert rounds.heldout.folds()[0] == set() and snap["n_dev_queries"] == 0
        assert snap["n_train"] + snap["n_eval"] == len(rounds.data.rows())
        trained = {a for (a,) in ws.store.execute("SELECT anchor FROM trained_queries WHERE round = 1").fetchall()}
        assert trained == {row["anchor"] for row in rounds.data.rows()}  # recorded with the snapshot
        assert {"ndcg@10", "mrr@10", "recall@10"} <= set(m.metrics["candidate"])
        assert m.vs_base["ci_low"] <= m.vs_base["delta"] <= m.vs_base["ci_high"]
        assert set(m.vs_base_by_metric) == set(m.metrics["candidate"])  # every metric has its interval
        assert m.vs_base_by_metric["ndcg@10"] == m.vs_base
        assert m.promotion.reasons
        status = ws.status()
        if m.promotion.promote:
            assert status["active_model"]["version"] == m.model.version
            assert status["active_index"]["count"] == status["passages"]
        else:
            assert status["active_model"]["version"] == ws.base_version
        # The baseline was stored before training.
        assert json.loads(ws.store.scalar("SELECT metrics FROM model_versions WHERE version = ?", [ws.base_version]))


@case("Stuck or wrong state", "the checkpoint and the WiSE-FT weight are chosen on the promotion set",
      "a development fold of the held-out queries chooses both (eval loss, then NDCG@10 over a grid of weights); "
      "the saved model is (1-a)*base + a*tuned; the promotion set judges alone")
@pytest.mark.slow
def test_checkpoint_and_wise_weight_come_from_the_development_fold(tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    from loop.workspace import Workspace

    with Workspace.open(tmp_path / "ws") as ws:
        _seed(ws, tmp_path)
        more = tmp_path / "more.jsonl"
        with more.open("w") as f:
            for name in TOPICS:
                for q in (f"explain the {name} clause", f"where is {name} covered"):
                    f.write(json.dumps({"anchor": q, "positive_id": f"{name}.txt"}) + "\n")
        ws.import_pairs(more)
        rounds, lines = _rounds(ws, generate_max=0, train={"epochs": 1, "batch_size": 8, "max_seq_length": 64,
                                                           "wise_grid": [0.0, 0.5, 1.0]})
        r = rounds.advance(until="review")
        r = rounds.advance(until="evaluate", force=True)
        dev, gate = rounds.heldout.folds()
        assert dev and gate and not dev & gate
        run = rounds.run_dir(r)
        eval_anchors = {json.loads(x)["anchor"] for x in (run / "eval.jsonl").read_text().splitlines()}
        assert {query_key(a) for a in eval_anchors} <= dev  # the checkpoint's eval loss: the dev fold only
        assert {query_key(q) for q in rounds.heldout.evalset().queries} == gate  # promotion: the rest
        w = r.manifest.steps["train"]["wise"]
        assert w["alpha"] in (0.0, 0.5, 1.0) and set(w["dev_ndcg@10"]) == {"0.0", "0.5", "1.0"}
        assert w["n_dev_queries"] == len(dev) and any("WiSE-FT" in line for line in lines)
        saved = SentenceTransformer(r.manifest.model.path, device="cpu").state_dict()
        base = SentenceTransformer(str(minilm_path), device="cpu").state_dict()
        key = next(k for k, v in saved.items() if v.is_floating_point() and v.ndim == 2)
        if w["alpha"] == 0.0:
            assert saved[key].allclose(base[key])
        else:
            assert not saved[key].allclose(base[key])


@pytest.mark.slow
def test_with_soup_on_a_round_averages_its_fine_tune_with_the_previous_rounds(tmp_path, minilm_path):
    from loop.workspace import Workspace

    with Workspace.open(tmp_path / "ws") as ws:
        _seed(ws, tmp_path)
        rounds, lines = _rounds(ws, soup=True, train={"epochs": 1, "batch_size": 8, "max_seq_length": 64})
        first = rounds.advance(until="done", force=True)
        assert first.state == "done", first.error
        assert first.manifest.train_config.get("soup_with") is None and first.manifest.steps["train"]["soup"] is None
        second = rounds.advance(until="done", force=True)
        assert second.state == "done" and second.round == 2, second.error
        alpha = (first.manifest.steps["train"].get("wise") or {}).get("alpha", 1.0)
        member = {"path": first.manifest.model.path, "alpha": alpha, "version": first.manifest.model.version}
        assert second.manifest.train_config["soup_with"] == member
        assert second.manifest.steps["train"]["soup"] == member
        assert any(f"averaged with {member['version']}'s fine-tune" in line for line in lines), lines


def test_the_soup_member_is_set_by_the_round_not_by_the_train_table():
    from loop.errors import ConfigError
    from loop.rounds import loop_config

    with pytest.raises(ConfigError, match=r"soup = true"):
        loop_config({"train": {"soup_with": {"path": "/models/x", "alpha": 1.0}}})
    assert loop_config({"soup": True}).soup


def test_held_out_queries_are_real_ones_never_offline_synthetic(workspace, tmp_path):
    _seed(workspace, tmp_path, n_pairs=3)
    with workspace.store.transaction() as cur:  # twelve offline synthetic pairs a reviewer accepted
        workspace.store.insert_ignore(cur, "pairs", [
            {"pair_id": f"syn-{i}", "anchor": f"synthetic question {i}", "positive_id": "payment.txt#0",
             "positive_text": "x", "source": "synthetic", "status": "accepted", "split": "train",
             "meta": json.dumps({"generator": "offline:keyphrase"})} for i in range(12)])
    for i in range(12):
        workspace.store.append_decision(f"syn-{i}", "ann", "accept", {"previous_status": "pending"})
    rounds, _ = _rounds(workspace)
    with pytest.raises(RoundError, match="3 human-verified real queries.*offline synthetic queries never count"):
        rounds.heldout.ensure()
    workspace.store.execute("UPDATE pairs SET meta = ? WHERE source = 'synthetic'",
                            [json.dumps({"generator": "llm:some-model"})])
    lines: list[str] = []
    rounds.log = lines.append
    workspace.store.execute("UPDATE pairs SET status = 'dropped' WHERE source = 'seed'")  # no real query at all
    assert rounds.heldout.ensure() == 5  # LLM-written queries only when nothing else exists, and it says so
    assert any("LLM-generated queries" in line for line in lines)


def test_recommendation_uses_baseline_pairs_and_speed(workspace, tmp_path):
    _seed(workspace, tmp_path)
    rounds, _ = _rounds(workspace)
    rounds.heldout.ensure()
    rec = rounds.heldout.recommend(target_ndcg=1.0)
    assert rec.pairs_available == 5  # 10 seeds, 5 held out
    assert rec.generate_first and not rec.finetune  # far below 1,000 pairs
    assert rec.reindex_seconds > 0 and any("Re-indexing" in r for r in rec.reasons)
    assert 0 <= rec.baseline <= 1


def _write_pairs(path: Path, anchors: list[str]) -> Path:
    with path.open("w") as f:
        for q, name in zip(anchors, TOPICS, strict=False):
            f.write(json.dumps({"anchor": q, "positive_id": f"{name}.txt"}) + "\n")
    return path


def _variant(query: str, end: str = "") -> str:
    """The same question as typed by someone else: upper case, extra spaces (and `end`)."""
    return query.upper().replace(" ", "   ") + end


def test_a_query_imported_in_two_forms_is_held_out_in_both(workspace, tmp_path):
    _seed(workspace, tmp_path, n_pairs=12)
    questions = [f"what does the {name} clause say" for name in TOPICS]
    workspace.import_pairs(_write_pairs(tmp_path / "again.jsonl", [_variant(q, " ?") for q in questions]))
    rounds, _ = _rounds(workspace)
    assert rounds.heldout.ensure() == 5  # 12 distinct queries, not 24: max(5, 20% of 12)
    held = {r["anchor"] for r in workspace.store.rows("SELECT anchor FROM pairs WHERE split = 'eval'")}
    assert len(held) == 10 and {_variant(q, " ?") for q in questions if q in held} <= held  # both forms, together
    train = [r["anchor"] for r in rounds.data.rows()]  # no LeakageError
    assert len(train) == 14 and not set(train) & held


def test_a_stuck_workspace_drops_training_pairs_of_held_out_queries(workspace, tmp_path):
    _seed(workspace, tmp_path, n_pairs=12)
    questions = [f"what does the {name} clause say" for name in TOPICS]
    held_out = [f"how does the {name} clause work" for name in TOPICS][:6]
    workspace.import_pairs(_write_pairs(tmp_path / "eval.jsonl", held_out), split="eval")
    variants = [_variant(q) for q in held_out[:2]] + [_variant(q, "?!") for q in held_out[2:4]]
    workspace.import_pairs(_write_pairs(tmp_path / "variants.jsonl", variants))
    rounds, lines = _rounds(workspace)
    for _ in range(2):  # the train step runs ensure_eval_split first; a rerun finds nothing more to do
        assert rounds.heldout.ensure() == 0  # the imported eval split is the held-out set
        rows = rounds.data.rows()  # today: LeakageError "4 training pairs use a held-out query"
        assert sorted(r["anchor"] for r in rows) == sorted(questions)
    dropped = workspace.store.rows("SELECT anchor, status, split, reason FROM pairs WHERE status = 'dropped'")
    assert sorted(r["anchor"] for r in dropped) == sorted(variants)
    assert all(r["reason"] == "its query is held out for evaluation" and r["split"] == "train" for r in dropped)
    assert [line for line in lines if "held out" in line] == [
        "Dropped 4 accepted training pairs whose query is held out for evaluation (the same query, case, "
        f"spacing and trailing punctuation aside), e.g. {sorted(variants)[0]!r}; they stay stored, marked dropped."]
    assert len(rounds.heldout.evalset().query_ids) == 6  # the held-out set itself did not change


# Known positives are never negatives --------------------------------------------------------
LOOP_DOCS = {
    "for": "A for loop will iterate over the items of a sequence, one item at a time.",
    "while": "A while loop repeats its body; each pass is one loop over the items left.",
    "range": "The range type gives numbers to iterate over in a loop.",
    "dict": "Dictionaries map keys to values; iterate over items to get key and value pairs.",
    "class": "A class statement defines a new type with methods and attributes.",
    "raise": "The raise statement signals an error; an exception propagates up the stack.",
    # long enough for several chunks with the fake model (62 tokens): its chunks are siblings
    "guide": " ".join(["The loop guide explains how a loop can iterate over items."]
                      + ["Filler words about nothing in particular go here to make the text long enough."] * 8
                      + ["Finally a loop may iterate over items and stop early with break."]),
}
Q = "how does a loop iterate over items"
Q2 = "which loop iterates over items"


def _loop_corpus(ws, tmp_path: Path) -> dict[str, str]:
    """Ingest LOOP_DOCS; returns doc name (or 'guide#N' for guide's chunks) -> passage id."""
    folder = tmp_path / "loopdocs"
    folder.mkdir()
    for name, text in LOOP_DOCS.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    ws.ingest([folder])
    ids = {}
    for doc, ordinal, pid in ws.store.execute("SELECT doc_id, ordinal, passage_id FROM doc_passages").fetchall():
        name = doc.rsplit("/", 1)[-1].removesuffix(".txt")  # folder documents are "<folder>/<path>"
        ids[name if name != "guide" else f"guide#{ordinal}"] = pid
    return ids


def _accepted(ws, rows: list[tuple[str, str]], ids: dict[str, str], status: str = "accepted",
              source: str = "seed") -> None:
    texts = ws.store.passages(list(ids.values()))
    with ws.store.transaction() as cur:
        ws.store.insert_ignore(cur, "pairs", [
            {"pair_id": f"{status}-{n}", "anchor": a, "positive_id": ids[d], "positive_text": texts[ids[d]],
             "source": source, "status": status, "split": "train"} for n, (a, d) in enumerate(rows)])


def test_training_rows_never_use_a_known_positive_as_a_negative(workspace, tmp_path):
    """With mine_top 3 a query gets several accepted positives: none may be another's hard negative
    (nor a chunk of a positive's document, nor a positive of the same query in another case or
    punctuation, nor a reviewer's rejected passage that is also an accepted positive)."""
    ids = _loop_corpus(workspace, tmp_path)
    text = workspace.store.passages(list(ids.values()))
    by = {d: text[pid] for d, pid in ids.items()}
    # Fake-model scores for Q: for .649, while .507, guide#0 .479, range .473, guide#3 .469, class .378 ...
    _accepted(workspace, [(Q, "for"), ("How does a LOOP iterate over items ?", "while"), (Q, "guide#3"),
                          (Q2, "for"), (Q2, "range")], ids)
    with workspace.store.transaction() as cur:  # a reviewer rejected `range` for Q2, then `class`
        workspace.store.insert_ignore(cur, "negatives", [
            {"anchor": Q2, "passage_id": ids["range"], "source": "review", "created_at": "2026-01-01 00:00:00"},
            {"anchor": Q2, "passage_id": ids["class"], "source": "review", "created_at": "2026-01-02 00:00:00"}])
    rounds, _ = _rounds(workspace)
    rows = {(r["anchor"], r["positive"]): r for r in rounds.data.rows()}
    variant = "How does a LOOP iterate over items ?"
    # Mined: the best passage below the margin that no variant of the query has as a positive.
    assert rows[(Q, by["for"])]["negatives"] == [by["range"]]       # was `while` (a positive of Q's variant)
    assert rows[(variant, by["while"])]["negatives"] == [by["range"]]  # was guide#0 (a chunk of Q's positive)
    assert rows[(Q, by["guide#3"])]["negatives"] == [by["class"]]
    # Reviewer negatives: `range` is an accepted positive of Q2, so the next one is used.
    assert rows[(Q2, by["for"])]["negatives"] == [by["class"]]
    assert rows[(Q2, by["range"])]["negatives"] == [by["class"]]
    # Each row names the known positives of its query that occur in the training data (for the trainer).
    assert rows[(Q, by["for"])]["exclude"] == sorted([by["while"], by["guide#3"]])
    assert rows[(variant, by["while"])]["exclude"] == sorted([by["for"], by["guide#3"]])
    assert rows[(Q, by["guide#3"])]["exclude"] == sorted([by["for"], by["while"]])
    assert rows[(Q2, by["for"])]["exclude"] == [by["range"]]
    assert rows[(Q2, by["range"])]["exclude"] == [by["for"]]


def test_training_rows_take_several_negatives_reviewers_first_then_mined(workspace, tmp_path):
    """`mining.num_negatives` 3: a row's hard negatives are its query's reviewer-verified ones first
    (in the order they were judged), then mined ones; none is a known positive of its query."""
    ids = _loop_corpus(workspace, tmp_path)
    text = workspace.store.passages(list(ids.values()))
    by = {d: text[pid] for d, pid in ids.items()}
    _accepted(workspace, [(Q, "for"), (Q, "guide#3"), (Q2, "for"), (Q2, "range")], ids)
    with workspace.store.transaction() as cur:
        workspace.store.insert_ignore(cur, "negatives", [
            {"anchor": Q2, "passage_id": ids[d], "source": "review", "created_at": f"2026-01-0{n + 1} 00:00:00"}
            for n, d in enumerate(["class", "range", "dict"])])
    rounds, _ = _rounds(workspace, mining={"num_negatives": 3})
    rows = {(r["anchor"], r["positive"]): r for r in rounds.data.rows()}
    one, _ = _rounds(workspace)
    first = {(r["anchor"], r["positive"]): r["negatives"] for r in one.data.rows()}
    known = {Q: {by["for"], by["guide#3"], *(by[f"guide#{n}"] for n in range(4) if f"guide#{n}" in by)},
             Q2: {by["for"], by["range"]}}
    for (anchor, positive), row in rows.items():
        assert len(row["negatives"]) == 3 == len(set(row["negatives"])), row
        assert not known[anchor] & set(row["negatives"]), row
        assert row["negatives"][0] == first[(anchor, positive)][0]  # the one negative a row had before
    # Q2's verified negatives (`range` is its positive), then what mining adds
    assert rows[(Q2, by["for"])]["negatives"][:2] == [by["class"], by["dict"]]
    assert rows[(Q2, by["range"])]["negatives"][:2] == [by["dict"], by["class"]]  # the second positive's turn
    assert rows[(Q, by["for"])]["negatives"][:2] == [by["while"], by["range"]]  # mined, best first (not a guide chunk)


def test_select_does_not_score_a_known_positive_as_the_hard_negative(workspace, tmp_path):
    """A query's accepted positive is not a negative that outranks its next proposed passage."""
    ids = _loop_corpus(workspace, tmp_path)
    _accepted(workspace, [(Q, "for"), ("How does a LOOP iterate over items?", "while"), (Q, "guide#3")], ids)
    _accepted(workspace, [(Q, "dict")], ids, status="candidate", source="synthetic")
    rounds, _ = _rounds(workspace, routing={"random_fraction": 0.0})
    rounds.select(rounds.open())
    meta = json.loads(workspace.store.scalar("SELECT meta FROM pairs WHERE pair_id = 'candidate-0'"))
    emb = workspace.embedder()
    texts = workspace.store.passages([ids["dict"], ids["range"]])
    q = emb.encode([Q])[0]
    score = {d: float(emb.encode([texts[ids[d]]])[0] @ q) for d in ("dict", "range")}
    # The hardest negative is `range` (not `for`, `while` or a guide chunk, all known positives of Q);
    # the query's known positives lead the ranking, so the query counts as answered at rank 0.
    assert meta["features"]["hard_neg_score"] == pytest.approx(score["range"], abs=1e-4)
    assert meta["features"]["margin"] == pytest.approx(score["dict"] - score["range"], abs=1e-4)
    assert meta["features"]["rank"] == 0
