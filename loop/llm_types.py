"""What callers hand to `loop.llm.LLMClient` and get back: its settings, the usage it reports,
the cache key of a paid answer, and its error. Import them from loop.llm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from loop.errors import EmbedloopError

if TYPE_CHECKING:
    from loop.config import Settings

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class LLMError(EmbedloopError):
    """The LLM endpoint failed, or kept answering with something unusable.

    Attributes:
        kind: what went wrong last: rate_limited, server_error, http_error, timeout,
            connection, invalid_json, off_schema, empty, refusal, truncated, cancelled.
        status: the HTTP status of the last failure, when there was one.
        endpoint: scheme://host[:port] of the endpoint (never a key or a path with secrets).
        attempts: how many requests were made.
        fatal: retrying later will not help without a fix (bad key, unknown model, bad URL).
    """

    def __init__(
        self, message: str, *, kind: str, endpoint: str = "", status: int | None = None,
        attempts: int = 0, fatal: bool = False,
    ):
        self.kind = kind
        self.endpoint = endpoint
        self.status = status
        self.attempts = attempts
        self.fatal = fatal
        super().__init__(message)


class LLMSettings(BaseModel):
    """How to reach the LLM. The key is excluded from dumps and repr."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = DEFAULT_BASE_URL
    model: str = Field(min_length=1)
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=5, ge=0, le=20)
    # Generation is latency-bound: 16 requests in flight make it ~16x sequential. Paid endpoints
    # that allow less answer 429, which backs off (honouring Retry-After) without failing the job.
    concurrency: int = Field(default=16, ge=1, le=256)
    requests_per_minute: float = Field(default=6000.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        v = v.strip() or DEFAULT_BASE_URL
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https:// (e.g. http://127.0.0.1:8080/v1)")
        return v.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LLMSettings:
        """The LLM part of the workspace settings (`llm_base_url`, `llm_model`, `llm_api_key`)."""
        values: dict[str, Any] = {
            "base_url": settings.llm_base_url or DEFAULT_BASE_URL,
            "model": settings.llm_model,
            "api_key": settings.llm_api_key,
            "concurrency": settings.llm_concurrency,
            "requests_per_minute": settings.llm_requests_per_minute,
        }
        return cls(**{**values, **overrides})

    @property
    def endpoint(self) -> str:
        """scheme://host[:port]: safe to show (no user-info, path or query)."""
        parts = urlsplit(self.base_url)
        host = parts.hostname or "?"
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


class Usage(BaseModel):
    """Tokens and requests spent; `a + b` sums, `sum(usages, Usage())` works too."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    cached: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            requests=self.requests + other.requests,
            cached=self.cached + other.cached,
        )

    def __radd__(self, other: Any) -> Usage:
        if other == 0:  # sum() starts from 0
            return self
        return NotImplemented


class CacheKey(NamedTuple):
    """What identifies one paid answer; the LLM model is added by the client."""

    passage_hash: str
    prompt: str  # "id@version"
    round: int | None = None  # recorded with the answer, not part of the key
