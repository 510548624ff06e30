"""The one place that imports `openai`: an OpenAI-protocol client for JSON answers.

Any OpenAI-compatible endpoint works (OpenAI, vLLM, llama.cpp, Ollama, LiteLLM ...). The SDK's
own retries are off; this module retries itself so that every kind of failure - 429, 5xx,
timeouts, dropped connections, and also answers that are not the JSON we asked for - is
handled in one loop, with exponential backoff and jitter, and ends in one clear `LLMError`.

Paid work is never repeated: the client's `AnswerCache` (storage.llm_cache.LLMCache, in
DuckDB) keeps validated answers keyed by (passage hash, prompt id@version, LLM model), and a
hit makes no HTTP request. This module is transport only: it imports nothing from storage/.
Its settings, usage, cache key and error are defined in loop/llm_types.py and exported here.

The API key is a `SecretStr`: it is only unwrapped to build the SDK client, and every message
this module produces passes through `_redact`, so it never reaches logs, errors or DuckDB.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import openai
from pydantic import BaseModel, ValidationError

from loop.errors import validation_problems
from loop.llm_types import CacheKey, LLMError, LLMSettings, Usage

__all__ = ["AnswerCache", "CacheKey", "LLMClient", "LLMError", "LLMSettings", "Usage"]

log = logging.getLogger("embedloop.llm")

# A local endpoint often needs no key, but the SDK refuses to start without one.
_NO_KEY = "no-key"

M = TypeVar("M", bound=BaseModel)
J = TypeVar("J")
R = TypeVar("R")


class AnswerCache(Protocol):
    """Where the client keeps validated answers (storage.llm_cache.LLMCache writes DuckDB)."""

    def get(self, passage_hash: str, prompt: str, llm_model: str) -> dict[str, Any] | None: ...

    def put(
        self, passage_hash: str, prompt: str, llm_model: str, response: dict[str, Any],
        usage: Usage | None = None, round: int | None = None,
    ) -> None: ...


class _TokenBucket:
    """`rate` requests per second on average, bursts up to `capacity`."""

    def __init__(self, per_minute: float, capacity: int, clock: Callable[[], float] = time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = float(max(1, capacity))
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self.clock()
                self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                wait = (1.0 - self.tokens) / self.rate
            time.sleep(wait)


class _Fatal(Exception):
    """A rejected request that repeating will not fix (bad key, model, URL or parameters)."""

    def __init__(self, status: int, body: str):
        self.status, self.body = status, body
        super().__init__(body)


class _Retry(Exception):
    """One failed attempt that may succeed when repeated."""

    def __init__(self, kind: str, detail: str, status: int | None = None, wait: float | None = None):
        self.kind, self.detail, self.status, self.wait = kind, detail, status, wait
        self.usage = Usage(requests=1)  # replaced by the real usage when an answer came back
        super().__init__(detail)


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)


def _is_empty(instance: BaseModel) -> bool:
    """True when every list/dict field of the answer is empty (e.g. {"queries": []})."""
    containers = [v for v in instance.__dict__.values() if isinstance(v, (list, dict, tuple))]
    return bool(containers) and all(len(v) == 0 for v in containers)


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                return None  # an HTTP date: fall back to our own backoff
    return None


class LLMClient:
    """JSON answers from an OpenAI-compatible chat endpoint, with retries, rate limit and cache.

    Args:
        settings: endpoint, model, key, timeouts and limits.
        cache: where answers are kept; None = no cache.
        backoff_base_s: first retry delay; doubles per attempt, with jitter (tests pass ~0).
        max_backoff_s: ceiling of one delay, including a server's Retry-After.
    """

    def __init__(
        self, settings: LLMSettings, cache: AnswerCache | None = None, *,
        backoff_base_s: float = 0.5, max_backoff_s: float = 30.0, seed: int | None = None,
    ):
        self.settings = settings
        self.cache = cache
        self.backoff_base_s = backoff_base_s
        self.max_backoff_s = max_backoff_s
        self._rng = random.Random(seed)
        self._bucket = _TokenBucket(settings.requests_per_minute, settings.concurrency)
        self._lock = threading.Lock()
        self._usage = Usage()
        self._json_mode = True
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._client = openai.OpenAI(
            base_url=settings.base_url, api_key=key or _NO_KEY, max_retries=0, timeout=settings.timeout_s,
        )

    def __repr__(self) -> str:
        return f"LLMClient(endpoint={self.endpoint!r}, model={self.model!r})"

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint

    @property
    def usage(self) -> Usage:
        """Running totals of everything this client spent (cache hits counted as `cached`)."""
        return self._usage

    def _add_usage(self, u: Usage) -> None:
        with self._lock:
            self._usage = self._usage + u

    def _redact(self, text: str) -> str:
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        if len(key) >= 4:
            text = text.replace(key, "***")
        return text

    def _error(self, what: str, *, kind: str, status: int | None = None, attempts: int = 0,
               fatal: bool = False, hint: str = "") -> LLMError:
        where = f"LLM endpoint {self.endpoint} (model {self.model!r})"
        code = f" [HTTP {status}]" if status else ""
        tries = f" after {attempts} request{'s' if attempts != 1 else ''}" if attempts else ""
        msg = f"{where}: {what}{code}{tries}." + (f" {hint}" if hint else "")
        return LLMError(self._redact(msg), kind=kind, endpoint=self.endpoint, status=status,
                        attempts=attempts, fatal=fatal)

    def _delay(self, attempt: int, server_wait: float | None) -> float:
        base = min(self.max_backoff_s, self.backoff_base_s * (2**attempt))
        with self._lock:
            jitter = 0.5 + self._rng.random()  # between half and 1.5x: workers do not retry in step
        # A server's Retry-After wins when it asks for longer; never hammer on "Retry-After: 0".
        return min(self.max_backoff_s, max(server_wait or 0.0, base * jitter))

    # One request -------------------------------------------------------------------------
    def _request(self, messages: Sequence[dict[str, str]], schema: type[M], extra: dict[str, Any]) -> tuple[M, Usage]:
        self._bucket.acquire()
        kwargs: dict[str, Any] = {"model": self.model, "messages": list(messages), **extra}
        if self._json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            resp = self._client.chat.completions.create(**kwargs)
        except openai.APITimeoutError:
            raise _Retry("timeout", f"no answer within {self.settings.timeout_s:g} s") from None
        except openai.APIConnectionError as e:
            raise _Retry("connection", f"cannot connect ({type(e.__cause__ or e).__name__})") from None
        except openai.APIStatusError as e:
            status = e.status_code
            body = self._redact(str(getattr(e, "message", "") or e))[:300]
            wait = _retry_after(e.response.headers)
            if status == 429:
                raise _Retry("rate_limited", f"rate limited: {body}", status, wait) from None
            if status >= 500 or status in (408, 409):
                raise _Retry("server_error", f"server error: {body}", status, wait) from None
            if status == 400 and self._json_mode and "response_format" in body:
                # Some endpoints reject JSON mode; ask again without it (the prompt asks for JSON).
                self._json_mode = False
                raise _Retry("http_error", "the endpoint does not support response_format; retrying without it",
                              status, 0.0) from None
            raise _Fatal(status, body) from None
        usage = Usage(
            prompt_tokens=getattr(resp.usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(resp.usage, "completion_tokens", 0) or 0,
            requests=1,
        )
        try:
            return self._parse(resp, schema), usage
        except _Retry as r:
            r.usage = usage  # an unusable answer is still paid for
            raise

    @staticmethod
    def _parse(resp: Any, schema: type[M]) -> M:
        if not resp.choices:
            raise _Retry("empty", "the answer has no choices")
        choice = resp.choices[0]
        refusal = getattr(choice.message, "refusal", None)
        if refusal:
            raise _Retry("refusal", f"the model refused: {refusal[:200]!r}")
        if choice.finish_reason == "length":
            raise _Retry("truncated", "the answer was cut off (finish_reason=length)")
        text = choice.message.content or ""
        fenced = _FENCE.match(text)
        if fenced:
            text = fenced.group(1)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise _Retry("invalid_json", f"the answer is not JSON: {text[:120]!r}") from None
        try:
            instance = schema.model_validate(data)
        except ValidationError as e:
            problems = validation_problems(e, whole="answer")
            raise _Retry("off_schema", f"the JSON does not match {schema.__name__}: {problems[:200]}") from None
        if _is_empty(instance):
            raise _Retry("empty", f"the answer is empty: {text[:120]!r}")
        return instance

    def _fatal_status(self, status: int, body: str, attempts: int = 1) -> LLMError:
        hints = {
            401: "Check the API key (OPENAI_API_KEY or EMBEDLOOP_LLM_API_KEY).",
            403: "The key is not allowed to use this model or endpoint.",
            404: "Check llm_base_url (it usually ends in /v1) and llm_model.",
        }
        return self._error(f"request rejected: {body}", kind="http_error", status=status, attempts=attempts,
                           fatal=status in hints, hint=hints.get(status, ""))

    # Public ------------------------------------------------------------------------------
    def complete_json(
        self, messages: Sequence[dict[str, str]], schema: type[M], cache_key: CacheKey | None = None,
        **extra: Any,
    ) -> tuple[M, Usage]:
        """Ask for a JSON object and validate it with `schema`; retry until it fits.

        Args:
            messages: chat messages ({"role", "content"}).
            schema: the pydantic model the answer must validate as (and not be empty).
            cache_key: when given and a cache is set, a stored answer is returned without a request,
                and a new answer is stored.
            **extra: passed to the endpoint (temperature, max_tokens, seed ...).

        Returns:
            The validated answer and what this call spent (`cached=1` for a cache hit).

        Raises:
            LLMError: the endpoint failed, or answered unusably, `max_retries + 1` times, or
                rejected the request outright (bad key, model or URL: not retried).
        """
        if cache_key is not None and self.cache is not None:
            hit = self.cache.get(cache_key.passage_hash, cache_key.prompt, self.model)
            if hit is not None:
                try:
                    instance = schema.model_validate(hit)
                except ValidationError:
                    instance = None  # stored under an older schema: ask again
                if instance is not None:
                    u = Usage(cached=1)
                    self._add_usage(u)
                    return instance, u
        spent = Usage()
        attempts = self.settings.max_retries + 1
        last: _Retry | None = None
        try:
            for attempt in range(attempts):
                try:
                    instance, u = self._request(messages, schema, extra)
                except _Retry as r:
                    last = r
                    spent = spent + r.usage
                    if attempt + 1 < attempts:
                        wait = self._delay(attempt, r.wait)
                        log.warning("LLM %s: %s (attempt %d/%d); retrying in %.2f s",
                                    self.endpoint, self._redact(r.detail), attempt + 1, attempts, wait)
                        time.sleep(wait)
                    continue
                except _Fatal as f:
                    spent = spent + Usage(requests=1)
                    raise self._fatal_status(f.status, f.body, attempt + 1) from None
                spent = spent + u
                if cache_key is not None and self.cache is not None:
                    self.cache.put(cache_key.passage_hash, cache_key.prompt, self.model,
                                   instance.model_dump(mode="json"), spent, cache_key.round)
                return instance, spent
        finally:
            self._add_usage(spent)
        assert last is not None
        hint = {
            "rate_limited": "Lower requests_per_minute / concurrency, or try later.",
            "timeout": "Raise timeout_s, or check that the endpoint is up.",
            "connection": "Check llm_base_url and that the server is running.",
            "server_error": "The endpoint is failing; try later.",
        }.get(last.kind, "The model does not follow the JSON instructions; try another model or prompt.")
        raise self._error(last.detail, kind=last.kind, status=last.status, attempts=attempts, hint=hint)

    def map(
        self, jobs: Iterable[J], fn: Callable[[J], R], progress: Callable[[int, int], None] | None = None,
    ) -> list[R | Exception]:
        """Run `fn(job)` for every job, `concurrency` at a time; results in job order.

        A job that raises yields its exception in its slot, so one failure does not lose the
        others' (paid) results. After a fatal error (bad key, model or URL) the jobs not yet
        started fail with that error instead of repeating the rejected request.
        """
        items = list(jobs)
        results: list[Any] = [None] * len(items)
        fatal: list[LLMError] = []
        done = 0
        done_lock = threading.Lock()

        def run(i: int) -> None:
            nonlocal done
            try:
                if fatal:
                    raise fatal[0]
                results[i] = fn(items[i])
            except Exception as e:  # noqa: BLE001 - handed back to the caller in order
                results[i] = e
                if isinstance(e, LLMError) and e.fatal and not fatal:
                    fatal.append(e)
            with done_lock:
                done += 1
                n = done
            if progress:
                progress(n, len(items))

        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(items)),
                                thread_name_prefix="llm") as pool:
            list(pool.map(run, range(len(items))))
        return results

    def test_connection(self) -> str:
        """One cheap request; returns what was found, e.g. "http://host:8080: 3 models, 'x' available".

        Raises:
            LLMError: the endpoint is unreachable or rejects the key.
        """
        try:
            models = [m.id for m in self._client.models.list()]
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise self._fatal_status(e.status_code, self._redact(str(e.message))[:300]) from None
            models = None  # no /models on this endpoint: try a 1-token completion
        except openai.APITimeoutError:
            raise self._error(f"no answer within {self.settings.timeout_s:g} s", kind="timeout", attempts=1,
                              hint="Check llm_base_url and that the server is running.") from None
        except openai.APIConnectionError:
            raise self._error("cannot connect", kind="connection", attempts=1,
                              hint="Check llm_base_url and that the server is running.") from None
        if models is not None:
            listed = "available" if self.model in models else "NOT listed"
            return f"{self.endpoint}: {len(models)} model{'s' if len(models) != 1 else ''}, {self.model!r} {listed}"
        try:
            self._client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "ping"}], max_tokens=1,
            )
        except openai.APIStatusError as e:
            raise self._fatal_status(e.status_code, self._redact(str(e.message))[:300]) from None
        except openai.APIConnectionError:
            raise self._error("cannot connect", kind="connection", attempts=1,
                              hint="Check llm_base_url and that the server is running.") from None
        return f"{self.endpoint}: {self.model!r} answered"
