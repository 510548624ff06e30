"""The storage layer's errors, and the project's one error base class.

`EmbedloopError` is defined here so that storage/ needs nothing from loop/; loop/errors.py
re-exports every class below, so `from loop.errors import ...` and `except EmbedloopError`
work the same everywhere.
"""

from __future__ import annotations

from pathlib import Path


class EmbedloopError(Exception):
    """Base class: `str(err)` is a complete, user-facing message that says how to fix it."""


class WorkspaceLockedError(EmbedloopError):
    """Another process owns the workspace (DuckDB is single-writer per file)."""

    def __init__(self, workspace: Path, pid: int | None, command: str | None):
        self.workspace = workspace
        self.pid = pid
        self.command = command
        who = f"process {pid}" if pid else "another process"
        if command:
            who += f" ({command})"
        super().__init__(
            f"The workspace {workspace} is in use by {who}. Only one process may open a workspace "
            f"at a time: stop that process, or use another workspace with --workspace."
        )


class IndexMismatchError(EmbedloopError):
    """A query embedded by one model version was compared with a collection built by another."""

    def __init__(self, query_model: str, index_model: str):
        self.query_model = query_model
        self.index_model = index_model
        super().__init__(
            f"Refusing to search: the query was embedded by model {query_model!r} but the index "
            f"was built by model {index_model!r}. Vectors from different models are not comparable; "
            f"re-index with the query's model or embed the query with the index's model."
        )


class VectorIndexError(EmbedloopError):
    """The vector index is missing, unverified or unreachable."""
