"""Retrieval evaluation: IR metrics, exact search, paired bootstrap, Matryoshka dims.

The maths is split from the plumbing. `ir_metrics`, `paired_bootstrap` and `exact_search` work
on plain lists and arrays, so their tests need no model. `evaluate` embeds an `EvalSet` with an
embedder and calls them; `evalset_from_store` / `evalset_from_beir` build the `EvalSet`.

Retrieval is at document level: a document's score is the max over its passages (documents
are chunked into passages at ingest), and metrics are computed on document ids, because
that is what qrels and reviewers judge. A passage-level set uses the identity map.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from loop.errors import IndexMismatchError, InputError
from loop.readers import iter_jsonl, read_qrels
from loop.records import content_hash, query_key
from storage.db import Store

if TYPE_CHECKING:
    import duckdb

Progress = Callable[[int, int], None]
Gain = Literal["linear", "exponential"]
PRIMARY_METRIC = "ndcg@10"
_SCORE_BUDGET = 1 << 24  # float32 cells per score block (64 MiB): bounds memory of exact search


class SupportsEncode(Protocol):
    """What evaluation needs of a model: `loop.embed.Embedder` and the test fake both fit."""

    version: str

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


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


# Eval sets -------------------------------------------------------------------------------------
class EvalSet(BaseModel):
    """Queries with graded judgements, and the corpus they are searched in.

    Attributes:
        query_ids, queries: the queries (same order). Every query has a relevant document.
        qrels: query id -> {document id: gain > 0}.
        passage_ids, passages: the corpus as embedded (same order).
        passage_docs: passage id -> ids of the documents it belongs to; None = passage level
            (each passage is its own document, id = passage id).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, float]]
    passage_ids: list[str]
    passages: list[str]
    passage_docs: dict[str, list[str]] | None = None
    skipped: int = Field(default=0, description="Labelled items left out (e.g. a positive outside the corpus).")

    @model_validator(mode="after")
    def _check(self) -> EvalSet:
        if len(self.query_ids) != len(self.queries):
            raise ValueError("query_ids and queries differ in length")
        if len(set(self.query_ids)) != len(self.query_ids):
            raise ValueError("query_ids repeat an id")
        if len(self.passage_ids) != len(self.passages):
            raise ValueError("passage_ids and passages differ in length")
        if len(set(self.passage_ids)) != len(self.passage_ids):
            raise ValueError("passage_ids repeat an id")
        for qid in self.query_ids:
            if not any(g > 0 for g in self.qrels.get(qid, {}).values()):
                raise ValueError(f"query {qid!r} has no relevant document; leave it out of the eval set")
        if self.passage_docs is not None:
            missing = [p for p in self.passage_ids if p not in self.passage_docs]
            if missing:
                raise ValueError(f"passage_docs lacks {len(missing)} passage ids, e.g. {missing[0]!r}")
        return self

    @cached_property
    def groups(self) -> DocGroups | None:
        """Document grouping of the corpus, or None at passage level."""
        if self.passage_docs is None:
            return None
        return DocGroups.from_map([self.passage_docs[p] for p in self.passage_ids])

    @property
    def doc_ids(self) -> list[str]:
        """Ids of the retrievable units, in the column order of search results."""
        return self.passage_ids if self.groups is None else self.groups.doc_ids

    @cached_property
    def corpus_fingerprint(self) -> str:
        """Hash of the corpus as embedded: cached corpus embeddings are valid only for it."""
        h = hashlib.sha256()
        for pid, text in zip(self.passage_ids, self.passages, strict=True):
            h.update(f"{pid}\x00{content_hash(text)}\x01".encode())
        return h.hexdigest()[:16]

    @cached_property
    def fingerprint(self) -> str:
        """Hash of queries, judgements and corpus: two reports are comparable only if equal."""
        h = hashlib.sha256(self.corpus_fingerprint.encode())
        for qid, text in zip(self.query_ids, self.queries, strict=True):
            rel = sorted(self.qrels[qid].items())
            h.update(f"{qid}\x00{text}\x00{rel}\x01".encode())
        if self.passage_docs is not None:
            for pid in self.passage_ids:
                h.update(f"{pid}\x00{sorted(self.passage_docs[pid])}\x01".encode())
        return h.hexdigest()[:16]


def held_out_keys(con: Store | duckdb.DuckDBPyConnection) -> set[str]:
    """The `query_key` of every query of the eval and test splits: training must not use one.

    `con` is the store or a cursor of an open transaction (a review decision checks inside its own).
    """
    rows = con.execute("SELECT DISTINCT anchor FROM pairs WHERE split IN ('eval', 'test')").fetchall()
    return {query_key(a) for (a,) in rows}


def dev_fold(keys: set[str], share: float, seed: int = 0) -> set[str]:
    """The development fold of the held-out query keys: a seeded `share` of them (none when that
    would leave fewer than 5 for promotion, or when share is 0). It chooses the checkpoint and the
    WiSE-FT weight; the other held-out queries judge promotion, so no choice is made on them."""
    n = round(len(keys) * share)
    if n < 1 or len(keys) - n < 5:
        return set()
    return set(random.Random(seed).sample(sorted(keys), n))


def evalset_from_store(store: Store, splits: Sequence[str] = ("eval", "test"), keys: set[str] | None = None) -> EvalSet:
    """The held-out set of a workspace: accepted pairs of `splits`, judged at document level.

    `keys`: only the queries with these `query_key`s (e.g. the promotion set); None = all.
    Each distinct query (by `query_key`: its spellings are one query) is one query; its relevant
    documents (gain 1) are the documents of its pairs' positive passages. Pairs whose positive is not a corpus passage (no passage id,
    or a passage no document uses) cannot be retrieved and are skipped, counted in `skipped`.
    The corpus is every passage that belongs to a document.

    Raises:
        InputError: there is no usable pair in these splits.
    """
    splits = list(splits)
    pairs = store.rows(
        "SELECT anchor, positive_id FROM pairs WHERE status = 'accepted' AND split IN (SELECT unnest(?::VARCHAR[])) "
        "ORDER BY anchor, positive_id",
        [splits],
    )
    if keys is not None:
        pairs = [p for p in pairs if query_key(p["anchor"]) in keys]
    docs_of = store.docs_of_passages(sorted({p["positive_id"] for p in pairs if p["positive_id"]}))
    qrels: dict[str, dict[str, float]] = {}
    texts: dict[str, str] = {}
    skipped = 0
    for p in pairs:
        docs = docs_of.get(p["positive_id"] or "", [])
        if not docs:
            skipped += 1
            continue
        qid = content_hash(query_key(p["anchor"]))
        texts.setdefault(qid, p["anchor"])
        qrels.setdefault(qid, {}).update({d: 1.0 for d in docs})
    if not qrels:
        raise InputError(
            f"no accepted {'/'.join(splits)} pairs whose positive is a corpus passage ({skipped} skipped): "
            f"import held-out pairs with `embedloop pairs import FILE --split eval` after ingesting the corpus."
        )
    rows = store.execute(
        "SELECT p.passage_id, any_value(p.text), list(DISTINCT m.doc_id ORDER BY m.doc_id) "
        "FROM passages p JOIN doc_passages m USING (passage_id) GROUP BY p.passage_id ORDER BY p.passage_id"
    ).fetchall()
    qids = sorted(qrels)
    return EvalSet(
        name=f"workspace:{'+'.join(splits)}",
        query_ids=qids, queries=[texts[q] for q in qids], qrels=qrels,
        passage_ids=[r[0] for r in rows], passages=[r[1] for r in rows],
        passage_docs={r[0]: list(r[2]) for r in rows}, skipped=skipped,
    )


def evalset_from_beir(folder: str | Path, split: str = "test", *, max_bytes: int = 8 * 2**30) -> EvalSet:
    """A BEIR folder read directly (for benchmarks): graded qrels, one passage per document.

    The passage text is `title + "\\n\\n" + text` (the text alone when there is no title), as
    ingest builds it. Unlike ingest, empty documents are kept (BEIR sets have a few, and
    published figures rank them). Judged documents missing from the corpus still count as
    relevant (they lower recall), as in trec_eval.

    Raises:
        InputError: a file is missing or malformed, or a judged query is not in queries.jsonl.
    """
    folder = Path(folder)
    if not (folder / "corpus.jsonl").is_file():
        raise InputError("a BEIR folder needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv", folder)
    corpus: dict[str, str] = {}
    for n, rec in iter_jsonl(folder / "corpus.jsonl", max_bytes):
        doc_id, title, text = rec.get("_id", rec.get("id")), rec.get("title") or "", rec.get("text") or ""
        if doc_id is None or str(doc_id).strip() == "" or not isinstance(title, str) or not isinstance(text, str):
            raise InputError(
                "each document needs an `_id`, and `title` / `text` must be strings", folder / "corpus.jsonl", n
            )
        # A repeated id keeps its first record; an empty document stays retrievable, as in BEIR.
        corpus.setdefault(str(doc_id), f"{title}\n\n{text}" if title else text)
    qfile = folder / "queries.jsonl"
    if not qfile.is_file():
        raise InputError("a BEIR folder needs queries.jsonl", folder)
    queries: dict[str, str] = {}
    for n, rec in iter_jsonl(qfile, max_bytes):
        if rec.get("_id") is None or not isinstance(rec.get("text"), str) or not rec["text"].strip():
            raise InputError("each query needs `_id` and a non-empty `text`", qfile, n)
        queries[str(rec["_id"])] = rec["text"].strip()
    qrels: dict[str, dict[str, float]] = {}
    for n, qid, cid, gain in read_qrels(folder, split, max_bytes):
        if qid not in queries:
            raise InputError(f"query id {qid!r} is not in queries.jsonl", folder / "qrels" / f"{split}.tsv", n)
        qrels.setdefault(qid, {})[cid] = gain
    if not qrels:
        raise InputError(f"qrels/{split}.tsv judges no document relevant", folder)
    qids = sorted(qrels)
    return EvalSet(
        name=f"{folder.name}:{split}", query_ids=qids, queries=[queries[q] for q in qids], qrels=qrels,
        passage_ids=list(corpus), passages=list(corpus.values()), passage_docs=None,
    )


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
    order = [{q: i for i, q in enumerate(other.query_ids)}[q] for q in base.query_ids]
    a = {m: np.asarray(base.per_query[m], dtype=np.float64) for m in metrics}
    b = {m: np.asarray(other.per_query[m], dtype=np.float64)[order] for m in metrics}
    boot = bootstrap_means({m: b[m] - a[m] for m in metrics}, n_boot, seed)
    out = {}
    for m in metrics:
        delta, lo, hi = boot[m]
        out[m] = Comparison(
            metric=m, base_version=base.model_version, other_version=other.model_version,
            base=float(a[m].mean()), other=float(b[m].mean()), delta=delta, ci_low=lo, ci_high=hi,
            n_queries=len(order), significant=lo > 0 or hi < 0,
        )
    return out


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
