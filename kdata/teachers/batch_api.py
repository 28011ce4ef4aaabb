"""The two batch APIs over HTTP: OpenAI's Batch API and Anthropic's Message Batches.

Each client turns a request into a line of the provider's batch input, submits, reports a
batch's status (`Status`), and reads its results back as litellm ``ModelResponse`` objects (the
shape an online call stores) or `TeacherError` with the pool's error classes. litellm translates
requests to Anthropic's format and its answers back, as its online path does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdata.errors import TeacherError

if TYPE_CHECKING:
    from kdata.recipe import Teacher

# Provider limits on one batch: requests and bytes of the request file (with some headroom).
LIMITS = {"openai": (50_000, 180 * 2**20), "anthropic": (100_000, 230 * 2**20)}
BASES = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
KEY_VARS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
_STATUS = {400: "bad_request", 401: "auth", 403: "permission", 404: "not_found", 422: "bad_request"}
_ANTHROPIC_ERRORS = {
    "invalid_request_error": ("bad_request", False),
    "authentication_error": ("auth", False),
    "permission_error": ("permission", False),
    "not_found_error": ("not_found", False),
    "request_too_large": ("bad_request", False),
    "rate_limit_error": ("rate_limit", True),
    "api_error": ("server_error", True),
    "overloaded_error": ("server_error", True),
}


def provider(cfg: Teacher) -> tuple[str, str]:
    """``(provider, model name as the provider knows it)`` of a batch teacher.

    Raises:
        ValueError: the model is served by neither OpenAI's nor Anthropic's API.
    """
    from kdata.teachers.pool import _litellm

    try:
        model, name = _litellm().get_llm_provider(cfg.model)[:2]
    except Exception:  # litellm raises for a model it cannot place
        name = None
    if name not in LIMITS:
        raise ValueError(
            f"batch: true needs an OpenAI or Anthropic model (openai/... or anthropic/...), not "
            f"'{cfg.model}'; remove batch or use such a model"
        )
    return name, model


def http_error(status: int, message: str) -> TeacherError:
    """The `TeacherError` of an HTTP error status, with the pool's classes."""
    if status == 429:
        return TeacherError("rate_limit", message, retryable=True)
    if status >= 500:
        return TeacherError("server_error", message, retryable=True)
    if status == 400 and "context" in message.lower() and "length" in message.lower():
        return TeacherError("context_window", message, retryable=False)
    return TeacherError(_STATUS.get(status, f"http_{status}"), message, retryable=False)


@dataclass
class Status:
    """A batch's state as its provider reports it."""

    ended: bool
    label: str  # the provider's status word
    done: int
    failed: int
    total: int
    raw: dict


class Http:
    """What both providers' clients share: one HTTP client, errors as `TeacherError`."""

    def __init__(self, base: str, key: str, model: str, timeout: float) -> None:
        self.base, self.key, self.model, self.timeout = base, key, model, timeout

    def client(self):
        import httpx

        return httpx.AsyncClient(timeout=self.timeout, headers=self.headers())

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    async def call(self, client, method: str, path: str, **kw) -> Any:
        import httpx

        try:
            r = await client.request(method, self.base + path, **kw)
        except httpx.TimeoutException as e:
            raise TeacherError("timeout", f"{method} {path}: {e}", retryable=True) from None
        except httpx.HTTPError as e:
            raise TeacherError(
                "connection_error", f"{method} {path}: {e}", retryable=True
            ) from None
        if r.status_code >= 400:
            text = r.text[:500].replace(self.key, "***") if self.key else r.text[:500]
            error = http_error(r.status_code, f"{method} {path}: {text}")
            error.headers = r.headers  # its Retry-After (`kdata.teachers.retries.retry_after`)
            raise error
        return r

    async def lines(self, client, path: str) -> AsyncIterator[dict]:
        """The JSON lines of a results file, as they download."""
        import httpx

        try:
            async with client.stream("GET", self.base + path) as r:
                if r.status_code >= 400:
                    text = (await r.aread()).decode(errors="replace")[:500]
                    raise http_error(r.status_code, f"GET {path}: {text}")
                async for line in r.aiter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TimeoutException as e:
            raise TeacherError("timeout", f"GET {path}: {e}", retryable=True) from None
        except httpx.HTTPError as e:  # the download was cut short: it is read again
            raise TeacherError("connection_error", f"GET {path}: {e}", retryable=True) from None


class OpenAI(Http):
    """OpenAI's Batch API: ``/files`` (purpose ``batch``), ``/batches``, output and error files."""

    provider = "openai"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def line(self, key: str, messages: list[dict], params: dict) -> str:
        body = {"model": self.model, "messages": messages, **params}
        line = {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body}
        return json.dumps(line, ensure_ascii=False) + "\n"

    async def upload(self, client, data: bytes) -> str:
        files = {"file": ("batch.jsonl", data, "application/jsonl")}
        r = await self.call(client, "POST", "/files", data={"purpose": "batch"}, files=files)
        return r.json()["id"]

    async def find(self, client, file_id: str, since: float) -> str | None:
        """The id of a batch made from ``file_id``, if the account has one (newest first, back
        to the batches created before ``since``, the file's upload)."""
        after = None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = (await self.call(client, "GET", "/batches", params=params)).json()
            for b in page.get("data", []):
                if b.get("input_file_id") == file_id:
                    return b["id"]
            data = page.get("data") or []
            if not page.get("has_more") or not data or data[-1].get("created_at", 0) < since - 60:
                return None
            after = data[-1]["id"]

    async def create(self, client, uid: str, requests: dict, file_id: str, since: float) -> str:
        """Create the batch of an uploaded file, unless one was made from it already (by a
        build that died, or a create whose answer was lost): a file is submitted once."""
        found = await self.find(client, file_id, since)
        if found is not None:
            return found
        body = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"kdata_batch": uid},
        }
        return (await self.call(client, "POST", "/batches", json=body)).json()["id"]

    async def status(self, client, batch_id: str) -> Status:
        raw = (await self.call(client, "GET", f"/batches/{batch_id}")).json()
        counts = raw.get("request_counts") or {}
        return Status(
            ended=raw["status"] in ("completed", "expired", "failed", "cancelled"),
            label=raw["status"],
            done=counts.get("completed", 0),
            failed=counts.get("failed", 0),
            total=counts.get("total", 0),
            raw=raw,
        )

    def unanswered(self, status: Status) -> tuple[str, str]:
        """The error class of the requests an ended batch did not answer, and why (the batch's
        own errors: a token limit, an invalid file...)."""
        error_class = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(
            status.label, "batch_failed" if status.label == "failed" else "batch_missing"
        )
        errors = (status.raw.get("errors") or {}).get("data") or []
        why = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors[:3])
        return error_class, f" ({why})" if why else ""

    async def results(self, client, status: Status, requests: dict) -> AsyncIterator[tuple]:
        """``(key, response or TeacherError)`` of each line of the output and error files."""
        import litellm

        for file_id in (status.raw.get("output_file_id"), status.raw.get("error_file_id")):
            if not file_id:
                continue
            async for line in self.lines(client, f"/files/{file_id}/content"):
                resp, error = line.get("response") or {}, line.get("error")
                if resp.get("status_code") == 200 and not error:
                    yield line["custom_id"], litellm.ModelResponse(**resp["body"])
                elif error and error.get("code") in ("batch_expired", "batch_cancelled"):
                    message = error.get("message", "")
                    yield line["custom_id"], TeacherError(error["code"], message, retryable=True)
                else:
                    body = (resp.get("body") or {}).get("error") or error or {}
                    message = body.get("message") or json.dumps(body)
                    yield line["custom_id"], http_error(resp.get("status_code") or 500, message)


class Anthropic(Http):
    """Anthropic's Message Batches API: ``/v1/messages/batches``, results as JSON lines."""

    provider = "anthropic"
    VERSION = "2023-06-01"

    def __init__(self, base: str, key: str, model: str, timeout: float) -> None:
        super().__init__(base.removesuffix("/v1"), key, model, timeout)

    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key, "anthropic-version": self.VERSION}

    def line(self, key: str, messages: list[dict], params: dict) -> str:
        return json.dumps({"custom_id": key, "params": self.params(messages, params)}) + "\n"

    def optional(self, params: dict) -> dict:
        """litellm's Anthropic parameters for these (``json_mode``: a schema sent as a tool)."""
        from kdata.teachers.pool import _litellm

        config = _litellm().AnthropicConfig()
        return config.map_openai_params(dict(params), {}, self.model, drop_params=False)

    def params(self, messages: list[dict], params: dict) -> dict:
        """The Messages API request litellm's online path would send for these."""
        from kdata.teachers.pool import DEFAULT_MAX_TOKENS_ESTIMATE, _litellm

        optional = self.optional(params)
        optional.pop("json_mode", None)  # litellm's own flag, not sent (as online)
        body = (
            _litellm().AnthropicConfig().transform_request(self.model, messages, optional, {}, {})
        )
        body.pop("stream", None)
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS_ESTIMATE)
        return {**body, "model": self.model}

    async def create(self, client, uid: str, requests: dict, file_id: None, since: float) -> str:
        lines = [json.loads(self.line(k, m, p)) for k, (m, p) in requests.items()]
        r = await self.call(client, "POST", "/v1/messages/batches", json={"requests": lines})
        return r.json()["id"]

    async def status(self, client, batch_id: str) -> Status:
        raw = (await self.call(client, "GET", f"/v1/messages/batches/{batch_id}")).json()
        c = raw.get("request_counts") or {}
        return Status(
            ended=raw["processing_status"] == "ended",
            label=raw["processing_status"],
            done=c.get("succeeded", 0),
            failed=c.get("errored", 0) + c.get("canceled", 0) + c.get("expired", 0),
            total=sum(c.values()),
            raw=raw,
        )

    def unanswered(self, status: Status) -> tuple[str, str]:
        """Every request of an ended Message Batch has a result: one missing is an anomaly."""
        return "batch_missing", ""

    async def results(self, client, status: Status, requests: dict) -> AsyncIterator[tuple]:
        """``(key, response or TeacherError)`` of each result; an answer to a request whose
        schema went as a tool is read as litellm reads it online (the tool's input as content)."""
        import httpx

        from kdata.teachers.pool import _litellm

        litellm = _litellm()
        config = litellm.AnthropicConfig()
        path = f"/v1/messages/batches/{status.raw['id']}/results"
        async for line in self.lines(client, path):
            key, result = line["custom_id"], line.get("result") or {}
            kind = result.get("type")
            if kind == "succeeded":
                message = result["message"]
                json_mode = bool(self.optional(requests.get(key, ((), {}))[1]).get("json_mode"))
                yield (
                    key,
                    config.transform_parsed_response(
                        message,
                        httpx.Response(200, json=message),
                        litellm.ModelResponse(),
                        json_mode=json_mode,
                    ),
                )
            elif kind in ("expired", "canceled"):
                error_class = "batch_expired" if kind == "expired" else "batch_cancelled"
                yield key, TeacherError(error_class, f"the request was {kind}", retryable=True)
            else:
                err = (result.get("error") or {}).get("error") or result.get("error") or {}
                error_class, retryable = _ANTHROPIC_ERRORS.get(
                    err.get("type"), (str(err.get("type")), False)
                )
                message = err.get("message") or json.dumps(err)
                yield key, TeacherError(error_class, message, retryable=retryable)
