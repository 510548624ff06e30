"""The held-out set of a workspace, and what is measured on it: the one place both faces ask.

Drawn from the human-verified real queries (`ensure`): a seeded share of them when it is first
fixed, then, before each later round trains, the same share of the verified queries no model was
trained on yet (`record_trained` keeps the list). Split into a development fold (it
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
HELD_OUT_POINTER, DRAWN = "held_out", "drawn"  # set when the loop drew the held-out set (it may grow)


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
        Dropped, not moved to the eval split: a query that was trained on never joins the held-out set.
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

    def ensure(self, in_round: int | None = None) -> int:
        """Fix the held-out set, or grow it by `in_round`'s newly verified queries; then keep
        training off it. Returns the queries added now.

        First call: a seeded share (`eval_fraction`, within `eval_min`..`eval_max`) of the
        human-verified real queries, each with all its accepted pairs. Later calls with `in_round`
        (the train step, before it writes its snapshot) add the same share of the verified queries
        that no training snapshot held (`record_trained`): no model was trained on them. So the promotion set
        grows with the reviews (a fixed one of 10-20 queries cannot resolve a +0.02 gain), and each
        model is judged on queries it never saw. A query is matched by `query_key` (case, spacing
        and trailing punctuation do not make it another query), so every form of a held-out query
        goes to the eval split. A set the loop did not draw (an imported eval or test split) never
        changes. Each call then drops the training pairs and open cards of held-out queries, with
        the reason.
        """
        n = 0
        if not self.store.scalar("SELECT count(*) FROM pairs WHERE status = 'accepted' AND split IN ('eval', 'test')"):
            n = self._hold_out()
        elif in_round is not None and self.store.pointer(HELD_OUT_POINTER) == DRAWN:
            n = self._grow(in_round)
        self.drop_training_pairs()
        return n

    def _verified(self, untrained: bool = False) -> tuple[dict[str, str], bool]:
        """The human-verified queries still in training, as query key -> its first form (anchor
        order): the real ones (imported, logged or typed by a reviewer; never an offline synthetic
        query), or, when there is none and not `untrained`, the LLM-written ones a reviewer
        accepted (then True). `untrained`: only the queries no training snapshot held."""
        rows = self.store.execute(
            "SELECT DISTINCT anchor, source = 'seed' OR query_id IS NOT NULL OR origin = 'review:edit' AS real, "
            "coalesce(json_extract_string(meta, '$.generator'), '') LIKE 'llm:%' AS llm "
            "FROM pairs WHERE status = 'accepted' AND split = 'train' AND positive_id IS NOT NULL "
            "AND (source IN ('seed', 'edited') OR pair_id IN (SELECT pair_id FROM decisions WHERE action IN "
            "('accept', 'mark'))) ORDER BY anchor"
        ).fetchall()
        anchors = [a for a, real, _ in rows if real]
        llm = not anchors and not untrained and any(is_llm for _, _, is_llm in rows)
        if llm:
            anchors = [a for a, _, is_llm in rows if is_llm]
        queries: dict[str, str] = {}
        for a in anchors:
            queries.setdefault(query_key(a), a)
        if untrained:
            trained = {query_key(a) for (a,) in self.store.execute("SELECT anchor FROM trained_queries").fetchall()}
            queries = {k: a for k, a in queries.items() if k not in trained}
        return queries, llm

    def record_trained(self, anchors: list[str], in_round: int) -> None:
        """The queries of a training snapshot: none of them may join the held-out set later."""
        self.store.execute("INSERT OR IGNORE INTO trained_queries (anchor, round) "
                           "SELECT DISTINCT unnest(?::VARCHAR[]), ?", [anchors, in_round])

    def _move(self, chosen: set[str]) -> None:
        """The accepted training pairs of these query keys go to the eval split. Their open cards
        (a logged query proposes several passages) are dropped next, by `drop_training_pairs`: an
        answer would be a training label for an evaluation query."""
        moved = [pid for pid, a in self.store.execute(
            "SELECT pair_id, anchor FROM pairs WHERE status = 'accepted' AND split = 'train'").fetchall()
            if query_key(a) in chosen]
        self.store.execute("UPDATE pairs SET split = 'eval', updated_at = current_timestamp "
                           "WHERE pair_id IN (SELECT unnest(?::VARCHAR[]))", [moved])

    def _hold_out(self) -> int:
        """Hold out a seeded share of the verified real queries (LLM-written ones only when nothing
        else exists, said in the log)."""
        queries, llm = self._verified()
        if llm:
            self.log("No verified real queries yet: holding out LLM-generated queries a reviewer accepted. The "
                     "figures measure how well the model finds passages for the LLM's questions; import real "
                     "queries with their answers (`embedloop pairs import --split eval`) for a truer measure.")
        need = 2 * self.config.eval_min
        if len(queries) < need:
            raise RoundError(
                f"Only {len(queries)} human-verified real queries exist; at least {need} are needed to hold out an "
                f"evaluation set (offline synthetic queries never count). Import labelled pairs (`embedloop pairs "
                f"import`), add a query log (`embedloop queries import`) and review its cards."
            )
        n = min(self.config.eval_max, max(self.config.eval_min, round(len(queries) * self.config.eval_fraction)))
        self._move({query_key(a) for a in random.Random(self.config.seed).sample(list(queries.values()), n)})
        self.store.set_pointer(HELD_OUT_POINTER, DRAWN)
        dev, _ = self.folds()
        self.log(f"Held out {n} human-verified queries as the evaluation set ({len(dev)} of them the development "
                 f"fold that chooses the checkpoint and the WiSE-FT weight); each later round adds "
                 f"{self.config.eval_fraction:.0%} of the queries verified since the last training.")
        return n

    def _grow(self, in_round: int) -> int:
        """Add a seeded share of the verified queries no model was trained on, before `in_round` trains."""
        queries, _ = self._verified(untrained=True)
        n = min(self.config.eval_max - len(held_out_keys(self.store)), round(len(queries) * self.config.eval_fraction))
        if n <= 0:
            return 0
        rng = random.Random(f"{self.config.seed}:{in_round}")
        self._move({query_key(a) for a in rng.sample(list(queries.values()), n)})
        dev, promotion = self.folds()
        self.log(f"Added {n} of the {len(queries)} verified queries not yet trained on to the held-out set: "
                 f"now {len(dev) + len(promotion)} queries, {len(promotion)} of them judging promotion.")
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
