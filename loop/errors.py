"""One error base class for the project; subclasses carry the data a message needs.

The base class and the storage errors are defined in storage/errors.py (storage/ imports
nothing from loop/) and re-exported here: import every error from this module.

The CLI and the app turn an `EmbedloopError` into a message in one place each; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.errors import EmbedloopError, IndexMismatchError, VectorIndexError, WorkspaceLockedError

__all__ = [
    "ConfigError",
    "EmbedloopError",
    "IndexMismatchError",
    "InputError",
    "LeakageError",
    "NotFoundError",
    "RoundError",
    "VectorIndexError",
    "WorkspaceLockedError",
    "validation_problems",
]


def validation_problems(error: Any, whole: str = "record", prefix: str = "") -> str:
    """One line from a pydantic ValidationError: `field.path: message; ...`.

    Args:
        whole: the name used when an error concerns the whole object (empty location).
        prefix: put before every field path (e.g. "loop." for a config table).
    """
    return "; ".join(
        f"{prefix}{'.'.join(str(p) for p in err['loc']) or whole}: {err['msg']}" for err in error.errors()
    )


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


class NotFoundError(EmbedloopError):
    """A referenced record (passage, pair, model version, ...) does not exist."""


class RoundError(EmbedloopError):
    """A round cannot advance (e.g. pending reviews, a failed training run)."""


class LeakageError(RoundError):
    """Training data contains a held-out query or one of its (query, positive) pairs."""
