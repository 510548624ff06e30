"""Hard negatives: passages the model ranks high for a query that are not its positive.

Mining follows NV-Retriever's TopK-PercPos (the method sentence-transformers'
`util.mine_hard_negatives` recommends): take the top candidates from a rank window, and keep
only those scoring at least `relative_margin` (5%) below the positive, which filters most
false negatives. Chunks of the positive's own document are never negatives. We mine against
the active index (its vectors are already computed) instead of re-encoding the corpus, which
is what `mine_hard_negatives` would do on every call.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class MiningPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    range_min: int = Field(0, ge=0)   # skip this many top candidates
    range_max: int = Field(30, ge=0)  # consider candidates up to this rank
    relative_margin: float = Field(0.05, ge=0.0, lt=1.0)
    num_negatives: int = Field(1, ge=0)


def select_negatives(
    topk_ids: list[list[str]],
    topk_scores: np.ndarray,
    pos_scores: np.ndarray,
    excluded: list[set[str]],
    policy: MiningPolicy = MiningPolicy(),
) -> list[list[str]]:
    """Per query, up to `num_negatives` passage ids from the window that pass the margin.

    Args:
        excluded: per query, passage ids that must not be negatives (its positives and their
            documents' other chunks).
    """
    out: list[list[str]] = []
    for i, row in enumerate(topk_ids):
        ceiling = float(pos_scores[i]) * (1.0 - policy.relative_margin) if pos_scores[i] > 0 else float(pos_scores[i])
        chosen: list[str] = []
        for r in range(policy.range_min, min(policy.range_max, len(row))):
            if len(chosen) >= policy.num_negatives:
                break
            pid = row[r]
            if pid in excluded[i] or topk_scores[i][r] > ceiling:
                continue
            chosen.append(pid)
        out.append(chosen)
    return out
