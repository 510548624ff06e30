"""WiSE-FT: the final step of a training run, weight-space ensembling of the tuned and base models.

`(1 - a) * base + a * tuned`, with `a` chosen from a small grid on the round's development fold
(Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"). With a few hundred labels a
fine-tune often gains on the domain and loses elsewhere; the interpolation usually keeps most of
the gain and removes most of the regression, and it costs a few encodes, not a training run.

A grid of one weight (`wise_grid = [a]`) applies that weight as it is, with no development fold.
With several, the development fold is a retrieval task written by the parent (`DevTask`, `dev.json` in the run
directory): the fold's queries, a pool of passages (their relevant passages plus the active
model's top passages for each query) and which pool passages are relevant. Each grid weight
is scored by NDCG@10 over that pool; the best wins, a tie going to the smaller weight (closer to
the base model). Nothing here reads the promotion set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEV_FILE = "dev.json"


class DevTask(BaseModel):
    """The development fold as a small retrieval task over a pool of passages."""

    model_config = ConfigDict(extra="forbid")

    queries: list[str] = Field(min_length=1)
    pool: list[str] = Field(min_length=1, description="passage texts: the relevant ones and the model's top ones")
    relevant: list[list[int]] = Field(description="per query, the indexes of its relevant pool passages")

    @model_validator(mode="after")
    def _shape(self) -> DevTask:
        if len(self.relevant) != len(self.queries):
            raise ValueError("relevant needs one list per query")
        if any(not rel or min(rel) < 0 or max(rel) >= len(self.pool) for rel in self.relevant):
            raise ValueError("every query needs at least one relevant passage, by its index in pool")
        return self

    @classmethod
    def read(cls, run_dir: str | Path) -> DevTask | None:
        path = Path(run_dir) / DEV_FILE
        return cls.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None


def dev_task(queries: list[str], relevant: list[set[str]], ranked: list[list[str]],
             texts: dict[str, str]) -> DevTask | None:
    """A `DevTask` from passage ids: per query its relevant passages and the model's ranking
    (None when no query has a relevant passage with a text)."""
    ids = list(dict.fromkeys([p for rel in relevant for p in sorted(rel)] + [p for row in ranked for p in row]))
    ids = [p for p in ids if p in texts]
    at = {p: i for i, p in enumerate(ids)}
    keep = [i for i, rel in enumerate(relevant) if any(p in at for p in rel)]
    if not keep:
        return None
    return DevTask(queries=[queries[i] for i in keep], pool=[texts[p] for p in ids],
                   relevant=[sorted(at[p] for p in relevant[i] if p in at) for i in keep])


def ndcg_at_10(scores: np.ndarray, relevant: list[list[int]]) -> float:
    """Mean NDCG@10 (binary gains) of a queries x pool score matrix."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    discount = 1.0 / np.log2(np.arange(2, 12))
    out = []
    for row, rel in zip(top, relevant, strict=True):
        rel_set = set(rel)
        dcg = sum(discount[r] for r, j in enumerate(row) if int(j) in rel_set)
        ideal = discount[: min(10, len(rel_set))].sum()
        out.append(dcg / ideal)
    return float(np.mean(out))


def mix(base: dict[str, Any], tuned: dict[str, Any], a: float) -> dict[str, Any]:
    """`(1 - a) * base + a * tuned` for every floating-point tensor; others (ids, counters) from tuned.
    At a >= 1 that is `tuned` itself, returned without arithmetic."""
    if a >= 1:
        return dict(tuned)
    return {k: ((1 - a) * base[k].to(v.dtype) + a * v) if v.is_floating_point() and k in base else v
            for k, v in tuned.items()}


def unmix(base: dict[str, Any], mixed: dict[str, Any], a: float) -> dict[str, Any]:
    """The tuned weights back from `mix(base, tuned, a)` (a > 0): base + (mixed - base) / a."""
    if not a > 0:
        raise ValueError(f"cannot recover the tuned weights from a mix with weight {a}")
    return {k: base[k].to(v.dtype) + (v - base[k].to(v.dtype)) / a if v.is_floating_point() and k in base else v
            for k, v in mixed.items()}


def soup(model: Any, base_state: dict[str, Any], earlier_state: dict[str, Any], earlier_alpha: float) -> None:
    """Leave `model` holding the mean of its own weights and an earlier fine-tune's tuned weights, recovered
    from that run's saved mix `(1 - earlier_alpha) * base + earlier_alpha * tuned` (Wortsman et al., 2022,
    "Model soups": fine-tunes of one base model average into a model at least as good as each, most often).
    The earlier state dict may itself be a soup: each round's model is then a running average.

    Raises:
        ValueError: the two models do not have the same weights (names and shapes).
    """
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    odd = sorted(k for k in own.keys() ^ earlier_state.keys()) or sorted(
        k for k in own if own[k].shape != earlier_state[k].shape)
    if odd:
        raise ValueError(f"the earlier fine-tune's weights do not match this model's ({', '.join(odd[:3])}...): "
                         "a soup needs fine-tunes of the same base model")
    earlier = earlier_state if earlier_alpha >= 1 else unmix(base_state, earlier_state, earlier_alpha)
    model.load_state_dict(mix(earlier, own, 0.5))


def apply(model: Any, base_state: dict[str, Any], a: float) -> dict[str, Any]:
    """Leave `model` holding `(1-a)*base + a*its own weights`: one fixed weight, nothing scored."""
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(mix(base_state, tuned, a))
    return {"alpha": a, "fixed": True}


def choose(model: Any, base_state: dict[str, Any], task: DevTask, grid: list[float],
           batch_size: int = 64, max_seq_length: int | None = None) -> dict[str, Any]:
    """Score each weight of `grid` on `task`, leave `model` holding the chosen mix; return the record.

    `max_seq_length`: tokens per text while scoring (the training length: the weights are compared
    with one another, at a fraction of the full length's cost); the model's own is restored after.

    Returns:
        {"alpha": chosen, "dev_ndcg@10": {alpha: score}, "n_dev_queries", "pool"}.
    """
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores: dict[float, float] = {}
    own = getattr(model, "max_seq_length", None)
    if max_seq_length and own:
        model.max_seq_length = min(own, max_seq_length)
    for a in sorted(set(grid)):
        model.load_state_dict(mix(base_state, tuned, a))
        q = model.encode(task.queries, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        p = model.encode(task.pool, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        scores[a] = ndcg_at_10(q @ p.T, task.relevant)
    if own:
        model.max_seq_length = own
    best = max(scores.values())
    alpha = min(a for a, s in scores.items() if s >= best - 1e-9)  # a tie goes to the base's side
    model.load_state_dict(mix(base_state, tuned, alpha))
    return {"alpha": alpha, "dev_ndcg@10": {str(a): round(s, 4) for a, s in scores.items()},
            "n_dev_queries": len(task.queries), "pool": len(task.pool)}
