"""Eval sets: queries with graded judgements and the corpus they are searched in.

`EvalSet` is the typed, validated set; `evalset_from_store` builds a workspace's held-out set
(accepted eval/test pairs, judged at document level) and `evalset_from_beir` reads a BEIR
folder for benchmarks. `held_out_keys` and `dev_fold` say which queries are held out and
which of them form the development fold, so training can leave them out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loop.errors import InputError
from loop.metrics import DocGroups
from loop.readers import iter_jsonl, read_qrels
from loop.records import content_hash, query_key
from storage.db import Store

if TYPE_CHECKING:
    import duckdb


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
    WiSE-FT weight; the other held-out queries judge promotion, so no choice is made on them.

    The fold is the `share` of keys that come first in a seeded hash order, so when the held-out
    set grows a query stays on its side but at the margin (a random sample would reshuffle it)."""
    n = round(len(keys) * share)
    if n < 1 or len(keys) - n < 5:
        return set()
    return set(sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\x00{k}".encode()).digest())[:n])


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
    qids = sorted(qrels)
    return EvalSet(name=f"workspace:{'+'.join(splits)}", query_ids=qids, queries=[texts[q] for q in qids],
                   qrels=qrels, skipped=skipped, **workspace_corpus(store))


def workspace_corpus(store: Store) -> dict[str, Any]:
    """The corpus of a workspace as an `EvalSet` searches it: every passage that belongs to a
    document, by passage id, with the documents it belongs to (`passage_ids`, `passages`,
    `passage_docs`). A held-out set and a benchmark's judge over the workspace both use it, so a
    model's corpus vectors from one fit the other."""
    rows = store.execute(
        "SELECT p.passage_id, any_value(p.text), list(DISTINCT m.doc_id ORDER BY m.doc_id) "
        "FROM passages p JOIN doc_passages m USING (passage_id) GROUP BY p.passage_id ORDER BY p.passage_id"
    ).fetchall()
    return {"passage_ids": [r[0] for r in rows], "passages": [r[1] for r in rows],
            "passage_docs": {r[0]: list(r[2]) for r in rows}}


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

