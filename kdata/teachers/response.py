"""What a stored teacher response says: one reader for every format the cache has held.

The cache keeps the provider's whole response as litellm returned it, or as an OpenAI-compatible
server sent it on the fast path (the same shape: ``{"format": 2,
"response": ..., "cost_usd": ...}``): content, reasoning (``reasoning_content``, Anthropic's
thinking blocks, vLLM's ``reasoning``), tool calls, refusal, finish reason and the full usage
(reasoning and cached tokens included). A new parser or column reads it again; nothing is paid
for twice. Entries written before format 2 kept only the text, finish reason, token counts and
logprobs; they are read as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


@dataclass(frozen=True)
class Reply:
    """The fields of one response that steps, the ledger and provenance use."""

    text: str | None
    reasoning: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    logprobs: Any
    response_model: str | None
    tool_calls: list | None
    refusal: str | None


def stored(response: dict[str, Any], cost_usd: float) -> dict[str, Any]:
    """The cache entry of a response in JSON form: litellm's ``ModelResponse`` dumped, or the
    fast path's chat completion as the server sent it (the same shape)."""
    return {"format": 2, "response": response, "cost_usd": cost_usd}


def read(data: dict[str, Any], *, think_tags: bool = False) -> Reply:
    """The reply in a cache entry of any format.

    Args:
        data: what the cache stored.
        think_tags: split an inline ``<think>...</think>`` at the start of the content into
            the reasoning (for servers that do not separate it themselves). Such a server
            counts no reasoning tokens; they are estimated as the trace's share of the
            content's characters times the completion tokens.
    """
    if data.get("format") == 2:
        reply = _read_v2(data["response"])
    else:
        usage = data.get("usage") or {}
        reply = Reply(
            text=data.get("text"),
            reasoning=None,
            finish_reason=data.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            reasoning_tokens=0,
            cached_tokens=0,
            logprobs=data.get("logprobs"),
            response_model=data.get("response_model"),
            tool_calls=None,
            refusal=None,
        )
    if think_tags and reply.text and reply.reasoning is None:
        m = _THINK.match(reply.text)
        if m:
            tokens = reply.reasoning_tokens
            if not tokens:  # the server counted none: the trace's share of the characters
                tokens = round(reply.completion_tokens * m.end() / len(reply.text))
            return replace(
                reply,
                text=reply.text[m.end() :],
                reasoning=m.group(1).strip(),
                reasoning_tokens=tokens,
            )
    return reply


def _read_v2(resp: dict[str, Any]) -> Reply:
    choice = (resp.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = resp.get("usage") or {}
    details = usage.get("completion_tokens_details") or {}
    prompt_details = usage.get("prompt_tokens_details") or {}
    return Reply(
        text=message.get("content") if message else choice.get("text"),  # chat, else text
        reasoning=_reasoning(message),
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        reasoning_tokens=details.get("reasoning_tokens") or 0,
        cached_tokens=prompt_details.get("cached_tokens") or 0,
        logprobs=choice.get("logprobs"),
        response_model=resp.get("model"),
        tool_calls=message.get("tool_calls") or None,
        refusal=message.get("refusal"),
    )


def _reasoning(message: dict[str, Any]) -> str | None:
    """litellm's ``reasoning_content`` (DeepSeek, Anthropic, Gemini, OpenAI-compatible servers
    with a reasoning parser), else vLLM's ``reasoning``, else Anthropic's thinking blocks."""
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str) and message[key]:
            return message[key]
    blocks = message.get("thinking_blocks") or []
    text = "\n".join(b.get("thinking", "") for b in blocks if isinstance(b, dict))
    return text or None
