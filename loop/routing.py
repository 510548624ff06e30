"""Scoring and routing of candidate pairs: pure functions on arrays, no model, no store.

The active-learning core, in one line: `route(features(scores...), policy)`. A candidate is
(query, proposed positive passage). The current model's view of it decides where a human's
time is best spent:

- confident and consistent -> auto-accepted (the model ranks the positive first by a clear
  margin, and the base model agrees);
- uncertain -> the review queue, ordered by the expected value of a human label (closest
  margins and base/current disagreement first);
- hopeless -> dropped with a reason (the positive is far outside the top-k and barely similar:
  usually a broken generated query);
- a random slice (default 10%) goes to review whatever its route: the control that shows
  routing beats random selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

AUTO, REVIEW, DROP = "auto", "review", "drop"


@dataclass(frozen=True)
class Features:
    """One entry per candidate."""

    pos_score: np.ndarray       # cosine(query, proposed positive), current model
    rank: np.ndarray            # 0-based rank of the positive in the top-k; k when absent
    hard_neg_score: np.ndarray  # best score of a passage that is not a known positive
    margin: np.ndarray          # pos_score - hard_neg_score (negative: a negative outranks it)
    disagreement: np.ndarray    # |rank_current - rank_base| / k, 0..1 (0 when no base model)
    roundtrip: np.ndarray       # bool: positive within the top-k

    def row(self, i: int) -> dict[str, float | int | bool]:
        return {
            "pos_score": round(float(self.pos_score[i]), 4),
            "rank": int(self.rank[i]),
            "hard_neg_score": round(float(self.hard_neg_score[i]), 4),
            "margin": round(float(self.margin[i]), 4),
            "disagreement": round(float(self.disagreement[i]), 4),
            "roundtrip": bool(self.roundtrip[i]),
        }


def positive_rank(topk_ids: list[list[str]], positives: list[set[str]]) -> np.ndarray:
    """0-based rank of the first passage in each row that is a known positive; k when none is."""
    out = np.empty(len(topk_ids), dtype=np.int64)
    for i, (row, pos) in enumerate(zip(topk_ids, positives, strict=True)):
        out[i] = next((r for r, pid in enumerate(row) if pid in pos), len(row))
    return out


def hardest_negative(topk_ids: list[list[str]], topk_scores: np.ndarray, positives: list[set[str]]) -> np.ndarray:
    """Highest score in each row among passages that are not known positives (-1 when none)."""
    out = np.full(len(topk_ids), -1.0, dtype=np.float32)
    for i, (row, pos) in enumerate(zip(topk_ids, positives, strict=True)):
        for r, pid in enumerate(row):
            if pid not in pos:
                out[i] = topk_scores[i][r]
                break
    return out


def _rank_in_k(topk_ids: list[list[str]], positives: list[set[str]], k: int) -> np.ndarray:
    """`positive_rank`, with k (not the row's own length) for a row shorter than k that lacks the
    positive: a search that returned fewer hits is a miss like any other, not a roundtrip (and a
    longer base-model row counts only its first k)."""
    rank = positive_rank(topk_ids, positives)
    lengths = np.array([len(r) for r in topk_ids], dtype=np.int64)
    return np.where(rank < np.minimum(lengths, k), rank, k)


def features(
    pos_score: np.ndarray,
    topk_ids: list[list[str]],
    topk_scores: np.ndarray,
    positives: list[set[str]],
    base_topk_ids: list[list[str]] | None = None,
) -> Features:
    """Features of each candidate from the current model's top-k (and the base model's, if any).

    Args:
        pos_score: cosine of each query with its proposed positive.
        topk_ids / topk_scores: the current model's top-k passages per query (k >= 1).
        positives: per query, the passage ids that count as that positive (chunks of the same
            document, known positives of the anchor): they are neither ranks to beat nor negatives.
        base_topk_ids: the base model's top-k, for disagreement.
    """
    k = max((len(r) for r in topk_ids), default=1) or 1
    rank = _rank_in_k(topk_ids, positives, k)
    hard = hardest_negative(topk_ids, topk_scores, positives)
    if base_topk_ids is not None:
        disagreement = np.abs(rank - _rank_in_k(base_topk_ids, positives, k)) / k
    else:
        disagreement = np.zeros(len(rank), dtype=np.float64)
    pos_score = np.asarray(pos_score, dtype=np.float32)
    return Features(pos_score, rank, hard, pos_score - hard, disagreement, rank < k)


class RoutingPolicy(BaseModel):
    """Thresholds of `route`. Margins are in cosine units."""

    model_config = ConfigDict(extra="forbid")

    confident_margin: float = Field(0.10, description="auto-accept when rank 0 and margin >= this")
    max_disagreement: float = Field(0.2, description="... and the base model's rank is this close")
    hopeless_score: float = Field(0.10, description="drop when outside top-k and cosine below this")
    random_fraction: float = Field(0.10, ge=0.0, le=1.0, description="random control slice sent to review")
    uncertainty_scale: float = Field(0.05, gt=0.0, description="margin scale of the uncertainty score")
    # A logged query is a real user's question: its answer is a person's call, never the model's
    # own confident guess (which adds no signal and some wrong labels). Synthetic pairs the model
    # ranks first by a margin are kept without review.
    auto_accept_sources: list[str] = Field(
        default_factory=lambda: ["synthetic"],
        description="candidate sources that may be accepted without review (others always go to a person)",
    )
    seed: int = 0


@dataclass(frozen=True)
class Routing:
    route: np.ndarray     # AUTO / REVIEW / DROP per candidate
    reason: list[str]     # a sentence per candidate
    priority: np.ndarray  # expected value of a human label (higher = ask first)
    control: np.ndarray   # bool: in the random control slice


def priority(f: Features, policy: RoutingPolicy) -> np.ndarray:
    """Expected value of a human label: highest where the model can't tell (margin ~ 0) and
    where the base and current models disagree; a clear win or loss is worth less."""
    uncertainty = np.exp(-np.abs(f.margin) / policy.uncertainty_scale)
    return uncertainty + 0.5 * f.disagreement


def route(f: Features, policy: RoutingPolicy = RoutingPolicy(), flagged: np.ndarray | None = None,
          sources: Sequence[str] | None = None) -> Routing:
    """Route every candidate; `flagged` candidates (e.g. instruction-like text) always go to review,
    and so does a confident one whose source (`sources`, per candidate) is not in
    `policy.auto_accept_sources`."""
    n = len(f.pos_score)
    routes = np.full(n, REVIEW, dtype=object)
    reasons = [""] * n
    prio = priority(f, policy)
    flagged = np.zeros(n, dtype=bool) if flagged is None else np.asarray(flagged, dtype=bool)
    for i in range(n):
        if flagged[i]:
            reasons[i] = "flagged by a quality filter"
        elif f.rank[i] == 0 and f.margin[i] >= policy.confident_margin and f.disagreement[i] <= policy.max_disagreement:
            if sources is None or sources[i] in policy.auto_accept_sources:
                routes[i], reasons[i] = AUTO, f"ranked first by a margin of {f.margin[i]:.2f}"
            else:
                reasons[i] = f"ranked first by a margin of {f.margin[i]:.2f}; {sources[i]} pairs are confirmed by a person"
        elif not f.roundtrip[i] and f.pos_score[i] < policy.hopeless_score:
            routes[i], reasons[i] = DROP, (
                f"positive outside the top-{int(f.rank[i])} with cosine {f.pos_score[i]:.2f}"
            )
        elif f.rank[i] == 0:
            reasons[i] = f"ranked first but only by {f.margin[i]:.2f}"
        elif f.roundtrip[i]:
            reasons[i] = f"ranked {int(f.rank[i]) + 1}: a negative scores {-f.margin[i]:.2f} higher"
        else:
            reasons[i] = f"not in the top-{int(f.rank[i])}; cosine {f.pos_score[i]:.2f}"
        if f.disagreement[i] > policy.max_disagreement and routes[i] == REVIEW:
            reasons[i] += "; the base model ranks it differently"
    control = np.zeros(n, dtype=bool)
    n_control = int(round(policy.random_fraction * n))
    if n_control:
        control[np.random.default_rng(policy.seed).choice(n, size=n_control, replace=False)] = True
        for i in np.flatnonzero(control):
            if routes[i] != REVIEW:
                reasons[i] = f"random control (would be {routes[i]}: {reasons[i]})"
            else:
                reasons[i] = f"random control ({reasons[i]})"
            routes[i] = REVIEW
    return Routing(routes, reasons, prio, control)
