"""The select step: mine the query log, score every open candidate with the current model, route it.

Routing (`loop.routing.route`) sends a candidate to auto-accept, review or drop; the review budget
takes the random-control slice first, then the highest expected value of a label; the rest waits
for a later round. A candidate's margins are measured against passages that are not known
answers of its query (`TrainingData.known_positives`).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from loop import indexing
from loop.evalsets import held_out_keys
from loop.pair_status import ACCEPTED, CANDIDATE, DROPPED, PENDING, check_routes
from loop.records import Pair, query_key
from loop.routing import AUTO, DROP, REVIEW, features, route
from loop.training_data import passage_vectors

if TYPE_CHECKING:
    from loop.heldout import HeldOut
    from loop.rounds import LoopConfig
    from loop.training_data import TrainingData
    from loop.workspace import Workspace


class Selection:
    """One round's select step over a workspace."""

    def __init__(self, ws: Workspace, config: LoopConfig, log, heldout: HeldOut, data: TrainingData):
        self.ws = ws
        self.store = ws.store
        self.config = config
        self.log = log
        self.heldout = heldout
        self.data = data

    def mine_query_log(self, round_n: int) -> int:
        """Unlabelled queries + the top of their review pool become 'mined' candidates."""
        held_out = held_out_keys(self.store)
        rows = self.store.execute(
            "SELECT query_id, text FROM queries q WHERE NOT EXISTS (SELECT 1 FROM pairs p WHERE p.query_id = q.query_id) "
            "AND NOT EXISTS (SELECT 1 FROM pairs p WHERE p.anchor = q.text) ORDER BY query_id"
        ).fetchall()
        rows = [(qid, text) for qid, text in rows if query_key(text) not in held_out]
        if not rows:
            return 0
        # Each logged query proposes the top `mine_top` passages of its review pool (the model's
        # first); its card shows the rest of the pool, and the reviewer marks every answer.
        top = [[h.passage_id for h in hits]
               for hits in self.ws.review_pool([t for _, t in rows], self.config.mine_top, self.config.review_pool)]
        texts = self.store.passages(sorted({pid for ids in top for pid in ids}))
        new = [
            {"pair_id": Pair.make_id(text, texts[pid]), "anchor": text, "positive_id": pid,
             "positive_text": texts[pid], "source": "mined", "status": CANDIDATE, "split": "train",
             "round": round_n, "query_id": qid, "origin": f"query log + top-{rank + 1}",
             "meta": json.dumps({"generator": f"mined:top{rank + 1}"})}
            for (qid, text), ids in zip(rows, top, strict=True) for rank, pid in enumerate(ids)
        ]
        with self.store.transaction() as cur:
            return self.store.insert_ignore(cur, "pairs", new)

    def run(self, round_n: int) -> dict[str, Any]:
        """Score every open candidate with the current model and route it; returns the step's counts."""
        mined = self.mine_query_log(round_n)
        self.heldout.drop_training_pairs()  # e.g. a generated query that is word for word an evaluation query
        cands = self.store.rows(
            "SELECT pair_id, anchor, positive_id, positive_text, source, meta FROM pairs WHERE status = 'candidate' "
            "ORDER BY pair_id"
        )
        if not cands:
            self.log("No candidates to route.")
            return {"mined": mined, "candidates": 0}
        self.log(f"Scoring {len(cands)} candidates ({mined} mined from the query log) with {self.ws.active_model}...")
        emb = self.ws.embedder()
        k = self.config.k
        q_emb = emb.encode([c["anchor"] for c in cands])
        active = self.store.pointer(indexing.ACTIVE_INDEX)
        p_emb = passage_vectors(self.ws, emb, active, [c["positive_id"] for c in cands],
                                [c["positive_text"] for c in cands])
        pos_score = np.einsum("ij,ij->i", q_emb, p_emb)
        topk_ids, topk_scores = self.data._topk(emb, active, q_emb, k)
        sib = self.data.siblings([c["positive_id"] for c in cands if c["positive_id"]])
        known = self.data.known_positives()  # another accepted answer of the query is not a negative to beat
        positives = [(sib.get(c["positive_id"], {c["positive_id"]}) if c["positive_id"] else set())
                     | known.get(query_key(c["anchor"]), set()) for c in cands]
        base_topk = None
        base_coll = indexing.collection_for(self.store, self.ws.base_version)
        if self.ws.active_model != self.ws.base_version and base_coll in self.ws.index.collections():
            base = self.ws.embedder(self.ws.base_version)
            base_topk, _ = self.data._topk(base, base_coll, base.encode([c["anchor"] for c in cands]), k)
        f = features(pos_score, topk_ids, topk_scores, positives, base_topk)
        flagged = np.array([bool(json.loads(c["meta"] or "{}").get("flags")) for c in cands])
        policy = self.config.routing.model_copy(update={"seed": self.config.seed + round_n})
        routing = route(f, policy, flagged, [c["source"] for c in cands])

        # The review budget: the random control slice first, then the highest expected value.
        review = [i for i in range(len(cands)) if routing.route[i] == REVIEW]
        control = [i for i in review if routing.control[i]]
        rest = sorted((i for i in review if not routing.control[i]), key=lambda i: -routing.priority[i])
        n_control = min(len(control), max(0, math.ceil(self.config.review_budget * policy.random_fraction)))
        queued = set(control[:n_control] + rest[: max(0, self.config.review_budget - n_control)])
        counts = {"auto": 0, "review": 0, "drop": 0, "waiting": 0, "control": 0}
        updates = []
        for i, c in enumerate(cands):
            meta = json.loads(c["meta"] or "{}")
            meta["features"] = f.row(i)
            meta["control"] = bool(routing.control[i])
            meta["scored_by"] = emb.version
            rt = routing.route[i]
            if rt == AUTO:
                status = ACCEPTED
            elif rt == DROP:
                status = DROPPED
            elif i in queued:
                status = PENDING
                counts["control"] += int(routing.control[i])
            else:
                status, rt = CANDIDATE, "waiting"
            counts[rt if rt in counts else "review"] += 1
            reason = routing.reason[i] if rt != "waiting" else f"over this round's review budget ({routing.reason[i]})"
            updates.append({"pair_id": c["pair_id"], "status": status, "reason": reason,
                            "priority": float(routing.priority[i]), "meta": json.dumps(meta), "round": round_n})
        check_routes(u["status"] for u in updates)
        with self.store.transaction() as cur:
            self.store.update_from(
                cur, "pairs", "pair_id", updates,
                "status = u.status, reason = u.reason, priority = u.priority, meta = u.meta, "
                "round = coalesce(pairs.round, u.round), updated_at = current_timestamp",
            )
        self.log(
            f"Routed: {counts['auto']} auto-accepted, {counts['review']} to review "
            f"({counts['control']} random control), {counts['drop']} dropped, {counts['waiting']} waiting."
        )
        return {"mined": mined, "candidates": len(cands), **counts}
