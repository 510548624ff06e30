"""Hard negatives: passages the model ranks high for a query that are not its positive.

Mining follows NV-Retriever's TopK-PercPos (the method sentence-transformers'
`util.mine_hard_negatives` recommends): take the top candidates from a rank window, and keep
only those scoring at least `relative_margin` (5%) below the positive, which filters most
false negatives. A known positive of the query is never its negative: `known_positives` says
which those are (every accepted positive of the query, in any case, spacing or trailing
punctuation, and the other chunks of their documents). We mine against the active index (its
vectors are already computed) instead of re-encoding the corpus, which is what
`mine_hard_negatives` would do on every call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from loop.records import query_key


class MiningPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    range_min: int = Field(0, ge=0)   # skip this many top candidates
    range_max: int = Field(30, ge=0)  # consider candidates up to this rank
    relative_margin: float = Field(0.05, ge=0.0, lt=1.0)
    # hard negatives per training row: a reviewer's first, mined ones fill up; 0 = in-batch only
    num_negatives: int = Field(1, ge=0, le=16)


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


def known_positives(pairs: Iterable[tuple[str, str]], siblings: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Per `records.query_key`, the passage ids known to answer it: none of them is ever its negative.

    Args:
        pairs: (anchor, positive passage id) of every accepted pair (picks and edits included).
        siblings: passage id -> the passages of its documents (the other chunks answer too).
    """
    out: dict[str, set[str]] = {}
    for anchor, pid in pairs:
        out.setdefault(query_key(anchor), set()).update(siblings.get(pid, ()), (pid,))
    return out
