"""The one place that trains: the sentence-transformers trainer, run in a subprocess.

The process that owns DuckDB never trains. It exports a snapshot of the inputs into a run
directory, starts this module as a subprocess and polls files; the subprocess never opens DuckDB.

    parent (owner process)                         child: python -m loop.train RUN_DIR
    write_snapshot(run_dir, train, eval, cfg)      reads config.json, train.jsonl, eval.jsonl
    proc = start(run_dir)                          trains; appends progress.jsonl
    read_progress(run_dir) / request_stop(run_dir) checkpoints/checkpoint-N (one per epoch, best 3 kept)
    read_result(run_dir) -> dict | None            model/ (the best checkpoint) and result.json

The trainer uses the configured `device` only; with `train_devices` N > 1 (asked for, never
assumed), `start` launches `torchrun --nproc_per_node N` on the same entry; the trainer then runs
DDP (effective batch = N x batch_size, stated in result.json), and only rank 0 writes progress
and results.

Run directory:
    config.json      TrainConfig            snapshot.json  data hash and counts
    train.jsonl      {anchor, positive[, negative]} per line; eval.jsonl likewise
    progress.jsonl   one JSON event per line (see `RunMonitor`)
    STOP             created by `request_stop`: training stops at the next step
    checkpoints/     trainer checkpoints; a restart resumes from the last complete one
    model/           the final (best by eval loss) model, when status is ok or stopped
    result.json      {status, reason, model_dir, best_checkpoint, best_eval_loss, train_seconds,
                      steps, pairs_per_second, ...}; written last, atomically
    train.log        the subprocess's stdout and stderr

Fault hook for tests (EMBEDLOOP_TRAIN_FAULT, comma-separated `key=value`):
    nan_at_step=N        the training loss of step N becomes NaN
    oom_at_step=N        step N raises torch.OutOfMemoryError("CUDA out of memory ...")
    disk_full_at_step=N  saving at step >= N raises OSError(ENOSPC)
    sleep_per_step=S     sleep S seconds after each step (makes kill/stop tests deterministic)
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loop.errors import ConfigError, EmbedloopError, InputError
from loop.wise import DEV_FILE

# Models load from local paths; nothing may reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent

CONFIG_FILE = "config.json"
TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"
SNAPSHOT_FILE = "snapshot.json"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
STOP_FILE = "STOP"
LOG_FILE = "train.log"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
FAULT_ENV = "EMBEDLOOP_TRAIN_FAULT"
_SECRET_ENV = frozenset({"OPENAI_API_KEY", "EMBEDLOOP_LLM_API_KEY"})


class TrainConfig(BaseModel):
    """Hyper-parameters of one training run. Unknown keys are an error.

    Defaults are for small domain data (a few hundred to a few thousand pairs) and are a
    starting point to tune by experiment:
      - lr 3e-5, 3 epochs, batch 32: small data gives only tens of optimizer steps, so a rate in
        the middle of the usual 2e-5..5e-5 band; 3 epochs give three checkpoints to pick the best
        from by eval loss. Batch 32 keeps 31 in-batch negatives per anchor while still giving
        ~10 steps per epoch at 300 pairs (64 would leave ~5).
      - warmup 10% and weight decay 0.01: the usual fine-tuning values, they damp the first
        large updates that can wreck a good base model.
      - max_seq_length 128 while training: passages are chunked to the model's own limit (256 for
        MiniLM), and training on their first 128 tokens costs about half the time and a third of
        the memory (bench/README.md); the saved model still encodes up to its own limit.
      - eval_fraction 0.1: only used when no eval rows are given to `write_snapshot`.
    """

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, description="Local path of the model to fine-tune.")
    loss: Literal["mnrl", "cached_mnrl", "gist"] = Field(
        default="mnrl",
        description="mnrl: in-batch negatives; cached_mnrl: the same with GradCache (big batches in "
        "little memory); gist: in-batch negatives filtered by a guide model (the base model).",
    )
    matryoshka_dims: list[int] | None = Field(
        default=None, description="Wrap the loss in MatryoshkaLoss at these dims (the full dim is always added)."
    )
    epochs: int = Field(default=3, ge=1, le=100)
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many steps (smoke runs).")
    batch_size: int = Field(default=32, ge=2, description="Per device; in-batch negatives = batch_size - 1.")
    mini_batch_size: int = Field(default=32, ge=1, description="cached_mnrl only: forward chunk size.")
    memory_budget_mb: int | None = Field(
        default=None, ge=16,
        description="Activation memory one step may hold. When a whole mnrl batch would need more, the loss "
        "becomes cached_mnrl (same gradients, GradCache) with the largest micro-batch that fits. None = "
        "min(2048, RAM / 8) on a CPU, 60% of the GPU's free memory on CUDA.",
    )
    learning_rate: float = Field(default=3e-5, gt=0, le=1e-2)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    max_seq_length: int | None = Field(
        default=128, ge=8,
        description="Tokens per text while training (longer texts are cut); None = the model's own limit. The "
        "saved model keeps its own limit for encoding. 128 is what all-MiniLM-L6-v2 was trained at.",
    )
    seed: int = 42
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps (the workspace's `device`).")
    train_devices: int = Field(
        default=1, ge=1, description="CUDA devices to train on (DDP via torchrun); only used when asked for."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on a CUDA GPU that supports it, else fp16 on CUDA, fp32 on CPU."
    )
    eval_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="Held out when no eval rows are given.")
    wise_grid: list[float] = Field(
        default=[0.25, 0.5, 0.75, 1.0], min_length=1,
        description="WiSE-FT weights (loop/wise.py): the model saved is (1-a)*base + a*tuned with the a of this grid "
        "that scores best on the development fold (dev.json); [1.0] = the tuned weights as they are.")
    save_total_limit: int = Field(default=3, ge=1, description="Checkpoints kept (the best is always kept).")
    dataloader_num_workers: int = Field(default=0, ge=0, description="Keep 0: workers froze on the GPU machine.")
    logging_steps: int | None = Field(default=None, ge=1, description="None = about 50 points per run, at most 10 apart.")

    @field_validator("matryoshka_dims")
    @classmethod
    def _dims(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v or any(d <= 0 for d in v):
            raise ValueError("matryoshka_dims must be a non-empty list of positive integers, e.g. [384, 256, 128, 64]")
        return sorted(set(v), reverse=True)

    @field_validator("wise_grid")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= a <= 1.0 for a in v):
            raise ValueError(f"every WiSE-FT weight must lie in 0..1 (0 = the base model, 1 = the tuned one), got {v}")
        return sorted(set(v))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("device must be one of auto, cpu, cuda, cuda:N, mps")
        return v

    @model_validator(mode="after")
    def _devices(self) -> TrainConfig:
        if self.train_devices > 1 and self.device not in ("auto", "cuda"):
            raise ValueError(f"train_devices {self.train_devices} needs device auto or cuda (not {self.device})")
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Validate `data`; raises ConfigError that names every bad key."""
        try:
            return cls(**dict(data))
        except ValidationError as e:
            problems = []
            for err in e.errors():
                key = ".".join(str(p) for p in err["loc"]) or "?"
                if err["type"] == "extra_forbidden":
                    problems.append(f"{key}: unknown setting (known: {', '.join(cls.model_fields)})")
                else:
                    problems.append(f"{key}: {err['msg']}")
            raise ConfigError(f"Invalid training config: {'; '.join(problems)}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"{p} is missing: call write_snapshot before starting a run.") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid JSON ({e}).") from e
        return cls.from_dict(data)


# --- snapshot (parent side) -----------------------------------------------------------------


def _row_text(row: Any, *names: str) -> str | None:
    for name in names:
        v = row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)
        if v is not None:
            return str(v)
    return None


def _clean_rows(rows: Iterable[Any], split: str) -> list[dict[str, str]]:
    """Rows as {anchor, positive[, negative][, exclude]}; accepts dicts or `Pair` records (positive_text ...).

    `exclude` lists texts known to answer the row's anchor (its other positives): they are never
    drawn as its negative and never share its batch.
    """
    out = []
    for i, row in enumerate(rows, start=1):
        anchor = _row_text(row, "anchor")
        positive = _row_text(row, "positive", "positive_text")
        negative = _row_text(row, "negative", "negative_text")
        if not anchor or not anchor.strip():
            raise InputError(f"{split} row {i}: anchor is empty.", line=i)
        if not positive or not positive.strip():
            raise InputError(f"{split} row {i}: positive is empty.", line=i)
        rec: dict[str, Any] = {"anchor": anchor, "positive": positive}
        if negative and negative.strip():
            rec["negative"] = negative
        exclude = row.get("exclude") if isinstance(row, Mapping) else None
        if exclude:
            rec["exclude"] = sorted({str(t) for t in exclude} - {positive})
        out.append(rec)
    return out


def _fill_negatives(rows: list[dict[str, str]], with_negative: bool, rng: random.Random) -> int:
    """Make the negative column all-or-nothing: a dataset column cannot have holes.

    A missing negative becomes another row's positive: exactly the kind of negative the loss
    already sees in-batch, so it adds no wrong signal; never the row's own positive, a positive of
    the same anchor, or a text in its `exclude`. Returns how many were filled.
    """
    positives = sorted({r["positive"] for r in rows})
    known: dict[str, set[str]] = {}
    for r in rows:
        known.setdefault(r["anchor"], set()).update([r["positive"], *r.get("exclude", ())])
    filled = 0
    for rec in rows:
        if not with_negative:
            rec.pop("negative", None)
        elif "negative" not in rec:
            taboo = known[rec["anchor"]]
            for _ in range(20):  # a few draws at most: positives are mostly of other anchors
                negative = rng.choice(positives)
                if negative not in taboo:
                    break
            else:
                allowed = [p for p in positives if p not in taboo]
                if not allowed:
                    raise InputError("Cannot fill a missing negative: every positive answers the same query.")
                negative = rng.choice(allowed)
            rec["negative"] = negative
            filled += 1
    return filled


def _jsonl_bytes(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_snapshot(
    run_dir: str | Path,
    train_rows: Iterable[Any],
    eval_rows: Iterable[Any] | None,
    config: TrainConfig | Mapping[str, Any],
    dev: Any = None,
) -> str:
    """Write a run's inputs as files: train.jsonl, eval.jsonl, config.json, snapshot.json.

    Args:
        run_dir: the run directory (created).
        train_rows: dicts with anchor, positive, optional negative (or `Pair` records).
        eval_rows: the explicit eval set; None or empty = hold out `config.eval_fraction` of
            train_rows (seeded, so the same inputs give the same split).
        config: a TrainConfig or a dict for one.
        dev: the development fold as a `wise.DevTask` (dev.json): the WiSE-FT weight is chosen on it.

    Hard negatives: if any train row has one, every row (train and eval) gets one, a missing
    one being another row's positive; if none has, eval negatives are dropped too, so train
    and eval losses stay comparable.

    Returns:
        The sha256 data snapshot hash over train.jsonl and eval.jsonl (stable for the same inputs).

    Raises:
        ConfigError: bad config, or base_model is not a local folder.
        InputError: an empty anchor/positive, or too few rows to train and evaluate.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if not Path(cfg.base_model).is_dir():
        raise ConfigError(f"base_model {cfg.base_model} is not a local folder. Models load from local paths only.")
    train = _clean_rows(train_rows, "train")
    evals = _clean_rows(eval_rows, "eval") if eval_rows is not None else []
    if not evals:
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(2, round(len(train) * cfg.eval_fraction))
        held = set(order[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    if len(train) < 2 or len(evals) < 2:
        raise InputError(
            f"Too few pairs to train: {len(train)} train and {len(evals)} eval (need at least 2 of each; "
            f"a useful run needs a few hundred). Add or accept more pairs."
        )
    with_negative = any("negative" in r for r in train)
    rng = random.Random(cfg.seed)
    filled = _fill_negatives(train, with_negative, rng) + _fill_negatives(evals, with_negative, rng)

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    train_bytes, eval_bytes = _jsonl_bytes(train), _jsonl_bytes(evals)
    dev_bytes = dev.model_dump_json().encode() if dev is not None else b""
    h = hashlib.sha256()
    for name, data in ((TRAIN_FILE, train_bytes), (EVAL_FILE, eval_bytes), *(((DEV_FILE, dev_bytes),) if dev_bytes else ())):
        h.update(f"{name}\n{len(data)}\n".encode())
        h.update(data)
    digest = h.hexdigest()
    config_bytes = json.dumps(cfg.model_dump(mode="json"), indent=2).encode()
    if any((run / CHECKPOINTS_DIR).glob("checkpoint-*")):
        # A restart resumes from these checkpoints: they must belong to exactly these inputs.
        try:
            same = (json.loads((run / SNAPSHOT_FILE).read_text())["data_hash"] == digest
                    and (run / CONFIG_FILE).read_bytes() == config_bytes)
        except (OSError, ValueError, KeyError):
            same = False
        if not same:
            raise ConfigError(
                f"{run} already holds checkpoints of another snapshot or config; write this one to a new run directory."
            )
    _atomic_write(run / TRAIN_FILE, train_bytes)
    _atomic_write(run / EVAL_FILE, eval_bytes)
    if dev_bytes:
        _atomic_write(run / DEV_FILE, dev_bytes)
    else:
        (run / DEV_FILE).unlink(missing_ok=True)
    _atomic_write(run / CONFIG_FILE, config_bytes)
    snapshot = {
        "data_hash": digest,
        "n_train": len(train),
        "n_eval": len(evals),
        "negatives": with_negative,
        "filled_negatives": filled,
        "n_dev_queries": len(dev.queries) if dev is not None else 0,
    }
    _atomic_write(run / SNAPSHOT_FILE, json.dumps(snapshot, indent=2).encode())
    return digest


# --- parent-side helpers --------------------------------------------------------------------


def _device_env(device: str) -> dict[str, str]:
    """The environment that pins the trainer to the configured device: `cpu` hides every GPU,
    `cuda:N` shows only GPU N (the trainer then sees it as cuda:0)."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    return {}


def command(run_dir: str | Path, nproc: int = 1) -> list[str]:
    """The command line `start` runs: plain python for one device, torchrun for several."""
    run = str(Path(run_dir).resolve())
    if nproc > 1:
        # `python -m torch.distributed.run` is torchrun; --standalone picks a free rendezvous port.
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "loop.train", run]
    return [sys.executable, "-m", "loop.train", run]


def start(run_dir: str | Path, *, env: Mapping[str, str] | None = None, nproc: int | None = None) -> subprocess.Popen:
    """Start (or restart, resuming from the last checkpoint) training on `run_dir`.

    Args:
        run_dir: a directory prepared by `write_snapshot`.
        env: extra environment variables for the subprocess (e.g. EMBEDLOOP_TRAIN_FAULT).
        nproc: processes to launch; None = the config's `train_devices` (torchrun when > 1).

    Returns:
        The Popen of the training process (its own session; output goes to run_dir/train.log).
    """
    run = Path(run_dir).resolve()
    if not (run / CONFIG_FILE).exists():
        raise ConfigError(f"{run} has no {CONFIG_FILE}: call write_snapshot before start.")
    pid = running_pid(run)
    if pid is not None:
        raise EmbedloopError(
            f"A training process (pid {pid}) is already running on {run}: wait for it, or call request_stop first."
        )
    # A restart is a fresh attempt: a stale stop request or result must not end it at once.
    for name in (STOP_FILE, RESULT_FILE):
        (run / name).unlink(missing_ok=True)
    cfg = TrainConfig.from_file(run / CONFIG_FILE)
    n = nproc if nproc is not None else cfg.train_devices
    # The trainer never calls the LLM: it does not inherit the key (least privilege; a crash
    # report or a library that dumps its environment cannot leak what it never had).
    child_env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
    child_env.update(_device_env(cfg.device))
    child_env.update(env or {})
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p)
    with open(run / LOG_FILE, "ab") as log:
        return subprocess.Popen(
            command(run, max(1, n)),
            cwd=run,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a UI reload or Ctrl-C in the owner does not kill training
        )


def read_progress(run_dir: str | Path) -> list[dict]:
    """All progress events so far. A torn line (the writer was killed mid-write) is skipped."""
    path = Path(run_dir) / PROGRESS_FILE
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


def read_result(run_dir: str | Path) -> dict | None:
    """The run's result.json, or None while it is running (or if it died without one)."""
    try:
        data = json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def request_stop(run_dir: str | Path) -> None:
    """Ask a run to stop after its current step; it keeps its best checkpoint (status "stopped")."""
    (Path(run_dir) / STOP_FILE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"), encoding="utf-8")


def running_pid(run_dir: str | Path) -> int | None:
    """The pid of a live trainer of `run_dir` (from its latest start event), else None."""
    run = str(Path(run_dir).resolve())
    starts = [e for e in read_progress(run) if e.get("event") == "start"]
    pid = starts[-1].get("pid") if starts else None
    if not isinstance(pid, int) or not is_running(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid  # not Linux: trust the liveness check
    return pid if run.encode() in cmdline else None


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return Path("/proc/self").exists() is False  # not Linux: signal 0 is all we can ask
    except OSError:
        return True
    return not stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


def is_running(pid: int) -> bool:
    """Whether `pid` is a live training process (not a zombie, not a reused pid of another program)."""
    if not pid_alive(pid):
        return False
    try:
        return b"loop.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # not Linux: trust the liveness check
    except OSError:
        return False


# --- child side -----------------------------------------------------------------------------


@dataclass
class Faults:
    """Injected faults for tests; parsed from EMBEDLOOP_TRAIN_FAULT."""

    nan_at_step: int | None = None
    oom_at_step: int | None = None
    disk_full_at_step: int | None = None
    sleep_per_step: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Faults:
        faults = cls()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, _, value = item.partition("=")
            if key not in cls.__dataclass_fields__ or not value:
                raise ConfigError(
                    f"{FAULT_ENV}: bad item {item!r}; use key=value with key one of "
                    f"{', '.join(cls.__dataclass_fields__)}."
                )
            setattr(faults, key, float(value) if key == "sleep_per_step" else int(value))
        return faults


class _Watch:
    """State shared by the trainer (which sees each loss) and the callback (which may stop)."""

    def __init__(self, faults: Faults, poll_every: int = 1):
        self.faults = faults
        self.poll_every = poll_every  # steps between reads of the loss (a read waits for a GPU)
        self.last_loss = None  # detached tensor of the latest training step
        self.first_bad = None  # on a GPU: tensor [step, loss] of the first non-finite loss, step -1 if none
        self.step = 0  # the step being computed
        self.nonfinite: tuple[int, str] | None = None  # (step, "NaN" | "inf")
        self.stop_requested = False

    def record(self, loss: Any, step: int) -> None:
        """Keep a step's loss without waiting for the device that computes it."""
        self.last_loss = loss.detach()
        if self.last_loss.is_cuda:
            import torch

            if self.first_bad is None:
                self.first_bad = torch.tensor([-1.0, 0.0], device=self.last_loss.device)
            # torch.full, not torch.tensor(step, device=...): a host-to-GPU copy waits for the GPU.
            now = torch.stack([torch.full((), float(step), device=self.last_loss.device), self.last_loss.float()])
            first = (self.first_bad[0] < 0) & ~torch.isfinite(self.last_loss)
            self.first_bad = torch.where(first, now, self.first_bad)

    def read(self) -> float | None:
        """The latest loss as a float; notes the first non-finite one (this waits for the device)."""
        if self.last_loss is None:
            return None
        if self.first_bad is not None and self.nonfinite is None:
            step, value = (float(x) for x in self.first_bad.tolist())
            if step >= 0:
                self.nonfinite = (int(step), "inf" if math.isinf(value) else "NaN")
        loss = float(self.last_loss)
        if not math.isfinite(loss) and self.nonfinite is None:
            self.nonfinite = (self.step, "inf" if math.isinf(loss) else "NaN")
        return loss


class _Progress:
    """Appends one JSON event per line; only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        if enabled and path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a killed run tore its last line: end it so ours parse
                    f.write(b"\n")

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "step": None, "max_steps": None, "epoch": None, "loss": None,
               "learning_rate": None, "eta_seconds": None, "time": time.time()}
        rec.update(fields)
        line = json.dumps({k: _finite(v) for k, v in rec.items()}, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def _finite(v: Any) -> Any:
    """JSON has no NaN: non-finite floats become null (the reason field says what happened)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _last_complete_checkpoint(ckpt_dir: Path, cleanup: bool) -> Path | None:
    """The newest checkpoint whose trainer_state.json (written last) is complete.

    A run killed while saving leaves a checkpoint without it, or with a torn one; with `cleanup`
    those are deleted, since resuming overwrites that step anyway and rotation would count them.
    """
    if not ckpt_dir.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for d in ckpt_dir.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        try:
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if cleanup:
                shutil.rmtree(d, ignore_errors=True)
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return best[1] if best else None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"not valid JSON ({e})", path=path, line=i) from e
    return rows


def _dataset(rows: list[dict]):
    from datasets import Dataset

    # Column order matters to the losses: anchor, positive, then the negative.
    cols = ["anchor", "positive"] + (["negative"] if rows and "negative" in rows[0] else [])
    return Dataset.from_dict({c: [r[c] for r in rows] for c in cols})


def _resolve_precision(precision: str, cuda: bool) -> str:
    import torch

    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"precision {precision} needs a CUDA GPU and none is visible; use auto or fp32.")
    return precision


def activation_mb_per_text(config: Any, seq_len: int) -> float:
    """What one text of `seq_len` tokens holds for the backward pass of a BERT-like encoder, in MB:
    per layer about 14 hidden-size tensors and 3 attention maps (scores, softmax, dropout mask).
    MiniLM-L6 at 128 tokens: ~31 MB (measured: a batch of 32 triplets peaked 3.2 GB over the model)."""
    hidden = getattr(config, "hidden_size", 768)
    heads = getattr(config, "num_attention_heads", 12)
    layers = getattr(config, "num_hidden_layers", 12)
    return layers * seq_len * (hidden * 4 * 14 + heads * seq_len * 4 * 3) / 2**20


def micro_batch(batch_size: int, columns: int, per_text_mb: float, budget_mb: float) -> int | None:
    """The micro-batch (texts of one column embedded at a time) that keeps a step's activations in
    `budget_mb`; None when the whole batch of every column fits (plain MNRL)."""
    if batch_size * columns * per_text_mb <= budget_mb:
        return None
    return max(1, min(batch_size, int(budget_mb // per_text_mb)))


def _memory_budget_mb(cfg: TrainConfig, cuda: bool) -> float:
    if cfg.memory_budget_mb:
        return float(cfg.memory_budget_mb)
    if cuda:
        import torch

        return torch.cuda.mem_get_info()[0] / 2**20 * 0.6
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 if hasattr(os, "sysconf") else 16384
    return min(2048.0, ram / 8)


def _build_loss(cfg: TrainConfig, model, device: str, world_size: int, micro: int | None = None):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    # Under DDP, gather embeddings so every anchor sees the negatives of all devices.
    gather = world_size > 1
    if cfg.loss == "mnrl" and micro is None:
        loss = losses.MultipleNegativesRankingLoss(model, gather_across_devices=gather)
    elif cfg.loss in ("mnrl", "cached_mnrl"):  # mnrl whose batch does not fit in memory: the same loss, cached
        loss = losses.CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=micro or cfg.mini_batch_size, gather_across_devices=gather
        )
    else:
        guide = SentenceTransformer(cfg.base_model, device=device, trust_remote_code=False, local_files_only=True)
        guide.max_seq_length = model.max_seq_length
        guide.requires_grad_(False)
        loss = losses.GISTEmbedLoss(model, guide, gather_across_devices=gather)
    if cfg.matryoshka_dims:
        full = int(model.get_embedding_dimension())
        if cfg.matryoshka_dims[0] > full:
            raise ConfigError(
                f"matryoshka_dims {cfg.matryoshka_dims} exceed the model's dimension {full}; use dims <= {full}."
            )
        dims = sorted(set(cfg.matryoshka_dims) | {full}, reverse=True)
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss


def _find_oserror(exc: BaseException) -> bool:
    """Whether the exception (or its cause chain) is a disk-full error."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "os error 28" in str(e):  # safetensors wraps it
            return True
        e = e.__cause__ or e.__context__
    return False


def _explain(exc: BaseException, cfg: TrainConfig | None, step: int, run_dir: Path) -> str:
    """A failure reason that says how to fix it."""
    torch = sys.modules.get("torch")  # not imported when the failure came before any training
    oom = getattr(torch, "OutOfMemoryError", ()) if torch is not None else ()
    text = str(exc)
    if isinstance(exc, oom) or "out of memory" in text.lower():
        b = cfg.batch_size if cfg else "?"
        return (
            f"Out of GPU memory at step {step} (batch_size={b}): lower batch_size (e.g. {b // 2 if cfg else '?'}) "
            f"or max_seq_length, or use loss 'cached_mnrl' with a smaller mini_batch_size. ({text[:200]})"
        )
    if _find_oserror(exc):
        return (
            f"Disk full while saving at step {step} under {run_dir}: free disk space (or lower "
            f"save_total_limit), then restart the run; it resumes from the last complete checkpoint."
        )
    if isinstance(exc, (ConfigError, InputError)):
        return text
    return f"{type(exc).__name__} at step {step}: {text}"


class PretokenizedCollator:
    """Tokenises every text of a run once, then builds each batch from those rows.

    The stock collator tokenises every batch in the training loop's own thread, step after step and
    epoch after epoch; here a batch is an index into tensors made before training, trimmed to its
    longest row (so a batch of short texts stays short). The keys are the model's own
    (`model.preprocess`), named `{column}_{key}` as sentence-transformers' collator names them.
    """

    valid_label_columns: list[str] = []  # read by the trainer; these rows carry no label column

    def __init__(self, preprocess: Any, texts: Iterable[str], max_length: int, chunk: int = 4096):
        import torch

        unique = list(dict.fromkeys(texts))
        self.row = {t: i for i, t in enumerate(unique)}
        parts = [preprocess(unique[s : s + chunk], max_length=max_length) for s in range(0, len(unique), chunk)]
        width = max(p["attention_mask"].shape[1] for p in parts)
        self.tensors: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        for key, value in parts[0].items():
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                padded = [torch.nn.functional.pad(p[key], (0, width - p[key].shape[1])) for p in parts]
                self.tensors[key] = torch.cat(padded)
            else:
                self.extra[key] = value
        self.lengths = self.tensors["attention_mask"].sum(dim=1).tolist()

    def length(self, text: str) -> int:
        return self.lengths[self.row[text]]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch: dict[str, Any] = {}
        for column in features[0]:
            idx = torch.tensor([self.row[f[column]] for f in features])
            longest = max(1, int(max(self.lengths[i] for i in idx.tolist())))
            for key, value in self.tensors.items():
                batch[f"{column}_{key}"] = value[idx, :longest]
            for key, value in self.extra.items():
                batch[f"{column}_{key}"] = value
        return batch


def length_grouped_batches(values: list[tuple[str, ...]], lengths: list[int], batch_size: int, seed: int,
                           blocks: list[Iterable[str]] | None = None, group: int = 16) -> list[list[int]]:
    """One epoch of batches: similar lengths together (less padding), no text twice in a batch.

    Rows are shuffled, cut into groups of `group` batches, each group sorted by length; batches are
    filled in that order, a row whose text (anchor, positive or negative) is already in the batch
    waits for the next one (two positives of one query in a batch would be each other's false
    negative), nor beside a row holding one of its `blocks` (texts known to answer its query), and
    the batches are shuffled. At most ceil(n / batch_size) batches: rows left over by duplicates
    wait for the next epoch.
    """
    block = [set(b) for b in blocks] if blocks is not None else [set() for _ in values]
    rng = random.Random(seed)
    order = list(range(len(values)))
    rng.shuffle(order)
    span = batch_size * group
    ordered = [i for s in range(0, len(order), span) for i in sorted(order[s : s + span], key=lambda i: -lengths[i])]
    batches: list[list[int]] = []
    batch: list[int] = []
    seen: set[str] = set()
    blocked: set[str] = set()

    def add(j: int) -> bool:
        nonlocal batch, seen, blocked
        if not (seen.isdisjoint(values[j]) and seen.isdisjoint(block[j]) and blocked.isdisjoint(values[j])):
            return False
        batch.append(j)
        seen.update(values[j])
        blocked.update(block[j])
        if len(batch) == batch_size:
            batches.append(batch)
            batch, seen, blocked = [], set(), set()
        return True

    waiting: list[int] = []
    for i in ordered:
        if not add(i):
            waiting.append(i)
        if not batch and waiting:  # a new batch: the rows that waited go first
            waiting = [j for j in waiting if not add(j)]
    while waiting:
        if batch:
            batches.append(batch)
            batch, seen, blocked = [], set(), set()
        waiting = [j for j in waiting if not add(j)]
    if batch:
        batches.append(batch)
    batches = batches[: math.ceil(len(values) / batch_size)]
    rng.shuffle(batches)
    return batches


def _batch_sampler(dataset: Any, batch_size: int, drop_last: bool, valid_label_columns: Any = None,
                   generator: Any = None, seed: int = 0) -> Any:
    """The trainer's batch sampler; a module-level function so that the training args pickle."""
    return _make_classes()[2](dataset, batch_size=batch_size, drop_last=drop_last,
                              valid_label_columns=valid_label_columns, generator=generator, seed=seed)


@functools.cache
def _make_classes():
    """The callback and trainer classes; defined lazily so that importing this module (parent
    side: start, read_progress ...) does not import torch and transformers."""
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from transformers import TrainerCallback

    class LengthGroupedBatchSampler(DefaultBatchSampler):
        """`length_grouped_batches` as the trainer's batch sampler (seeded per epoch).

        `collator` gives token lengths; `blocks` maps an anchor to the texts known to answer it.
        """

        collator: PretokenizedCollator
        blocks: dict[str, list[str]]

        @functools.cached_property
        def _rows(self):
            """Each row's texts, its longest token length and its blocks: the same every epoch."""
            dataset = self.sampler  # BatchSampler's first argument: the dataset
            cols = [c for c in ("anchor", "positive", "negative") if c in dataset.column_names]
            data = [dataset[c] for c in cols]
            values = [tuple(col[i] for col in data) for i in range(len(dataset))]
            lengths = [max(self.collator.length(t) for t in v) for v in values]
            return values, lengths, [self.blocks.get(v[0], ()) for v in values]

        def __iter__(self):
            values, lengths, blocks = self._rows
            seed = (self.seed or 0) + getattr(self, "epoch", 0)
            yield from length_grouped_batches(values, lengths, self.batch_size, seed, blocks)

        def __len__(self) -> int:
            return math.ceil(len(self.sampler) / self.batch_size)

    class RunMonitor(TrainerCallback):
        """Writes progress events and stops training on a STOP file or a non-finite loss.

        Events (one JSON line each, all with event, step, max_steps, epoch, loss,
        learning_rate, eta_seconds, time): train_begin, step (at most every 0.5 s; loss is that
        step's), log (loss averaged over logging_steps), eval (eval_loss), epoch, checkpoint.
        Like every callback it changes only `control`.
        """

        def __init__(self, run_dir: Path, watch: _Watch, progress: _Progress, world_size: int):
            self.run_dir = run_dir
            self.watch = watch
            self.progress = progress
            self.world_size = world_size
            self.t0 = time.time()
            self.step0 = 0
            self.last_step_event = 0.0
            self.lr: float | None = None

        def _eta(self, state) -> float | None:
            done = state.global_step - self.step0
            if done <= 0 or not state.max_steps:
                return None
            return (time.time() - self.t0) / done * max(0, state.max_steps - state.global_step)

        def _emit(self, event: str, state, **fields: Any) -> None:
            base = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                    "learning_rate": self.lr, "eta_seconds": self._eta(state)}
            base.update(fields)
            self.progress.emit(event, **base)

        def _agree(self, args, *flags: bool) -> list[bool]:
            """Under DDP every rank must stop at the same step, or the others hang in a collective."""
            if self.world_size <= 1:
                return list(flags)
            import torch
            import torch.distributed as dist

            t = torch.tensor([float(f) for f in flags], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return [bool(x) for x in t.tolist()]

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.time()
            self.step0 = state.global_step
            self._emit("train_begin", state, resumed_from_step=state.global_step, world_size=self.world_size)

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            # The rate this step used: by on_step_end the scheduler has already moved on.
            if optimizer is not None:
                self.lr = float(optimizer.param_groups[0]["lr"])

        def on_step_end(self, args, state, control, **kwargs):
            if self.watch.faults.sleep_per_step:
                time.sleep(self.watch.faults.sleep_per_step)
            # On a GPU the loss is read every `poll_every` steps only: a read waits for the device.
            poll = state.global_step % self.watch.poll_every == 0 or state.global_step >= state.max_steps
            loss = self.watch.read() if poll else None
            nonfinite, stop = self._agree(args, self.watch.nonfinite is not None, (self.run_dir / STOP_FILE).exists())
            if nonfinite and self.watch.nonfinite is None:  # another rank's loss
                self.watch.nonfinite = (state.global_step, "NaN")
            if stop:
                self.watch.stop_requested = True
            if nonfinite or stop:
                control.should_training_stop = True
            now = time.time()
            if poll and (nonfinite or stop or now - self.last_step_event >= 0.5 or state.global_step >= state.max_steps):
                self.last_step_event = now
                self._emit("step", state, loss=loss)
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.watch.nonfinite:
                # The weights are now NaN: do not evaluate or checkpoint them.
                control.should_evaluate = False
                control.should_save = False
            self._emit("epoch", state)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if "loss" in logs:
                self._emit("log", state, **logs)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
            self._emit("eval", state, **metrics)

        def on_save(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._emit("checkpoint", state, path=str(path), best_checkpoint=state.best_model_checkpoint,
                       best_eval_loss=state.best_metric)

    class GuardedTrainer(SentenceTransformerTrainer):
        """Records each training loss for the callback, and injects the test faults."""

        watch: _Watch

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            training = model.training
            step = self.state.global_step + 1
            faults = self.watch.faults
            if training:
                self.watch.step = step
                if faults.oom_at_step == step:
                    import torch

                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory. Tried to allocate 2.00 GiB (injected by {FAULT_ENV})"
                    )
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if training:
                loss = out[0] if return_outputs else out
                if faults.nan_at_step == step:
                    loss = loss * float("nan")
                self.watch.record(loss, step)
                out = (loss, out[1]) if return_outputs else loss
            return out

        def _save(self, output_dir=None, state_dict=None):
            n = self.watch.faults.disk_full_at_step
            if n is not None and self.state.global_step >= n:
                raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_ENV})", output_dir)
            return super()._save(output_dir, state_dict)

    return RunMonitor, GuardedTrainer, LengthGroupedBatchSampler


def _peak_memory(torch: Any, cuda: bool) -> dict[str, float]:
    """This process's peak resident memory (and the GPU's peak allocation), in MB.

    Linux's VmHWM starts afresh at exec; `ru_maxrss` would also count the parent that forked us
    (it survives execve), so it is only the fallback elsewhere."""
    out: dict[str, float] = {}
    try:
        status = Path("/proc/self/status").read_text()
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        out["peak_rss_mb"] = round(kb / 1024, 1)
    except (OSError, StopIteration, ValueError):
        try:
            import resource

            out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        except ImportError:  # not a Unix
            pass
    if cuda:
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _write_result(run_dir: Path, result: dict, rank0: bool) -> None:
    """Rank 0 writes the result; another rank only records its own failure when none exists."""
    path = run_dir / RESULT_FILE
    data = json.dumps({k: _finite(v) for k, v in result.items()}, indent=2).encode()
    if rank0:
        _atomic_write(path, data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)  # fails if rank 0 already wrote one
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def main(run_dir: str | Path) -> int:
    """Train on a prepared run directory; the subprocess entry. Returns 0 unless the run failed."""
    run = Path(run_dir).resolve()
    if not run.is_dir():
        print(f"loop.train: {run} is not a directory; prepare it with write_snapshot.", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = rank == 0
    progress = _Progress(run / PROGRESS_FILE, enabled=rank0)
    progress.emit("start", pid=os.getpid(), world_size=world_size)
    ctx: dict[str, Any] = {"cfg": None, "trainer": None, "watch": None}
    result: dict[str, Any] = {
        "status": "failed", "reason": "", "model_dir": None, "best_checkpoint": None, "best_eval_loss": None,
        "train_seconds": 0.0, "steps": 0, "pairs_per_second": None, "world_size": world_size,
    }
    try:
        result.update(_train(run, ctx, progress, world_size))
    except BaseException as exc:  # noqa: BLE001 - every failure must leave a result behind
        if isinstance(exc, KeyboardInterrupt):
            result.update(status="stopped", reason="interrupted")
        else:
            if not isinstance(exc, (ConfigError, InputError)):  # those messages are complete
                traceback.print_exc()
            watch = ctx["watch"]
            result["reason"] = _explain(exc, ctx["cfg"], watch.step if watch else 0, run)
        trainer = ctx["trainer"]
        if trainer is not None:
            result["steps"] = trainer.state.global_step
            result["best_checkpoint"] = trainer.state.best_model_checkpoint
            result["best_eval_loss"] = trainer.state.best_metric
    progress.emit("end", step=result["steps"], status=result["status"], reason=result["reason"])
    _write_result(run, result, rank0)
    return 1 if result["status"] == "failed" else 0


def _train(run: Path, ctx: dict, progress: _Progress, world_size: int) -> dict:
    cfg = ctx["cfg"] = TrainConfig.from_file(run / CONFIG_FILE)
    faults = Faults.parse(os.environ.get(FAULT_ENV, ""))

    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

    from loop import wise
    from transformers import __version__ as tf_version
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    RunMonitor, GuardedTrainer, LengthGroupedBatchSampler = _make_classes()

    train_rows, eval_rows = _read_jsonl(run / TRAIN_FILE), _read_jsonl(run / EVAL_FILE)
    rank0 = progress.enabled
    resume = _last_complete_checkpoint(run / CHECKPOINTS_DIR, cleanup=rank0)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # Every core this process may use: torch counts the machine's, not the ones it is given.
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    precision = _resolve_precision(cfg.precision, cuda)
    # DDP drops the last uneven batch: cap per-device batches so tiny data still gives a step and
    # an eval batch on every device.
    train_bs = max(1, min(cfg.batch_size, len(train_rows) // world_size))
    eval_bs = max(1, min(cfg.batch_size, len(eval_rows) // world_size))
    steps_per_epoch = math.ceil(len(train_rows) / (train_bs * world_size))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    logging_steps = cfg.logging_steps or max(1, min(10, total // 50))
    watch = ctx["watch"] = _Watch(faults, poll_every=logging_steps if cuda else 1)
    warmup = {"warmup_steps": cfg.warmup_ratio} if int(tf_version.split(".")[0]) >= 5 else {"warmup_ratio": cfg.warmup_ratio}

    args = SentenceTransformerTrainingArguments(
        output_dir=str(run / CHECKPOINTS_DIR),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=train_bs,
        per_device_eval_batch_size=eval_bs,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        # Similar lengths per batch, no text twice in a batch (a duplicate is a false negative).
        batch_sampler=_batch_sampler,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_strategy="steps",
        logging_steps=logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must show, not be averaged away
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_pin_memory=cuda,
        # gloo for multi-process CPU runs; naming a backend in a single process would demand a process group
        ddp_backend="gloo" if world_size > 1 and not cuda else None,
        **warmup,
    )
    device = str(args.device)
    model = SentenceTransformer(cfg.base_model, device=device, trust_remote_code=False, local_files_only=True)
    seq_len = min(cfg.max_seq_length or model.max_seq_length, model.max_seq_length)
    t_tok = time.time()
    texts = (r[c] for rows in (train_rows, eval_rows) for r in rows for c in ("anchor", "positive", "negative") if c in r)
    collator = PretokenizedCollator(model.preprocess, texts, seq_len)
    LengthGroupedBatchSampler.collator = collator
    LengthGroupedBatchSampler.blocks = {r["anchor"]: r["exclude"] for r in train_rows + eval_rows if r.get("exclude")}
    progress.emit("loading", device=device, precision=precision, world_size=world_size,
                  n_train=len(train_rows), n_eval=len(eval_rows), batch_size=train_bs,
                  effective_batch_size=train_bs * world_size, learning_rate=cfg.learning_rate,
                  max_seq_length=seq_len, tokenize_seconds=round(time.time() - t_tok, 3),
                  resume_from=str(resume) if resume else None)
    per_text = activation_mb_per_text(model[0].auto_model.config, seq_len) if hasattr(model[0], "auto_model") else 0
    columns = 3 if train_rows and "negative" in train_rows[0] else 2
    micro = micro_batch(train_bs, columns, per_text, _memory_budget_mb(cfg, cuda)) if cfg.loss == "mnrl" else None
    loss = _build_loss(cfg, model, device, world_size, micro)

    trainer = GuardedTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(train_rows),
        eval_dataset=_dataset(eval_rows),
        loss=loss,
        data_collator=collator,
        callbacks=[RunMonitor(run, watch, progress, world_size)],
    )
    trainer.watch = watch
    ctx["trainer"] = trainer
    step0 = 0
    if resume:
        step0 = json.loads((resume / "trainer_state.json").read_text())["global_step"]
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = time.time() - t0
    state = trainer.state
    out: dict[str, Any] = {
        "best_checkpoint": state.best_model_checkpoint,
        "best_eval_loss": state.best_metric,
        "train_seconds": round(train_seconds, 3),
        "steps": state.global_step,
        "pairs_per_second": round((state.global_step - step0) * train_bs * world_size / max(train_seconds, 1e-9), 3),
        "resumed_from": str(resume) if resume else None,
        "device": device,
        "precision": precision,
        "batch_size": train_bs,
        "effective_batch_size": train_bs * world_size,
        "learning_rate": cfg.learning_rate,
        "max_seq_length": seq_len,
        "micro_batch_size": micro,
        **_peak_memory(torch, cuda),
    }
    if watch.nonfinite:
        step, kind = watch.nonfinite
        # The best checkpoint stays on disk; no model is published from a diverged run.
        return {**out, "status": "failed", "reason": f"loss became {kind} at step {step}: lower learning_rate "
                f"(now {cfg.learning_rate}) or use precision fp32; the best checkpoint is kept."}
    if watch.stop_requested and state.best_model_checkpoint is None:
        return {**out, "status": "stopped", "reason": "stop requested before the first checkpoint"}
    # load_best_model_at_end has put the best checkpoint's weights in `model`.
    task = wise.DevTask.read(run)
    if task is not None and cfg.wise_grid != [1.0] and rank0 and not watch.stop_requested:
        t_wise = time.time()
        progress.emit("wise", grid=cfg.wise_grid, n_dev_queries=len(task.queries))
        base = SentenceTransformer(cfg.base_model, device=device, trust_remote_code=False,
                                   local_files_only=True).state_dict()
        out["wise"] = {**wise.choose(model, base, task, cfg.wise_grid), "seconds": round(time.time() - t_wise, 2)}
        del base
    final, partial = run / MODEL_DIR, run / f"{MODEL_DIR}.partial"
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
    trainer.save_model(str(partial))
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    status, reason = ("stopped", "stop requested") if watch.stop_requested else ("ok", "")
    return {**out, "status": status, "reason": reason, "model_dir": str(final)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m loop.train RUN_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
