"""Retrieval metrics and exact search: pure maths on lists and numpy arrays.

`ir_metrics` scores rankings against graded qrels (trec_eval / BEIR definitions),
`bootstrap_means` / `paired_bootstrap` put 95% intervals on per-query values by resampling
queries, and `exact_search` ranks a corpus by inner product, at passage level or, through
`DocGroups`, at document level (a document's score is the max over its passages). Nothing
here needs a model, a store or a file, so the tests feed plain arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Gain = Literal["linear", "exponential"]
_SCORE_BUDGET = 1 << 24  # float32 cells per score block (64 MiB): bounds memory of exact search


# Metrics ---------------------------------------------------------------------------------------
def metric_names(ks: Sequence[int] = (1, 5, 10, 100)) -> list[str]:
    return ["ndcg@10", *(f"recall@{k}" for k in ks), "mrr@10", "map"]


def ir_metrics(
    ranked: list[list[str]], qrels: list[dict[str, float]], ks: Sequence[int] = (1, 5, 10, 100),
    *, gain: Gain = "linear",
) -> dict[str, np.ndarray]:
    """Per-query retrieval metrics, as trec_eval / BEIR define them.

    - ndcg@10: graded gains, discount 1/log2(rank + 1), ideal DCG from the query's qrels
      sorted by gain. The gain is the qrels value ("linear": trec_eval, pytrec_eval, BEIR,
      MTEB), or 2**value - 1 ("exponential": Burges et al.; weights top grades more).
    - recall@k (for each k in `ks`): relevant in the top k / all relevant of the query.
    - mrr@10: 1 / rank of the first relevant document in the top 10, else 0.
    - map: average precision over the ranking as given (MAP@100 when 100 are ranked): the mean,
      over all relevant documents of the query, of precision at its rank (0 when not ranked).

    A document is relevant when its gain is > 0; zero and negative judgements are ignored.

    Args:
        ranked: per query, document ids best first, without duplicates.
        qrels: per query (same order), {document id: gain}. Every query must have at least one
            relevant document: the caller excludes queries that have none (their metrics are
            undefined and would drag every mean towards zero).
        ks: cut-offs of recall.
        gain: how a qrels value becomes an NDCG gain (other metrics are binary).

    Returns:
        {metric name: float64 array of one value per query}.

    Raises:
        ValueError: lengths differ, a ranking repeats a document, or a query has no relevant document.
    """
    if len(ranked) != len(qrels):
        raise ValueError(
            f"ranked has {len(ranked)} queries but qrels has {len(qrels)}; give one qrels dict per ranking."
        )
    if gain not in ("linear", "exponential"):
        raise ValueError(f"gain must be 'linear' or 'exponential', not {gain!r}.")
    n = len(ranked)
    out = {name: np.zeros(n, dtype=np.float64) for name in metric_names(ks)}
    for i, (ranking, judged) in enumerate(zip(ranked, qrels, strict=True)):
        rel = {d: (float(g) if gain == "linear" else 2.0 ** g - 1.0) for d, g in judged.items() if g > 0}
        if not rel:
            raise ValueError(f"query {i} has no relevant document; exclude such queries before computing metrics.")
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"the ranking of query {i} lists a document twice; rank each document once.")
        gains = [rel.get(d, 0.0) for d in ranking]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains[:10]) if g)
        ideal = sorted(rel.values(), reverse=True)[:10]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        out["ndcg@10"][i] = dcg / idcg
        for k in ks:
            out[f"recall@{k}"][i] = sum(1 for g in gains[:k] if g) / len(rel)
        first = next((r for r, g in enumerate(gains[:10]) if g), None)
        out["mrr@10"][i] = 0.0 if first is None else 1.0 / (first + 1)
        hits, ap = 0, 0.0
        for r, g in enumerate(gains):
            if g:
                hits += 1
                ap += hits / (r + 1)
        out["map"][i] = ap / len(rel)
    return out


def bootstrap_means(
    values: dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Mean of each per-query array and its 95% percentile interval from resampling queries.

    One resample of query indices serves every array (they must be over the same queries, in
    the same order), so all metrics' intervals cost one set of draws and see the same
    resampled query sets.

    Returns:
        {name: (mean, 2.5th percentile, 97.5th percentile)}. Deterministic for a seed.
    """
    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}
    sizes = {v.shape for v in arrays.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(f"bootstrap_means needs 1-D arrays of equal length, got shapes {sorted(sizes)}.")
    n = next(iter(arrays.values())).size
    if n == 0:
        raise ValueError("bootstrap_means needs at least one query.")
    if n_boot < 1:
        raise ValueError("n_boot must be at least 1.")
    rng = np.random.default_rng(seed)
    means = {name: np.empty(n_boot, dtype=np.float64) for name in arrays}
    step = max(1, _SCORE_BUDGET // (8 * n))  # resample in slices to bound memory
    for start in range(0, n_boot, step):
        rows = min(step, n_boot - start)
        idx = rng.integers(0, n, size=(rows, n))
        for name, v in arrays.items():
            means[name][start : start + rows] = v[idx].mean(axis=1)
    out = {}
    for name, v in arrays.items():
        lo, hi = np.percentile(means[name], [2.5, 97.5])
        out[name] = (float(v.mean()), float(lo), float(hi))
    return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of `b - a` over queries and its 95% percentile interval from resampling queries.

    `a[i]` and `b[i]` must be the same query's metric under two systems: resampling the
    per-query differences keeps the pairing, which is what makes small gains detectable.

    Returns:
        (mean difference, 2.5th percentile, 97.5th percentile). Deterministic for a seed.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}.")
    return bootstrap_means({"diff": b - a}, n_boot, seed)["diff"]


# Exact search ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DocGroups:
    """Which passages make up each document, in the layout `np.maximum.reduceat` needs.

    Attributes:
        doc_ids: the documents, in column order of the document scores.
        order: passage indices, grouped by document (a passage may serve several documents).
        starts: where each document's group begins in `order`.
    """

    doc_ids: list[str]
    order: np.ndarray
    starts: np.ndarray

    @classmethod
    def from_map(cls, passage_docs: Sequence[Sequence[str]]) -> DocGroups:
        """From, per passage index, the ids of the documents it belongs to."""
        members: dict[str, list[int]] = {}
        for p, docs in enumerate(passage_docs):
            for d in docs:
                members.setdefault(d, []).append(p)
        doc_ids = sorted(members)
        order = np.fromiter((p for d in doc_ids for p in members[d]), dtype=np.int64)
        sizes = np.fromiter((len(members[d]) for d in doc_ids), dtype=np.int64, count=len(doc_ids))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if doc_ids else np.zeros(0, np.int64)
        return cls(doc_ids, order, starts)


def truncate(emb: np.ndarray, dim: int | None) -> np.ndarray:
    """The first `dim` components, re-normalised to unit length (Matryoshka truncation)."""
    emb = np.asarray(emb, dtype=np.float32)
    if dim is None or dim >= emb.shape[1]:
        return emb
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}.")
    cut = emb[:, :dim]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


def exact_search(
    query_emb: np.ndarray, corpus_emb: np.ndarray, k: int, *, dim: int | None = None,
    groups: DocGroups | None = None, block_cells: int = _SCORE_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (cosine for normalised vectors), in query blocks.

    Args:
        query_emb: (n_queries, d); corpus_emb: (n_corpus, d).
        k: results per query; fewer when the corpus (or document count) is smaller.
        dim: truncate both sides to this many dimensions and re-normalise (Matryoshka).
        groups: score documents instead of passages, a document's score being the max over
            its passages; indices then refer to `groups.doc_ids`.
        block_cells: score-matrix cells computed at once (bounds memory).

    Returns:
        (indices, scores), each (n_queries, min(k, n_columns)), best first; equal scores are
        ordered by index, so results are deterministic.
    """
    q, c = np.asarray(query_emb, dtype=np.float32), np.asarray(corpus_emb, dtype=np.float32)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"query and corpus embeddings must be 2-D with equal width, got {q.shape} and {c.shape}.")
    q, c = truncate(q, dim), truncate(c, dim)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    n_cols = len(groups.doc_ids) if groups is not None else c.shape[0]
    width = len(groups.order) if groups is not None else c.shape[0]
    k = min(k, n_cols)
    indices = np.zeros((q.shape[0], k), dtype=np.int64)
    scores = np.zeros((q.shape[0], k), dtype=np.float32)
    if k == 0:
        return indices, scores
    rows = max(1, block_cells // max(width, 1))
    for start in range(0, q.shape[0], rows):
        s = q[start : start + rows] @ c.T
        if groups is not None:
            s = np.maximum.reduceat(s[:, groups.order], groups.starts, axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < n_cols else np.broadcast_to(np.arange(n_cols), s.shape)
        vals = np.take_along_axis(s, top, axis=1)
        order = np.lexsort((top, -vals), axis=1)  # by score desc, then index asc
        indices[start : start + rows] = np.take_along_axis(top, order, axis=1)
        scores[start : start + rows] = np.take_along_axis(vals, order, axis=1)
    return indices, scores
