"""Embedding models: loaded from local paths only, versioned by the hash of their files."""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from loop.errors import ConfigError

# Models load from local paths; nothing may reach a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


def model_hash(path: str | Path) -> str:
    """SHA-256 over a model directory's weight, config and tokenizer files (names and bytes)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"Model path {root} is not a directory. Set base_model to a local model folder.")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        if "checkpoint-" in f.as_posix():
            continue
        h.update(f.relative_to(root).as_posix().encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class Embedder:
    """A sentence-transformers model with its version id. Loads lazily, from a local path.

    Args:
        path: local model directory.
        version: the id queries and collections are tagged with (see `model_version_for`).
        device: auto | cpu | cuda | mps.
    """

    def __init__(self, path: str | Path, version: str, device: str = "auto", batch_size: int = 64):
        self.path = Path(path)
        self.version = version
        self.device = resolve_device(device)
        self.batch_size = batch_size

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every CLI call are noise
        if not (self.path / "modules.json").exists() and not (self.path / "config.json").exists():
            raise ConfigError(f"{self.path} does not look like a sentence-transformers model folder.")
        return SentenceTransformer(
            str(self.path), device=self.device, trust_remote_code=False, local_files_only=True
        )

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def encode(self, texts: list[str], batch_size: int | None = None, show_progress: bool = False) -> np.ndarray:
        """L2-normalised float32 embeddings, shape (len(texts), dim)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(
            texts,
            batch_size=batch_size or self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.asarray(emb, dtype=np.float32)


def base_version(path: str | Path) -> str:
    """Version id of an off-the-shelf model: `base-<first 10 hex of its hash>`."""
    return f"base-{model_hash(path)[:10]}"
