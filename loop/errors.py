"""One error base class for the project; subclasses carry the data a message needs.

The CLI and the app turn an `EmbedloopError` into a message in one place each; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def validation_problems(error: Any, whole: str = "record", prefix: str = "") -> str:
    """One line from a pydantic ValidationError: `field.path: message; ...`.

    Args:
        whole: the name used when an error concerns the whole object (empty location).
        prefix: put before every field path (e.g. "loop." for a config table).
    """
    return "; ".join(
        f"{prefix}{'.'.join(str(p) for p in err['loc']) or whole}: {err['msg']}" for err in error.errors()
    )


class EmbedloopError(Exception):
    """Base class: `str(err)` is a complete, user-facing message that says how to fix it."""


class ConfigError(EmbedloopError):
    """A setting or config file is invalid."""


class InputError(EmbedloopError):
    """A file or value a user supplied cannot be imported. Nothing of it was imported.

    Attributes:
        path: the file at fault, when there is one.
        line: the 1-based line (or record) number at fault, when known.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.reason = message
        where = ""
        if self.path:
            where = f"{self.path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(f"{where}{message}")


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


class NotFoundError(EmbedloopError):
    """A referenced record (passage, pair, model version, ...) does not exist."""
