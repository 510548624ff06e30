"""BM25 beside the model: the review pool shows what either retriever finds.

A reviewer can only mark an answer that is shown, so a pool of the model's top passages alone
verifies only the queries the model already answers: the labels teach it what it knows, and the
held-out set they build cannot show a gain on a query it misses. Pooling two different retrievers
(as TREC's judgement pools do) lets a card also show what BM25 finds and the model misses.

`Lexical` is BM25 (bm25s, English stopwords, default k1/b) over a list of texts; `interleave`
merges rankings round-robin, first ranking first, so each retriever fills half of the pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Lexical:
    """BM25 over `texts`; `search` returns their ids, best first."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str]):
        import bm25s

        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        self.ids = list(ids)
        self._bm25s = bm25s
        self._retriever = bm25s.BM25()
        if self.ids:
            self._retriever.index(self._tokenize(texts), show_progress=False)

    def _tokenize(self, texts: Sequence[str]):
        return self._bm25s.tokenize(list(texts), stopwords="en", show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[str]]:
        """The top `k` ids per query (fewer when the corpus is smaller; none when a query shares
        no indexed word with any text)."""
        return [[i for i, _ in row] for row in self.scored(queries, k)]

    def scored(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """`search` with each id's BM25 score."""
        if not queries:
            return []
        k = min(k, len(self.ids))
        if k < 1:
            return [[] for _ in queries]
        idx, scores = self._retriever.retrieve(self._tokenize(queries), k=k, show_progress=False, n_threads=1)
        return [[(self.ids[int(j)], float(s)) for j, s in zip(row, srow, strict=True) if s > 0]
                for row, srow in zip(np.asarray(idx), np.asarray(scores), strict=True)]


def interleave(rankings: Sequence[Sequence[str]], k: int) -> list[str]:
    """Round-robin over `rankings` (the first one leads), skipping ids already taken, up to `k`."""
    out: list[str] = []
    seen: set[str] = set()
    depth = max((len(r) for r in rankings), default=0)
    for i in range(depth):
        for ranking in rankings:
            if i < len(ranking) and ranking[i] not in seen:
                seen.add(ranking[i])
                out.append(ranking[i])
                if len(out) == k:
                    return out
    return out
