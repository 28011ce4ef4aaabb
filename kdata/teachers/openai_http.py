"""The fast path: OpenAI-compatible chat completions over one pooled aiohttp session per endpoint.

A teacher takes it (``client: auto``, the default) when litellm would send its requests to
``POST {api_base}/chat/completions`` unchanged: litellm's provider is ``openai`` (``openai/...``,
or a bare OpenAI model name such as ``gpt-4o-mini``) with its plain chat config, or
``hosted_vllm`` with an ``api_base``; and the teacher sets no ``thinking`` (which litellm maps to
``reasoning_effort`` for vLLM). OpenAI's reasoning models (o-series, gpt-5), whose parameters and
roles litellm rewrites, and every other provider go through litellm, as does any teacher with
``client: litellm``.

The body is what litellm sends: the model name without its provider prefix, the messages, the
parameters, ``extra_body`` merged in. The answer is stored as the server's JSON, which has the
shape of litellm's ``ModelResponse`` dump that `kdata.teachers.response` reads, vLLM's
``reasoning`` included. A failed request raises `StatusError` with the pool's error class,
mapped from the HTTP status as litellm maps it (context window and content policy from the
error's code or text, by litellm's own check); a dropped connection or timeout raises aiohttp's
own error, which the pool classifies as it classifies the SDK's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

    from kdata.recipe import Teacher

_PLAIN_CONFIGS = {
    "openai": {"OpenAIGPTConfig", "OpenAIUnknownModelConfig"},
    "hosted_vllm": {"HostedVLLMChatConfig"},
}
_KEY_VARS = {"openai": "OPENAI_API_KEY", "hosted_vllm": "HOSTED_VLLM_API_KEY"}
# HTTP status -> (error class, retryable), as litellm maps an OpenAI-compatible server's answer.
_STATUS = {
    400: ("bad_request", False),
    401: ("auth", False),
    403: ("permission", False),
    404: ("not_found", False),
    408: ("timeout", True),
    422: ("bad_request", False),
    429: ("rate_limit", True),
    504: ("timeout", True),
}


@dataclass(frozen=True)
class Endpoint:
    """Where and as what one teacher's requests are sent on the fast path."""

    url: str  # .../chat/completions
    model: str  # the model name the server is sent
    key_var: str  # the key's environment variable when the teacher names none


class StatusError(Exception):
    """A non-200 answer (or a 200 that is not a completion), with the pool's error class."""

    def __init__(
        self, status: int, message: str, headers: Any, error_class: str, retryable: bool
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status_code = status
        self.headers = headers  # Retry-After is read from here
        self.error_class = error_class
        self.retryable = retryable


def endpoint(cfg: Teacher, litellm: Any) -> Endpoint | None:
    """The fast-path endpoint of a teacher, or None when its requests go through litellm."""
    if cfg.client == "litellm" or cfg.model.startswith("local/") or cfg.params.thinking:
        return None
    try:
        model, provider, _, _ = litellm.get_llm_provider(cfg.model, api_base=cfg.api_base)
        from litellm.utils import ProviderConfigManager

        config = ProviderConfigManager.get_provider_chat_config(
            model, litellm.LlmProviders(provider)
        )
    except Exception:  # litellm does not know the model: it says why when the request is made
        return None
    if type(config).__name__ not in _PLAIN_CONFIGS.get(provider, ()):
        return None
    base = cfg.api_base
    if provider == "openai":
        base = base or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE")
        base = base or "https://api.openai.com/v1"
    else:
        base = base or os.environ.get("HOSTED_VLLM_API_BASE")
    if not base:
        return None
    return Endpoint(base.rstrip("/") + "/chat/completions", model, _KEY_VARS[provider])


def body(ep: Endpoint, messages: list[dict], params: dict[str, Any]) -> bytes:
    """The JSON body litellm would send: model, messages, parameters, ``extra_body`` merged."""
    extra = params.get("extra_body")
    sent = {k: v for k, v in params.items() if k != "extra_body"}
    return json.dumps({"model": ep.model, "messages": messages, **sent, **(extra or {})}).encode()


class Sessions:
    """One pooled aiohttp session per endpoint URL, opened on first use on the running loop.

    The proxy (``HTTPS_PROXY``, ``NO_PROXY``... as the OpenAI SDK honours them) is looked up once
    per endpoint: aiohttp's ``trust_env`` would look it up, in a thread, for every request.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[aiohttp.ClientSession, dict[str, Any]]] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _session(self, url: str) -> tuple[aiohttp.ClientSession, dict[str, Any]]:
        import aiohttp
        from aiohttp.helpers import get_env_proxy_for_url
        from yarl import URL

        try:
            proxy, auth = get_env_proxy_for_url(URL(url))
            via = {"proxy": proxy, "proxy_auth": auth}
        except LookupError:  # no proxy for this host
            via = {}
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # the pool's semaphores bound it
            headers={"Content-Type": "application/json", "User-Agent": "kdata"},
        )
        self._open[url] = session, via
        return session, via

    async def post(
        self, ep: Endpoint, messages: list[dict], params: dict, api_key: str | None, timeout: float
    ) -> dict:
        """Send one request; the parsed answer, or `StatusError` / aiohttp's error."""
        session, via = self._open.get(ep.url) or self._session(ep.url)
        if timeout not in self._timeouts:
            import aiohttp

            self._timeouts[timeout] = aiohttp.ClientTimeout(total=timeout)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        async with session.post(
            ep.url,
            data=body(ep, messages, params),
            headers=headers,
            timeout=self._timeouts[timeout],
            **via,
        ) as r:
            raw = await r.read()
            status, resp_headers = r.status, r.headers
        data = _json(raw)
        if status == 200 and isinstance(data, dict) and data.get("choices"):
            return _split_reasoning(data)
        raise _status_error(status, raw, data, resp_headers)

    async def aclose(self) -> None:
        """Close every session (and its connections)."""
        sessions, self._open = list(self._open.values()), {}
        for session, _ in sessions:
            await session.close()


def _split_reasoning(data: dict) -> dict:
    """A leading ``<think>...</think>`` moved from the content to ``reasoning_content``, as
    litellm does for these providers: both paths store the same response."""
    from litellm.litellm_core_utils.prompt_templates.common_utils import (
        _parse_content_for_reasoning,
    )

    for choice in data["choices"]:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and not message.get("reasoning_content"):
            reasoning, content = _parse_content_for_reasoning(message.get("content"))
            if reasoning is not None:
                message["reasoning_content"], message["content"] = reasoning, content
    return data


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _status_error(status: int, raw: bytes, data: Any, headers: Any) -> StatusError:
    from litellm.litellm_core_utils.exception_mapping_utils import ExceptionCheckers

    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message, code = str(error.get("message") or error), str(error.get("code") or "")
    else:
        message = str(error) if error else raw.decode("utf-8", "replace")[:2000] or "no body"
        code = ""
    if status == 200:  # an answer that is no completion: the server failed to give one
        return StatusError(
            status, f"not a chat completion: {message}", headers, "server_error", True
        )
    if code == "context_length_exceeded" or ExceptionCheckers.is_error_str_context_window_exceeded(
        message
    ):
        return StatusError(status, message, headers, "context_window", False)
    if code == "model_not_found":
        return StatusError(status, message, headers, "not_found", False)
    if code == "content_policy_violation" or "violating our usage policy" in message:
        return StatusError(status, message, headers, "content_policy", False)
    error_class, retryable = _STATUS.get(
        status, ("server_error", True) if status >= 500 else ("bad_request", False)
    )
    return StatusError(status, message, headers, error_class, retryable)
