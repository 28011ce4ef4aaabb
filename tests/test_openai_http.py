"""The fast path (kdata.teachers.openai_http): which teachers take it, and that it sends, stores
and prices exactly what the litellm path does, against the loopback OpenAI stand-in.

The fault-injection, kill -9, budget and secret tests of the pool run on both paths in
tests/test_pool_faults.py; the llama.cpp server tests in test_e2e.py and test_features.py too.
"""

from __future__ import annotations

import asyncio

import pytest
from openai_standin import CONTEXT_WINDOW, Config, StandIn

from kdata.errors import TeacherError
from kdata.recipe import Teacher
from kdata.teachers import openai_http, response
from kdata.teachers.cache import RequestCache
from kdata.teachers.pool import TeacherPool, _litellm


@pytest.mark.parametrize(
    ("model", "api_base", "client", "sent_as"),
    [
        ("openai/standin-model", "http://127.0.0.1:9/v1", "auto", "standin-model"),
        (
            "openai/Qwen/Qwen2.5-7B-Instruct",
            "http://h:8000/v1/",
            "auto",
            "Qwen/Qwen2.5-7B-Instruct",
        ),
        ("hosted_vllm/Qwen/Qwen3-8B", "http://h:8000/v1", "auto", "Qwen/Qwen3-8B"),
        ("gpt-4o-mini", None, "auto", "gpt-4o-mini"),  # a bare OpenAI name: OpenAI itself
        ("openai/gpt-4o-mini", "http://127.0.0.1:9/v1", "litellm", None),  # forced
        ("openai/o3-mini", None, "auto", None),  # litellm rewrites max_tokens and roles
        ("openai/gpt-5-mini", None, "auto", None),
        ("hosted_vllm/x", None, "auto", None),  # no endpoint to send to
        ("anthropic/claude-3-5-haiku-20241022", None, "auto", None),
        ("local/smollm2-135m-instruct", None, "auto", None),
    ],
)
def test_which_teachers_take_the_fast_path(monkeypatch, model, api_base, client, sent_as):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "HOSTED_VLLM_API_BASE"):
        monkeypatch.delenv(var, raising=False)
    ep = openai_http.endpoint(Teacher(model=model, api_base=api_base, client=client), _litellm())
    if sent_as is None:
        assert ep is None
        return
    assert ep.model == sent_as
    want = (api_base or "https://api.openai.com/v1").rstrip("/") + "/chat/completions"
    assert ep.url == want


def test_a_thinking_teacher_goes_through_litellm():
    cfg = Teacher(
        model="hosted_vllm/q", api_base="http://h/v1", params={"thinking": {"type": "enabled"}}
    )
    assert openai_http.endpoint(cfg, _litellm()) is None  # litellm maps it to reasoning_effort


def _ask(base_url: str, tmp, client: str, params: dict, model: str = "openai/standin-model"):
    """One request through a fresh pool and cache; the completion and the stored entry."""
    cfg = Teacher(
        model=model,
        api_base=base_url,
        api_key="${KDATA_TEST_KEY}",
        client=client,
        params=params,
    )
    cache = RequestCache(tmp / f"{client}.sqlite")
    pool = TeacherPool({"t": cfg}, cache)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]

    async def go():
        try:
            return await pool.complete("t", msgs, route_key="0", params={"logprobs": True})
        finally:
            await pool.aclose()

    c = asyncio.run(go())
    stored = cache.get(c.request_hash)
    cache.close()
    return c, stored, pool


def test_both_paths_send_the_same_body_and_store_what_reads_the_same(tmp_path):
    params = {"temperature": 0.0, "max_tokens": 64, "seed": 3, "extra_body": {"top_k": 5}}
    with StandIn(Config(reasoning=lambda body: "two and two", reasoning_tokens=5)) as s:
        fast, fast_stored, _ = _ask(s.base_url, tmp_path, "auto", params)
        slow, slow_stored, _ = _ask(s.base_url, tmp_path, "litellm", params)
        a, b = s.records
    assert a.user_agent == "kdata" and b.user_agent.startswith("AsyncOpenAI")
    assert a.body == b.body and a.body_hash == b.body_hash  # extra_body merged, as litellm does
    assert a.body["top_k"] == 5 and "extra_body" not in a.body
    assert a.authorization == b.authorization == "Bearer sk-test"
    assert fast.request_hash == slow.request_hash  # one cache key, whichever path
    assert response.read(fast_stored) == response.read(slow_stored)
    reply = response.read(fast_stored)
    assert reply.reasoning == "two and two" and reply.reasoning_tokens == 5
    assert (fast.text, fast.reasoning, fast.completion_tokens) == (
        slow.text,
        slow.reasoning,
        slow.completion_tokens,
    )


def test_a_cache_written_through_litellm_serves_the_fast_path(tmp_path):
    with StandIn(Config()) as s:
        first, _, _ = _ask(s.base_url, tmp_path, "litellm", {"max_tokens": 8})
        (tmp_path / "litellm.sqlite").rename(tmp_path / "auto.sqlite")
        again, _, pool = _ask(s.base_url, tmp_path, "auto", {"max_tokens": 8})
        assert s.count() == 1  # the second was never sent
    assert again.cached and again.text == first.text
    assert pool.ledgers["t"].cache_hits == 1 and pool.ledgers["t"].requests == 0


def test_the_fast_path_prices_from_litellms_table(tmp_path):
    with StandIn(Config(completion_tokens=7)) as s:
        c, stored, pool = _ask(s.base_url, tmp_path, "auto", {}, model="openai/gpt-4o-mini")
    p_cost, c_cost = _litellm().cost_per_token(
        model="gpt-4o-mini", prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens
    )
    assert c.completion_tokens == 7 and c.cost_usd > 0
    assert c.cost_usd == pytest.approx(p_cost + c_cost)
    assert stored["cost_usd"] == c.cost_usd == pool.spent_usd


@pytest.mark.parametrize(
    ("status", "body", "error_class", "retryable"),
    [
        (
            400,
            {"error": {"message": "bad temperature", "code": "invalid_value"}},
            "bad_request",
            False,
        ),
        (
            400,
            {"error": {"message": "x", "code": "context_length_exceeded"}},
            "context_window",
            False,
        ),
        # llama.cpp's server says it in words only
        (
            400,
            {"error": {"message": "the request exceeds the available context size"}},
            "context_window",
            False,
        ),
        (
            400,
            {"error": {"message": "no", "code": "content_policy_violation"}},
            "content_policy",
            False,
        ),
        (401, {"error": {"message": "Incorrect API key"}}, "auth", False),
        (403, {"error": {"message": "region"}}, "permission", False),
        (
            404,
            {"error": {"message": "no such model", "code": "model_not_found"}},
            "not_found",
            False,
        ),
        (408, None, "timeout", True),
        (422, {"detail": "bad field"}, "bad_request", False),
        (429, {"error": {"message": "slow down"}}, "rate_limit", True),
        (500, None, "server_error", True),
        (502, None, "server_error", True),
        (503, {"error": "overloaded"}, "server_error", True),
        (504, None, "timeout", True),
        (200, {"object": "chat.completion", "choices": []}, "server_error", True),
    ],
)
def test_http_answers_get_the_pools_error_classes(status, body, error_class, retryable):
    import json

    raw = json.dumps(body).encode() if body is not None else b"<html>Bad Gateway</html>"
    err = openai_http._status_error(status, raw, openai_http._json(raw), {"retry-after": "2"})
    assert (err.error_class, err.retryable) == (error_class, retryable)
    assert str(err).startswith(f"HTTP {status}: ")
    assert err.headers["retry-after"] == "2"


def test_a_context_window_error_over_http_is_not_retried(tmp_path):
    with StandIn(Config(always=CONTEXT_WINDOW)) as s:
        cfg = Teacher(model="openai/m", api_base=s.base_url, max_retries=3)
        pool = TeacherPool({"t": cfg}, RequestCache(tmp_path / "c.sqlite"))

        async def go():
            try:
                await pool.complete("t", [{"role": "user", "content": "hi"}], route_key="0")
            finally:
                await pool.aclose()

        with pytest.raises(TeacherError) as exc:
            asyncio.run(go())
        assert s.count() == 1
    assert exc.value.error_class == "context_window" and "maximum context length" in str(exc.value)
