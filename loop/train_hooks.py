"""The trainer process's hooks into the sentence-transformers trainer (used by loop/trainer.py).

`LengthGroupedBatchSampler` makes the batches (loop/train_batching.py); `RunMonitor`, a
TrainerCallback, writes the progress events and stops training on a STOP file or a non-finite
loss; `GuardedTrainer` hands each step's loss to the run's `Watch` and injects the test faults
(loop/train_monitor.py). The trainer imports this module, and with it torch and transformers,
only once its start event is written.
"""

from __future__ import annotations

import errno
import functools
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import TrainerCallback

from loop.train import FAULT_ENV, STOP_FILE, text_columns
from loop.train_batching import PretokenizedCollator, length_grouped_batches
from loop.train_monitor import Progress, Watch


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """`length_grouped_batches` as the trainer's batch sampler (seeded per epoch).

    `collator` gives token lengths; `blocks` maps an anchor to the texts known to answer it. The
    trainer builds the sampler from this class itself, so both are set on the class before training.
    """

    collator: PretokenizedCollator
    blocks: dict[str, list[str]]

    @functools.cached_property
    def _rows(self):
        """Each row's texts, its longest token length and its blocks: the same every epoch."""
        dataset = self.sampler  # BatchSampler's first argument: the dataset
        cols = text_columns(dataset.column_names)
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

    def __init__(self, run_dir: Path, watch: Watch, progress: Progress, world_size: int):
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
        if self.watch.nonfinite:
            # The weights are now NaN: do not evaluate or checkpoint them. Evaluation and saving are
            # step-based, so this step's flags are the only ones that could (the last step's included).
            control.should_evaluate = False
            control.should_save = False
        now = time.time()
        if poll and (nonfinite or stop or now - self.last_step_event >= 0.5 or state.global_step >= state.max_steps):
            self.last_step_event = now
            self._emit("step", state, loss=loss)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
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

    watch: Watch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        step = self.state.global_step + 1
        faults = self.watch.faults
        if training:
            self.watch.step = step
            if faults.oom_at_step == step:
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
