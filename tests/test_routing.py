"""Scoring and routing on plain arrays: no model, no store."""

import numpy as np
import pytest

from loop.routing import AUTO, DROP, REVIEW, RoutingPolicy, features, hardest_negative, positive_rank, route


def _f(pos_score, topk_ids, topk_scores, positives, base=None):
    return features(np.asarray(pos_score, dtype=np.float32), topk_ids, np.asarray(topk_scores, dtype=np.float32),
                    positives, base)


# positive_rank / hardest_negative ---------------------------------------------------------
def test_positive_rank_counts_siblings_as_the_positive():
    topk = [["n1", "sib", "p", "n2"], ["p", "n1", "n2", "n3"], ["n1", "n2", "n3", "n4"]]
    positives = [{"p", "sib"}, {"p"}, {"p"}]
    assert positive_rank(topk, positives).tolist() == [1, 0, 4]  # absent -> k


def test_hardest_negative_skips_positives_and_siblings():
    topk = [["sib", "p", "n1", "n2"], ["n1", "p", "n2", "n3"], ["p", "sib"]]
    scores = [[0.9, 0.8, 0.7, 0.6], [0.95, 0.9, 0.5, 0.4], [0.9, 0.8]]
    positives = [{"p", "sib"}, {"p"}, {"p", "sib"}]
    hard = hardest_negative(topk, scores, positives)
    assert hard.tolist() == pytest.approx([0.7, 0.95, -1.0])  # -1 when every hit is a positive


def test_rank_and_negative_need_one_positive_set_per_row():
    with pytest.raises(ValueError):
        positive_rank([["a"], ["b"]], [{"a"}])


# features -----------------------------------------------------------------------------------
def test_features_margin_roundtrip_and_no_base():
    f = _f(
        [0.8, 0.5, 0.2],
        [["p", "n1", "n2"], ["n1", "p", "n2"], ["n1", "n2", "n3"]],
        [[0.8, 0.6, 0.5], [0.7, 0.5, 0.4], [0.6, 0.5, 0.4]],
        [{"p"}, {"p"}, {"p"}],
    )
    assert f.rank.tolist() == [0, 1, 3]
    assert f.hard_neg_score.tolist() == pytest.approx([0.6, 0.7, 0.6])
    assert f.margin.tolist() == pytest.approx([0.2, -0.2, -0.4])
    assert f.roundtrip.tolist() == [True, True, False]
    assert f.disagreement.tolist() == [0.0, 0.0, 0.0]
    assert f.row(1) == {"pos_score": 0.5, "rank": 1, "hard_neg_score": 0.7, "margin": -0.2,
                        "disagreement": 0.0, "roundtrip": True}


def test_features_disagreement_with_the_base_model():
    topk = [["p", "a", "b", "c"], ["p", "a", "b", "c"], ["a", "b", "c", "d"]]
    base = [["a", "b", "c", "p"], ["p", "a", "b", "c"], ["p", "a", "b", "c"]]
    f = _f([0.9, 0.9, 0.1], topk, [[0.9, 0.5, 0.4, 0.3]] * 3, [{"p"}] * 3, base)
    # |0 - 3| / 4, |0 - 0| / 4, |4 (absent) - 0| / 4
    assert f.disagreement.tolist() == pytest.approx([0.75, 0.0, 1.0])


def test_features_of_rows_shorter_than_k_are_not_roundtrips_when_the_positive_is_absent():
    # A query whose top-k came back short (e.g. a filtered search) must not look like a hit.
    f = _f([0.05, 0.05], [["n1", "n2", "n3"], ["n1"]], [[0.5, 0.4, 0.3], [0.5, 0.0, 0.0]], [{"p"}, {"p"}])
    assert f.rank.tolist() == [3, 3]
    assert f.roundtrip.tolist() == [False, False]
    # a base-model row longer than k counts only its first k: disagreement stays within 0..1
    f = _f([0.5], [["n1", "p"]], [[0.6, 0.5]], [{"p"}], [["a", "b", "c", "d", "p"]])
    assert f.disagreement.tolist() == [pytest.approx(0.5)]


# route ----------------------------------------------------------------------------------------
NO_CONTROL = RoutingPolicy(random_fraction=0.0)


def _one(pos, rank, hard, disagreement=0.0, k=10):
    """Features of one candidate with the positive at `rank` (k = absent)."""
    ids = [f"n{j}" for j in range(k)]
    scores = sorted([hard] + [hard - 0.01 * (j + 1) for j in range(k - 1)], reverse=True)
    if rank < k:
        ids.insert(rank, "p")
        ids = ids[:k]
        scores = sorted(scores[: k - 1] + [pos], reverse=True)
    base = None
    if disagreement:
        shift = int(round(disagreement * k))
        base = [[f"m{j}" for j in range(shift)] + ["p"] + [f"m{j}" for j in range(shift, k - 1)]]
    return _f([pos], [ids], [scores], [{"p"}], base)


@pytest.mark.parametrize(
    "pos, rank, hard, disagreement, flagged, expected, reason_has",
    [
        (0.80, 0, 0.50, 0.0, False, AUTO, "ranked first by a margin of 0.30"),
        (0.80, 0, 0.70, 0.0, False, AUTO, "margin of 0.10"),                    # margin == threshold
        (0.80, 0, 0.75, 0.0, False, REVIEW, "ranked first but only by 0.05"),
        (0.80, 0, 0.50, 0.5, False, REVIEW, "the base model ranks it differently"),
        (0.60, 2, 0.70, 0.0, False, REVIEW, "ranked 3: a negative scores 0.10 higher"),
        (0.05, 10, 0.60, 0.0, False, DROP, "positive outside the top-10 with cosine 0.05"),
        (0.30, 10, 0.60, 0.0, False, REVIEW, "not in the top-10; cosine 0.30"),  # absent but similar
        (0.80, 0, 0.50, 0.0, True, REVIEW, "flagged by a quality filter"),         # flagged beats auto
        (0.05, 10, 0.60, 0.0, True, REVIEW, "flagged by a quality filter"),        # flagged beats drop
    ],
)
def test_route_table(pos, rank, hard, disagreement, flagged, expected, reason_has):
    f = _one(pos, rank, hard, disagreement)
    r = route(f, NO_CONTROL, np.array([flagged]))
    assert r.route[0] == expected
    assert reason_has in r.reason[0]
    assert not r.control[0]


def test_route_drop_and_auto_give_a_reason_for_every_candidate():
    f = _f([0.9, 0.02, 0.5], [["p", "a"], ["a", "b"], ["a", "p"]], [[0.9, 0.1], [0.6, 0.5], [0.55, 0.5]],
           [{"p"}] * 3)
    r = route(f, NO_CONTROL)
    assert r.route.tolist() == [AUTO, DROP, REVIEW]
    assert all(r.reason)
    assert "cosine 0.02" in r.reason[1]


def test_route_auto_accepts_only_the_allowed_sources():
    f = _f([0.9, 0.9], [["p", "a"], ["p", "a"]], [[0.9, 0.1], [0.9, 0.1]], [{"p"}] * 2)
    policy = NO_CONTROL.model_copy(update={"auto_accept_sources": ["synthetic"]})
    r = route(f, policy, sources=["synthetic", "mined"])
    assert r.route.tolist() == [AUTO, REVIEW]
    assert "mined pairs are confirmed by a person" in r.reason[1]
    assert route(f, NO_CONTROL).route.tolist() == [AUTO, AUTO]  # no sources given: confidence alone decides


def test_priority_is_highest_near_a_zero_margin():
    f = _f([0.60, 0.90, 0.10, 0.61], [["p", "a"], ["p", "a"], ["a", "p"], ["a", "p"]],
           [[0.6, 0.6], [0.9, 0.3], [0.7, 0.1], [0.62, 0.61]], [{"p"}] * 4)
    p = route(f, NO_CONTROL).priority
    assert f.margin.tolist() == pytest.approx([0.0, 0.6, -0.6, -0.01], abs=1e-6)
    assert p[0] == pytest.approx(1.0)
    assert p[0] > p[3] > p[1]
    assert p[3] > p[2]
    assert p[1] == pytest.approx(p[2])  # a clear win and a clear loss are worth the same


def test_priority_adds_disagreement():
    same = _one(0.8, 0, 0.5)
    moved = _one(0.8, 0, 0.5, disagreement=0.5)
    assert route(moved, NO_CONTROL).priority[0] == pytest.approx(route(same, NO_CONTROL).priority[0] + 0.25)


def _mixed(n=200):
    """n candidates cycling through confident, hopeless and uncertain."""
    pos, ids, scores = [], [], []
    for i in range(n):
        kind = i % 3
        if kind == 0:    # confident
            pos.append(0.9), ids.append(["p", "a", "b"]), scores.append([0.9, 0.3, 0.2])
        elif kind == 1:  # hopeless
            pos.append(0.01), ids.append(["a", "b", "c"]), scores.append([0.7, 0.6, 0.5])
        else:            # uncertain
            pos.append(0.5), ids.append(["a", "p", "b"]), scores.append([0.52, 0.5, 0.3])
    return _f(pos, ids, scores, [{"p"}] * n)


@pytest.mark.parametrize("fraction, n", [(0.1, 200), (0.25, 10), (0.15, 10), (0.0, 50), (1.0, 7), (0.1, 4)])
def test_random_control_slice_size(fraction, n):
    r = route(_mixed(n), RoutingPolicy(random_fraction=fraction))
    assert int(r.control.sum()) == int(round(fraction * n))
    assert all(r.route[i] == REVIEW for i in np.flatnonzero(r.control))
    assert all(r.reason[i].startswith("random control") for i in np.flatnonzero(r.control))


def test_random_control_is_deterministic_by_seed_and_covers_auto_and_drop():
    f = _mixed(300)
    plain = route(f, NO_CONTROL)
    a = route(f, RoutingPolicy(random_fraction=0.2, seed=7))
    b = route(f, RoutingPolicy(random_fraction=0.2, seed=7))
    c = route(f, RoutingPolicy(random_fraction=0.2, seed=8))
    assert a.control.tolist() == b.control.tolist() and a.reason == b.reason
    assert a.control.tolist() != c.control.tolist()
    ctrl = np.flatnonzero(a.control)
    would_be = {plain.route[i] for i in ctrl}
    assert {AUTO, DROP, REVIEW} <= would_be  # the control is drawn from every route
    for i in ctrl:
        if plain.route[i] == AUTO:
            assert a.reason[i] == f"random control (would be auto: {plain.reason[i]})"
        elif plain.route[i] == DROP:
            assert a.reason[i] == f"random control (would be drop: {plain.reason[i]})"
        else:
            assert a.reason[i] == f"random control ({plain.reason[i]})"
    # outside the slice nothing changes
    rest = [i for i in range(300) if not a.control[i]]
    assert [a.route[i] for i in rest] == [plain.route[i] for i in rest]
    assert a.priority.tolist() == plain.priority.tolist()


def test_routing_policy_rejects_unknown_and_out_of_range_settings():
    with pytest.raises(ValueError):
        RoutingPolicy(random_fraction=1.5)
    with pytest.raises(ValueError):
        RoutingPolicy(confident=0.2)
    with pytest.raises(ValueError):
        RoutingPolicy(uncertainty_scale=0.0)


def test_route_of_nothing():
    f = _f(np.zeros(0), [], np.zeros((0, 0)), [])
    r = route(f)
    assert len(r.route) == 0 and r.reason == [] and not r.control.any()
