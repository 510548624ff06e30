import math

import numpy as np
import pytest

from loop.verdicts import gain_fraction, human_duration, promotion_gate, resolution, should_finetune
from loop.errors import InputError
from loop.evaluate import EvalReport


@pytest.mark.parametrize(
    "baseline, target, pairs, ci, finetune, generate_first, significant, needed",
    [
        (0.50, 0.53, 5000, None, False, False, False, 0),         # small gap: not worth it
        (0.70, 0.60, 5000, None, False, False, False, 0),         # already above target
        (0.40, 0.60, 200, None, False, True, True, 800),          # big gap, few pairs: generate first
        (0.40, 0.60, 2000, None, True, False, True, 0),           # big gap, enough pairs: fine-tune
        (0.40, 0.60, 1000, None, True, False, True, 0),           # exactly min_pairs is enough
        (0.40, 0.48, 2000, (0.35, 0.50), False, False, False, 0),  # gap > min_gap but inside the CI
        (0.40, 0.48, 2000, (0.37, 0.43), True, False, True, 0),    # gap beyond the CI
    ],
)
def test_should_finetune_table(baseline, target, pairs, ci, finetune, generate_first, significant, needed):
    rec = should_finetune(baseline, target, pairs, 10_000, 100.0, ci=ci)
    assert (rec.finetune, rec.generate_first, rec.gap_significant, rec.pairs_needed) == (
        finetune, generate_first, significant, needed
    )
    assert rec.gap == pytest.approx(target - baseline)
    assert rec.pairs_available == pairs
    assert all(r.endswith(".") and r[0].isupper() for r in rec.reasons)
    assert f"{baseline:.3f}" in rec.reasons[0] and f"{target:.3f}" in rec.reasons[0]
    assert 0.0 <= rec.expected_gain <= max(rec.gap, 0.0)


def test_should_finetune_reasons_and_expected_gain():
    rec = should_finetune(0.40, 0.60, 200, 10_000, 100.0)
    assert any("generate and review 800 more" in r for r in rec.reasons)
    # the estimate is for the data after generating up to min_pairs: 25% of the gap at 1,000 pairs
    assert rec.expected_gain == pytest.approx(0.2 * 0.25)
    rec = should_finetune(0.40, 0.60, 10_000, 10_000, 100.0)
    assert rec.expected_gain == pytest.approx(0.2 * 0.5)
    small = should_finetune(0.50, 0.53, 5000, 10_000, 100.0)
    assert any("too small" in r for r in small.reasons)
    inside = should_finetune(0.40, 0.48, 2000, 100, 100.0, ci=(0.35, 0.50))
    assert any("within the baseline's 95% interval (0.350 to 0.500)" in r for r in inside.reasons)


@pytest.mark.parametrize(
    "n_passages, speed, seconds, human",
    [
        (12_000, 50.0, 240.0, "4 min"),
        (500, 1000.0, 0.5, "under a second"),
        (3_000, 100.0, 30.0, "30 s"),
        (1_000_000, 200.0, 5000.0, "1 h 23 min"),
        (10_000_000, 100.0, 100_000.0, "1 d 4 h"),
    ],
)
def test_reindex_estimate(n_passages, speed, seconds, human):
    rec = should_finetune(0.4, 0.6, 2000, n_passages, speed)
    assert rec.reindex_seconds == pytest.approx(seconds)
    assert rec.reindex_human == human
    assert any(f"about {human}" in r for r in rec.reasons)


def test_helpers():
    assert gain_fraction(50) == 0.0 and gain_fraction(100) == 0.0
    assert gain_fraction(1000) == pytest.approx(0.25)
    assert gain_fraction(10**7) == 0.6
    assert human_duration(2 * 3600) == "2 h" and human_duration(89) == "89 s" and human_duration(90) == "2 min"


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.4, 1.5, 10, 10, 1.0), "target_ndcg"),
        ((-0.1, 0.5, 10, 10, 1.0), "baseline_ndcg"),
        ((0.4, 0.6, -1, 10, 1.0), "negative"),
        ((0.4, 0.6, 10, 10, 0.0), "measure it first"),
    ],
)
def test_should_finetune_rejects_bad_input(args, match):
    with pytest.raises(InputError, match=match):
        should_finetune(*args)


def _report(version, values, fingerprint="same"):
    values = [float(v) for v in values]
    return EvalReport(
        model_version=version, evalset_fingerprint=fingerprint, n_queries=len(values), n_docs=500, dim=384, k=100,
        metrics={"ndcg@10": float(np.mean(values))}, per_query={"ndcg@10": values},
        query_ids=[f"q{i}" for i in range(len(values))],
    )


_RNG = np.random.default_rng(11)
_ACTIVE = _RNG.uniform(0.2, 0.8, 200)


@pytest.mark.parametrize(
    "candidate, min_delta, promote, phrase",
    [
        (_ACTIVE + 0.05 + _RNG.normal(0, 0.03, 200), 0.0, True, "beyond noise"),    # clear win
        (_ACTIVE + _RNG.normal(0, 0.08, 200), 0.0, False, "may be noise"),          # noise
        (_ACTIVE - 0.05 + _RNG.normal(0, 0.03, 200), 0.0, False, "is worse"),       # loss
        (_ACTIVE + 0.05 + _RNG.normal(0, 0.03, 200), 0.1, False, "required minimum"),  # win, but too small
    ],
)
def test_promotion_gate(candidate, min_delta, promote, phrase):
    active, cand = _report("base-1", _ACTIVE), _report("ft-2", candidate)
    ok, reasons = promotion_gate(cand, active, min_delta=min_delta)
    assert ok is promote
    assert any(phrase in r for r in reasons)
    delta = float(np.mean(candidate) - np.mean(_ACTIVE))
    assert f"{delta:+.4f}" in reasons[0] and "ft-2" in reasons[0] and "base-1" in reasons[0]
    assert "200 held-out queries" in reasons[0]
    assert not math.isnan(delta)


def test_promotion_gate_refuses_different_eval_sets():
    with pytest.raises(ValueError, match="different eval sets"):
        promotion_gate(_report("ft-2", _ACTIVE), _report("base-1", _ACTIVE, fingerprint="other"))


def test_a_likely_gain_passes_a_lower_confidence_and_the_set_says_what_it_can_resolve():
    rng = np.random.default_rng(3)
    active = rng.uniform(0.3, 0.7, 30)
    cand = active + 0.02 + rng.normal(0, 0.06, 30)  # a small gain, 30 queries: the interval spans zero
    a, c = _report("base-1", active), _report("ft-2", cand)
    res = resolution(a, c)
    assert 0.8 < res.p_better < 0.975 and res.n_queries == 30
    sd = float(np.std(cand - active, ddof=1))
    assert res.queries_for["0.02"] == math.ceil((1.96 * sd / 0.02) ** 2) and res.more_queries(0.02) == res.queries_for[
        "0.02"] - 30
    assert promotion_gate(c, a)[0] is False  # the classic test: the interval must clear zero
    ok, reasons = promotion_gate(c, a, confidence=0.8)
    assert ok and any("a likely gain" in r for r in reasons)
    assert any(f"{res.more_queries(0.02)} more verified held-out queries would resolve +0.02" in r for r in reasons)


def test_the_sign_flip_test_can_hold_back_a_bootstrap_win_on_a_handful_of_queries():
    # Ten queries, three clear wins, one loss: the bootstrap share reaches 95%, the exact
    # sign-flip test (p 2/16 = 0.125 over the four queries that differ) does not.
    active = np.full(10, 0.5)
    cand = active + np.array([0.3, 0.3, 0.3, -0.1, 0, 0, 0, 0, 0, 0])
    a, c = _report("base-1", active), _report("ft-2", cand)
    res = resolution(a, c)
    assert res.p_better >= 0.95 and res.p_sign_flip == 0.125
    assert promotion_gate(c, a, confidence=0.95)[0] is True  # the bootstrap share alone
    ok, reasons = promotion_gate(c, a, confidence=0.95, sign_flip_max=0.1)
    assert not ok
    assert any("sign-flip test gives p 0.125 (above the 0.1 required)" in r for r in reasons)
    assert any("does not confirm it" in r for r in reasons)
    ok, reasons = promotion_gate(c, a, confidence=0.95, sign_flip_max=0.2)
    assert ok and any("(within the 0.2 required)" in r for r in reasons)


def test_a_held_out_set_the_active_model_already_aces_says_it_cannot_show_a_gain():
    ok, reasons = promotion_gate(_report("ft-2", [1.0] * 8), _report("base-1", [1.0] * 8))
    assert not ok and any("cannot show a gain" in r for r in reasons)


def test_sign_flip_p_counts_sign_assignments_and_stays_cautious_on_a_handful_of_queries():
    from loop.verdicts import sign_flip_p

    assert sign_flip_p(np.array([0.1, 0.2, 0.0, 0.3])) == 0.125  # 3 non-zero, all up: 1 of 8 assignments
    assert sign_flip_p(np.array([0.1, -0.1])) == 0.75 and sign_flip_p(np.zeros(4)) == 1.0
    assert sign_flip_p(np.full(40, 0.05)) < 0.001  # many queries, all up: drawn, not enumerated
    # One query up by a lot, four a little down: the bootstrap share of wins is high, the test is not.
    a, c = _report("base-1", [0.5] * 5), _report("ft-2", [1.0, 0.49, 0.49, 0.49, 0.49])
    res = resolution(a, c)
    assert res.p_better > 0.6 and res.p_sign_flip == 0.5
