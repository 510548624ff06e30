"""The round state machine: generate -> select -> review -> train -> evaluate -> promote -> reindex -> done.

A round is a row in `rounds` whose `state` names the next step to run. Each step is idempotent:
it records its result in the round's manifest and advances the state in one place, so a crash
or a rerun picks up where the round stopped and never repeats paid or finished work. Training
runs in a subprocess on a snapshot of files (this process stays the only DuckDB writer); a
restarted train step resumes from the run's last checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from loop import indexing, train
from loop.decide import Recommendation, promotion_gate, resolution, should_finetune
from loop.embed import Embedder, model_hash
from loop.errors import EmbedloopError, InputError, VectorIndexError
from loop.evaluate import (
    PRIMARY_METRIC, CorpusEmbeddings, EvalReport, EvalSet, compare, compare_all, dev_fold, evaluate,
    evalset_from_store, held_out_keys,
)
from loop.generate import needs_generation, run_generation
from loop.negatives import MiningPolicy, known_positives, select_negatives
from loop.records import Pair, query_key
from loop.select import AUTO, DROP, REVIEW, RoutingPolicy, features, route
from loop.wise import DevTask, dev_task
from loop.workspace import Workspace

STATES = ["generate", "select", "review", "train", "evaluate", "promote", "reindex", "done"]
Log = Callable[[str], None]


class RoundError(EmbedloopError):
    """A round cannot advance (e.g. pending reviews, a failed training run)."""


class LeakageError(RoundError):
    """Training data contains a held-out query or one of its (query, positive) pairs."""


HELD_OUT_REASON = "its query is held out for evaluation"


class TrainOverrides(train.TrainConfig):
    """The `[loop.train]` table: TrainConfig keys, checked when the round settings load (not when
    training starts, after the review work). The round fills in base_model."""

    base_model: str = Field("", description="empty: the workspace's base model")


class LoopConfig(BaseModel):
    """Knobs of a round. Defaults suit a team starting from a few hundred pairs."""

    model_config = ConfigDict(extra="forbid")

    review_budget: int = Field(200, ge=0, description="cards queued for review per round")
    k: int = Field(20, ge=2, description="top-k used to score candidates")
    generate_threshold: int = Field(1000, ge=0, description="generate while accepted train pairs are fewer")
    generate_max: int = Field(300, ge=0, description="synthetic pairs generated per round at most")
    mine_top: int = Field(1, ge=1, le=20, description="cards per logged query, one per passage of the active index's "
                          "top; 1 suffices: a card shows the model's top passages and the reviewer marks each that answers")
    domain: str = Field("", description="a sentence on the domain and its users, for the LLM prompt")
    eval_fraction: float = Field(0.3, gt=0, lt=1, description="share of the human-verified real queries held "
                                 "out, once (a development fold and a promotion set, see dev_share)")
    eval_min: int = Field(5, ge=1, description="queries held out at least (twice as many verified ones are needed)")
    eval_max: int = Field(300, ge=1, description="queries held out at most")
    dev_share: float = Field(0.35, ge=0, lt=1, description="share of the held-out queries in the development fold: "
                             "it chooses the checkpoint and the WiSE-FT weight; the rest decide promotion")
    promote_confidence: float = Field(
        0.9, gt=0.5, lt=1, description="promote when the bootstrap share of resamples in which the candidate beats the "
        "active model on the promotion set reaches this (0.975 = the 95% interval's lower bound above zero)")
    routing: RoutingPolicy = RoutingPolicy()
    mining: MiningPolicy = MiningPolicy()
    train: TrainOverrides = Field(default_factory=TrainOverrides, description="TrainConfig overrides")
    promote_min_delta: float = 0.0
    seed: int = 0

    @model_validator(mode="after")
    def _sizes(self) -> LoopConfig:
        if self.eval_min > self.eval_max:
            raise ValueError(f"eval_min ({self.eval_min}) is larger than eval_max ({self.eval_max})")
        return self

    @field_serializer("train")
    def _train_as_set(self, v: TrainOverrides) -> dict[str, Any]:
        return v.model_dump(mode="json", exclude_unset=True)  # what was set, not every default


def loop_config(settings_table: dict[str, Any], **overrides: Any) -> LoopConfig:
    """LoopConfig from the workspace's `[loop]` table plus overrides; a clear error on bad keys."""
    from pydantic import ValidationError

    from loop.errors import ConfigError, validation_problems

    try:
        return LoopConfig(**{**settings_table, **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as e:
        problems = validation_problems(e, whole="", prefix="loop.")
        raise ConfigError(f"Invalid [loop] settings: {problems}") from e


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Rounds:
    """Runs rounds of one workspace. `log` receives one line per thing a user would want to see."""

    def __init__(self, ws: Workspace, config: LoopConfig | None = None, log: Log | None = None,
                 llm: Any = None, train_env: dict[str, str] | None = None, cancel: threading.Event | None = None):
        self.ws = ws
        self.cancel = cancel or threading.Event()
        self._corpus_cache: dict[str, dict[str, np.ndarray]] = {}  # version -> passage vectors
        self.store = ws.store
        self.config = config or loop_config(ws.settings.loop)
        self.log = log or (lambda _msg: None)
        self.llm = llm
        self.train_env = train_env or {}

    # Round records ---------------------------------------------------------------------------
    def current(self) -> dict[str, Any] | None:
        """The open round (not done, not failed), if any."""
        rows = self.store.rows(
            "SELECT round, state, error, manifest FROM rounds WHERE state NOT IN ('done', 'failed') ORDER BY round DESC LIMIT 1"
        )
        if not rows:
            return None
        r = rows[0]
        r["manifest"] = json.loads(r["manifest"] or "{}")
        return r

    def open(self) -> dict[str, Any]:
        """The open round, or a new one."""
        r = self.current()
        if r:
            return r
        n = int(self.store.scalar("SELECT coalesce(max(round), 0) FROM rounds")) + 1
        manifest = {"round": n, "started": _now(), "config": self.config.model_dump(mode="json"),
                    "base_model": self._base_info(), "steps": {}}
        self.store.execute("INSERT INTO rounds (round, state, manifest) VALUES (?, 'generate', ?)",
                           [n, json.dumps(manifest)])
        self.log(f"Round {n} opened.")
        return self.current()  # type: ignore[return-value]

    def _base_info(self) -> dict[str, Any]:
        row = self.store.rows("SELECT version, path, sha256 FROM model_versions WHERE version = ?", [self.ws.base_version])
        return row[0] if row else {"version": self.ws.base_version}

    def _save(self, r: dict[str, Any], state: str | None = None, error: str | None = None) -> None:
        if state:
            r["state"] = state
        r["error"] = error  # the caller's record says what the stored one says
        self.store.execute(
            "UPDATE rounds SET state = ?, error = ?, manifest = ?, updated_at = current_timestamp WHERE round = ?",
            [r["state"], error, json.dumps(r["manifest"], default=str), r["round"]],
        )

    def _step_done(self, r: dict[str, Any], step: str, result: dict[str, Any], t0: float) -> None:
        result["seconds"] = round(time.monotonic() - t0, 2)
        r["manifest"]["steps"][step] = result
        nxt = STATES[STATES.index(step) + 1]
        self._save(r, nxt)

    def fail(self, r: dict[str, Any], reason: str) -> None:
        r["manifest"]["failure"] = reason
        self._save(r, "failed", reason)
        self.log(f"Round {r['round']} failed: {reason}")

    # Driver -------------------------------------------------------------------------------
    def advance(self, until: str = "done", force: bool = False) -> dict[str, Any]:
        """Run steps of the open round (opening one if needed) until `until` is reached.

        `until="review"` stops once the review queue is filled. The review step passes only
        when this round's queue is empty (or `force`: pending cards stay for a later round).
        """
        if until not in STATES:
            raise InputError(f"until must be one of {', '.join(STATES)}")
        r = self.open()
        steps: dict[str, Callable[[dict[str, Any]], None]] = {
            "generate": self.generate, "select": self.select, "review": lambda rr: self.review_gate(rr, force),
            "train": self.train, "evaluate": self.evaluate, "promote": self.promote, "reindex": self.reindex,
        }
        while r["state"] not in ("done", "failed"):
            if STATES.index(r["state"]) >= STATES.index(until) or self.cancel.is_set():
                break
            before = r["state"]
            steps[before](r)
            if r["state"] == before:  # the step could not finish now (e.g. training stopped)
                break
        return r

    # Steps --------------------------------------------------------------------------------
    def _search_ids(self, queries: list[str], k: int) -> list[list[str]]:
        return [[h.passage_id for h in hits] for hits in indexing.search(
            self.store, self.ws.index, self.ws.embedder(), queries, k)]

    def _drop_held_out_training_pairs(self) -> None:
        """Training pairs and open cards whose query is held out leave training, with the reason.

        They can appear after the held-out set was fixed: pairs imported or typed in another
        case, spacing or punctuation, or a generated query that repeats an evaluation query.
        Dropped, not moved to the eval split: the held-out set stays the one fixed at the start.
        """
        held_out = held_out_keys(self.store)
        rows = self.store.execute(
            "SELECT pair_id, anchor, status FROM pairs WHERE split = 'train' "
            "AND status IN ('accepted', 'candidate', 'pending') ORDER BY anchor, pair_id"
        ).fetchall()
        leaking = [(pid, anchor, status) for pid, anchor, status in rows if query_key(anchor) in held_out]
        if not leaking:
            return
        self.store.execute(
            "UPDATE pairs SET status = 'dropped', reason = ?, claimed_by = NULL, claim_expires = NULL, "
            "updated_at = current_timestamp WHERE pair_id IN (SELECT unnest(?::VARCHAR[]))",
            [HELD_OUT_REASON, [pid for pid, _, _ in leaking]],
        )
        accepted = [anchor for _, anchor, status in leaking if status == "accepted"]
        if accepted:
            self.log(f"Dropped {len(accepted)} accepted training pairs whose query is held out for evaluation (the "
                     f"same query, case, spacing and trailing punctuation aside), e.g. {accepted[0]!r}; they stay "
                     f"stored, marked dropped.")

    def generate(self, r: dict[str, Any]) -> None:
        t0 = time.monotonic()
        accepted = int(self.store.scalar("SELECT count(*) FROM pairs WHERE status = 'accepted' AND split = 'train'"))
        wanted = min(needs_generation(accepted, self.config.generate_threshold), self.config.generate_max)
        if wanted == 0:
            self.log(f"Generation skipped: {accepted} accepted training pairs (threshold {self.config.generate_threshold}).")
            self._step_done(r, "generate", {"skipped": True, "accepted_pairs": accepted}, t0)
            return
        # Generation writes all its candidates in one transaction: if this round's are there, a
        # crash came between that write and the step record. Generating again would pay twice.
        written = int(self.store.scalar("SELECT count(*) FROM pairs WHERE source = 'synthetic' AND round = ?",
                                        [r["round"]]))
        if written:
            self.log(f"Generation already wrote {written} candidates for round {r['round']}; not generating again.")
            self._step_done(r, "generate", {"recovered": True, "requested": wanted, "written": written}, t0)
            return
        who = f"LLM {self.llm.model}" if self.llm else "the offline generator (no LLM endpoint configured)"
        self.log(f"Generating up to {wanted} pairs with {who} ({accepted} accepted pairs so far)...")
        report = run_generation(
            self.store, lambda qs: self._search_ids(qs, self.config.k), llm=self.llm, domain=self.config.domain,
            round=r["round"], n=wanted, seed=self.config.seed + r["round"],
        )
        self.log(f"Generated {report.generated}, kept {report.kept}, wrote {report.written} candidates.")
        self._step_done(r, "generate", report.model_dump(mode="json"), t0)

    def _mine_query_log(self, r: dict[str, Any]) -> int:
        """Unlabelled queries + the current model's top passage become 'mined' candidates."""
        held_out = held_out_keys(self.store)
        rows = self.store.execute(
            "SELECT query_id, text FROM queries q WHERE NOT EXISTS (SELECT 1 FROM pairs p WHERE p.query_id = q.query_id) "
            "AND NOT EXISTS (SELECT 1 FROM pairs p WHERE p.anchor = q.text) ORDER BY query_id"
        ).fetchall()
        rows = [(qid, text) for qid, text in rows if query_key(text) not in held_out]
        if not rows:
            return 0
        # Each logged query proposes its top `mine_top` passages: a query usually has several
        # relevant documents, and one review per passage labels more of them than top-1 alone.
        top = self._search_ids([t for _, t in rows], self.config.mine_top)
        texts = self.store.passages(sorted({pid for ids in top for pid in ids}))
        new = [
            {"pair_id": Pair.make_id(text, texts[pid]), "anchor": text, "positive_id": pid,
             "positive_text": texts[pid], "source": "mined", "status": "candidate", "split": "train",
             "round": r["round"], "query_id": qid, "origin": f"query log + top-{rank + 1}",
             "meta": json.dumps({"generator": f"mined:top{rank + 1}"})}
            for (qid, text), ids in zip(rows, top, strict=True) for rank, pid in enumerate(ids)
        ]
        with self.store.transaction() as cur:
            return self.store.insert_ignore(cur, "pairs", new)

    def _siblings(self, passage_ids: list[str]) -> dict[str, set[str]]:
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
        return known_positives(rows, self._siblings([pid for _, pid in rows]))

    def _topk(self, embedder: Embedder, collection: str, q_emb: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        hits = self.ws.index.search(collection, q_emb, embedder.version, k=k)
        ids = [[h[0] for h in row] for row in hits]
        scores = np.array([[h[1] for h in row] + [-1.0] * (k - len(row)) for row in hits], dtype=np.float32)
        return ids, scores

    def select(self, r: dict[str, Any]) -> None:
        """Score every open candidate with the current model and route it."""
        t0 = time.monotonic()
        mined = self._mine_query_log(r)
        self._drop_held_out_training_pairs()  # e.g. a generated query that is word for word an evaluation query
        cands = self.store.rows(
            "SELECT pair_id, anchor, positive_id, positive_text, source, meta FROM pairs WHERE status = 'candidate' "
            "ORDER BY pair_id"
        )
        if not cands:
            self.log("No candidates to route.")
            self._step_done(r, "select", {"mined": mined, "candidates": 0}, t0)
            return
        self.log(f"Scoring {len(cands)} candidates ({mined} mined from the query log) with {self.ws.active_model}...")
        emb = self.ws.embedder()
        k = self.config.k
        q_emb = emb.encode([c["anchor"] for c in cands])
        p_emb = emb.encode([c["positive_text"] for c in cands])
        pos_score = np.einsum("ij,ij->i", q_emb, p_emb)
        active = self.store.pointer(indexing.ACTIVE_INDEX)
        topk_ids, topk_scores = self._topk(emb, active, q_emb, k)
        sib = self._siblings([c["positive_id"] for c in cands if c["positive_id"]])
        known = self.known_positives()  # another accepted answer of the query is not a negative to beat
        positives = [(sib.get(c["positive_id"], {c["positive_id"]}) if c["positive_id"] else set())
                     | known.get(query_key(c["anchor"]), set()) for c in cands]
        base_topk = None
        base_coll = indexing.collection_for(self.store, self.ws.base_version)
        if self.ws.active_model != self.ws.base_version and base_coll in self.ws.index.collections():
            base = self.ws.embedder(self.ws.base_version)
            base_topk, _ = self._topk(base, base_coll, base.encode([c["anchor"] for c in cands]), k)
        f = features(pos_score, topk_ids, topk_scores, positives, base_topk)
        flagged = np.array([bool(json.loads(c["meta"] or "{}").get("flags")) for c in cands])
        policy = self.config.routing.model_copy(update={"seed": self.config.seed + r["round"]})
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
                status = "accepted"
            elif rt == DROP:
                status = "dropped"
            elif i in queued:
                status = "pending"
                counts["control"] += int(routing.control[i])
            else:
                status, rt = "candidate", "waiting"
            counts[rt if rt in counts else "review"] += 1
            reason = routing.reason[i] if rt != "waiting" else f"over this round's review budget ({routing.reason[i]})"
            updates.append({"pair_id": c["pair_id"], "status": status, "reason": reason,
                            "priority": float(routing.priority[i]), "meta": json.dumps(meta), "round": r["round"]})
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
        self._step_done(r, "select", {"mined": mined, "candidates": len(cands), **counts}, t0)

    def review_gate(self, r: dict[str, Any], force: bool = False) -> None:
        pending = int(self.store.scalar("SELECT count(*) FROM pairs WHERE status = 'pending'"))
        if pending and not force:
            raise RoundError(
                f"{pending} cards are waiting for review. Review them in the app or with "
                f"`embedloop review apply FILE`, or pass --force to train without them."
            )
        decided = self.store.rows(
            "SELECT action, count(*) AS n FROM decisions d JOIN pairs p USING (pair_id) WHERE p.round = ? GROUP BY action",
            [r["round"]],
        )
        self._step_done(r, "review", {"pending_left": pending, "decisions": {d["action"]: d["n"] for d in decided}},
                        time.monotonic())

    # Held-out set and baseline --------------------------------------------------------------
    def ensure_eval_split(self) -> int:
        """Fix the held-out set once, then keep training off it; returns the queries held out now.

        The held-out set is a seeded share of the human-verified queries, each with all its
        accepted pairs. A query is matched by `query_key` (case, spacing and trailing punctuation
        do not make it another query), so every form of a held-out query goes to the eval split.
        Nothing moves when an eval or test split exists already (e.g. an imported BEIR test). Each
        call then drops the training pairs and open cards of held-out queries, with the reason.
        """
        n = 0
        if not self.store.scalar("SELECT count(*) FROM pairs WHERE status = 'accepted' AND split IN ('eval', 'test')"):
            n = self._hold_out()
        self._drop_held_out_training_pairs()
        return n

    def _hold_out(self) -> int:
        """Hold out a seeded share of the verified real queries (imported, logged or typed by a
        reviewer; never an offline synthetic query, and an LLM-written one only when nothing else
        exists, said in the log)."""
        rows = self.store.execute(
            "SELECT DISTINCT anchor, source = 'seed' OR query_id IS NOT NULL OR origin = 'review:edit' AS real, "
            "coalesce(json_extract_string(meta, '$.generator'), '') LIKE 'llm:%' AS llm "
            "FROM pairs WHERE status = 'accepted' AND split = 'train' AND positive_id IS NOT NULL "
            "AND (source IN ('seed', 'edited') OR pair_id IN (SELECT pair_id FROM decisions WHERE action IN "
            "('accept', 'mark'))) ORDER BY anchor"
        ).fetchall()
        anchors = [a for a, real, _ in rows if real]
        if not anchors and any(llm for _, _, llm in rows):
            anchors = [a for a, _, llm in rows if llm]
            self.log("No verified real queries yet: holding out LLM-generated queries a reviewer accepted. The "
                     "figures measure how well the model finds passages for the LLM's questions; import real "
                     "queries with their answers (`embedloop pairs import --split eval`) for a truer measure.")
        queries: dict[str, str] = {}  # query key -> its first form, in anchor order
        for a in anchors:
            queries.setdefault(query_key(a), a)
        need = 2 * self.config.eval_min
        if len(queries) < need:
            raise RoundError(
                f"Only {len(queries)} human-verified real queries exist; at least {need} are needed to hold out an "
                f"evaluation set (offline synthetic queries never count). Import labelled pairs (`embedloop pairs "
                f"import`), add a query log (`embedloop queries import`) and review its cards."
            )
        n = min(self.config.eval_max, max(self.config.eval_min, round(len(queries) * self.config.eval_fraction)))
        chosen = {query_key(a) for a in random.Random(self.config.seed).sample(list(queries.values()), n)}
        moved = [pid for pid, a in self.store.execute(
            "SELECT pair_id, anchor FROM pairs WHERE status = 'accepted' AND split = 'train'").fetchall()
            if query_key(a) in chosen]
        # Their open cards (a logged query proposes several passages) are dropped next, by
        # `_drop_held_out_training_pairs`: an answer would be a training label for an evaluation query.
        self.store.execute("UPDATE pairs SET split = 'eval', updated_at = current_timestamp "
                           "WHERE pair_id IN (SELECT unnest(?::VARCHAR[]))", [moved])
        dev, _ = self.folds()
        self.log(f"Held out {n} human-verified queries as the fixed evaluation set ({len(dev)} of them the "
                 f"development fold that chooses the checkpoint and the WiSE-FT weight).")
        return n

    def folds(self) -> tuple[set[str], set[str]]:
        """The held-out query keys as (development fold, promotion set): `evaluate.dev_fold`."""
        keys = held_out_keys(self.store)
        dev = dev_fold(keys, self.config.dev_share, self.config.seed)
        return dev, keys - dev

    def evalset(self) -> EvalSet:
        """The promotion set: the held-out queries outside the development fold."""
        return evalset_from_store(self.store, keys=self.folds()[1])

    def report_for(self, version: str, evalset: EvalSet) -> EvalReport:
        """The stored report of `version` on this eval set, or a fresh evaluation (then stored)."""
        row = self.store.rows("SELECT metrics FROM model_versions WHERE version = ?", [version])
        cached = json.loads(row[0]["metrics"]) if row and row[0]["metrics"] else {}
        if cached.get("evalset_fingerprint") == evalset.fingerprint:
            return EvalReport.model_validate(cached)
        self.log(f"Evaluating {version} on {len(evalset.query_ids)} held-out queries...")
        report = evaluate(self.ws.embedder(version), evalset, corpus_emb=self._indexed_corpus(version, evalset))
        if report.corpus_embeddings is not None:
            self._corpus_cache[version] = dict(zip(evalset.passage_ids, report.corpus_embeddings.emb, strict=True))
        self.store.execute("UPDATE model_versions SET metrics = ? WHERE version = ?",
                           [report.model_dump_json(), version])
        return report

    def _indexed_corpus(self, version: str, evalset: EvalSet) -> CorpusEmbeddings | None:
        """The corpus vectors of `version` from its index, when it has one: no re-encoding."""
        name = indexing.collection_for(self.store, version)
        if name not in self.ws.index.collections() or self.ws.index.count(name) != len(evalset.passage_ids):
            return None
        try:
            emb = self.ws.index.embeddings(name, evalset.passage_ids)
        except VectorIndexError:
            return None
        return CorpusEmbeddings(version, evalset.corpus_fingerprint, emb)

    def baseline(self) -> EvalReport:
        """The off-the-shelf model on the held-out set (measured once, before any training)."""
        return self.report_for(self.ws.base_version, self.evalset())

    def recommend(self, target_ndcg: float) -> Recommendation:
        """`should_finetune` on this workspace: baseline, accepted pairs, measured encode speed."""
        base = self.baseline()
        accepted = int(self.store.scalar("SELECT count(*) FROM pairs WHERE status = 'accepted' AND split = 'train'"))
        n_passages = int(self.store.scalar("SELECT count(*) FROM passages"))
        ci = None
        per_query = np.asarray(base.per_query["ndcg@10"])
        if len(per_query) > 1:  # the baseline's own 95% interval, by bootstrap over queries
            rng = np.random.default_rng(self.config.seed)
            means = per_query[rng.integers(0, len(per_query), size=(2000, len(per_query)))].mean(axis=1)
            ci = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
        return should_finetune(base.metrics["ndcg@10"], target_ndcg, accepted, n_passages,
                               self.ws.encode_speed(), ci=ci)

    # Training -----------------------------------------------------------------------------
    def training_rows(self) -> list[dict[str, Any]]:
        """Accepted train pairs with one hard negative each (a reviewer's first, else mined).

        A known positive of the row's query (`known_positives`) is never its negative. Each row is
        `{anchor, positive[, negative], exclude}`: `exclude` lists the texts of the query's other
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
        if leaks:  # the train step runs ensure_eval_split first, which drops them
            raise LeakageError(
                f"{len(leaks)} training pairs use a held-out query (e.g. {leaks[0][:80]!r}); "
                f"refusing to train on evaluation data. Rounds.ensure_eval_split() (the train step's "
                f"first action) drops them from training."
            )
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
        negative: dict[int, str] = {}
        nth: dict[str, int] = {}  # a query's several positives take its verified negatives in turn
        for i, p in enumerate(pairs):
            mine = [t for t in reviewed.get(p["anchor"], []) if usable(i, t)]
            j = nth.get(p["anchor"], 0)
            nth[p["anchor"]] = j + 1
            given = p["negative_text"] if usable(i, p["negative_text"]) else mine[j % len(mine)] if mine else None
            if given:
                negative[i] = given
        need = [i for i in range(len(pairs)) if i not in negative]
        if need:
            emb = self.ws.embedder()
            policy = self.config.mining
            q_emb = emb.encode([pairs[i]["anchor"] for i in need])
            p_emb = emb.encode([pairs[i]["positive_text"] for i in need])
            ids, scores = self._topk(emb, self.store.pointer(indexing.ACTIVE_INDEX), q_emb, policy.range_max)
            # `known` holds every accepted pair's positive with its document's chunks, this row's too.
            excluded = [known.get(keys[i], set()) for i in need]
            chosen = select_negatives(ids, scores, np.einsum("ij,ij->i", q_emb, p_emb), excluded, policy)
            texts = self.store.passages(sorted({c[0] for c in chosen if c}))
            negative.update({i: texts[c[0]] for i, c in zip(need, chosen, strict=True) if c and usable(i, texts[c[0]])})
        in_data = {p["positive_text"] for p in pairs} | set(negative.values())
        rows: list[dict[str, Any]] = []
        for i, p in enumerate(pairs):
            row: dict[str, Any] = {"anchor": p["anchor"], "positive": p["positive_text"]}
            if i in negative:
                row["negative"] = negative[i]
            row["exclude"] = sorted((known_text[keys[i]] & in_data) - {p["positive_text"]})
            rows.append(row)
        return rows

    def _dev_fold(self) -> tuple[list[dict[str, str]], DevTask | None]:
        """The development fold's pairs (the trainer's eval loss) and its retrieval task (WiSE-FT):
        its queries, their relevant passages (every chunk of a positive's documents) and a pool of
        the active model's top passages for them (at most about 2,000 passages in all)."""
        dev, _ = self.folds()
        pairs = [p for p in self.store.rows(
            "SELECT anchor, positive_id, positive_text AS positive FROM pairs WHERE status = 'accepted' "
            "AND split = 'eval' AND positive_text IS NOT NULL ORDER BY pair_id") if query_key(p["anchor"]) in dev]
        if not pairs:
            return [], None
        queries: dict[str, str] = {}
        relevant: dict[str, set[str]] = {}
        sib = self._siblings([p["positive_id"] for p in pairs if p["positive_id"]])
        for p in pairs:
            key = query_key(p["anchor"])
            queries.setdefault(key, p["anchor"])
            relevant.setdefault(key, set()).update(sib.get(p["positive_id"], set()) if p["positive_id"] else set())
        keys = sorted(queries)
        ranked = self._search_ids([queries[k] for k in keys], max(10, min(50, 2000 // len(keys))))
        texts = self.store.passages(sorted({*(p for k in keys for p in relevant[k]), *(p for r in ranked for p in r)}))
        task = dev_task([queries[k] for k in keys], [relevant[k] for k in keys], ranked, texts)
        return [{"anchor": p["anchor"], "positive": p["positive"]} for p in pairs], task

    def run_dir(self, r: dict[str, Any]) -> Path:
        return self.ws.settings.runs_dir / f"round-{r['round']:03d}"

    def train(self, r: dict[str, Any], wait: bool = True, poll_s: float = 2.0) -> None:
        t0 = time.monotonic()
        run = self.run_dir(r)
        result = train.read_result(run)
        if result is None or result.get("status") != "ok":
            self.ensure_eval_split()
            self.baseline()  # benchmark first, always: stored before any training
            if not (run / train.CONFIG_FILE).exists():
                rows = self.training_rows()
                overrides = self.config.train.model_dump(exclude_unset=True)
                cfg = {"device": self.ws.settings.device, **overrides,  # the workspace's device unless [loop.train] says
                       "base_model": overrides.get("base_model") or str(self.ws.settings.base_model_path)}
                # The checkpoint (eval loss) and the WiSE-FT weight are chosen on the development fold,
                # never on the promotion set; without a fold the trainer holds out a share of the rows.
                dev_pairs, task = self._dev_fold()
                digest = train.write_snapshot(run, rows, dev_pairs if len(dev_pairs) >= 2 else None, cfg, dev=task)
                r["manifest"]["data_snapshot"] = digest
                r["manifest"]["train_config"] = json.loads((run / train.CONFIG_FILE).read_text())
                self._save(r)
                self.log(f"Training on {len(rows)} pairs (snapshot {digest[:12]}) in {run}...")
            else:
                self.log(f"Resuming training in {run} from its last checkpoint...")
            proc = None
            pid = train.running_pid(run)
            if pid:  # a trainer outlived the process that started it: follow it, don't start another
                self.log(f"Following the training process {pid} that is still running on {run}...")
            else:
                proc = train.start(run, env=self.train_env)
                pid = proc.pid
            job_id = f"train-{r['round']}"
            self.store.execute(
                "INSERT OR REPLACE INTO jobs (job_id, kind, status, pid, args) VALUES (?, 'train', 'running', ?, ?)",
                [job_id, pid, json.dumps({"run_dir": str(run)})],
            )
            if not wait:
                return
            result = self._follow(run, proc, pid, poll_s)
            self.store.execute("UPDATE jobs SET status = ?, error = ?, updated_at = current_timestamp WHERE job_id = ?",
                               [result["status"], result.get("reason"), job_id])
        if result["status"] in ("stopped", "interrupted"):
            # Not a failure of the data or the model: the round stays at `train`, and running it
            # again resumes from the run's last checkpoint (or starts it over if it had none).
            why = "stopped on request" if result["status"] == "stopped" else result["reason"]
            msg = f"Training {why}. Run the round again to resume from the last checkpoint."
            self.log(msg)
            self._save(r, error=msg)
            return
        if result["status"] != "ok":
            self.fail(r, f"training {result['status']}: {result.get('reason')}")
            return
        model_dir = Path(result["model_dir"])
        digest = model_hash(model_dir)
        version = f"r{r['round']}-{digest[:10]}"
        self.store.execute(
            "INSERT OR IGNORE INTO model_versions (version, path, parent, sha256, round, status) "
            "VALUES (?, ?, ?, ?, ?, 'candidate')",
            [version, str(model_dir), self.ws.base_version, digest, r["round"]],
        )
        r["manifest"]["model"] = {"version": version, "path": str(model_dir), "sha256": digest}
        self.log(f"Trained {version} in {result.get('train_seconds', 0):.0f}s.")
        if result.get("wise"):
            w = result["wise"]
            self.log(f"WiSE-FT: kept {w['alpha']:g} of the fine-tuning's change to the base weights, the best of "
                     f"{', '.join(w['dev_ndcg@10'])} on the {w['n_dev_queries']} development-fold queries "
                     f"(NDCG@10 {', '.join(f'{v:.3f}' for v in w['dev_ndcg@10'].values())}).")
        self._step_done(r, "train", {k: result.get(k) for k in (
            "status", "steps", "train_seconds", "best_eval_loss", "pairs_per_second", "device", "world_size",
            "batch_size", "effective_batch_size", "learning_rate", "max_seq_length", "peak_rss_mb", "wise")}, t0)

    def _follow(self, run: Path, proc: Any, pid: int, poll_s: float) -> dict[str, Any]:
        """Wait for the trainer, relaying its progress and a cancel request; return its result."""
        last = 0
        stop_sent = False

        def alive() -> bool:
            return proc.poll() is None if proc is not None else train.is_running(pid)

        while alive():
            time.sleep(poll_s)
            if self.cancel.is_set() and not stop_sent:
                train.request_stop(run)  # the trainer keeps its best checkpoint and exits
                stop_sent = True
            events = train.read_progress(run)
            for ev in events[last:]:
                if ev.get("loss") is not None and ev.get("event") == "log":
                    self.log(f"  step {ev.get('step')}/{ev.get('max_steps')} loss {ev['loss']:.4f} "
                             f"eta {ev.get('eta_seconds', 0):.0f}s")
            last = len(events)
        code = proc.returncode if proc is not None else "unknown"
        return train.read_result(run) or {
            "status": "interrupted",
            "reason": f"the trainer exited (code {code}) without a result (killed?); see {run / train.LOG_FILE}",
        }

    # Evaluation and promotion ----------------------------------------------------------------
    def evaluate(self, r: dict[str, Any]) -> None:
        t0 = time.monotonic()
        evalset = self.evalset()
        version = r["manifest"]["model"]["version"]
        base = self.report_for(self.ws.base_version, evalset)
        active = self.report_for(self.ws.active_model, evalset)
        cand = self.report_for(version, evalset)
        every = compare_all(base, cand)  # one resample of the queries for every metric's interval
        vs_base = every[PRIMARY_METRIC]
        vs_active = compare(active, cand)
        r["manifest"]["metrics"] = {"base": base.metrics, "active": active.metrics, "candidate": cand.metrics,
                                    "matryoshka": cand.matryoshka, "n_queries": cand.n_queries}
        r["manifest"]["vs_base"] = vs_base.model_dump()
        r["manifest"]["vs_base_by_metric"] = {m: c.model_dump() for m, c in every.items()}
        r["manifest"]["vs_active"] = vs_active.model_dump()
        self.log(f"NDCG@10: base {base.metrics['ndcg@10']:.4f}, active {active.metrics['ndcg@10']:.4f}, "
                 f"candidate {cand.metrics['ndcg@10']:.4f} (vs base {vs_base.delta:+.4f}, "
                 f"95% CI {vs_base.ci_low:+.4f}..{vs_base.ci_high:+.4f})")
        self._step_done(r, "evaluate", {"candidate": version}, t0)

    def promote(self, r: dict[str, Any]) -> None:
        t0 = time.monotonic()
        evalset = self.evalset()
        version = r["manifest"]["model"]["version"]
        cand, active = self.report_for(version, evalset), self.report_for(self.ws.active_model, evalset)
        ok, reasons = promotion_gate(cand, active, min_delta=self.config.promote_min_delta,
                                     confidence=self.config.promote_confidence)
        res = resolution(active, cand)
        r["manifest"]["promotion"] = {"promote": ok, "reasons": reasons, "confidence": self.config.promote_confidence,
                                      "resolution": {**res.model_dump(), "more_queries_for_0.02": res.more_queries()}}
        for line in reasons:
            self.log(line)
        self._step_done(r, "promote", {"promoted": ok}, t0)
        if not ok:  # the candidate stays a candidate; nothing is re-indexed
            r["manifest"]["finished"] = _now()
            self._save(r, "done")

    def reindex(self, r: dict[str, Any]) -> None:
        t0 = time.monotonic()
        version = r["manifest"]["model"]["version"]
        # A rerun after a crash between the switch and the step record finds the switch done.
        if self.ws.active_model != version:
            emb = self.ws.embedder(version)
            self.log(f"Re-indexing the corpus with {version}...")
            name = indexing.build(self.store, self.ws.index, emb, precomputed=self._corpus_cache.get(version))
            r["manifest"]["previous_model"] = self.ws.active_model  # the switch below replaces it
            self._save(r)
            indexing.activate(self.store, name)
        name = self.store.pointer(indexing.ACTIVE_INDEX)  # activate also set the models' status, in one go
        old = r["manifest"].get("previous_model")  # None only in a round stopped here by an earlier version
        r["manifest"]["collection"] = name
        r["manifest"]["finished"] = _now()
        kept = indexing.collection_for(self.store, old) if old else "the previous index"
        self.log(f"Index {name} verified and active; {kept} kept for rollback.")
        self._step_done(r, "reindex", {"collection": name, "previous_model": old}, t0)
