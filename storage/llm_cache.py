"""The `llm_cache` table: validated LLM answers kept so that paid work is never repeated.

`loop.llm.LLMClient` reads and writes it through the `AnswerCache` protocol defined there;
this module only knows DuckDB (it imports nothing from loop/).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from storage.db import Store


class _Tokens(Protocol):
    """What an answer cost (e.g. `loop.llm.Usage`)."""

    prompt_tokens: int
    completion_tokens: int


class LLMCache:
    """Validated LLM answers in the `llm_cache` table, keyed by sha256(passage, prompt, model)."""

    def __init__(self, store: Store):
        self.store = store
        # One DuckDB connection serves every thread (a cursor each); serialising writes avoids
        # write-write conflicts when two workers finish at once.
        self._lock = threading.Lock()

    @staticmethod
    def key(passage_hash: str, prompt: str, llm_model: str) -> str:
        return hashlib.sha256(f"{passage_hash}\x00{prompt}\x00{llm_model}".encode()).hexdigest()

    def get(self, passage_hash: str, prompt: str, llm_model: str) -> dict[str, Any] | None:
        with self._lock:
            rows = self.store.execute(
                "SELECT response FROM llm_cache WHERE cache_key = ?", [self.key(passage_hash, prompt, llm_model)]
            ).fetchall()
        return json.loads(rows[0][0]) if rows else None

    def put(
        self, passage_hash: str, prompt: str, llm_model: str, response: dict[str, Any],
        usage: _Tokens | None = None, round: int | None = None,
    ) -> None:
        """Keep one answer; `usage` (tokens spent on it) is recorded with it, 0 when None."""
        prompt_tokens = usage.prompt_tokens if usage is not None else 0
        output_tokens = usage.completion_tokens if usage is not None else 0
        with self._lock:
            self.store.execute(
                "INSERT OR REPLACE INTO llm_cache (cache_key, passage_hash, prompt, llm_model, response, "
                "prompt_tokens, output_tokens, round) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [self.key(passage_hash, prompt, llm_model), passage_hash, prompt, llm_model,
                 json.dumps(response, ensure_ascii=False), prompt_tokens, output_tokens, round],
            )

    def __len__(self) -> int:
        return int(self.store.scalar("SELECT count(*) FROM llm_cache"))
