"""Fakes over mocks: a keyword embedder whose similarities are exact by construction."""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")


class FakeTokenizer:
    """Word-level tokenizer with the HF call signature `chunk_text` needs (offset mapping)."""

    def __call__(self, text: str, **_: object) -> dict[str, list[tuple[int, int]]]:
        return {"offset_mapping": [m.span() for m in _WORD.finditer(text)]}


class FakeEmbedder:
    """Bag-of-words hashed into `dim` buckets, L2-normalised: shared words => high cosine."""

    def __init__(self, version: str = "fake-1", dim: int = 64, max_seq_length: int = 64):
        self.version = version
        self.dim = dim
        self.max_seq_length = max_seq_length
        self.tokenizer = FakeTokenizer()
        self.calls = 0

    def encode(self, texts: list[str], batch_size: int | None = None, show_progress: bool = False) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
            out[i, 0] += 1e-3  # never a zero vector
        return out / np.linalg.norm(out, axis=1, keepdims=True)
