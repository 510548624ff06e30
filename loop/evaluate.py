"""Retrieval evaluation of a model: embed, search exactly, score, compare with a bootstrap.

The maths lives in `loop.metrics` (metrics, bootstrap, exact search) and the eval sets in
`loop.evalsets`; this module is the plumbing between them and a model. `evaluate` embeds an
`EvalSet` with an embedder and reports per-query metrics and Matryoshka dimensions;
`compare` / `compare_all` test a difference between two reports with a paired bootstrap.

Retrieval is at document level: a document's score is the max over its passages (documents
are chunked into passages at ingest), and metrics are computed on document ids, because
that is what qrels and reviewers judge. A passage-level set uses the identity map.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, PrivateAttr

from loop.errors import IndexMismatchError
from loop.evalsets import EvalSet
from loop.metrics import Gain, bootstrap_means, exact_search, ir_metrics

Progress = Callable[[int, int], None]
PRIMARY_METRIC = "ndcg@10"


class SupportsEncode(Protocol):
    """What evaluation needs of a model: `loop.embed.Embedder` and the test fake both fit."""

    version: str

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


# Evaluation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusEmbeddings:
    """A corpus encoded once by one model version: cache it per (version, corpus fingerprint)."""

    model_version: str
    corpus_fingerprint: str
    emb: np.ndarray


class EvalReport(BaseModel):
    """One model on one eval set. `per_query` keeps the values the bootstrap resamples.

    `matryoshka` maps a truncated dimension (the model's full dimension included) to the mean
    NDCG@10 with embeddings cut to it. `seconds` is the wall time (encoding dominates).
    `corpus_embeddings` (not serialised) holds the encoded corpus so a caller can reuse it
    for the same model version.
    """

    model_config = ConfigDict(extra="forbid")

    model_version: str
    evalset: str = ""
    evalset_fingerprint: str = ""
    n_queries: int
    n_docs: int
    dim: int
    k: int
    metrics: dict[str, float]
    per_query: dict[str, list[float]]
    query_ids: list[str]
    matryoshka: dict[int, float] = {}
    gain: Gain = "linear"
    seconds: float = 0.0
    _corpus: CorpusEmbeddings | None = PrivateAttr(default=None)

    @property
    def corpus_embeddings(self) -> CorpusEmbeddings | None:
        return self._corpus


def _encode(embedder: SupportsEncode, texts: list[str], progress: Progress | None, step: int = 2048) -> np.ndarray:
    # Slices keep progress reporting possible on big corpora; the embedder batches inside.
    parts = []
    for start in range(0, len(texts), step):
        parts.append(np.asarray(embedder.encode(texts[start : start + step]), dtype=np.float32))
        if progress:
            progress(min(start + step, len(texts)), len(texts))
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)


def evaluate(
    embedder: SupportsEncode, evalset: EvalSet, *, k: int = 100, dims: Sequence[int | None] = (64, 128, 256, None),
    corpus_emb: CorpusEmbeddings | None = None, gain: Gain = "linear", progress: Progress | None = None,
) -> EvalReport:
    """Embed queries (and the corpus, unless given), search exactly, and score the ranking.

    Args:
        k: documents ranked per query (>= 10; recall@k is reported for the cut-offs <= k).
        dims: Matryoshka dimensions to report NDCG@10 at; None = the full dimension; those
            above the model's dimension are skipped.
        corpus_emb: the corpus encoded earlier by this model version (`report.corpus_embeddings`).
        gain: NDCG gain of a graded judgement (see `ir_metrics`); linear matches BEIR / MTEB.
        progress: called with (passages encoded, total).

    Raises:
        IndexMismatchError: `corpus_emb` was made by another model version.
        ValueError: `corpus_emb` was made for another corpus, or `k` < 10.
    """
    if k < 10:
        raise ValueError(f"k must be at least 10 (NDCG@10 and MRR@10 need ten ranks), got {k}.")
    t0 = time.perf_counter()
    if corpus_emb is None:
        encoded = _encode(embedder, evalset.passages, progress)
        corpus_emb = CorpusEmbeddings(embedder.version, evalset.corpus_fingerprint, encoded)
    elif corpus_emb.model_version != embedder.version:
        raise IndexMismatchError(embedder.version, corpus_emb.model_version)
    elif corpus_emb.corpus_fingerprint != evalset.corpus_fingerprint or len(corpus_emb.emb) != len(evalset.passages):
        raise ValueError(
            "corpus_emb was encoded from another corpus; encode this eval set's corpus (pass corpus_emb=None)."
        )
    query_emb = np.asarray(embedder.encode(list(evalset.queries)), dtype=np.float32)
    full = int(corpus_emb.emb.shape[1])
    ks = tuple(c for c in (1, 5, 10, 100) if c <= k)
    qrels = [evalset.qrels[q] for q in evalset.query_ids]
    doc_ids = evalset.doc_ids

    def run(dim: int | None) -> dict[str, np.ndarray]:
        idx, _ = exact_search(query_emb, corpus_emb.emb, k, dim=dim, groups=evalset.groups)
        return ir_metrics([[doc_ids[j] for j in row] for row in idx], qrels, ks, gain=gain)

    per_query = run(None)
    matryoshka: dict[int, float] = {}
    for d in dims:
        d = full if d is None else int(d)
        if d <= full and d not in matryoshka:
            values = per_query if d == full else run(d)
            matryoshka[d] = float(values[PRIMARY_METRIC].mean())
    report = EvalReport(
        model_version=embedder.version, evalset=evalset.name, evalset_fingerprint=evalset.fingerprint,
        n_queries=len(evalset.query_ids), n_docs=len(doc_ids), dim=full, k=k,
        metrics={m: float(v.mean()) for m, v in per_query.items()},
        per_query={m: v.tolist() for m, v in per_query.items()},
        query_ids=list(evalset.query_ids), matryoshka=dict(sorted(matryoshka.items())), gain=gain,
        seconds=round(time.perf_counter() - t0, 3),
    )
    report._corpus = corpus_emb
    return report


class Comparison(BaseModel):
    """`other` minus `base` on one metric, paired over the same queries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    base_version: str
    other_version: str
    base: float
    other: float
    delta: float
    ci_low: float
    ci_high: float
    n_queries: int
    significant: bool


def intervals(report: EvalReport, *, n_boot: int = 2000, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Every metric of one report: (mean, 95% interval low, high), one resample for all."""
    return bootstrap_means(report.per_query, n_boot, seed)


def compare_all(
    base: EvalReport, other: EvalReport, metrics: Sequence[str] | None = None, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Comparison]:
    """Paired bootstrap of `other - base` for each metric (default: every metric of `base`), from
    one resample of the queries; a metric is significant when its 95% interval excludes 0.

    Raises:
        ValueError: the reports are of different eval sets, or lack a metric.
    """
    metrics = list(base.per_query if metrics is None else metrics)
    for r in (base, other):
        for metric in metrics:
            if metric not in r.per_query:
                raise ValueError(
                    f"metric {metric!r} is not in the report of {r.model_version}; have {sorted(r.per_query)}."
                )
    if base.gain != other.gain:
        raise ValueError(f"the reports use different NDCG gains ({base.gain}, {other.gain}); evaluate both alike.")
    if base.evalset_fingerprint != other.evalset_fingerprint or set(base.query_ids) != set(other.query_ids):
        raise ValueError(
            f"reports of {base.model_version} and {other.model_version} come from different eval sets; "
            f"evaluate both on the same EvalSet to compare them."
        )
    boot = bootstrap_means({m: paired_differences(base, other, m) for m in metrics}, n_boot, seed)
    out = {}
    for m in metrics:
        delta, lo, hi = boot[m]
        out[m] = Comparison(
            metric=m, base_version=base.model_version, other_version=other.model_version,
            base=float(np.mean(base.per_query[m])), other=float(np.mean(other.per_query[m])), delta=delta,
            ci_low=lo, ci_high=hi, n_queries=len(base.query_ids), significant=lo > 0 or hi < 0,
        )
    return out


def paired_differences(base: EvalReport, other: EvalReport, metric: str = PRIMARY_METRIC) -> np.ndarray:
    """`other - base` on `metric`, per query, in the order of `base.query_ids` (same query set)."""
    at = {q: i for i, q in enumerate(other.query_ids)}
    order = [at[q] for q in base.query_ids]
    return np.asarray(other.per_query[metric], dtype=np.float64)[order] - np.asarray(
        base.per_query[metric], dtype=np.float64)


def compare(
    base: EvalReport, other: EvalReport, metric: str = PRIMARY_METRIC, *, n_boot: int = 2000, seed: int = 0
) -> Comparison:
    """Paired bootstrap of `other - base` on one metric (see `compare_all`)."""
    return compare_all(base, other, [metric], n_boot=n_boot, seed=seed)[metric]


def score_distributions(
    embedder: SupportsEncode, anchors: list[str], positives: list[str],
    hard_negatives: list[str | Sequence[str] | None],
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine of each anchor with its positive, and with its hardest (most similar) negative.

    For a before/after chart: training should push the two distributions apart.

    Args:
        hard_negatives: per anchor, one negative text, several, or None.

    Returns:
        (positive scores, hardest-negative scores), float32 arrays of len(anchors); NaN where
        an anchor has no negative.
    """
    if not len(anchors) == len(positives) == len(hard_negatives):
        raise ValueError("anchors, positives and hard_negatives must have the same length.")
    negs = [[n] if isinstance(n, str) else list(n or []) for n in hard_negatives]
    texts = list(dict.fromkeys([*anchors, *positives, *(t for ns in negs for t in ns)]))  # encode each text once
    at = {t: i for i, t in enumerate(texts)}
    emb = np.asarray(embedder.encode(texts), dtype=np.float32) if texts else np.zeros((0, 1), np.float32)
    a = emb[[at[t] for t in anchors]] if anchors else emb[:0]
    pos = np.einsum("ij,ij->i", a, emb[[at[t] for t in positives]]) if anchors else np.zeros(0, np.float32)
    neg = np.full(len(anchors), np.nan, dtype=np.float32)
    for i, ns in enumerate(negs):
        if ns:
            neg[i] = float((emb[[at[t] for t in ns]] @ a[i]).max())
    return pos.astype(np.float32), neg
