"""The review queue: claims, decisions, undo and many reviewers at once."""

import json
import re
import threading
from datetime import timedelta

import pytest

import loop.review as review
from loop.errors import InputError, NotFoundError
from loop.records import Pair
from loop.review import (
    DecisionIn,
    ReviewConflict,
    apply_decisions,
    claim_next,
    decide,
    read_decisions,
    release,
    undo_last,
)
from storage.db import Store


def _seed(store: Store, n: int = 3, priorities=None) -> list[str]:
    """n passages and one pending pair per passage; returns the pair ids (by descending priority)."""
    priorities = priorities or [float(n - i) for i in range(n)]
    passages = [{"passage_id": f"p{i}", "text": f"passage number {i}", "n_tokens": 3} for i in range(n)]
    passages.append({"passage_id": "other", "text": "a better passage", "n_tokens": 3})
    pairs = [
        {
            "pair_id": f"pair{i:04d}", "anchor": f"query {i}", "positive_id": f"p{i}",
            "positive_text": f"passage number {i}", "source": "synthetic", "status": "pending",
            "priority": priorities[i], "reason": f"ranked {i + 2}",
            "meta": json.dumps({"features": {"margin": -0.01 * i}, "generator": "gen@1"}),
        }
        for i in range(n)
    ]
    with store.transaction() as cur:
        Store.insert_ignore(cur, "passages", passages)
        Store.insert_ignore(cur, "pairs", pairs)
    return [p["pair_id"] for p in sorted(pairs, key=lambda p: -p["priority"])]


def _status(store, pair_id):
    return store.scalar("SELECT status FROM pairs WHERE pair_id = ?", [pair_id])


def _d(pair_id, action, reviewer="ann", **kw):
    return DecisionIn(pair_id=pair_id, action=action, reviewer=reviewer, **kw)


# Claims ---------------------------------------------------------------------------------------
def test_claim_next_returns_the_highest_priority_card(store):
    ids = _seed(store, 3, priorities=[0.2, 0.9, 0.5])
    card = claim_next(store, "ann")
    assert card.pair_id == ids[0] == "pair0001"
    assert card.anchor == "query 1" and card.positive_id == "p1" and card.positive_text == "passage number 1"
    assert card.priority == 0.9 and card.reason == "ranked 3"
    assert card.features == {"margin": -0.01} and card.generator == "gen@1"
    row = store.rows("SELECT claimed_by, claim_expires FROM pairs WHERE pair_id = ?", [card.pair_id])[0]
    assert row["claimed_by"] == "ann" and row["claim_expires"] > review._now()


def test_same_reviewer_gets_the_same_card_while_the_claim_is_valid(store):
    _seed(store, 3)
    first = claim_next(store, "ann")
    assert claim_next(store, "ann") == first
    assert claim_next(store, "ann").pair_id == first.pair_id


def test_two_reviewers_get_different_cards(store):
    ids = _seed(store, 3)
    a, b = claim_next(store, "ann"), claim_next(store, "bob")
    assert (a.pair_id, b.pair_id) == (ids[0], ids[1])
    c = claim_next(store, "cy")
    assert c.pair_id == ids[2]
    assert claim_next(store, "dee") is None  # everything is claimed


def test_an_expired_claim_returns_the_card_to_the_queue(store):
    ids = _seed(store, 2)
    assert claim_next(store, "ann", claim_seconds=0).pair_id == ids[0]
    assert claim_next(store, "bob").pair_id == ids[0]


def test_an_abandoned_claim_goes_to_the_next_reviewer_after_expiry(store, monkeypatch):
    ids = _seed(store, 2)
    now = review._now()
    monkeypatch.setattr(review, "_now", lambda: now)
    assert claim_next(store, "ann").pair_id == ids[0]  # ann claims and vanishes
    assert claim_next(store, "bob").pair_id == ids[1]  # still hers: bob gets the next card
    assert claim_next(store, "cy") is None
    monkeypatch.setattr(review, "_now", lambda: now + timedelta(seconds=review.CLAIM_SECONDS + 1))
    assert claim_next(store, "cy").pair_id == ids[0]
    # ...and bob's claim expired too; ann's stale claim does not let her decide cy's card
    with pytest.raises(ReviewConflict, match="cy"):
        decide(store, _d(ids[0], "accept", "ann"))
    decide(store, _d(ids[0], "accept", "cy"))
    assert _status(store, ids[0]) == "accepted"


def test_release_gives_the_cards_back(store):
    ids = _seed(store, 2)
    claim_next(store, "ann")
    release(store, "ann")
    assert claim_next(store, "bob").pair_id == ids[0]


def test_claim_next_on_an_empty_queue(store):
    assert claim_next(store, "ann") is None


# Decisions ------------------------------------------------------------------------------------
def _decisions(store):
    return store.rows("SELECT decision_id, pair_id, reviewer, action, payload FROM decisions ORDER BY decision_id")


def _negatives(store):
    return [(r["anchor"], r["passage_id"], r["source"]) for r in store.rows("SELECT * FROM negatives ORDER BY ALL")]


def test_accept(store):
    ids = _seed(store, 2)
    claim_next(store, "ann")
    did = decide(store, _d(ids[0], "accept"))
    assert _status(store, ids[0]) == "accepted"
    assert store.rows("SELECT claimed_by, claim_expires FROM pairs WHERE pair_id = ?", [ids[0]]) == [
        {"claimed_by": None, "claim_expires": None}
    ]
    log = _decisions(store)
    assert [(r["decision_id"], r["pair_id"], r["reviewer"], r["action"]) for r in log] == [(did, ids[0], "ann", "accept")]
    assert json.loads(log[0]["payload"]) == {"previous_status": "pending"}
    assert _negatives(store) == []
    assert claim_next(store, "ann").pair_id == ids[1]


def test_reject_records_a_hard_negative(store):
    ids = _seed(store, 2)
    decide(store, _d(ids[0], "reject"))
    assert _status(store, ids[0]) == "rejected"
    assert _negatives(store) == [("query 0", "p0", "review")]
    assert json.loads(_decisions(store)[0]["payload"]) == {"previous_status": "pending", "negative": "p0"}


def test_edit_creates_an_edited_pair_with_the_new_query(store):
    ids = _seed(store, 2)
    decide(store, _d(ids[0], "edit", query="  a  better   query "))
    assert _status(store, ids[0]) == "rejected"
    new_id = Pair.make_id("a better query", "passage number 0")
    new = store.rows("SELECT * FROM pairs WHERE pair_id = ?", [new_id])[0]
    assert (new["anchor"], new["positive_id"], new["positive_text"]) == ("a better query", "p0", "passage number 0")
    assert (new["source"], new["status"], new["origin"]) == ("edited", "accepted", "review:edit")
    assert json.loads(new["meta"]) == {"from_pair": ids[0], "reviewer": "ann"}
    assert json.loads(_decisions(store)[0]["payload"]) == {
        "previous_status": "pending", "query": "a better query", "created_pair": new_id,
    }
    assert _negatives(store) == []  # the passage is right; only the query was wrong


def test_edit_to_the_same_query_is_refused(store):
    ids = _seed(store, 1)
    with pytest.raises(InputError, match="accept"):
        decide(store, _d(ids[0], "edit", query=" query   0 "))
    assert _status(store, ids[0]) == "pending"
    assert _decisions(store) == []


def test_edit_onto_a_held_out_query_is_refused(store):
    ids = _seed(store, 2)
    with store.transaction() as cur:
        Store.insert_ignore(cur, "pairs", [{"pair_id": "held", "anchor": "Where is the notice period set",
                                            "positive_id": "p1", "positive_text": "passage number 1",
                                            "source": "seed", "status": "accepted", "split": "eval"}])
    before = store.rows("SELECT * FROM pairs ORDER BY pair_id")
    with pytest.raises(InputError, match="held out for evaluation") as info:
        decide(store, _d(ids[0], "edit", query="  where IS the notice   period set? "))
    assert "Write a different query, or reject the card" in str(info.value)
    assert store.rows("SELECT * FROM pairs ORDER BY pair_id") == before
    assert _decisions(store) == []
    decide(store, _d(ids[0], "edit", query="where is the notice period set for suppliers"))  # another query is fine


def test_pick_replaces_the_positive_and_records_the_old_one_as_negative(store):
    ids = _seed(store, 2)
    decide(store, _d(ids[0], "pick", passage_id="other"))
    assert _status(store, ids[0]) == "rejected"
    new_id = Pair.make_id("query 0", "a better passage")
    new = store.rows("SELECT * FROM pairs WHERE pair_id = ?", [new_id])[0]
    assert (new["anchor"], new["positive_id"], new["source"], new["status"]) == ("query 0", "other", "edited", "accepted")
    assert _negatives(store) == [("query 0", "p0", "review")]
    assert json.loads(_decisions(store)[0]["payload"]) == {
        "previous_status": "pending", "passage_id": "other", "created_pair": new_id, "negative": "p0",
    }


def test_a_pick_answers_the_open_card_of_the_same_query_and_passage_and_undo_reopens_it(store):
    ids = _seed(store, 1)
    twin = Pair.make_id("query 0", "a better passage")  # the query's own card for the passage it picks
    with store.transaction() as cur:
        Store.insert_ignore(cur, "pairs", [{"pair_id": twin, "anchor": "query 0", "positive_id": "other",
                                            "positive_text": "a better passage", "source": "mined", "status": "pending",
                                            "priority": 0.1}])
    decide(store, _d(ids[0], "pick", passage_id="other"))
    assert _status(store, ids[0]) == "rejected" and _status(store, twin) == "accepted"
    assert claim_next(store, "bob") is None  # nobody is asked the same question again
    assert json.loads(_decisions(store)[0]["payload"])["resolved_pair"] == {"pair_id": twin, "previous_status": "pending"}
    undo_last(store, "ann")
    assert _status(store, ids[0]) == "pending" and _status(store, twin) == "pending"
    assert store.scalar("SELECT count(*) FROM pairs") == 2  # the twin is not deleted, only reopened


def test_a_mark_labels_every_shown_passage_and_undo_reverts_all_of_it(store):
    """One review of a card that shows the model's top passages: every marked passage answers the
    query, every other shown one is a verified negative; open cards of those passages are answered."""
    ids = _seed(store, 3)  # pair0000: query 0 -> p0, pending
    twin = Pair.make_id("query 0", "passage number 2")  # query 0's own (waiting) card for p2
    with store.transaction() as cur:
        Store.insert_ignore(cur, "pairs", [{"pair_id": twin, "anchor": "query 0", "positive_id": "p2",
                                            "positive_text": "passage number 2", "source": "mined",
                                            "status": "candidate", "priority": 0.1}])
    decide(store, _d(ids[0], "mark", passage_ids=["p0", "other"], shown=["other", "p1", "p2"]))
    assert _status(store, ids[0]) == "accepted"  # its own passage was marked
    new_id = Pair.make_id("query 0", "a better passage")
    assert store.rows("SELECT anchor, positive_id, status, source FROM pairs WHERE pair_id = ?", [new_id]) == [
        {"anchor": "query 0", "positive_id": "other", "status": "accepted", "source": "edited"}]
    assert _status(store, twin) == "rejected"  # answered by this review: nobody is asked again
    assert _negatives(store) == [("query 0", "p1", "review"), ("query 0", "p2", "review")]
    payload = json.loads(_decisions(store)[0]["payload"])
    assert payload["marked"] == ["p0", "other"] and payload["shown"] == 4
    undo_last(store, "ann")
    assert _status(store, ids[0]) == "pending" and _status(store, twin) == "candidate"
    assert store.scalar("SELECT count(*) FROM pairs WHERE pair_id = ?", [new_id]) == 0 and _negatives(store) == []


def test_a_mark_with_nothing_marked_rejects_the_card_and_every_shown_passage(store):
    ids = _seed(store, 2)
    decide(store, _d(ids[0], "mark", passage_ids=[], shown=["p1"]))
    assert _status(store, ids[0]) == "rejected"
    assert _negatives(store) == [("query 0", "p0", "review"), ("query 0", "p1", "review")]
    assert store.scalar("SELECT count(*) FROM pairs WHERE status = 'accepted'") == 0


def test_a_malformed_mark_is_refused(store):
    ids = _seed(store, 3)
    with pytest.raises(ValueError, match="shown"):
        _d(ids[0], "mark", passage_ids=["p1"])
    with pytest.raises(InputError, match="among those shown: p1"):
        decide(store, _d(ids[0], "mark", passage_ids=["p1"], shown=["p2"]))
    assert _status(store, ids[0]) == "pending" and _negatives(store) == []


def test_a_mark_of_an_unknown_passage_changes_nothing(store):
    ids = _seed(store, 1)
    with pytest.raises(NotFoundError, match="ghost"):
        decide(store, _d(ids[0], "mark", passage_ids=["other"], shown=["other", "ghost"]))
    assert _status(store, ids[0]) == "pending" and _negatives(store) == [] and _decisions(store) == []


def test_deciding_twice_is_a_conflict(store):
    ids = _seed(store, 1)
    decide(store, _d(ids[0], "accept"))
    with pytest.raises(ReviewConflict, match="already decided"):
        decide(store, _d(ids[0], "reject", "bob"))
    assert _status(store, ids[0]) == "accepted" and len(_decisions(store)) == 1


def test_a_card_claimed_by_another_reviewer_is_a_conflict(store):
    ids = _seed(store, 1)
    claim_next(store, "ann")
    with pytest.raises(ReviewConflict, match="ann"):
        decide(store, _d(ids[0], "accept", "bob"))
    assert _status(store, ids[0]) == "pending"


def test_require_claim(store):
    ids = _seed(store, 1)
    with pytest.raises(ReviewConflict, match="not claimed"):
        decide(store, _d(ids[0], "accept"), require_claim=True)
    claim_next(store, "ann")
    decide(store, _d(ids[0], "accept"), require_claim=True)


def test_unknown_pair_or_passage(store):
    ids = _seed(store, 1)
    with pytest.raises(NotFoundError, match="nope"):
        decide(store, _d("nope", "accept"))
    with pytest.raises(NotFoundError, match="missing"):
        decide(store, _d(ids[0], "pick", passage_id="missing"))
    assert _status(store, ids[0]) == "pending" and _decisions(store) == []


def test_pick_of_the_same_passage_is_an_input_error(store):
    ids = _seed(store, 1)
    with pytest.raises(InputError, match="accept"):
        decide(store, _d(ids[0], "pick", passage_id="p0"))
    assert _status(store, ids[0]) == "pending" and _decisions(store) == [] and _negatives(store) == []


@pytest.mark.parametrize(
    "record, expected_error",
    [
        ({"pair_id": "x", "action": "edit", "reviewer": "ann"}, "query"),
        ({"pair_id": "x", "action": "edit", "reviewer": "ann", "query": "   "}, "query"),
        ({"pair_id": "x", "action": "pick", "reviewer": "ann"}, "passage_id"),
        ({"pair_id": "x", "action": "accept", "reviewer": "  "}, "reviewer is empty"),
        ({"pair_id": "x", "action": "approve", "reviewer": "ann"}, "action"),
        ({"pair_id": "x", "action": "accept", "reviewer": "ann", "note": "hi"}, "note"),
        ({"action": "accept", "reviewer": "ann"}, "pair_id"),
        ({"pair_id": "x", "action": "accept", "reviewer": " ann "}, None),
        ({"pair_id": "x", "action": "pick", "reviewer": "ann", "passage_id": "p"}, None),
    ],
)
def test_decision_validation(record, expected_error):
    if expected_error is None:
        assert DecisionIn(**record).reviewer == "ann"
    else:
        with pytest.raises(ValueError, match=expected_error):
            DecisionIn(**record)


# Undo -----------------------------------------------------------------------------------------
def test_undo_reverts_the_last_decision_and_its_side_effects(store):
    ids = _seed(store, 3)
    decide(store, _d(ids[0], "accept"))
    decide(store, _d(ids[1], "pick", passage_id="other"))
    decide(store, _d(ids[2], "reject", "bob"))  # another reviewer's decision is not ann's to undo
    n_pairs = store.scalar("SELECT count(*) FROM pairs")

    assert undo_last(store, "ann") == ids[1]
    row = store.rows("SELECT status, claimed_by FROM pairs WHERE pair_id = ?", [ids[1]])[0]
    assert row == {"status": "pending", "claimed_by": "ann"}
    assert store.scalar("SELECT count(*) FROM pairs") == n_pairs - 1  # the picked pair is gone
    assert _negatives(store) == [("query 2", "p2", "review")]  # bob's stays, ann's is gone
    log = _decisions(store)
    assert len(log) == 4 and log[-1]["action"] == "undo" and log[-1]["reviewer"] == "ann"
    assert json.loads(log[-1]["payload"]) == {"undid": log[1]["decision_id"]}
    # the reverted card is ann's current card
    assert claim_next(store, "ann").pair_id == ids[1]

    # a second undo undoes the decision before
    assert undo_last(store, "ann") == ids[0]
    assert _status(store, ids[0]) == "pending"
    assert len(_decisions(store)) == 5
    assert undo_last(store, "ann") is None
    assert len(_decisions(store)) == 5
    assert [r["action"] for r in _decisions(store)] == ["accept", "pick", "reject", "undo", "undo"]


def test_undo_of_an_edit_then_redo(store):
    ids = _seed(store, 1)
    decide(store, _d(ids[0], "edit", query="new words"))
    undo_last(store, "ann")
    assert store.scalar("SELECT count(*) FROM pairs") == 1
    # deciding again after the undo is allowed, and can itself be undone
    decide(store, _d(ids[0], "reject"))
    assert _negatives(store) == [("query 0", "p0", "review")]
    assert undo_last(store, "ann") == ids[0]
    assert _negatives(store) == [] and _status(store, ids[0]) == "pending"


def test_undo_keeps_a_negative_that_existed_before(store):
    ids = _seed(store, 1)
    with store.transaction() as cur:
        Store.insert_ignore(cur, "negatives", [{"anchor": "query 0", "passage_id": "p0", "source": "mined"}])
    decide(store, _d(ids[0], "reject"))
    assert json.loads(_decisions(store)[0]["payload"])["negative"] is None
    undo_last(store, "ann")
    assert _negatives(store) == [("query 0", "p0", "mined")]


# Decisions from a file ------------------------------------------------------------------------
def test_read_decisions(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"pair_id": "a", "action": "accept", "reviewer": "ann"}\n\n'
        '{"pair_id": "b", "action": "edit", "reviewer": "ann", "query": "q"}\n'
    )
    got = read_decisions(path, 10_000)
    assert [(n, d.pair_id, d.action, d.query) for n, d in got] == [(1, "a", "accept", None), (3, "b", "edit", "q")]


@pytest.mark.parametrize(
    "text, line, expected_error",
    [
        ('{"pair_id": "a", "action": "accept", "reviewer": "ann"}\n{"pair_id": "b", "action": "oops", '
         '"reviewer": "ann"}\n', 2, "action"),
        ('{"pair_id": "a", "action": "accept", "reviewer": "ann"}\n\n{not json}\n', 3, "malformed JSON"),
        ('{"pair_id": "a", "action": "edit", "reviewer": "ann"}\n', 1, "query"),
        ("\n\n", None, "only whitespace"),
    ],
)
def test_read_decisions_errors_name_the_line(tmp_path, text, line, expected_error):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=expected_error) as e:
        read_decisions(path, 10_000)
    assert e.value.line == line
    assert e.value.path == str(path)


_GOOD = '{"pair_id": "pair0000", "action": "pick", "passage_id": "other", "reviewer": "ann"}\n'


@pytest.mark.parametrize(
    "rest, line, expected_error",
    [
        ('{"pair_id": "nope", "action": "accept", "reviewer": "ann"}\n', 2, "No pair with id 'nope'"),
        ('{"pair_id": "pair0001", "action": "pick", "passage_id": "gone", "reviewer": "ann"}\n', 2,
         "No passage with id 'gone'"),
        ('{"pair_id": "pair0001", "action": "edit", "query": "query 1", "reviewer": "ann"}\n', 2,
         "the edited query is the same"),
        ('{"pair_id": "pair0001", "action": "accept", "reviewer": "ann"}\n'
         '{"pair_id": "pair0000", "action": "reject", "reviewer": "bo"}\n', 3,
         "decided twice in this file (lines 1 and 3)"),
        ('{"pair_id": "done", "action": "accept", "reviewer": "ann"}\n', 2, "already decided"),
    ],
)
def test_apply_decisions_is_all_or_nothing(store, tmp_path, rest, line, expected_error):
    """A line that cannot be applied, after good ones: the error names it, and no line is applied."""
    _seed(store, 3)
    store.execute("INSERT INTO pairs (pair_id, anchor, positive_id, positive_text, source, status) "
                  "VALUES ('done', 'query 9', 'p2', 'passage number 2', 'synthetic', 'accepted')")
    tables = ("pairs", "decisions", "negatives")
    before = {t: store.rows(f"SELECT * FROM {t} ORDER BY ALL") for t in tables}
    path = tmp_path / "d.jsonl"
    path.write_text(_GOOD + rest)
    with pytest.raises(InputError, match=re.escape(expected_error)) as e:
        apply_decisions(store, path, 10_000)
    assert (e.value.path, e.value.line) == (str(path), line)
    assert {t: store.rows(f"SELECT * FROM {t} ORDER BY ALL") for t in tables} == before


def test_apply_decisions_applies_a_good_file(store, tmp_path):
    ids = _seed(store, 3)
    path = tmp_path / "d.jsonl"
    path.write_text(_GOOD + '{"pair_id": "pair0001", "action": "reject", "reviewer": "ann"}\n')
    assert apply_decisions(store, path, 10_000) == 2
    assert [_status(store, i) for i in sorted(ids)] == ["rejected", "rejected", "pending"]
    assert store.scalar("SELECT count(*) FROM decisions") == 2
    assert store.scalar("SELECT count(*) FROM pairs WHERE source = 'edited' AND positive_id = 'other'") == 1


# Many reviewers at once -----------------------------------------------------------------------
def test_twenty_reviewers_decide_a_thousand_cards_exactly_once(tmp_path):
    store = Store.open(tmp_path / "ws.duckdb")
    try:
        n, threads, per_thread = 1000, 20, 50
        passages = [{"passage_id": f"p{i}", "text": f"t{i}", "n_tokens": 1} for i in range(n)]
        pairs = [
            {"pair_id": f"pair{i:04d}", "anchor": f"q{i}", "positive_id": f"p{i}", "positive_text": f"t{i}",
             "source": "synthetic", "status": "pending", "priority": float(i % 7), "meta": "{}"}
            for i in range(n)
        ]
        with store.transaction() as cur:
            Store.insert_ignore(cur, "passages", passages)
            Store.insert_ignore(cur, "pairs", pairs)

        errors: list[BaseException] = []
        missing: list[str] = []
        start = threading.Barrier(threads)

        def reviewer(name: str) -> None:
            try:
                start.wait()
                for j in range(per_thread):
                    card = claim_next(store, name)
                    if card is None:
                        missing.append(name)
                        return
                    decide(store, DecisionIn(pair_id=card.pair_id, action="accept" if j % 2 else "reject",
                                             reviewer=name), require_claim=True)
            except BaseException as e:  # noqa: BLE001 - surfaced below
                errors.append(e)

        workers = [threading.Thread(target=reviewer, args=(f"r{t}",)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert not any(w.is_alive() for w in workers)
        assert errors == [] and missing == []
        assert store.scalar("SELECT count(*) FROM decisions") == n
        assert store.scalar("SELECT count(DISTINCT pair_id) FROM decisions") == n
        assert store.scalar("SELECT count(*) FROM pairs WHERE status = 'pending'") == 0
        assert store.scalar("SELECT count(*) FROM pairs WHERE status = 'rejected'") == n // 2
        assert store.scalar("SELECT count(*) FROM negatives") == n // 2
        by_reviewer = dict(store.execute("SELECT reviewer, count(*) FROM decisions GROUP BY ALL").fetchall())
        assert by_reviewer == {f"r{t}": per_thread for t in range(threads)}
    finally:
        store.close()
