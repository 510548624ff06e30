"""Training, child side: the trainer process, run as `python -m loop.trainer RUN_DIR`.

The parent (loop/train.py) writes the run directory and starts this module; `main` reads the
inputs from files, trains with the sentence-transformers trainer, and leaves progress.jsonl,
checkpoints, model/ and result.json behind (the run directory's layout is in loop/train.py). It
never opens DuckDB. Under torchrun every rank runs `main`; only rank 0 writes progress and results.
The start event (with this process's pid) is written before torch and transformers load.

Its parts: loop/train_batching.py (tokenise once, length-grouped batches), loop/train_loss.py (the
loss and the memory budget that picks it), loop/train_monitor.py (progress events, the watched
loss, injected faults), loop/train_hooks.py (the batch sampler, callback and trainer subclass),
loop/wise.py (the WiSE-FT weight chosen on the development fold).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from loop.errors import ConfigError, InputError
from loop.train import (
    CHECKPOINTS_DIR, CONFIG_FILE, EVAL_FILE, FAULT_ENV, MODEL_DIR, PROGRESS_FILE, RESULT_FILE, TRAIN_FILE,
    atomic_write, text_columns,
)
from loop.train_batching import PretokenizedCollator
from loop.train_config import TrainConfig
from loop.train_loss import activation_mb_per_text, build_loss, memory_budget_mb, micro_batch
from loop.train_monitor import Faults, Progress, Watch, finite

# Models load from local paths; nothing may reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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

    # Column order matters to the losses: anchor, positive, then the negatives.
    cols = text_columns(rows[0] if rows else ())
    return Dataset.from_dict({c: [r[c] for r in rows] for c in cols})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there, autocast bf16
    trains ~1.4-1.9x faster than fp32 (bench/README.md); elsewhere it is emulated, and slower."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private; absent = not known to have it
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _resolve_precision(precision: str, cuda: bool) -> str:
    import torch

    if precision == "auto":
        if not cuda:
            return "bf16" if cpu_has_native_bf16() else "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise ConfigError("precision fp16 needs a CUDA GPU and none is visible; use auto, bf16 or fp32.")
    return precision


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
    data = json.dumps({k: finite(v) for k, v in result.items()}, indent=2).encode()
    if rank0:
        atomic_write(path, data)
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
        print(f"loop.trainer: {run} is not a directory; prepare it with write_snapshot.", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = rank == 0
    progress = Progress(run / PROGRESS_FILE, enabled=rank0)
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


def _train(run: Path, ctx: dict, progress: Progress, world_size: int) -> dict:
    cfg = ctx["cfg"] = TrainConfig.from_file(run / CONFIG_FILE)
    faults = Faults.parse(os.environ.get(FAULT_ENV, ""))

    # Heavy imports only now: the start event (with this pid) is already written.
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
    from transformers import EarlyStoppingCallback
    from transformers import __version__ as tf_version
    from transformers.utils import logging as hf_logging

    from loop import wise
    from loop.train_hooks import GuardedTrainer, LengthGroupedBatchSampler, RunMonitor

    hf_logging.set_verbosity_warning()

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
    # Evaluate and checkpoint every 1/evals_per_epoch of an epoch (the last step always, by the trainer).
    eval_steps = max(1, math.ceil(steps_per_epoch / cfg.evals_per_epoch))
    logging_steps = cfg.logging_steps or max(1, min(10, total // 50))
    watch = ctx["watch"] = Watch(faults, poll_every=logging_steps if cuda else 1)
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
        batch_sampler=LengthGroupedBatchSampler,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
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
    texts = (r[c] for rows in (train_rows, eval_rows) for r in rows for c in text_columns(r))
    collator = PretokenizedCollator(model.preprocess, texts, seq_len)
    LengthGroupedBatchSampler.collator = collator
    LengthGroupedBatchSampler.blocks = {r["anchor"]: r["exclude"] for r in train_rows + eval_rows if r.get("exclude")}
    progress.emit("loading", device=device, precision=precision, world_size=world_size,
                  n_train=len(train_rows), n_eval=len(eval_rows), batch_size=train_bs,
                  effective_batch_size=train_bs * world_size, learning_rate=cfg.learning_rate,
                  max_seq_length=seq_len, tokenize_seconds=round(time.time() - t_tok, 3),
                  resume_from=str(resume) if resume else None)
    per_text = activation_mb_per_text(model[0].auto_model.config, seq_len) if hasattr(model[0], "auto_model") else 0
    columns = len(text_columns(train_rows[0] if train_rows else ()))
    micro = micro_batch(train_bs, columns, per_text, memory_budget_mb(cfg, cuda)) if cfg.loss == "mnrl" else None
    loss = build_loss(cfg, model, device, world_size, micro)

    trainer = GuardedTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(train_rows),
        eval_dataset=_dataset(eval_rows),
        loss=loss,
        data_collator=collator,
        callbacks=[RunMonitor(run, watch, progress, world_size)] + (
            [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []),
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
        "epochs_run": round(float(state.epoch or 0), 2),
        "epochs_planned": cfg.epochs,
        "stopped_early": bool(not cfg.max_steps and not watch.stop_requested and state.global_step < total),
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
    fixed = len(cfg.wise_grid) == 1  # one weight: applied as it is, no development fold needed
    finishing = rank0 and not watch.stop_requested  # the final weights are rank 0's to make
    souping = finishing and cfg.soup_with is not None
    mixing = finishing and cfg.wise_grid != [1.0] and (fixed or task is not None)

    def weights(path: str) -> dict[str, Any]:
        return SentenceTransformer(path, device=device, trust_remote_code=False, local_files_only=True).state_dict()

    if souping or mixing:
        base = weights(cfg.base_model)
    if souping:  # first: WiSE-FT then mixes the soup with the base
        wise.soup(model, base, weights(cfg.soup_with.path), cfg.soup_with.alpha)
        out["soup"] = cfg.soup_with.model_dump()
    if mixing:
        t_wise = time.time()
        progress.emit("wise", grid=cfg.wise_grid, n_dev_queries=0 if fixed else len(task.queries))
        if fixed:
            choice = wise.apply(model, base, cfg.wise_grid[0])
        else:
            # The weights are scored at the precision they were trained at (bf16 autocast: ~1.6x on a CPU that has it).
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                choice = wise.choose(model, base, task, cfg.wise_grid, max_seq_length=seq_len)
        out["wise"] = {**choice, "seconds": round(time.time() - t_wise, 2)}
    final, partial = run / MODEL_DIR, run / f"{MODEL_DIR}.partial"
    if rank0:  # only rank 0 writes the model: under CPU DDP every rank may think it should save, and one
        # rank's files landing in `partial` after rank 0 renamed it failed the run (FileNotFoundError)
        shutil.rmtree(partial, ignore_errors=True)
        trainer.save_model(str(partial))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    status, reason = ("stopped", "stop requested") if watch.stop_requested else ("ok", "")
    return {**out, "status": status, "reason": reason, "model_dir": str(final)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m loop.trainer RUN_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
