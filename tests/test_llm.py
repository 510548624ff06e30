"""LLMClient over real HTTP against the local OpenAI-protocol server (tests/openai_server.py)."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from loop.config import Settings
from loop.llm import CacheKey, LLMClient, LLMError, LLMSettings, Usage, _TokenBucket
from storage.llm_cache import LLMCache
from tests.openai_server import MODEL, Reply, openai_server  # noqa: F401 - fixture

KEY = "sk-test-SECRET-0123456789abcdef"


class Queries(BaseModel):
    queries: list[str]


MESSAGES = [{"role": "user", "content": "Write 2 different queries. <passage>Refund windows</passage>"}]


def make_client(server, cache=None, **settings) -> LLMClient:
    values = {"base_url": server.base_url, "model": MODEL, "api_key": SecretStr(KEY), "timeout_s": 5.0,
              "max_retries": 3, "requests_per_minute": 60_000, **settings}
    return LLMClient(LLMSettings(**values), cache, backoff_base_s=0.001, max_backoff_s=0.5, seed=0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Success -------------------------------------------------------------------------------------
def test_success_sends_json_mode_and_key(openai_server):
    openai_server.enqueue(Reply.ok(["refund window length", "late refunds by bank transfer"]))
    client = make_client(openai_server)
    answer, usage = client.complete_json(MESSAGES, Queries)
    assert answer.queries == ["refund window length", "late refunds by bank transfer"]
    assert usage == Usage(prompt_tokens=100, completion_tokens=20, requests=1)
    assert client.usage == usage
    [req] = openai_server.requests
    assert req["body"]["model"] == MODEL
    assert req["body"]["response_format"] == {"type": "json_object"}
    assert req["headers"]["authorization"] == f"Bearer {KEY}"


def test_json_in_code_fence_is_accepted(openai_server):
    openai_server.enqueue(Reply("text", '```json\n{"queries": ["a b c"]}\n```'))
    answer, _ = make_client(openai_server).complete_json(MESSAGES, Queries)
    assert answer.queries == ["a b c"]


# Each failure kind is retried, then succeeds ---------------------------------------------------
@pytest.mark.parametrize(
    "failure, settings",
    [
        (Reply.rate_limit(), {}),
        (Reply.error(500), {}),
        (Reply.error(503), {}),
        (Reply.invalid_json(), {}),
        (Reply.wrong_schema(), {}),
        (Reply.empty(), {}),
        (Reply.refusal(), {}),
        (Reply.length(), {}),
        (Reply.slow(1.0), {"timeout_s": 0.25}),
    ],
    ids=["429", "500", "503", "invalid_json", "wrong_schema", "empty", "refusal", "length", "timeout"],
)
def test_failure_is_retried_then_succeeds(openai_server, failure, settings):
    openai_server.enqueue(failure, Reply.ok(["good query here"]))
    client = make_client(openai_server, **settings)
    answer, usage = client.complete_json(MESSAGES, Queries)
    assert answer.queries == ["good query here"]
    assert openai_server.count == 2
    assert usage.requests == 2


@pytest.mark.parametrize(
    "failure, kind, words",
    [
        (Reply.rate_limit(), "rate_limited", ["HTTP 429", "rate limit", "requests_per_minute"]),
        (Reply.error(502), "server_error", ["HTTP 502", "server error"]),
        (Reply.invalid_json(), "invalid_json", ["not JSON"]),
        (Reply.wrong_schema(), "off_schema", ["does not match Queries", "queries"]),
        (Reply.empty(), "empty", ["empty"]),
        (Reply.refusal(), "refusal", ["refused"]),
        (Reply.length(), "truncated", ["cut off"]),
    ],
    ids=["429", "502", "invalid_json", "wrong_schema", "empty", "refusal", "length"],
)
def test_persistent_failure_raises_clear_error(openai_server, failure, kind, words):
    openai_server.enqueue(*[failure] * 10)
    client = make_client(openai_server, max_retries=2)
    with pytest.raises(LLMError) as info:
        client.complete_json(MESSAGES, Queries)
    err = info.value
    assert err.kind == kind and err.attempts == 3 and openai_server.count == 3
    msg = str(err)
    assert "127.0.0.1" in msg and MODEL in msg and "after 3 requests" in msg
    for w in words:
        assert w in msg
    assert client.usage.requests == 3


def test_retry_after_is_honoured(openai_server):
    openai_server.enqueue(Reply.rate_limit(retry_after_ms="150"), Reply.ok(["x y z"]))
    make_client(openai_server).complete_json(MESSAGES, Queries)
    t0, t1 = (r["t"] for r in openai_server.requests)
    assert t1 - t0 >= 0.14


def test_unauthorized_is_not_retried(openai_server):
    openai_server.enqueue(Reply.error(401, "Incorrect API key provided"))
    with pytest.raises(LLMError) as info:
        make_client(openai_server).complete_json(MESSAGES, Queries)
    assert info.value.fatal and info.value.status == 401
    assert "API key" in str(info.value) and openai_server.count == 1


def test_unsupported_json_mode_falls_back(openai_server):
    openai_server.enqueue(Reply.error(400, "Unknown parameter: response_format"), Reply.ok(["a b"]))
    answer, _ = make_client(openai_server).complete_json(MESSAGES, Queries)
    assert answer.queries == ["a b"]
    assert "response_format" not in openai_server.chat_bodies[1]


def test_connection_refused():
    port = closed_port()
    settings = LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, api_key=SecretStr(KEY),
                           max_retries=2, timeout_s=2)
    client = LLMClient(settings, backoff_base_s=0.001)
    with pytest.raises(LLMError) as info:
        client.complete_json(MESSAGES, Queries)
    assert info.value.kind == "connection" and info.value.attempts == 3
    assert f"127.0.0.1:{port}" in str(info.value) and "llm_base_url" in str(info.value)
    with pytest.raises(LLMError, match="cannot connect"):
        client.test_connection()


def test_timeouts_exhaust_retries(openai_server):
    openai_server.enqueue(*[Reply.slow(1.0)] * 3)
    client = make_client(openai_server, timeout_s=0.2, max_retries=1)
    start = time.monotonic()
    with pytest.raises(LLMError) as info:
        client.complete_json(MESSAGES, Queries)
    assert info.value.kind == "timeout" and "0.2 s" in str(info.value) and "timeout_s" in str(info.value)
    assert openai_server.count == 2
    assert time.monotonic() - start < 2.0


# Cache ---------------------------------------------------------------------------------------
def test_cache_hit_makes_no_request(openai_server, store):
    cache = LLMCache(store)
    client = make_client(openai_server, cache)
    key = CacheKey("passagehash1", "generate_queries@1", round=2)
    first, u1 = client.complete_json(MESSAGES, Queries, cache_key=key)
    second, u2 = client.complete_json(MESSAGES, Queries, cache_key=key)
    assert first == second and openai_server.count == 1
    assert u1.requests == 1 and u2 == Usage(cached=1)
    assert client.usage.requests == 1 and client.usage.cached == 1
    [row] = store.rows("SELECT * FROM llm_cache")
    assert row["passage_hash"] == "passagehash1" and row["prompt"] == "generate_queries@1"
    assert row["llm_model"] == MODEL and row["round"] == 2
    assert (row["prompt_tokens"], row["output_tokens"]) == (100, 20)
    assert row["cache_key"] == LLMCache.key("passagehash1", "generate_queries@1", MODEL)
    # Another model or prompt version is another key.
    other = LLMClient(LLMSettings(base_url=openai_server.base_url, model="other-model"), cache)
    other.complete_json(MESSAGES, Queries, cache_key=key)
    client.complete_json(MESSAGES, Queries, cache_key=CacheKey("passagehash1", "generate_queries@2"))
    assert openai_server.count == 3 and len(cache) == 3


def test_cache_written_from_many_threads(openai_server, store):
    cache = LLMCache(store)
    client = make_client(openai_server, cache, concurrency=8)
    keys = [CacheKey(f"p{i}", "generate_queries@1") for i in range(24)]
    results = client.map(keys, lambda k: client.complete_json(MESSAGES, Queries, cache_key=k)[0])
    assert not [r for r in results if isinstance(r, Exception)]
    assert len(cache) == 24
    client.map(keys, lambda k: client.complete_json(MESSAGES, Queries, cache_key=k)[0])
    assert openai_server.count == 24


# Concurrency and rate limit ------------------------------------------------------------------
def test_map_runs_concurrently_and_keeps_order(openai_server):
    openai_server.latency = 0.2
    client = make_client(openai_server, concurrency=8)
    seen = []
    results = client.map(
        list(range(40)),
        lambda i: (i, client.complete_json([{"role": "user", "content": f"job {i}"}], Queries)[0]),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert [r[0] for r in results] == list(range(40))
    assert 1 < openai_server.max_in_flight <= 8
    assert openai_server.count == 40 and client.usage.requests == 40
    assert sorted(seen)[-1] == (40, 40) and len(seen) == 40


def test_map_keeps_other_results_when_one_fails(openai_server):
    client = make_client(openai_server, concurrency=4)

    def job(i: int) -> int:
        if i == 3:
            raise ValueError("boom")
        return i * 10

    results = client.map(range(6), job)
    assert results[:3] == [0, 10, 20] and results[4:] == [40, 50]
    assert isinstance(results[3], ValueError)


def test_map_stops_calling_after_fatal_error(openai_server):
    openai_server.enqueue(*[Reply.error(401, "bad key")] * 20)
    client = make_client(openai_server, concurrency=1)
    results = client.map(range(10), lambda i: client.complete_json(MESSAGES, Queries))
    assert all(isinstance(r, LLMError) and r.fatal for r in results)
    assert openai_server.count == 1


def test_token_bucket_limits_rate():
    bucket = _TokenBucket(per_minute=1200, capacity=2)  # 20 per second after a burst of 2
    start = time.monotonic()
    for _ in range(8):
        bucket.acquire()
    assert time.monotonic() - start >= 0.25  # 6 beyond the burst at 50 ms each


# Settings, secrets and usage -----------------------------------------------------------------
def test_settings_from_workspace_settings():
    s = Settings(llm_base_url="http://127.0.0.1:9/v1/", llm_model="m1", llm_api_key=KEY)
    ls = LLMSettings.from_settings(s, concurrency=2)
    assert ls.base_url == "http://127.0.0.1:9/v1" and ls.model == "m1" and ls.concurrency == 2
    assert ls.api_key.get_secret_value() == KEY
    assert LLMSettings.from_settings(Settings()).base_url == "https://api.openai.com/v1"
    with pytest.raises(ValidationError):
        LLMSettings(model="m", temperature=0.3)
    with pytest.raises(ValidationError, match="http"):
        LLMSettings(model="m", base_url="127.0.0.1:8080")
    assert LLMSettings(model="m", base_url="https://user:pw@llm.example:8443/v1").endpoint == "https://llm.example:8443"


def test_key_never_leaks(openai_server, store, caplog):
    caplog.set_level(logging.DEBUG)
    cache = LLMCache(store)
    client = make_client(openai_server, cache, max_retries=1)
    client.complete_json(MESSAGES, Queries, cache_key=CacheKey("p", "generate_queries@1"))
    openai_server.enqueue(Reply.rate_limit(), Reply.rate_limit(), Reply.echo_auth(401), Reply.echo_auth(500),
                          Reply.echo_auth(500))
    errors = []
    for _ in range(3):
        with pytest.raises(LLMError) as info:
            client.complete_json(MESSAGES, Queries)
        errors.append(info.value)
    assert openai_server.requests[-1]["headers"]["authorization"] == f"Bearer {KEY}"  # it was sent
    assert "Invalid credentials" in str(errors[1])  # the server's message, redacted
    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [
        repr(client), repr(client.settings), client.settings.model_dump_json(), str(client.settings.model_dump()),
        caplog.text, str(store.rows("SELECT * FROM llm_cache")),
    ]
    for t in texts:
        assert KEY not in t
    assert "Bearer ***" in str(errors[1])


def test_usage_sums():
    a, b = Usage(prompt_tokens=1, completion_tokens=2, requests=1), Usage(cached=1)
    assert a + b == Usage(prompt_tokens=1, completion_tokens=2, requests=1, cached=1)
    total = Usage(prompt_tokens=2, completion_tokens=4, requests=2, cached=1)
    assert sum([a, a, b], Usage()) == sum([a, a, b]) == total


def test_test_connection(openai_server):
    client = make_client(openai_server)
    assert "'test-model' available" in client.test_connection()
    openai_server.models_status = 404  # no /models: a 1-token completion instead
    assert "answered" in client.test_connection()
    assert openai_server.chat_bodies[-1]["max_tokens"] == 1
    openai_server.models_status = 401
    with pytest.raises(LLMError, match="API key"):
        client.test_connection()
