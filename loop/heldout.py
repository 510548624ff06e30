"""The held-out set of a workspace, and what is measured on it: the one place both faces ask.

Fixed once from the human-verified real queries (`ensure`), split into a development fold (it
chooses the checkpoint and the WiSE-FT weight) and the promotion set (`folds`); training never
sees either (`drop_training_pairs`). Reports are cached per model version and eval-set
fingerprint (`report_for`). The baseline and the should-I-fine-tune recommendation are computed
here for the CLI (`embedloop evaluate --target`) and the app's Overview alike.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from loop import indexing
from loop.verdicts import Recommendation, should_finetune
from loop.errors import RoundError, VectorIndexError
from loop.evalsets import EvalSet, dev_fold, evalset_from_store, held_out_keys
from loop.evaluate import CorpusEmbeddings, EvalReport, evaluate, intervals
from loop.pair_status import DROPPED, move
from loop.records import query_key

if TYPE_CHECKING:
    from loop.rounds import LoopConfig
    from loop.workspace import Workspace

HELD_OUT_REASON = "its query is held out for evaluation"


class Baseline(BaseModel):
    """The off-the-shelf model on the promotion set, with every metric's 95% interval."""

    model_config = ConfigDict(frozen=True)

    report: EvalReport
    intervals: dict[str, tuple[float, float, float]]  # metric -> (mean, low, high)

    @property
    def ci(self) -> tuple[float, float]:
        _, lo, hi = self.intervals["ndcg@10"]
        return lo, hi


class HeldOut:
    """The held-out set of one workspace under one round configuration."""

    def __init__(self, ws: Workspace, config: LoopConfig, log: Callable[[str], None]):
        self.ws = ws
        self.store = ws.store
        self.config = config
        self.log = log
        self._corpus_cache: dict[str, dict[str, np.ndarray]] = {}  # version -> passage vectors

    def corpus_vectors(self, version: str) -> dict[str, np.ndarray] | None:
        """The passage vectors of `version` from its last evaluation here (re-index reuses them)."""
        return self._corpus_cache.get(version)

    def drop_training_pairs(self) -> None:
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
        move(self.store, [pid for pid, _, _ in leaking], DROPPED, "hold_out", reason=HELD_OUT_REASON)
        accepted = [anchor for _, anchor, status in leaking if status == "accepted"]
        if accepted:
            self.log(f"Dropped {len(accepted)} accepted training pairs whose query is held out for evaluation (the "
                     f"same query, case, spacing and trailing punctuation aside), e.g. {accepted[0]!r}; they stay "
                     f"stored, marked dropped.")

    def ensure(self) -> int:
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
        self.drop_training_pairs()
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
        # `drop_training_pairs`: an answer would be a training label for an evaluation query.
        self.store.execute("UPDATE pairs SET split = 'eval', updated_at = current_timestamp "
                           "WHERE pair_id IN (SELECT unnest(?::VARCHAR[]))", [moved])
        dev, _ = self.folds()
        self.log(f"Held out {n} human-verified queries as the fixed evaluation set ({len(dev)} of them the "
                 f"development fold that chooses the checkpoint and the WiSE-FT weight).")
        return n

    def folds(self) -> tuple[set[str], set[str]]:
        """The held-out query keys as (development fold, promotion set): `evalsets.dev_fold`."""
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

    def measure_baseline(self) -> Baseline:
        """`baseline` with every metric's interval (one resample of the queries)."""
        report = self.baseline()
        return Baseline(report=report, intervals=intervals(report))

    def recommend(self, target_ndcg: float, baseline: Baseline | None = None, speed: float | None = None
                  ) -> Recommendation:
        """`should_finetune` on this workspace: the baseline and its interval, the accepted training
        pairs, and the active model's encoding speed measured here (for the re-index estimate)."""
        baseline = baseline or self.measure_baseline()
        accepted = int(self.store.scalar("SELECT count(*) FROM pairs WHERE status = 'accepted' AND split = 'train'"))
        n_passages = int(self.store.scalar("SELECT count(*) FROM passages"))
        ci = baseline.ci if baseline.report.n_queries > 1 else None
        return should_finetune(baseline.report.metrics["ndcg@10"], target_ndcg, accepted, n_passages,
                               speed if speed is not None else self.ws.encode_speed(), ci=ci)
