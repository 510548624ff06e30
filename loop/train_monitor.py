"""The state a training run keeps about itself, inside the trainer process (loop/trainer.py).

`Progress` appends the events the parent polls (progress.jsonl); `Watch` holds each step's loss
without waiting for the device, and notes a non-finite one and a stop request; `Faults` are the
test faults of EMBEDLOOP_TRAIN_FAULT. The trainer's hooks (loop/train_hooks.py) share them.
Importing this module imports no torch: the trainer writes its start event before loading it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loop.errors import ConfigError
from loop.train import FAULT_ENV


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


class Watch:
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


class Progress:
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
        line = json.dumps({k: finite(v) for k, v in rec.items()}, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


def finite(v: Any) -> Any:
    """JSON has no NaN: non-finite floats become null (the reason field says what happened)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
