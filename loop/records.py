"""Typed records passed between steps. Pydantic where data enters from a user or a file."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PairSource = Literal["seed", "synthetic", "mined", "edited"]
PairStatus = Literal["candidate", "pending", "accepted", "rejected", "dropped"]
Split = Literal["train", "eval", "test"]


def content_hash(text: str) -> str:
    """Stable id of a text: the first 16 hex digits of its SHA-256 after whitespace folding."""
    folded = " ".join(text.split())
    return hashlib.sha256(folded.encode("utf-8")).hexdigest()[:16]


_TRAILING = ".?!,;:…。？！ "


def query_key(text: str) -> str:
    """How one query is recognised everywhere (held-out set, known positives): case, spacing and
    trailing sentence punctuation do not make it another query ("What  is X ?" is "what is x";
    "__init__" keeps its underscores)."""
    return " ".join(text.casefold().split()).rstrip(_TRAILING)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Document(_Record):
    doc_id: str = Field(min_length=1)
    title: str = ""
    text: str
    source: str = ""

    @property
    def full_text(self) -> str:
        return f"{self.title}\n\n{self.text}" if self.title else self.text


class Passage(_Record):
    passage_id: str
    text: str
    n_tokens: int


class PairIn(_Record):
    """A labelled pair as it comes from a user's file, before ids are resolved.

    `positive` / `negative` may hold a text or a passage/document id; `positive_id` /
    `negative_id` name an id explicitly (an unknown explicit id is an error).
    """

    anchor: str
    positive: str | None = None
    positive_id: str | None = None
    negative: str | None = None
    negative_id: str | None = None
    score: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("anchor")
    @classmethod
    def _anchor(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("anchor is empty")
        return v.strip()


class Pair(_Record):
    pair_id: str
    anchor: str
    positive_text: str
    positive_id: str | None = None
    negative_text: str | None = None
    negative_id: str | None = None
    score: float | None = None
    source: PairSource
    status: PairStatus
    split: Split = "train"
    round: int | None = None
    query_id: str | None = None

    @staticmethod
    def make_id(anchor: str, positive_text: str) -> str:
        return content_hash(f"{anchor}\x00{positive_text}")


class SearchHit(_Record):
    passage_id: str
    score: float  # the retriever's own score: the model's cosine, or BM25's (found_by "bm25")
    text: str
    doc_ids: list[str] = []
    found_by: Literal["model", "bm25"] = "model"


class IngestReport(_Record):
    """What one file or folder added. Re-importing the same data reports zeros."""

    path: str
    documents_added: int = 0
    documents_updated: int = 0
    documents_unchanged: int = 0
    documents_empty: list[str] = []  # ids of documents without text: kept, but no passages
    passages_added: int = 0
    queries_added: int = 0
    pairs_added: int = 0
    pairs_unchanged: int = 0
    pairs_skipped: int = 0  # pairs naming a document without text
    indexed: int = 0


# Rounds ------------------------------------------------------------------------------------------
RoundState = Literal["generate", "select", "review", "train", "evaluate", "promote", "reindex", "done", "failed"]


class ModelRef(BaseModel):
    """A trained model of a round: its version, folder and content hash."""

    model_config = ConfigDict(extra="allow")

    version: str
    path: str = ""
    sha256: str = ""


class Promotion(BaseModel):
    """The promotion step's verdict, its reasons (sentences quoting the numbers) and the
    held-out set's resolution (`decide.resolution`)."""

    model_config = ConfigDict(extra="allow")

    promote: bool
    reasons: list[str] = []
    confidence: float | None = None
    resolution: dict[str, Any] | None = None


class Manifest(BaseModel):
    """What a round did, step by step: written as each step finishes, so a rerun resumes.

    `steps[name]` holds each finished step's result (with its `seconds`); the other fields are
    filled by the step that knows them. Unknown keys of older manifests are kept."""

    model_config = ConfigDict(extra="allow")

    round: int
    started: str = ""
    finished: str | None = None
    config: dict[str, Any] = {}
    base_model: dict[str, Any] = {}
    steps: dict[str, dict[str, Any]] = {}
    data_snapshot: str | None = None
    train_config: dict[str, Any] | None = None
    model: ModelRef | None = None
    metrics: dict[str, Any] | None = None  # base / active / candidate metrics, matryoshka, n_queries
    vs_base: dict[str, Any] | None = None  # a `evaluate.Comparison`, dumped
    vs_base_by_metric: dict[str, dict[str, Any]] | None = None
    vs_active: dict[str, Any] | None = None
    promotion: Promotion | None = None
    collection: str | None = None
    previous_model: str | None = None
    failure: str | None = None


class RoundRecord(BaseModel):
    """One row of `rounds`: its number, the next step to run (`state`), the last error, the manifest."""

    round: int
    state: RoundState
    error: str | None = None
    manifest: Manifest

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RoundRecord:
        """A `rounds` row as the store returns it (the manifest as JSON text or a dict)."""
        import json

        m = row.get("manifest") or {}
        m = json.loads(m) if isinstance(m, str) else m
        return cls(round=row["round"], state=row["state"], error=row.get("error"),
                   manifest=Manifest.model_validate({"round": row["round"], **m}))
