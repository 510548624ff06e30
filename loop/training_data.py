"""Training data of a round: accepted pairs with their hard negatives, and the development fold.

A known positive of a query (every accepted positive of it, in any spelling, with its documents'
other chunks: `known_positives`) is never its negative: not a reviewer's, not a mined one, not a
random fill-in or an in-batch one in the trainer (each row lists the texts to keep apart). The
development fold's pairs and retrieval task go to the trainer for its checkpoint and WiSE-FT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from loop import indexing
from loop.embed import Embedder
from loop.errors import LeakageError, VectorIndexError
from loop.evalsets import held_out_keys
from loop.negatives import known_positives, select_negatives
from loop.records import query_key
from loop.wise import DevTask, dev_task

if TYPE_CHECKING:
    from loop.heldout import HeldOut
    from loop.rounds import LoopConfig
    from loop.workspace import Workspace


def search_ids(ws: Workspace, queries: list[str], k: int) -> list[list[str]]:
    """The active index's top-k passage ids per query."""
    return [[h.passage_id for h in hits] for hits in indexing.search(ws.store, ws.index, ws.embedder(), queries, k)]


def topk(ws: Workspace, embedder: Embedder, collection: str, q_emb: np.ndarray, k: int
         ) -> tuple[list[list[str]], np.ndarray]:
    """Top-k passage ids and scores (padded with -1) of `collection` for encoded queries."""
    hits = ws.index.search(collection, q_emb, embedder.version, k=k)
    ids = [[h[0] for h in row] for row in hits]
    scores = np.array([[h[1] for h in row] + [-1.0] * (k - len(row)) for row in hits], dtype=np.float32)
    return ids, scores


def passage_vectors(ws: Workspace, embedder: Embedder, collection: str, ids: list[str | None], texts: list[str]
                    ) -> np.ndarray:
    """Vectors of passage texts under `embedder`: read from `collection` (that model's index) where
    text `n` is the stored passage `ids[n]`, encoded otherwise (e.g. a reviewer's edited positive).
    A candidate's proposed passage is already in the index: scoring it needs no second encode."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    stored = ws.store.passages(sorted({i for i in ids if i}))
    unique = sorted({pid for pid, text in zip(ids, texts, strict=True) if pid and stored.get(pid) == text})
    try:
        indexed = dict(zip(unique, ws.index.embeddings(collection, unique), strict=True)) if unique else {}
    except VectorIndexError:  # an index without some of them: encode those texts instead
        indexed = {}
    rest = [n for n, (pid, text) in enumerate(zip(ids, texts, strict=True))
            if pid not in indexed or stored.get(pid) != text]
    encoded = dict(zip(rest, embedder.encode([texts[n] for n in rest]), strict=True)) if rest else {}
    return np.stack([encoded[n] if n in encoded else indexed[ids[n]] for n in range(len(texts))]).astype(np.float32)


class TrainingData:
    """The accepted pairs of one workspace as the trainer's rows."""

    def __init__(self, ws: Workspace, config: LoopConfig, heldout: HeldOut):
        self.ws = ws
        self.store = ws.store
        self.config = config
        self.heldout = heldout

    def _search_ids(self, queries: list[str], k: int) -> list[list[str]]:
        return search_ids(self.ws, queries, k)

    def _topk(self, embedder: Embedder, collection: str, q_emb: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        return topk(self.ws, embedder, collection, q_emb, k)

    def siblings(self, passage_ids: list[str]) -> dict[str, set[str]]:
        """Passage -> every passage of the same documents (chunks of one document are not negatives)."""
        rows = self.store.execute(
            "SELECT a.passage_id, list(DISTINCT b.passage_id) FROM doc_passages a JOIN doc_passages b USING (doc_id) "
            "WHERE a.passage_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY a.passage_id",
            [sorted(set(passage_ids))],
        ).fetchall()
        out = {pid: set(sib) for pid, sib in rows}
        return {pid: out.get(pid, {pid}) for pid in passage_ids}

    def known_positives(self) -> dict[str, set[str]]:
        """Per `records.query_key`, the passages known to answer that query (`negatives.known_positives`
        over every accepted pair, with their documents' other chunks): never its negatives, in
        mining, in select's margins or from a reviewer."""
        rows = self.store.execute(
            "SELECT anchor, positive_id FROM pairs WHERE status = 'accepted' AND positive_id IS NOT NULL"
        ).fetchall()
        return known_positives(rows, self.siblings([pid for _, pid in rows]))

    def rows(self) -> list[dict[str, Any]]:
        """Accepted train pairs with up to `mining.num_negatives` hard negatives each: the pair's
        own negative, then the reviewer-verified negatives of its query, then mined ones.

        A known positive of the row's query (`known_positives`) is never its negative. Each row is
        `{anchor, positive, negatives, exclude}`: `exclude` lists the texts of the query's other
        known positives that occur in the training data (as a positive or negative of any row), so
        the trainer never uses one as this row's negative either (a random fill-in, or an in-batch
        negative); the row's own positive is not listed.
        """
        pairs = self.store.rows(
            "SELECT anchor, positive_id, positive_text, negative_text FROM pairs "
            "WHERE status = 'accepted' AND split = 'train' ORDER BY pair_id"
        )
        held_out = held_out_keys(self.store)
        leaks = [p["anchor"] for p in pairs if query_key(p["anchor"]) in held_out]
        if leaks:  # the train step runs HeldOut.ensure first, which drops them
            raise LeakageError(
                f"{len(leaks)} training pairs use a held-out query (e.g. {leaks[0][:80]!r}); "
                f"refusing to train on evaluation data. HeldOut.ensure() (the train step's first "
                f"action) drops them from training."
            )
        width = self.config.mining.num_negatives
        known = self.known_positives()
        keys = [query_key(p["anchor"]) for p in pairs]
        passage_text = self.store.passages(sorted(set().union(*known.values())))
        known_text = {key: {passage_text[pid] for pid in ids if pid in passage_text} for key, ids in known.items()}
        for p, key in zip(pairs, keys, strict=True):
            known_text.setdefault(key, set()).add(p["positive_text"])

        def usable(i: int, text: str | None) -> bool:
            return bool(text) and text != pairs[i]["positive_text"] and text not in known_text[keys[i]]

        reviewed: dict[str, list[str]] = {}  # anchor -> its reviewer-verified negatives, as they were shown
        for a, pid, text in self.store.execute(
            "SELECT n.anchor, n.passage_id, p.text FROM negatives n JOIN passages p USING (passage_id) "
            "ORDER BY n.created_at, n.rowid"
        ).fetchall():
            if pid not in known.get(query_key(a), ()):  # e.g. rejected once, accepted (picked) later
                reviewed.setdefault(a, []).append(text)
        negatives: list[list[str]] = [[] for _ in pairs]
        nth: dict[str, int] = {}  # a query's several positives take its verified negatives in turn
        for i, p in enumerate(pairs):
            mine = [t for t in reviewed.get(p["anchor"], []) if usable(i, t)]
            j = nth.get(p["anchor"], 0)
            nth[p["anchor"]] = j + 1
            own = [p["negative_text"]] if usable(i, p["negative_text"]) else []
            turn = [mine[(j * width + n) % len(mine)] for n in range(min(width, len(mine)))] if mine else []
            negatives[i] = list(dict.fromkeys(own + turn))[:width]
        need = [i for i in range(len(pairs)) if len(negatives[i]) < width]
        if need:
            emb = self.ws.embedder()
            # twice as many as a row needs: some may be negatives it already has from a reviewer
            policy = self.config.mining.model_copy(update={"num_negatives": 2 * width})
            q_emb = emb.encode([pairs[i]["anchor"] for i in need])
            active = self.store.pointer(indexing.ACTIVE_INDEX)
            p_emb = passage_vectors(self.ws, emb, active, [pairs[i]["positive_id"] for i in need],
                                    [pairs[i]["positive_text"] for i in need])
            ids, scores = self._topk(emb, active, q_emb, policy.range_max)
            # `known` holds every accepted pair's positive with its document's chunks, this row's too.
            excluded = [known.get(keys[i], set()) for i in need]
            chosen = select_negatives(ids, scores, np.einsum("ij,ij->i", q_emb, p_emb), excluded, policy)
            texts = self.store.passages(sorted({pid for c in chosen for pid in c}))
            for i, c in zip(need, chosen, strict=True):
                mined = [texts[pid] for pid in c if pid in texts and usable(i, texts[pid])]
                negatives[i] = list(dict.fromkeys(negatives[i] + mined))[:width]
        in_data = {p["positive_text"] for p in pairs} | {t for row in negatives for t in row}
        return [{"anchor": p["anchor"], "positive": p["positive_text"], "negatives": negatives[i],
                 "exclude": sorted((known_text[keys[i]] & in_data) - {p["positive_text"]})}
                for i, p in enumerate(pairs)]

    def dev_fold(self) -> tuple[list[dict[str, str]], DevTask | None]:
        """The development fold's pairs (the trainer's eval loss) and its retrieval task (WiSE-FT):
        its queries, their relevant passages (every chunk of a positive's documents) and a pool of
        the active model's top passages for them (10 to 20 per query, at most about 400 in all: the
        pool is encoded once per WiSE-FT weight, and NDCG@10 needs only the top of the ranking)."""
        dev, _ = self.heldout.folds()
        pairs = [p for p in self.store.rows(
            "SELECT anchor, positive_id, positive_text AS positive FROM pairs WHERE status = 'accepted' "
            "AND split = 'eval' AND positive_text IS NOT NULL ORDER BY pair_id") if query_key(p["anchor"]) in dev]
        if not pairs:
            return [], None
        queries: dict[str, str] = {}
        relevant: dict[str, set[str]] = {}
        sib = self.siblings([p["positive_id"] for p in pairs if p["positive_id"]])
        for p in pairs:
            key = query_key(p["anchor"])
            queries.setdefault(key, p["anchor"])
            relevant.setdefault(key, set()).update(sib.get(p["positive_id"], set()) if p["positive_id"] else set())
        keys = sorted(queries)
        ranked = self._search_ids([queries[k] for k in keys], max(10, min(20, 400 // len(keys))))
        texts = self.store.passages(sorted({*(p for k in keys for p in relevant[k]), *(p for r in ranked for p in r)}))
        task = dev_task([queries[k] for k in keys], [relevant[k] for k in keys], ranked, texts)
        return [{"anchor": p["anchor"], "positive": p["positive"]} for p in pairs], task
