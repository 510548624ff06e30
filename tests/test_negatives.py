"""Hard-negative selection on plain arrays (TopK-PercPos)."""

import numpy as np
import pytest

from loop.negatives import MiningPolicy, select_negatives

IDS = [[f"n{j}" for j in range(6)]]
SCORES = np.array([[0.90, 0.80, 0.70, 0.60, 0.50, 0.40]], dtype=np.float32)


def _pick(pos=1.0, excluded=(), ids=IDS, scores=SCORES, **policy):
    return select_negatives(ids, scores, np.array([pos], dtype=np.float32), [set(excluded)], MiningPolicy(**policy))


@pytest.mark.parametrize(
    "policy, expected",
    [
        ({}, ["n0"]),                                         # defaults: the top hit, well below 1.0
        ({"num_negatives": 3}, ["n0", "n1", "n2"]),
        ({"num_negatives": 10}, [f"n{j}" for j in range(6)]),  # fewer candidates than asked
        ({"range_min": 2, "num_negatives": 2}, ["n2", "n3"]),  # skip the top 2
        ({"range_max": 2, "num_negatives": 5}, ["n0", "n1"]),  # ranks 0..range_max-1 only
        ({"range_min": 1, "range_max": 3, "num_negatives": 5}, ["n1", "n2"]),
        ({"range_min": 4, "range_max": 2}, []),                # empty window
        ({"range_min": 10}, []),                              # window past the row
        ({"num_negatives": 0}, []),
    ],
)
def test_window_and_count(policy, expected):
    assert _pick(**policy) == [expected]


def test_relative_margin_ceiling_excludes_likely_false_negatives():
    # positive 0.80 -> ceiling 0.80 * 0.95 = 0.76: n0 (0.90) and n1 (0.80) are too close
    assert _pick(0.80, num_negatives=2) == [["n2", "n3"]]
    # a wider margin: ceiling 0.80 * 0.8 = 0.64
    assert _pick(0.80, relative_margin=0.2, num_negatives=2) == [["n3", "n4"]]
    # no margin: anything not above the positive
    assert _pick(0.80, relative_margin=0.0) == [["n1"]]


def test_score_exactly_at_the_ceiling_is_kept():
    scores = np.array([[0.95, 0.5]], dtype=np.float32)
    ceiling = float(np.float32(1.0) * (1 - 0.05))
    scores[0, 0] = ceiling
    assert _pick(1.0, ids=[["a", "b"]], scores=scores) == [["a"]]


def test_excluded_ids_are_never_negatives():
    # the positive itself and its document's other chunks sit at the top of the ranking
    assert _pick(1.0, excluded={"n0", "n1"}, num_negatives=2) == [["n2", "n3"]]
    # exclusion does not widen the window
    assert _pick(1.0, excluded={"n0", "n1"}, range_max=2) == [[]]


def test_negative_positive_score_admits_nothing_above_the_positive():
    # pos * (1 - m) would be *above* a negative positive score: never a negative that outranks it
    scores = np.array([[-0.05, -0.10, -0.19, -0.20, -0.30]], dtype=np.float32)
    got = _pick(-0.20, ids=[["a", "b", "c", "d", "e"]], scores=scores, num_negatives=5)
    assert got == [["d", "e"]]
    got = _pick(0.0, ids=[["a", "b"]], scores=np.array([[0.1, 0.0]], dtype=np.float32))
    assert got == [["b"]]


def test_one_result_per_query_with_its_own_exclusions():
    ids = [["p1", "x", "y"], ["x", "p2", "y"], []]
    scores = np.array([[0.9, 0.5, 0.4], [0.6, 0.55, 0.3], [-1.0, -1.0, -1.0]], dtype=np.float32)
    got = select_negatives(ids, scores, np.array([0.9, 0.55, 0.5], dtype=np.float32),
                           [{"p1"}, {"p2"}, set()], MiningPolicy(num_negatives=1))
    assert got == [["x"], ["y"], []]


def test_policy_rejects_unknown_and_nonsense_settings():
    with pytest.raises(ValueError):
        MiningPolicy(top_k=5)
    for bad in ({"range_min": -1}, {"range_max": -1}, {"num_negatives": -1},
                {"relative_margin": -0.1}, {"relative_margin": 1.5}):
        with pytest.raises(ValueError):
            MiningPolicy(**bad)


# Known positives: never an anchor's negative ------------------------------------------------
def test_query_key_ignores_case_spacing_and_trailing_punctuation():
    from loop.records import query_key as anchor_key

    assert anchor_key("How  does a LOOP work ?") == anchor_key("how does a loop work") == "how does a loop work"
    assert anchor_key("what is __init__") == "what is __init__"  # only sentence punctuation is trailing
    assert anchor_key("x == y?!.") == "x == y"
    assert anchor_key("what is a loop") != anchor_key("what is a loop body")


def test_known_positives_groups_anchor_variants_with_document_siblings():
    from loop.negatives import known_positives

    pairs = [("how do loops work", "p1"), ("How do loops work?", "p2"), ("what is a class", "c1"),
             ("what is a class", "c1")]
    siblings = {"p1": {"p1", "p1b", "p1c"}, "c1": {"c1"}}  # p2: not in the map, stands alone
    assert known_positives(pairs, siblings) == {
        "how do loops work": {"p1", "p1b", "p1c", "p2"},
        "what is a class": {"c1"},
    }
    assert known_positives([], {}) == {}
