"""How the trainer (loop/trainer.py) batches a run's pairs.

`PretokenizedCollator` tokenises every text once, before training; `length_grouped_batches` puts
rows of similar length together and never a text twice in a batch (nor a text known to answer a
row's query beside it). The trainer's batch sampler over it is `LengthGroupedBatchSampler`
(loop/train_hooks.py). Importing this module imports no torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any


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
