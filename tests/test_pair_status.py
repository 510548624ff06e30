"""The pair-status lifecycle (loop/pair_status.py): named transitions, and nothing else moves a pair."""

from __future__ import annotations

import pytest

from loop.pair_status import ACCEPTED, DROPPED, PENDING, REJECTED, LifecycleError, check_routes, move
from storage.db import Store


def _pairs(store: Store, **statuses: str) -> None:
    with store.transaction() as cur:
        Store.insert_ignore(cur, "pairs", [
            {"pair_id": pid, "anchor": f"q {pid}", "positive_text": "x", "source": "mined", "status": status,
             "split": "train", "claimed_by": "ann"} for pid, status in statuses.items()])


def _status(store: Store, pid: str) -> tuple[str, str | None, str | None]:
    return store.execute("SELECT status, claimed_by, reason FROM pairs WHERE pair_id = ?", [pid]).fetchall()[0]


def test_a_named_transition_moves_the_pairs_and_clears_their_claims(store):
    _pairs(store, a="pending", b="candidate", c="accepted")
    assert move(store, ["a", "b", "c"], DROPPED, "hold_out", reason="its query is held out") == 3
    assert _status(store, "a") == ("dropped", None, "its query is held out")
    assert move(store, [], ACCEPTED, "decide") == 0


def test_moves_the_lifecycle_does_not_have_are_refused_and_change_nothing(store):
    _pairs(store, a="accepted", d="dropped", p="pending")
    with pytest.raises(LifecycleError, match="decide cannot move pair a from accepted"):
        move(store, "a", REJECTED, "decide")  # a decided card is decided once
    with pytest.raises(LifecycleError, match="undo cannot move pair d from dropped"):
        move(store, "d", PENDING, "undo")  # a dropped pair is not revived
    with pytest.raises(LifecycleError, match="not pending"):
        move(store, "p", PENDING, "decide")
    with pytest.raises(LifecycleError, match="unknown pair-status transition 'revive'"):
        move(store, "d", ACCEPTED, "revive")
    with pytest.raises(LifecycleError, match="not rejected"):
        check_routes(["pending", "rejected"])
    assert [_status(store, p)[0] for p in ("a", "d", "p")] == ["accepted", "dropped", "pending"]
    assert _status(store, "p")[1] == "ann"  # the claim stays where nothing moved
