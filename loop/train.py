"""Training, parent side: the run directory's contract and control of the trainer process.

The process that owns DuckDB never trains. It exports a snapshot of the inputs into a run
directory, starts the trainer (loop/trainer.py) as a subprocess and polls files; the subprocess
never opens DuckDB. Importing this module imports no torch.

    parent (owner process): this module            child: python -m loop.trainer RUN_DIR
    write_snapshot(run_dir, train, eval, cfg)      reads config.json, train.jsonl, eval.jsonl
    run = Run(run_dir, store, job_id); run.start() trains; appends progress.jsonl
    run.follow(on_event, cancel) / run.stop()      checkpoints/checkpoint-N (one per evaluation, best 3 kept)
    run.result() -> dict                           model/ (the best checkpoint, WiSE-FT mixed) and result.json

(A little over the project's ~400 lines on purpose: the parent's whole side of the process
boundary, the snapshot contract and the run handle, in one file.)

The trainer uses the configured `device` only; with `train_devices` N > 1 (asked for, never
assumed), `start` launches `torchrun --nproc_per_node N` on the same entry; the trainer then runs
DDP (effective batch = N x batch_size, stated in result.json), and only rank 0 writes progress
and results.

Run directory:
    config.json      TrainConfig (loop/train_config.py)   snapshot.json  data hash and counts
    train.jsonl      {anchor, positive[, negative, negative_2, ...]} per line; eval.jsonl likewise
    dev.json         the development fold that chooses the WiSE-FT weight (loop/wise.py), if any
    progress.jsonl   one JSON event per line (see `RunMonitor` in loop/train_hooks.py)
    STOP             created by `request_stop`: training stops at the next step
    checkpoints/     trainer checkpoints; a restart resumes from the last complete one
    model/           the final (best by eval loss) model, when status is ok or stopped
    result.json      {status, reason, model_dir, best_checkpoint, best_eval_loss, train_seconds,
                      steps, pairs_per_second, ...}; written last, atomically
    train.log        the subprocess's stdout and stderr

Fault hook for tests (EMBEDLOOP_TRAIN_FAULT, comma-separated `key=value`; parsed by
`train_monitor.Faults`):
    nan_at_step=N        the training loss of step N becomes NaN
    oom_at_step=N        step N raises torch.OutOfMemoryError("CUDA out of memory ...")
    disk_full_at_step=N  saving at step >= N raises OSError(ENOSPC)
    sleep_per_step=S     sleep S seconds after each step (makes kill/stop tests deterministic)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loop.errors import ConfigError, EmbedloopError, InputError
from loop.procs import runs
from loop.train_config import TrainConfig
from loop.wise import DEV_FILE

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
CHILD_MODULE = "loop.trainer"
_SECRET_ENV = frozenset({"OPENAI_API_KEY", "EMBEDLOOP_LLM_API_KEY"})


# --- snapshot --------------------------------------------------------------------------------


def negative_column(n: int) -> str:
    """The name of a row's `n`-th hard negative (0-based): negative, negative_2, negative_3, ..."""
    return "negative" if n == 0 else f"negative_{n + 1}"


def text_columns(names: Iterable[str]) -> list[str]:
    """A row's text columns in the order the losses read them: anchor, positive, then its hard
    negatives (`negative`, `negative_2`, ...); every column after the positive is a negative."""
    have = set(names)
    n = 0
    while negative_column(n) in have:
        n += 1
    return ["anchor", "positive", *(negative_column(i) for i in range(n))]


def _row_text(row: Any, *names: str) -> str | None:
    for name in names:
        v = row.get(name) if isinstance(row, Mapping) else getattr(row, name, None)
        if v is not None:
            return str(v)
    return None


def _clean_rows(rows: Iterable[Any], split: str) -> list[dict[str, Any]]:
    """Rows as {anchor, positive, negatives[, exclude]}; accepts dicts or `Pair` records (positive_text ...).

    A row's hard negatives are its `negative` (or `negative_text`) followed by its `negatives`
    list, blank and repeated ones dropped. `exclude` lists texts known to answer the row's anchor
    (its other positives): they are never drawn as its negative and never share its batch.
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
        more = row.get("negatives") if isinstance(row, Mapping) else None
        if more is not None and (isinstance(more, str) or not isinstance(more, Iterable)):
            raise InputError(f"{split} row {i}: negatives must be a list of texts.", line=i)
        given = [str(t) for t in [negative, *(more or ())] if t is not None and str(t).strip()]
        rec: dict[str, Any] = {"anchor": anchor, "positive": positive,
                               "negatives": list(dict.fromkeys(t for t in given if t != positive))}
        exclude = row.get("exclude") if isinstance(row, Mapping) else None
        if exclude:
            rec["exclude"] = sorted({str(t) for t in exclude} - {positive})
        out.append(rec)
    return out


def _fill_negatives(rows: list[dict[str, Any]], width: int, rng: random.Random,
                    others: list[dict[str, Any]] = ()) -> int:
    """Give every row exactly `width` hard negatives, as columns `negative`, `negative_2`, ...: a
    dataset column cannot have holes. Extra ones are dropped; `width` 0 drops them all.

    A missing negative becomes another row's positive: exactly the kind of negative the loss
    already sees in-batch, so it adds no wrong signal; never the row's own positive, a positive of
    the same anchor (in either split), a text in its `exclude` or one of its other negatives. The
    `others` rows (the other split) give their positives only when the rows' own run out. Returns
    how many were filled.
    """
    positives = sorted({r["positive"] for r in rows})
    spares = sorted({r["positive"] for r in others} - set(positives))
    known: dict[str, set[str]] = {}
    for r in [*rows, *others]:
        known.setdefault(r["anchor"], set()).update([r["positive"], *r.get("exclude", ())])
    filled = 0
    for rec in rows:
        negatives = rec.pop("negatives")[:width]
        while len(negatives) < width:
            taboo = known[rec["anchor"]] | set(negatives)
            for _ in range(20):  # a few draws at most: positives are mostly of other anchors
                negative = rng.choice(positives)
                if negative not in taboo:
                    break
            else:
                allowed = [p for p in positives if p not in taboo] or [p for p in spares if p not in taboo]
                if not allowed:
                    raise InputError("Cannot fill a missing negative: every positive answers the same query.")
                negative = rng.choice(allowed)
            negatives.append(negative)
            filled += 1
        rec.update((negative_column(n), t) for n, t in enumerate(negatives))
    return filled


def _jsonl_bytes(rows: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def atomic_write(path: Path, data: bytes) -> None:
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
        train_rows: dicts with anchor, positive, optional negative and negatives (a list), or
            `Pair` records.
        eval_rows: the explicit eval set; None or empty = hold out `config.eval_fraction` of
            train_rows (seeded, so the same inputs give the same split).
        config: a TrainConfig or a dict for one.
        dev: the development fold as a `wise.DevTask` (dev.json): the WiSE-FT weight is chosen on it.

    Hard negatives: every row (train and eval) gets as many as the train row with the most has,
    as columns `negative`, `negative_2`, ...; a missing one is another row's positive. If no train
    row has one, eval negatives are dropped too, so train and eval losses stay comparable.

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
    width = max(len(r["negatives"]) for r in train)
    rng = random.Random(cfg.seed)
    filled = _fill_negatives(train, width, rng, evals) + _fill_negatives(evals, width, rng, train)

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
    atomic_write(run / TRAIN_FILE, train_bytes)
    atomic_write(run / EVAL_FILE, eval_bytes)
    if dev_bytes:
        atomic_write(run / DEV_FILE, dev_bytes)
    else:
        (run / DEV_FILE).unlink(missing_ok=True)
    atomic_write(run / CONFIG_FILE, config_bytes)
    snapshot = {
        "data_hash": digest,
        "n_train": len(train),
        "n_eval": len(evals),
        "negatives": width > 0,
        "negatives_per_row": width,
        "filled_negatives": filled,
        "n_dev_queries": len(dev.queries) if dev is not None else 0,
    }
    atomic_write(run / SNAPSHOT_FILE, json.dumps(snapshot, indent=2).encode())
    return digest

# --- the trainer process --------------------------------------------------------------------


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
                "-m", CHILD_MODULE, run]
    return [sys.executable, "-m", CHILD_MODULE, run]


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


def run_to_end(run_dir: str | Path, *, env: Mapping[str, str] | None = None, nproc: int | None = None) -> dict:
    """Train on `run_dir` in the trainer subprocess, as the loop does, and wait for it (benchmarks, scripts).

    Returns:
        The run's result (status "ok").

    Raises:
        EmbedloopError: the run did not finish ok; the message carries its result and the tail of train.log.
    """
    rc = start(run_dir, env=env, nproc=nproc).wait()
    result = read_result(run_dir)
    if rc != 0 or not result or result.get("status") != "ok":
        log_tail = (Path(run_dir) / LOG_FILE).read_text(errors="replace")[-2000:]
        reason = (result or {}).get("reason") or f"the trainer exited with status {rc} and no result"
        raise EmbedloopError(f"Training on {run_dir} failed: {reason}\n--- train.log (tail) ---\n{log_tail}")
    return result


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


def is_running(pid: int) -> bool:
    """Whether `pid` is a live training process (not a zombie, not a reused pid of another program)."""
    # "loop.train" is in the trainer's command line (python -m loop.trainer, or torchrun ... -m loop.trainer).
    return runs(pid, b"loop.train")


class Run:
    """A training run seen from the process that owns the workspace: start (or follow a trainer
    that outlived its starter), follow its progress, stop it, read its result; it keeps the run's
    row in `jobs` (`train-<round>`) in step.

    Args:
        run_dir: the run directory (`write_snapshot` wrote its inputs).
        store: the workspace's store (the only DuckDB writer is this process).
        job_id: its row in `jobs`.
        env: extra environment for the trainer (e.g. fault injection in tests).
    """

    def __init__(self, run_dir: str | Path, store: Any, job_id: str, env: Mapping[str, str] | None = None):
        self.dir = Path(run_dir)
        self.store = store
        self.job_id = job_id
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    def start(self) -> bool:
        """Start the trainer, or adopt the one still running on this directory; True if adopted."""
        self.pid = running_pid(self.dir)
        adopted = self.pid is not None
        if not adopted:
            self.proc = start(self.dir, env=self.env)
            self.pid = self.proc.pid
        self.store.execute(
            "INSERT OR REPLACE INTO jobs (job_id, kind, status, pid, args) VALUES (?, 'train', 'running', ?, ?)",
            [self.job_id, self.pid, json.dumps({"run_dir": str(self.dir)})],
        )
        return adopted

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and is_running(self.pid)

    def stop(self) -> None:
        """Ask the trainer to stop: it keeps its best checkpoint and exits."""
        request_stop(self.dir)

    def follow(self, on_event: Any = None, cancel: Any = None, poll_s: float = 2.0) -> dict:
        """Wait for the trainer, passing each new progress event to `on_event` and a set `cancel`
        event on as a stop request; return its result (recorded in the job row)."""
        seen, stop_sent = 0, False
        while self.alive():
            time.sleep(poll_s)
            if cancel is not None and cancel.is_set() and not stop_sent:
                self.stop()
                stop_sent = True
            events = read_progress(self.dir)
            for ev in events[seen:]:
                if on_event is not None:
                    on_event(ev)
            seen = len(events)
        result = self.result()
        self.store.execute("UPDATE jobs SET status = ?, error = ?, updated_at = current_timestamp WHERE job_id = ?",
                           [result["status"], result.get("reason"), self.job_id])
        return result

    def result(self) -> dict:
        """The trainer's result, or 'interrupted' when it exited without one (killed?)."""
        code = self.proc.returncode if self.proc is not None else "unknown"
        return read_result(self.dir) or {
            "status": "interrupted",
            "reason": f"the trainer exited (code {code}) without a result (killed?); see {self.dir / LOG_FILE}",
        }
