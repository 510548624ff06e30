"""A training run's settings (`TrainConfig`): written by the parent into the run directory's
config.json (loop/train.py) and read back by the trainer (loop/trainer.py). `[loop.train]` in
embedloop.toml holds the same keys."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loop.errors import ConfigError


class SoupMember(BaseModel):
    """An earlier run's saved model, to average with this run's fine-tune (`TrainConfig.soup_with`)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="its saved model directory")
    alpha: float = Field(gt=0, le=1, description="the WiSE-FT weight it was saved with: its tuned weights are "
                         "recovered from the saved mix (loop/wise.py `unmix`)")
    version: str = Field("", description="its model version, for the record")


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
      - evals_per_epoch 2, early_stopping_patience 1: the development fold's eval loss is read (and a
        checkpoint saved) every half epoch, the best checkpoint is kept anyway, and training stops
        at the first evaluation that does not improve on the best: on the demo the first epoch was
        the best, and a whole second epoch only to confirm it was a third of the round
        (bench/README.md).
      - eval_fraction 0.1: only used when no eval rows are given to `write_snapshot`.
    """

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, description="Local path of the model to fine-tune.")
    loss: Literal["mnrl", "cached_mnrl", "gist"] = Field(
        default="mnrl",
        description="mnrl: in-batch negatives; cached_mnrl: the same with GradCache (big batches in "
        "little memory); gist: in-batch negatives filtered by a guide model (the base model).",
    )
    directions: list[Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]] = Field(
        default=["query_to_doc"], min_length=1,
        description="mnrl / cached_mnrl: the similarity terms the softmax ranks (sentence-transformers' "
        "`directions`): query_to_doc is the classic loss; adding doc_to_query makes it symmetric; all four "
        "are GTE's improved contrastive loss (more negatives from the same batch).",
    )
    partition_mode: Literal["joint", "per_direction"] = Field(
        default="joint", description="mnrl / cached_mnrl: one softmax over every direction (joint), or one per "
        "direction, averaged (per_direction; not with query_to_query or doc_to_doc).",
    )
    hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = Field(
        default=None, description="mnrl / cached_mnrl: up-weight the negatives the model already finds close "
        "(`hardness_strength` times their cosine, without gradient, added to their logits); None = off.",
    )
    hardness_strength: float = Field(default=0.0, ge=0, le=100, description="The weight `hardness_mode` uses.")
    matryoshka_dims: list[int] | None = Field(
        default=None, description="Wrap the loss in MatryoshkaLoss at these dims (the full dim is always added)."
    )
    epochs: int = Field(default=3, ge=1, le=100)
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many steps (smoke runs).")
    evals_per_epoch: int = Field(
        default=2, ge=1, le=10,
        description="Evaluations (the development fold's eval loss) and checkpoints per epoch; a run's last step "
        "is always evaluated.",
    )
    early_stopping_patience: int | None = Field(
        default=1, ge=1,
        description="Stop after this many evaluations in a row whose eval loss (the development fold's) is no "
        "better than the best so far; None = always run every epoch. The best checkpoint is kept either way.",
    )
    batch_size: int = Field(default=32, ge=2, description="Per device; in-batch negatives = batch_size - 1.")
    mini_batch_size: int = Field(default=32, ge=1, description="cached_mnrl only: forward chunk size.")
    memory_budget_mb: int | None = Field(
        default=None, ge=16,
        description="Activation memory one step may hold. When a whole mnrl batch would need more, the loss "
        "becomes cached_mnrl (same gradients, GradCache) with the largest micro-batch that fits. None = "
        "min(1536, RAM / 8) on a CPU, 60% of the GPU's free memory on CUDA.",
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
        default="auto", description="auto: bf16 on a CUDA GPU that supports it, else fp16 on CUDA; on a CPU, bf16 "
        "autocast where the CPU has bf16 in hardware (AVX512-BF16, AMX), else fp32. Weights stay fp32 either way."
    )
    eval_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="Held out when no eval rows are given.")
    wise_grid: list[float] = Field(
        default=[0.25, 0.5, 0.75, 1.0], min_length=1,
        description="WiSE-FT weights (loop/wise.py): the model saved is (1-a)*base + a*tuned with the a of this grid "
        "that scores best on the development fold (dev.json); one weight [a] is applied as it is, no fold needed; "
        "[1.0] = the tuned weights as they are.")
    soup_with: SoupMember | None = Field(
        default=None, description="Set by a round when `[loop] soup` is on: an earlier round's fine-tune of the same "
        "base model. This run's tuned weights are averaged with that run's (a model soup) before WiSE-FT.")
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

    @field_validator("directions")
    @classmethod
    def _directions(cls, v: list[str]) -> list[str]:
        if "query_to_doc" not in v:
            raise ValueError(f"directions must include query_to_doc (the query ranks its positive), got {v}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _mnrl_options(self) -> TrainConfig:
        fields = type(self).model_fields
        tuned = [k for k in ("directions", "partition_mode", "hardness_mode") if getattr(self, k) != fields[k].default]
        if self.loss == "gist" and tuned:
            raise ValueError(f"{', '.join(tuned)} apply to the mnrl and cached_mnrl losses, not to gist")
        if self.partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(self.directions):
            raise ValueError("partition_mode per_direction cannot take query_to_query or doc_to_doc "
                             "(their candidates do not include the positive); use joint")
        if self.hardness_mode is not None and self.hardness_strength == 0:
            raise ValueError(f"hardness_mode {self.hardness_mode} needs a hardness_strength above 0 (e.g. 5)")
        return self

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
