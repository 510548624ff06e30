"""The loss a run trains with, and the memory budget that picks it (used by loop/trainer.py).

MNRL (in-batch negatives) holds every text of a batch for the backward pass; when a whole batch
would not fit the budget, the same loss runs cached (GradCache: the same gradients, a micro-batch
of texts at a time). GIST filters in-batch negatives with a guide model (the base model), and
Matryoshka wraps any of them. Importing this module imports no torch.
"""

from __future__ import annotations

import os
from typing import Any

from loop.errors import ConfigError
from loop.train_config import TrainConfig


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


CPU_BUDGET_MB = 1536.0


def memory_budget_mb(cfg: TrainConfig, cuda: bool) -> float:
    """The activation memory one step may hold, in MB: the config's, else 60% of the GPU's free
    memory on CUDA, else min(1536, RAM / 8): the trainer's process holds ~1.2 GB besides (model,
    optimizer, runtime), and at 2048 a batch of 32 (query, passage) pairs at 128 tokens ran as plain
    MNRL and peaked at 3.1-3.2 GB on scifact, over the 3 GB the trainer stays under; at 1536 it runs
    cached (same gradients, same model) at 2.8 GB (bench/README, 2026-12-07 night)."""
    if cfg.memory_budget_mb:
        return float(cfg.memory_budget_mb)
    if cuda:
        import torch

        return torch.cuda.mem_get_info()[0] / 2**20 * 0.6
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 if hasattr(os, "sysconf") else 16384
    return min(CPU_BUDGET_MB, ram / 8)


def cos_sim_fp32(a, b):
    """`util.cos_sim` computed in fp32 even inside a bf16/fp16 autocast region. Autocast runs the
    similarity matmul in half precision, and a bf16 cosine carries ~3 significant digits: at MNRL's
    scale 20 its logits round by up to 0.04, which blurs the ranking between a positive and a close
    hard negative. The matrix is batch x batch, so fp32 costs nothing measurable."""
    import torch
    from sentence_transformers.util import cos_sim

    with torch.autocast(a.device.type, enabled=False):
        return cos_sim(a.float(), b.float())


def build_loss(cfg: TrainConfig, model, device: str, world_size: int, micro: int | None = None):
    """The loss `cfg.loss` names; mnrl becomes cached_mnrl at `micro` texts a time when `micro` is set.
    Every similarity the loss takes is computed in fp32 (`cos_sim_fp32`), whatever the precision."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    # Under DDP, gather embeddings so every anchor sees the negatives of all devices.
    gather = world_size > 1
    mnrl = {"similarity_fct": cos_sim_fp32, "gather_across_devices": gather, "directions": tuple(cfg.directions),
            "partition_mode": cfg.partition_mode, "hardness_mode": cfg.hardness_mode,
            "hardness_strength": cfg.hardness_strength}
    if cfg.loss == "mnrl" and micro is None:
        loss = losses.MultipleNegativesRankingLoss(model, **mnrl)
    elif cfg.loss in ("mnrl", "cached_mnrl"):  # mnrl whose batch does not fit in memory: the same loss, cached
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=micro or cfg.mini_batch_size, **mnrl)
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
