"""Decisions a user must be able to read: is fine-tuning worth it, and may a candidate go live.

Both functions are pure: they take measured numbers (or `EvalReport`s) and return a verdict
with reasons written as plain sentences that quote those numbers.
"""

from __future__ import annotations

import math

import numpy as np

from pydantic import BaseModel, ConfigDict

from loop.errors import InputError
from loop.evaluate import PRIMARY_METRIC, EvalReport, compare, paired_differences

# Expected gain heuristic: a fraction of the gap that grows with log10(pairs), from 0 at
# 100 pairs to 0.25 at 1,000 and 0.5 at 10,000, capped at 0.6. Deliberately conservative:
# published domain fine-tunes of small models close well under half the gap to a strong
# target with a few thousand pairs, and an over-promise costs more trust than an under-promise.
_GAIN_PER_DECADE = 0.25
_GAIN_FLOOR_PAIRS = 100
_GAIN_CAP = 0.6


class Recommendation(BaseModel):
    """The `should_finetune` verdict. `reasons` are sentences to show as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    finetune: bool
    generate_first: bool
    reasons: list[str]
    baseline: float
    target: float
    gap: float
    gap_significant: bool
    pairs_available: int
    pairs_needed: int
    expected_gain: float
    reindex_seconds: float
    reindex_human: str


def gain_fraction(n_pairs: int) -> float:
    """Share of the gap a fine-tune on `n_pairs` pairs is expected to close (see module note)."""
    if n_pairs <= _GAIN_FLOOR_PAIRS:
        return 0.0
    return min(_GAIN_CAP, _GAIN_PER_DECADE * math.log10(n_pairs / _GAIN_FLOOR_PAIRS))


def human_duration(seconds: float) -> str:
    """'under a second', '45 s', '3 min', '2 h 5 min', '1 d 3 h' (rounded, for reading)."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{round(seconds)} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 24 * 60:
        hours, minutes = divmod(minutes, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(round(seconds / 3600), 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def should_finetune(
    baseline_ndcg: float, target_ndcg: float, n_accepted_pairs: int, n_passages: int, encode_passages_per_s: float,
    *, min_gap: float = 0.05, min_pairs: int = 1000, ci: tuple[float, float] | None = None,
) -> Recommendation:
    """Recommend fine-tuning, generating pairs first, or keeping the off-the-shelf model.

    Args:
        baseline_ndcg: the off-the-shelf model's NDCG@10 on the held-out set.
        target_ndcg: the NDCG@10 the team needs.
        n_accepted_pairs: accepted training pairs available now.
        n_passages: corpus size, for the re-index estimate.
        encode_passages_per_s: measured encoding speed of the model on this machine.
        min_gap: smallest gap worth a fine-tune.
        min_pairs: pairs needed for a reliable fine-tune; below it, generate first.
        ci: the baseline's 95% interval (lo, hi); the target must then also lie above `hi`.

    Raises:
        InputError: a value is out of range (scores outside 0..1, negative counts, speed <= 0).
    """
    for name, v in (("baseline_ndcg", baseline_ndcg), ("target_ndcg", target_ndcg)):
        if not 0.0 <= v <= 1.0:
            raise InputError(f"{name} must be an NDCG between 0 and 1, got {v}.")
    if n_accepted_pairs < 0 or n_passages < 0:
        raise InputError("pair and passage counts cannot be negative.")
    if not encode_passages_per_s > 0:
        raise InputError(
            f"encode speed must be positive (passages per second), got {encode_passages_per_s}; measure it first."
        )
    if ci is not None and not ci[0] <= ci[1]:
        raise InputError(f"the baseline interval must be (low, high), got {ci}.")

    gap = target_ndcg - baseline_ndcg
    beyond_ci = ci is None or target_ndcg > ci[1]
    significant = gap > min_gap and beyond_ci
    enough = n_accepted_pairs >= min_pairs
    needed = max(0, min_pairs - n_accepted_pairs)
    # If the plan is to generate first, the estimate is for the data after generating.
    expected = max(gap, 0.0) * gain_fraction(max(n_accepted_pairs, min_pairs) if significant else n_accepted_pairs)
    reindex = n_passages / encode_passages_per_s
    reindex_h = human_duration(reindex)

    reasons = [
        f"The off-the-shelf model scores NDCG@10 {baseline_ndcg:.3f} on your held-out set; "
        f"your target is {target_ndcg:.3f}, a gap of {gap:+.3f}."
    ]
    ci_txt = f" and above the baseline's 95% interval ({ci[0]:.3f} to {ci[1]:.3f})" if ci is not None else ""
    if gap <= 0:
        reasons.append("The off-the-shelf model already meets your target: keep it, no fine-tuning is needed.")
    elif gap <= min_gap:
        reasons.append(
            f"The gap is within {min_gap:.3f}, too small to be worth a fine-tune and a re-index; "
            f"keep the off-the-shelf model, or raise the target."
        )
    elif not beyond_ci:
        reasons.append(
            f"The target lies within the baseline's 95% interval ({ci[0]:.3f} to {ci[1]:.3f}): the held-out set "
            f"cannot tell the two apart, so a fine-tune could not be shown to help. Add held-out pairs first."
        )
    else:
        reasons.append(f"The gap is larger than {min_gap:.3f}{ci_txt}, so fine-tuning is worth considering.")
    if significant:
        if enough:
            reasons.append(
                f"You have {n_accepted_pairs:,} accepted training pairs, enough (at least {min_pairs:,}) "
                "to fine-tune now."
            )
        else:
            reasons.append(
                f"You have {n_accepted_pairs:,} accepted training pairs; about {min_pairs:,} are needed for a "
                f"reliable fine-tune, so generate and review {needed:,} more first."
            )
        reasons.append(
            f"Expect a gain of roughly {expected:+.3f} NDCG@10 (a conservative guess: "
            f"{gain_fraction(max(n_accepted_pairs, min_pairs)):.0%} of the gap at "
            f"{max(n_accepted_pairs, min_pairs):,} pairs); the round's evaluation will measure the real one."
        )
    reasons.append(
        f"Re-indexing {n_passages:,} passages with a new model takes about {reindex_h} "
        f"at the measured {encode_passages_per_s:,.1f} passages per second."
    )
    return Recommendation(
        finetune=significant and enough, generate_first=significant and not enough, reasons=reasons,
        baseline=baseline_ndcg, target=target_ndcg, gap=gap, gap_significant=significant,
        pairs_available=n_accepted_pairs, pairs_needed=needed, expected_gain=expected,
        reindex_seconds=reindex, reindex_human=reindex_h,
    )


class Resolution(BaseModel):
    """How finely a held-out set can measure a difference between two models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_queries: int
    half_width: float  # of the 95% interval of the difference
    p_better: float  # share of bootstrap resamples in which the candidate wins
    queries_for: dict[str, int]  # effect -> held-out queries that would resolve it (the same spread assumed)
    p_sign_flip: float | None = None  # one-sided p of "no better" (`sign_flip_p`), recorded beside p_better

    def more_queries(self, effect: float = 0.02) -> int:
        return max(0, self.queries_for[f"{effect:g}"] - self.n_queries)


def resolution(active: EvalReport, candidate: EvalReport, metric: str = PRIMARY_METRIC, *,
               effects: tuple[float, ...] = (0.01, 0.02, 0.05), n_boot: int = 2000, seed: int = 0) -> Resolution:
    """The half-width of the paired interval, the bootstrap share of wins, and how many queries
    would resolve each of `effects` (n = (1.96 sd / effect)^2, sd of the per-query differences;
    at least the queries there are when the spread is zero)."""
    c = compare(active, candidate, metric, n_boot=n_boot, seed=seed)
    diff = paired_differences(active, candidate, metric)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    sd = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    return Resolution(
        n_queries=len(diff), half_width=(c.ci_high - c.ci_low) / 2, p_better=float((means > 0).mean()),
        queries_for={f"{e:g}": max(len(diff), math.ceil((1.96 * sd / e) ** 2)) for e in effects},
        p_sign_flip=sign_flip_p(diff, seed=seed))


def sign_flip_p(diff: np.ndarray, *, exact_up_to: int = 16, n_draws: int = 20000, seed: int = 0) -> float:
    """One-sided p-value of the paired sign-flip (permutation) test that the mean of `diff` is
    above zero only by chance: the share of sign assignments to the non-zero |differences| whose
    mean is at least the observed one. Exact (every assignment) up to `exact_up_to` non-zero
    differences, else `n_draws` seeded random assignments. Unlike the bootstrap share of wins,
    it does not grow overconfident on a handful of queries; it is 1.0 when nothing differs.
    """
    d = np.asarray(diff, dtype=np.float64)
    mags, observed = np.abs(d[np.abs(d) > 1e-12]), float(d.sum())
    if not len(mags):
        return 1.0
    if len(mags) <= exact_up_to:
        signs = 1 - 2 * ((np.arange(2 ** len(mags))[:, None] >> np.arange(len(mags))) & 1)
    else:
        signs = np.random.default_rng(seed).choice((-1, 1), size=(n_draws, len(mags)))
    return float((signs @ mags >= observed - 1e-12).mean())


def promotion_gate(
    candidate: EvalReport, active: EvalReport, metric: str = PRIMARY_METRIC, min_delta: float = 0.0,
    confidence: float = 0.975, res: Resolution | None = None, sign_flip_max: float | None = None,
) -> tuple[bool, list[str]]:
    """Promote `candidate` only if it beats `active` on the same held-out queries with `confidence`.

    The rule: the mean difference exceeds `min_delta`, and in at least `confidence` of the paired
    bootstrap resamples of the queries the candidate wins (`res`: that measurement, when the caller
    already has it), and, when `sign_flip_max` is set, the paired sign-flip test's one-sided p is
    at most it (the bootstrap share grows overconfident on a handful of queries; the sign-flip
    test does not). 0.975 is the classic test (the 95% interval wholly above zero); the loop's
    defaults (LoopConfig.promote_confidence, promote_sign_flip) are chosen by `bench.quality`'s
    gate calibration (bench/README.md). Otherwise the candidate stays a candidate (the active
    model and index are untouched).

    Returns:
        (promote, reasons quoting the numbers).

    Raises:
        ValueError: the reports come from different eval sets or lack `metric`.
    """
    c = compare(active, candidate, metric)
    res = res or resolution(active, candidate, metric)  # the caller's, when it records it too
    name = metric.upper() if metric == "map" else metric.replace("ndcg", "NDCG").replace("mrr", "MRR")
    reasons = [
        f"Candidate {c.other_version} scores {name} {c.other:.4f} against {c.base:.4f} for the active model "
        f"{c.base_version}: a difference of {c.delta:+.4f} (95% interval {c.ci_low:+.4f} to {c.ci_high:+.4f}, "
        f"{c.n_queries} held-out queries); it wins in {res.p_better:.0%} of the bootstrap resamples."
    ]
    boot = res.p_better >= confidence
    checked = sign_flip_max is not None and res.p_sign_flip is not None
    confirmed = not checked or res.p_sign_flip <= sign_flip_max  # type: ignore[operator]
    sure = boot and confirmed
    if checked:
        reasons.append(f"The paired sign-flip test gives p {res.p_sign_flip:.3f} "
                       f"({'within' if confirmed else 'above'} the {sign_flip_max:g} required).")
    big_enough = c.delta > min_delta
    if sure and c.ci_low > 0:
        reasons.append("The whole interval is above zero: the gain is beyond noise.")
    elif sure:
        reasons.append(f"That is at least the required {confidence:.0%}: a likely gain, though the interval still "
                       f"includes zero.")
    elif boot:
        reasons.append(f"The bootstrap share reaches the required {confidence:.0%}, but on {c.n_queries} queries the "
                       f"sign-flip test does not confirm it: the difference may be noise. Keep the active model; "
                       f"the candidate stays a candidate.")
    elif c.ci_high < 0:
        reasons.append("The whole interval is below zero: the candidate is worse. Keep the active model.")
    else:
        reasons.append(
            f"That is below the required {confidence:.0%}: the difference may be noise. Keep the active model; "
            f"the candidate stays a candidate."
        )
    more = res.more_queries(0.02)
    reasons.append(
        f"This set resolves differences of about +-{res.half_width:.3f}; "
        + (f"{more} more verified held-out queries would resolve +0.02." if more else "it can resolve +0.02.")
    )
    if c.base >= 0.95:
        reasons.append(
            f"The active model already scores {c.base:.3f} here: this set cannot show a gain. Add held-out queries the "
            f"model gets wrong (logged queries a reviewer answered, or imported pairs with `--split eval`)."
        )
    if sure and not big_enough:
        reasons.append(f"The gain {c.delta:+.4f} is not above the required minimum of {min_delta:+.4f}; not promoted.")
    promote = sure and big_enough
    if promote:
        reasons.append("Promote: re-index the corpus with the candidate and switch the active model.")
    return promote, reasons
