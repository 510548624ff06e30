"""The round state machine: generate -> select -> review -> train -> evaluate -> promote -> reindex -> done.

A round is a row in `rounds` whose `state` names the next step to run. Each step is idempotent:
it records its result in the round's manifest and advances the state in one place, so a crash
or a rerun picks up where the round stopped and never repeats paid or finished work. Training
runs in a subprocess on a snapshot of files (this process stays the only DuckDB writer); a
restarted train step resumes from the run's last checkpoint.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

from loop import indexing, train
from loop.candidates import Selection
from loop.verdicts import promotion_gate, resolution
from loop.embed import model_hash
from loop.errors import InputError, LeakageError, RoundError
from loop.evaluate import PRIMARY_METRIC, compare, compare_all
from loop.generate import needs_generation, run_generation
from loop.heldout import HELD_OUT_REASON, HeldOut
from loop.negatives import MiningPolicy
from loop.records import Manifest, ModelRef, Promotion, RoundRecord
from loop.routing import RoutingPolicy
from loop.training_data import TrainingData, search_ids
from loop.workspace import Workspace

__all__ = ["HELD_OUT_REASON", "STATES", "LeakageError", "LoopConfig", "RoundError", "Rounds", "loop_config"]

STATES = ["generate", "select", "review", "train", "evaluate", "promote", "reindex", "done"]
Log = Callable[[str], None]


class TrainOverrides(train.TrainConfig):
    """The `[loop.train]` table: TrainConfig keys, checked when the round settings load (not when
    training starts, after the review work). The round fills in base_model."""

    base_model: str = Field("", description="empty: the workspace's base model")

    @model_validator(mode="after")
    def _no_soup_member(self) -> TrainOverrides:
        if self.soup_with is not None:
            raise ValueError("soup_with is set by the round itself; set `soup = true` in [loop] instead")
        return self


class LoopConfig(BaseModel):
    """Knobs of a round. Defaults suit a team starting from a few hundred pairs."""

    model_config = ConfigDict(extra="forbid")

    review_budget: int = Field(200, ge=0, description="cards queued for review per round")
    k: int = Field(20, ge=2, description="top-k used to score candidates")
    generate_threshold: int = Field(1000, ge=0, description="generate while accepted train pairs are fewer")
    generate_max: int = Field(300, ge=0, description="synthetic pairs generated per round at most")
    mine_top: int = Field(1, ge=1, le=20, description="cards per logged query, one per passage of the active index's "
                          "top; 1 suffices: a card shows the model's top passages and the reviewer marks each that answers")
    review_pool: Literal["interleaved", "model"] = Field(
        "interleaved", description="the passages a logged query's card proposes and shows: the active model's top "
        "interleaved with BM25's (a reviewer can mark an answer the model misses: the labels that teach it most, "
        "and held-out queries on which a gain can show), or the model's top alone")
    domain: str = Field("", description="a sentence on the domain and its users, for the LLM prompt")
    eval_fraction: float = Field(0.3, gt=0, lt=1, description="share of the human-verified real queries held "
                                 "out (a development fold and a promotion set, see dev_share): first of all "
                                 "of them, then of those verified since the last training, each round")
    eval_min: int = Field(5, ge=1, description="queries held out at least (twice as many verified ones are needed)")
    eval_max: int = Field(300, ge=1, description="queries held out at most")
    dev_share: float = Field(0.35, ge=0, lt=1, description="share of the held-out queries in the development fold: "
                             "it chooses the checkpoint and the WiSE-FT weight; the rest decide promotion")
    promote_confidence: float = Field(
        0.9, gt=0.5, lt=1, description="promote when the bootstrap share of resamples in which the candidate beats the "
        "active model on the promotion set reaches this (0.975 = the 95% interval's lower bound above zero) and the "
        "sign-flip test agrees (promote_sign_flip); both chosen by bench.quality's gate calibration over 42 benchmark "
        "rounds, bench/README.md")
    promote_sign_flip: float | None = Field(
        0.1, gt=0, lt=1, description="also require the paired sign-flip test's one-sided p on the promotion set to "
        "be at most this (the bootstrap share grows overconfident on a handful of queries); None: the bootstrap "
        "share alone (TOML has no null: 0.999 leaves it to the bootstrap share)")
    soup: bool = Field(False, description="average each round's fine-tune with the previous round's (same base "
                       "model; its tuned weights recovered from its WiSE-FT mix) before WiSE-FT: a running "
                       "weight-space average of the rounds' fine-tunes (a model soup)")
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
        self.store = ws.store
        self.config = config or loop_config(ws.settings.loop)
        self.log = log or (lambda _msg: None)
        self.llm = llm
        self.train_env = train_env or {}
        self.heldout = HeldOut(ws, self.config, lambda m: self.log(m))
        self.data = TrainingData(ws, self.config, self.heldout)
        self.selection = Selection(ws, self.config, lambda m: self.log(m), self.heldout, self.data)

    # Round records ---------------------------------------------------------------------------
    def current(self) -> RoundRecord | None:
        """The open round (not done, not failed), if any."""
        rows = self.store.rows(
            "SELECT round, state, error, manifest FROM rounds WHERE state NOT IN ('done', 'failed') ORDER BY round DESC LIMIT 1"
        )
        return RoundRecord.from_row(rows[0]) if rows else None

    def open(self) -> RoundRecord:
        """The open round, or a new one."""
        r = self.current()
        if r:
            return r
        n = int(self.store.scalar("SELECT coalesce(max(round), 0) FROM rounds")) + 1
        manifest = Manifest(round=n, started=_now(), config=self.config.model_dump(mode="json"),
                            base_model=self._base_info())
        self.store.execute("INSERT INTO rounds (round, state, manifest) VALUES (?, 'generate', ?)",
                           [n, manifest.model_dump_json(exclude_none=True)])
        self.log(f"Round {n} opened.")
        return self.current()  # type: ignore[return-value]

    def _base_info(self) -> dict[str, Any]:
        row = self.store.rows("SELECT version, path, sha256 FROM model_versions WHERE version = ?", [self.ws.base_version])
        return row[0] if row else {"version": self.ws.base_version}

    def _save(self, r: RoundRecord, state: str | None = None, error: str | None = None) -> None:
        if state:
            r.state = state  # type: ignore[assignment]
        r.error = error  # the caller's record says what the stored one says
        self.store.execute(
            "UPDATE rounds SET state = ?, error = ?, manifest = ?, updated_at = current_timestamp WHERE round = ?",
            [r.state, error, r.manifest.model_dump_json(exclude_none=True), r.round],
        )

    def _step_done(self, r: RoundRecord, step: str, result: dict[str, Any], t0: float) -> None:
        result["seconds"] = round(time.monotonic() - t0, 2)
        r.manifest.steps[step] = result
        nxt = STATES[STATES.index(step) + 1]
        self._save(r, nxt)

    def fail(self, r: RoundRecord, reason: str) -> None:
        r.manifest.failure = reason
        self._save(r, "failed", reason)
        self.log(f"Round {r.round} failed: {reason}")

    # Driver -------------------------------------------------------------------------------
    def advance(self, until: str = "done", force: bool = False) -> RoundRecord:
        """Run steps of the open round (opening one if needed) until `until` is reached.

        `until="review"` stops once the review queue is filled. The review step passes only
        when this round's queue is empty (or `force`: pending cards stay for a later round).
        """
        if until not in STATES:
            raise InputError(f"until must be one of {', '.join(STATES)}")
        r = self.open()
        steps: dict[str, Callable[[RoundRecord], None]] = {
            "generate": self.generate, "select": self.select, "review": lambda rr: self.review_gate(rr, force),
            "train": self.train, "evaluate": self.evaluate, "promote": self.promote, "reindex": self.reindex,
        }
        while r.state not in ("done", "failed"):
            if STATES.index(r.state) >= STATES.index(until) or self.cancel.is_set():
                break
            before = r.state
            steps[before](r)
            if r.state == before:  # the step could not finish now (e.g. training stopped)
                break
        return r

    # Steps --------------------------------------------------------------------------------
    def generate(self, r: RoundRecord) -> None:
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
                                        [r.round]))
        if written:
            self.log(f"Generation already wrote {written} candidates for round {r.round}; not generating again.")
            self._step_done(r, "generate", {"recovered": True, "requested": wanted, "written": written}, t0)
            return
        who = f"LLM {self.llm.model}" if self.llm else "the offline generator (no LLM endpoint configured)"
        self.log(f"Generating up to {wanted} pairs with {who} ({accepted} accepted pairs so far)...")
        report = run_generation(
            self.store, lambda qs: search_ids(self.ws, qs, self.config.k), llm=self.llm, domain=self.config.domain,
            round=r.round, n=wanted, seed=self.config.seed + r.round,
        )
        self.log(f"Generated {report.generated}, kept {report.kept}, wrote {report.written} candidates.")
        self._step_done(r, "generate", report.model_dump(mode="json"), t0)

    def select(self, r: RoundRecord) -> None:
        t0 = time.monotonic()
        self._step_done(r, "select", self.selection.run(r.round), t0)

    def review_gate(self, r: RoundRecord, force: bool = False) -> None:
        pending = int(self.store.scalar("SELECT count(*) FROM pairs WHERE status = 'pending'"))
        if pending and not force:
            raise RoundError(
                f"{pending} cards are waiting for review. Review them in the app or with "
                f"`embedloop review apply FILE`, or pass --force to train without them."
            )
        decided = self.store.rows(
            "SELECT action, count(*) AS n FROM decisions d JOIN pairs p USING (pair_id) WHERE p.round = ? GROUP BY action",
            [r.round],
        )
        self._step_done(r, "review", {"pending_left": pending, "decisions": {d["action"]: d["n"] for d in decided}},
                        time.monotonic())

    # Training -----------------------------------------------------------------------------
    def run_dir(self, r: RoundRecord) -> Path:
        return self.ws.settings.runs_dir / f"round-{r.round:03d}"

    def train(self, r: RoundRecord, wait: bool = True, poll_s: float = 2.0) -> None:
        t0 = time.monotonic()
        run = self.run_dir(r)
        result = train.read_result(run)
        if result is None or result.get("status") != "ok":
            fresh = not (run / train.CONFIG_FILE).exists()
            # The held-out set grows by this round's newly verified queries only before the snapshot
            # is written: a resumed run trains on the rows it started with.
            self.heldout.ensure(r.round if fresh else None)
            self.heldout.baseline()  # benchmark first, always: stored before any training
            if fresh:
                rows = self.data.rows()
                overrides = self.config.train.model_dump(exclude_unset=True)
                cfg = {"device": self.ws.settings.device, **overrides,  # the workspace's device unless [loop.train] says
                       "base_model": overrides.get("base_model") or str(self.ws.settings.base_model_path)}
                if self.config.soup:
                    cfg["soup_with"] = self._soup_member(r, cfg["base_model"])
                # The checkpoint (eval loss) and the WiSE-FT weight are chosen on the development fold,
                # never on the promotion set; without a fold the trainer holds out a share of the rows.
                dev_pairs, task = self.data.dev_fold()
                self.heldout.record_trained([row["anchor"] for row in rows], r.round)  # first: a crash can't lose it
                digest = train.write_snapshot(run, rows, dev_pairs if len(dev_pairs) >= 2 else None, cfg, dev=task)
                r.manifest.data_snapshot = digest
                r.manifest.train_config = json.loads((run / train.CONFIG_FILE).read_text())
                self._save(r)
                self.log(f"Training on {len(rows)} pairs (snapshot {digest[:12]}) in {run}...")
            else:
                self.log(f"Resuming training in {run} from its last checkpoint...")
            handle = train.Run(run, self.store, f"train-{r.round}", env=self.train_env)
            if handle.start():  # a trainer outlived the process that started it: follow it, don't start another
                self.log(f"Following the training process {handle.pid} that is still running on {run}...")
            if not wait:
                return
            result = handle.follow(self._relay, self.cancel, poll_s)
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
        version = f"r{r.round}-{digest[:10]}"
        self.store.execute(
            "INSERT OR IGNORE INTO model_versions (version, path, parent, sha256, round, status) "
            "VALUES (?, ?, ?, ?, ?, 'candidate')",
            [version, str(model_dir), self.ws.base_version, digest, r.round],
        )
        r.manifest.model = ModelRef(version=version, path=str(model_dir), sha256=digest)
        early = (f" (stopped after {result.get('epochs_run', 0):g} of {result.get('epochs_planned')} epochs: "
                 f"the development fold's eval loss stopped improving)") if result.get("stopped_early") else ""
        self.log(f"Trained {version} in {result.get('train_seconds', 0):.0f}s{early}.")
        if result.get("soup"):
            self.log(f"Model soup: averaged with {result['soup']['version'] or result['soup']['path']}'s fine-tune "
                     f"before WiSE-FT.")
        w = result.get("wise")
        if w and w.get("fixed"):
            self.log(f"WiSE-FT: kept {w['alpha']:g} of the fine-tuning's change to the base weights "
                     f"(`[loop.train] wise_grid`, one weight).")
        elif w:
            self.log(f"WiSE-FT: kept {w['alpha']:g} of the fine-tuning's change to the base weights, the best of "
                     f"{', '.join(w['dev_ndcg@10'])} on the {w['n_dev_queries']} development-fold queries "
                     f"(NDCG@10 {', '.join(f'{v:.3f}' for v in w['dev_ndcg@10'].values())}).")
        self._step_done(r, "train", {k: result.get(k) for k in (
            "status", "steps", "epochs_run", "stopped_early", "train_seconds", "best_eval_loss", "pairs_per_second",
            "precision",
            "device", "world_size",
            "batch_size", "effective_batch_size", "learning_rate", "max_seq_length", "peak_rss_mb", "soup", "wise")},
            t0)

    def _soup_member(self, r: RoundRecord, base_model: str) -> dict[str, Any] | None:
        """The latest finished round's fine-tune to average with this round's (`[loop] soup`), or None
        (with the reason logged) when there is none that can be: another base model, a model no
        longer on disk, or one saved as the base itself (WiSE-FT weight 0)."""
        rows = self.store.rows("SELECT round, state, error, manifest FROM rounds WHERE round < ? AND state = 'done' "
                               "ORDER BY round DESC LIMIT 1", [r.round])
        prev = RoundRecord.from_row(rows[0]) if rows else None
        if prev is None or prev.manifest.model is None:
            return None
        m = prev.manifest
        alpha = float(((m.steps.get("train") or {}).get("wise") or {}).get("alpha", 1.0))
        why = ("it was trained from another base model" if (m.train_config or {}).get("base_model") != base_model
               else "its model directory is gone" if not Path(m.model.path, "modules.json").is_file()
               else "it was saved as the base model itself (WiSE-FT weight 0)" if alpha <= 0 else "")
        if why:
            self.log(f"Model soup: round {prev.round}'s fine-tune is not averaged in: {why}.")
            return None
        self.log(f"Model soup: this round's fine-tune will be averaged with round {prev.round}'s ({m.model.version}).")
        return {"path": m.model.path, "alpha": alpha, "version": m.model.version}

    def _relay(self, ev: dict[str, Any]) -> None:
        """A trainer's progress event, as a log line."""
        if ev.get("loss") is not None and ev.get("event") == "log":
            self.log(f"  step {ev.get('step')}/{ev.get('max_steps')} loss {ev['loss']:.4f} "
                     f"eta {ev.get('eta_seconds', 0):.0f}s")

    # Evaluation and promotion ----------------------------------------------------------------
    def evaluate(self, r: RoundRecord) -> None:
        t0 = time.monotonic()
        evalset = self.heldout.evalset()
        version = r.manifest.model.version
        base = self.heldout.report_for(self.ws.base_version, evalset)
        active = self.heldout.report_for(self.ws.active_model, evalset)
        cand = self.heldout.report_for(version, evalset)
        every = compare_all(base, cand)  # one resample of the queries for every metric's interval
        vs_base = every[PRIMARY_METRIC]
        vs_active = compare(active, cand)
        r.manifest.metrics = {"base": base.metrics, "active": active.metrics, "candidate": cand.metrics,
                                    "matryoshka": cand.matryoshka, "n_queries": cand.n_queries}
        r.manifest.vs_base = vs_base.model_dump()
        r.manifest.vs_base_by_metric = {m: c.model_dump() for m, c in every.items()}
        r.manifest.vs_active = vs_active.model_dump()
        self.log(f"NDCG@10: base {base.metrics['ndcg@10']:.4f}, active {active.metrics['ndcg@10']:.4f}, "
                 f"candidate {cand.metrics['ndcg@10']:.4f} (vs base {vs_base.delta:+.4f}, "
                 f"95% CI {vs_base.ci_low:+.4f}..{vs_base.ci_high:+.4f})")
        self._step_done(r, "evaluate", {"candidate": version}, t0)

    def promote(self, r: RoundRecord) -> None:
        t0 = time.monotonic()
        evalset = self.heldout.evalset()
        version = r.manifest.model.version
        cand, active = self.heldout.report_for(version, evalset), self.heldout.report_for(self.ws.active_model, evalset)
        res = resolution(active, cand)  # measured once: the gate's reasons and the manifest both quote it
        ok, reasons = promotion_gate(cand, active, min_delta=self.config.promote_min_delta,
                                     confidence=self.config.promote_confidence, res=res,
                                     sign_flip_max=self.config.promote_sign_flip)
        r.manifest.promotion = Promotion(promote=ok, reasons=reasons, confidence=self.config.promote_confidence,
                                         resolution={**res.model_dump(), "more_queries_for_0.02": res.more_queries()})
        for line in reasons:
            self.log(line)
        self._step_done(r, "promote", {"promoted": ok}, t0)
        if not ok:  # the candidate stays a candidate; nothing is re-indexed
            r.manifest.finished = _now()
            self._save(r, "done")

    def reindex(self, r: RoundRecord) -> None:
        t0 = time.monotonic()
        version = r.manifest.model.version
        # A rerun after a crash between the switch and the step record finds the switch done.
        if self.ws.active_model != version:
            emb = self.ws.embedder(version)
            self.log(f"Re-indexing the corpus with {version}...")
            name = indexing.build(self.store, self.ws.index, emb, precomputed=self.heldout.corpus_vectors(version))
            r.manifest.previous_model = self.ws.active_model  # the switch below replaces it
            self._save(r)
            indexing.activate(self.store, name)
        name = self.store.pointer(indexing.ACTIVE_INDEX)  # activate also set the models' status, in one go
        old = r.manifest.previous_model  # None only in a round stopped here by an earlier version
        r.manifest.collection = name
        r.manifest.finished = _now()
        kept = indexing.collection_for(self.store, old) if old else "the previous index"
        self.log(f"Index {name} verified and active; {kept} kept for rollback.")
        self._step_done(r, "reindex", {"collection": name, "previous_model": old}, t0)
