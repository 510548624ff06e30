"""Prompt templates as data: `prompts/<id>.toml`, each with a version and example variables.

A template is `string.Template` text (`$name` / `${name}`), so JSON braces in a prompt need
no escaping and `$$` is a literal dollar. The declared `variables` must match the placeholders
exactly; that is checked when a template is loaded, not when a paid request is sent.

Bump `version` whenever the wording changes: cached LLM answers are keyed by `id@version`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from string import Template
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loop.errors import EmbedloopError, validation_problems

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class PromptError(EmbedloopError):
    """A prompt template is missing, malformed, or was rendered with the wrong variables."""


def placeholders(text: str) -> set[str]:
    """The `$name` / `${name}` identifiers used in a template text."""
    found: set[str] = set()
    for m in Template.pattern.finditer(text):
        name = m.group("named") or m.group("braced")
        if name:
            found.add(name)
        elif m.group("invalid") is not None:
            raise ValueError(f"invalid placeholder near {text[m.start():m.start() + 20]!r} (write $$ for a literal $)")
    return found


class PromptTemplate(BaseModel):
    """One versioned chat prompt: a system message and a user message template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    version: int = Field(ge=1)
    description: str = ""
    system: str = ""
    user: str = Field(min_length=1)
    variables: list[str]
    example: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> PromptTemplate:
        if not _ID.match(self.id):
            raise ValueError(f"id {self.id!r} must be lower_snake_case")
        used = placeholders(self.system) | placeholders(self.user)
        declared = set(self.variables)
        if used != declared:
            problems = []
            if used - declared:
                problems.append(f"used but not declared: {', '.join(sorted(used - declared))}")
            if declared - used:
                problems.append(f"declared but not used: {', '.join(sorted(declared - used))}")
            raise ValueError("variables do not match the template (" + "; ".join(problems) + ")")
        if self.example and set(self.example) != declared:
            raise ValueError(f"example must give exactly the variables {sorted(declared)}")
        return self

    @property
    def ref(self) -> str:
        """`id@version`: what a pair's provenance and the LLM cache record."""
        return f"{self.id}@{self.version}"

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Chat messages with the variables filled in.

        Raises:
            PromptError: a declared variable is missing, or an unknown one was given.
        """
        missing = [v for v in self.variables if v not in variables]
        unknown = sorted(set(variables) - set(self.variables))
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing variable{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown variable{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
            raise PromptError(
                f"Prompt {self.ref}: {'; '.join(parts)}. It takes: {', '.join(self.variables)}."
            )
        values = {k: str(v) for k, v in variables.items()}
        messages = []
        if self.system:
            messages.append({"role": "system", "content": Template(self.system).substitute(values)})
        messages.append({"role": "user", "content": Template(self.user).substitute(values)})
        return messages

    def render_example(self) -> list[dict[str, str]]:
        return self.render(**self.example)


def fence(text: str, tag: str) -> str:
    """Remove `<tag>` / `</tag>` look-alikes from text that goes between such delimiters.

    Passages are data, not instructions: the prompt wraps them in `<tag>...</tag>`, and a
    passage must not be able to close the block early and speak as the prompt.
    """
    return re.sub(rf"</?\s*{re.escape(tag)}\s*>", " ", text, flags=re.I)


def load_prompt(prompt_id: str, folder: Path | None = None) -> PromptTemplate:
    """Read and validate `prompts/<prompt_id>.toml`.

    Raises:
        PromptError: no such file, not TOML, or not a valid template (the message says which field).
    """
    folder = folder or PROMPTS_DIR
    if not _ID.match(prompt_id):
        raise PromptError(f"Prompt id {prompt_id!r} is not valid: use lower_snake_case names.")
    path = folder / f"{prompt_id}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.toml"))) or "none"
        raise PromptError(f"No prompt {prompt_id!r} in {folder} (available: {known}).")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: not valid TOML ({e}).") from e
    try:
        tmpl = PromptTemplate(**data)
    except ValidationError as e:
        problems = validation_problems(e, whole="template")
        raise PromptError(f"{path}: {problems}") from e
    if tmpl.id != prompt_id:
        raise PromptError(f"{path}: id is {tmpl.id!r}, but the file name says {prompt_id!r}.")
    return tmpl
