"""Batch APIs: a ``batch: true`` teacher's requests, sent as OpenAI Batches or Anthropic Message
Batches at half the online price.

A request that misses the cache joins the open batch of its teacher and block (`BLOCK`, which the
executor sets); a batch is sent once no request joined it for `COLLECT_S` (a block's requests
arrive together: a step that asks in rounds sends a batch per round) or when it reaches the
provider's limits. Each batch goes through these stages, each recorded in
``batches/journal.jsonl`` (fsync'd) before the next one starts:

1. its requests are written to ``batches/<uid>.jsonl`` (key, messages, parameters);
2. OpenAI: the provider's request file is uploaded (``uploaded``, with the file id);
3. the batch is created (``submitted``, with the batch id), before its id is used for anything;
4. it is polled with growing waits (a progress line each time) until it ends; every answer is
   stored in the cache, in the shape an online call stores (`kdata.teachers.response` reads it
   alike), at half price;
5. ``ended``.

A build killed anywhere resumes where the journal says: a request of a batch submitted and not
ended waits for that batch, which is polled again, never sent again. An OpenAI batch uploaded
but not recorded as submitted is looked for among the account's batches by its file id before
it is created. A request its batch did not answer (expired, cancelled, failed, a retryable
error) follows the teacher's ``batch_fallback``; a request the provider refused fails its row
with the error class, as online.

The calls are made over HTTP here rather than through litellm's batch functions: in the litellm
this was written against, creating an Anthropic batch raises ``NotImplementedError``, and one
client of ~5 endpoints per provider keeps the retries in kdata's hands. litellm still translates
the requests to Anthropic's format and the answers back (`_Anthropic`), as its online path does.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdata.errors import TeacherError

if TYPE_CHECKING:
    from kdata.recipe import Teacher
    from kdata.teachers.pool import TeacherPool, _TeacherState

BLOCK: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdata_block", default=None)
COLLECT_S = 1.0  # a batch is sent once no request joined it for this long
PRICE_FACTOR = 0.5  # batch prices: half of online, for both providers
POLL_GROWTH, POLL_CAP = 1.5, 20  # each wait 1.5x the one before, at most 20x batch_poll_s
# Provider limits on one batch: requests and bytes of the request file (with some headroom).
LIMITS = {"openai": (50_000, 180 * 2**20), "anthropic": (100_000, 230 * 2**20)}
BASES = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
KEY_VARS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
# What the fallback may retry: the batch did not answer, or answered an error retrying can fix.
UNANSWERED = {"batch_expired", "batch_cancelled", "batch_failed", "batch_missing"}
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


@dataclass
class _Batch:
    """One batch: its requests, where it stands, and the requests waiting for it."""

    uid: str
    teacher: str
    requests: dict[str, tuple[list[dict], dict]] = field(default_factory=dict)  # key -> request
    file_id: str | None = None  # OpenAI: the uploaded request file
    batch_id: str | None = None
    waiting: dict[str, asyncio.Future] = field(default_factory=dict)
    task: asyncio.Task | None = None
    size: int = 0  # bytes of the provider's request file so far


class Batches:
    """The batches of a pool's ``batch: true`` teachers (see the module doc).

    Args:
        pool: the pool whose cache, ledger, budget and online path the batches use.
        folder: ``batches/`` of the run directory.
        note: receives the progress lines.
    """

    def __init__(self, pool: TeacherPool, folder: Path, note: Callable[[str], None]) -> None:
        self.pool, self.folder, self.note = pool, folder, note
        self.journal = folder / "journal.jsonl"
        self._open: dict[tuple, _Batch] = {}  # (teacher, block) -> the batch collecting requests
        self._timers: dict[tuple, asyncio.TimerHandle] = {}
        self._known: dict[str, _Batch] = {}  # key -> the recorded batch that holds it
        self._apis: dict[str, _OpenAI | _Anthropic] = {}
        self._load()

    def _load(self) -> None:
        """Read the journal: every batch uploaded or submitted and not ended is resumed."""
        if not self.journal.exists():
            return
        state: dict[str, dict] = {}
        for line in self.journal.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except ValueError:  # a line cut short by a kill: its stage did not happen
                continue
            state.setdefault(event["uid"], {}).update(event)
        for uid, s in state.items():
            if s["event"] == "ended":
                continue
            b = _Batch(uid, s["teacher"], file_id=s.get("file_id"), batch_id=s.get("batch_id"))
            with (self.folder / f"{uid}.jsonl").open(encoding="utf-8") as fh:
                for line in fh:
                    r = json.loads(line)
                    b.requests[r["key"]] = (r["messages"], r["params"])
            for key in b.requests:
                self._known[key] = b

    async def send(
        self, st: _TeacherState, messages: list[dict], params: dict, key: str
    ) -> tuple[dict, int]:
        """Answer one request through batches, then the teacher's fallback; the stored
        response and how many times it was sent (a batch or online)."""
        fallback, attempts = st.cfg.batch_fallback, 0
        while True:
            attempts += 1
            result = await self._one(st, messages, params, key)
            if isinstance(result, dict):
                return result, attempts
            retry = result.retryable and fallback != "none"
            if not retry or (fallback == "batch" and attempts > st.cfg.max_retries):
                result.attempts = attempts
                raise result
            if fallback == "online":
                data, sent = await self.pool._send(st, messages, params, key)
                return data, attempts + sent

    async def _one(
        self, st: _TeacherState, messages: list[dict], params: dict, key: str
    ) -> dict | TeacherError:
        """One pass of a request through a batch: its stored response, or why it has none."""
        known = self._known.get(key)
        reserved = await self.pool._reserve(st, messages, params, PRICE_FACTOR, known is not None)
        try:
            stored = self.pool.cache.get(key)  # its batch may have ended while this waited
            if stored is not None:
                return stored
            known = self._known.get(key)
            if known is not None:
                fut = self._wait(known, key)
            else:
                fut = self._join(st, messages, params, key)
            return await fut
        finally:
            await self.pool._release(reserved)

    def _wait(self, b: _Batch, key: str) -> asyncio.Future:
        """A future for one request of batch ``b``; the batch runs while any request waits."""
        fut = asyncio.get_running_loop().create_future()
        b.waiting[key] = fut
        fut.add_done_callback(lambda _: self._stop_unwatched(b))
        if b.task is None or b.task.done():  # recorded by an earlier build, or failed
            b.task = asyncio.create_task(self._run(b))
        return fut

    def _stop_unwatched(self, b: _Batch) -> None:
        """Stop polling a batch nobody waits for any more (an interrupted build); the journal
        lets the next build go on polling it."""
        if b.batch_id and b.task and not b.task.done() and all(f.done() for f in b.waiting.values()):
            b.task.cancel()
            b.task = None

    def _join(self, st: _TeacherState, messages: list[dict], params: dict, key: str):
        """Add a request to its teacher's open batch (sent when full or when no request came
        for `COLLECT_S`); a future of its answer."""
        name, api = (st.name, BLOCK.get()), self._api(st)
        count, size = LIMITS[api.provider]
        try:
            line = api.line(key, messages, params)
        except Exception as e:  # litellm cannot translate it: the row fails, nothing is sent
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(TeacherError("bad_request", str(e), retryable=False))
            return fut
        b = self._open.get(name)
        if b is not None and (len(b.requests) >= count or b.size + len(line) > size):
            self._flush(name)
            b = None
        if b is None:
            b = self._open[name] = _Batch(uuid.uuid4().hex[:16], st.name)
        b.requests[key] = (messages, params)
        b.size += len(line)
        fut = asyncio.get_running_loop().create_future()
        b.waiting[key] = fut
        fut.add_done_callback(lambda _: self._stop_unwatched(b))
        if name in self._timers:
            self._timers[name].cancel()
        self._timers[name] = asyncio.get_running_loop().call_later(COLLECT_S, self._flush, name)
        return fut

    def _flush(self, name: tuple) -> None:
        """Send the open batch of a teacher, without the requests nobody waits for now."""
        self._timers.pop(name).cancel()
        b = self._open.pop(name)
        for key in [k for k, f in b.waiting.items() if f.done()]:
            del b.requests[key], b.waiting[key]
        if b.requests:
            b.task = asyncio.create_task(self._run(b))

    def _api(self, st: _TeacherState) -> _OpenAI | _Anthropic:
        """The client of a teacher's provider (made once; its key read from the environment)."""
        if st.name not in self._apis:
            name, model = provider(st.cfg)
            key = self.pool._api_key(st)
            if key is None:
                key = os.environ.get(KEY_VARS[name], "")
                self.pool._secrets.add(key)
            base = (st.cfg.api_base or BASES[name]).rstrip("/")
            api = (_OpenAI if name == "openai" else _Anthropic)(base, key, model, st.cfg.timeout)
            self._apis[st.name] = api
        return self._apis[st.name]

    async def _run(self, b: _Batch) -> None:
        """Submit a batch (unless the journal says it was), poll it, store its answers."""
        st = self.pool._teachers[b.teacher]
        api = self._api(st)
        try:
            async with api.client() as client:
                if b.batch_id is None:
                    await self._submit(b, st, api, client)
                    if all(f.done() for f in b.waiting.values()):
                        return  # recorded; nobody waits any more (an interrupted build)
                outcome = await self._poll(b, st, api, client)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the requests waiting fail with it; the journal keeps the batch
            outcome = dict.fromkeys(b.requests, _as_teacher_error(e))
        for key, fut in b.waiting.items():
            if not fut.done():
                fut.set_result(outcome.get(key) or self.pool.cache.get(key))

    async def _submit(self, b: _Batch, st: _TeacherState, api, client) -> None:
        """Write, upload and create the batch, recording each stage before the next."""
        self.pool.cache.check()
        path = self.folder / f"{b.uid}.jsonl"
        if not path.exists():  # a new batch (a resumed one has its file)
            self.folder.mkdir(parents=True, exist_ok=True)
            lines = (
                json.dumps({"key": k, "messages": m, "params": p}, ensure_ascii=False)
                for k, (m, p) in b.requests.items()
            )
            _write_synced(path, "\n".join(lines) + "\n")
            for key in b.requests:
                self._known[key] = b
        if isinstance(api, _OpenAI):
            if b.file_id is None:
                data = "".join(api.line(k, m, p) for k, (m, p) in b.requests.items())
                b.file_id = await _retrying(st, lambda: api.upload(client, data.encode()))
                self._record({"event": "uploaded", "uid": b.uid, "teacher": b.teacher,
                              "file_id": b.file_id})  # fmt: skip
            else:  # uploaded by a build that died: did it create the batch too?
                b.batch_id = await _retrying(st, lambda: api.find(client, b.file_id))
        if b.batch_id is None:
            b.batch_id = await _retrying(st, lambda: api.create(client, b))
        self._record({"event": "submitted", "uid": b.uid, "teacher": b.teacher,
                      "batch_id": b.batch_id})  # fmt: skip
        st.ledger.requests += len(b.requests)
        self.note(
            f"batch {b.batch_id} submitted: {len(b.requests)} requests of teacher "
            f"'{b.teacher}', recorded in {self.journal}"
        )

    async def _poll(self, b: _Batch, st: _TeacherState, api, client) -> dict[str, TeacherError]:
        """Wait for the batch to end, store its answers; the requests it did not answer."""
        wait, started = st.cfg.batch_poll_s, time.monotonic()
        while True:
            await asyncio.sleep(wait)
            try:
                status = await api.status(client, b.batch_id)
            except TeacherError as e:
                if not e.retryable:
                    raise
                self.note(f"batch {b.batch_id}: status check failed ({e}); trying again")
                status = None
            if status is not None and status.ended:
                break
            wait = min(wait * POLL_GROWTH, st.cfg.batch_poll_s * POLL_CAP)
            if status is not None:
                self.note(
                    f"batch {b.batch_id} ({b.teacher}): {status.label}, {status.done}/"
                    f"{status.total} answered, {status.failed} failed, "
                    f"{time.monotonic() - started:.0f}s; next check in {wait:.0f}s"
                )
        missing: dict[str, TeacherError] = {}
        async for key, answer in api.results(client, status):
            if key not in b.requests:
                continue
            if isinstance(answer, TeacherError):
                missing[key] = answer
                st.ledger.failures[answer.error_class] += 1
            else:
                messages, params = b.requests[key]
                self.pool._record(st, answer, messages, params, key, PRICE_FACTOR)
        unanswered = api.unanswered(status)
        for key in b.requests:
            if key not in missing and self.pool.cache.get(key) is None:
                missing[key] = TeacherError(unanswered, f"batch {b.batch_id} ended {status.label}"
                                            " without answering it", retryable=True)  # fmt: skip
                st.ledger.failures[unanswered] += 1
        self._record({"event": "ended", "uid": b.uid, "teacher": b.teacher,
                      "status": status.label})  # fmt: skip
        for key in b.requests:
            self._known.pop(key, None)
        self.note(
            f"batch {b.batch_id} ({b.teacher}) {status.label}: "
            f"{len(b.requests) - len(missing)} answered, {len(missing)} not"
        )
        return missing

    def _record(self, event: dict) -> None:
        """Append one event to the journal, durably, before anything else happens."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fresh = not self.journal.exists()
        with self.journal.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if fresh:
            _fsync_dir(self.folder)


def _as_teacher_error(error: Exception) -> TeacherError:
    if isinstance(error, TeacherError):
        return error
    from kdata.teachers.pool import classify

    error_class, retryable = classify(error)
    return TeacherError(error_class, f"{type(error).__name__}: {error}", retryable=retryable)


async def _retrying(st: _TeacherState, call: Callable[[], Any]) -> Any:
    """``call()`` with the pool's backoff, up to the teacher's ``max_retries`` retries."""
    from kdata.teachers.pool import backoff_delay

    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except TeacherError as e:
            if not e.retryable or attempt > st.cfg.max_retries:
                raise
        await asyncio.sleep(backoff_delay(attempt, None))


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Http:
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
            raise TeacherError("connection_error", f"{method} {path}: {e}", retryable=True) from None
        if r.status_code >= 400:
            text = r.text[:500].replace(self.key, "***") if self.key else r.text[:500]
            raise http_error(r.status_code, f"{method} {path}: {text}")
        return r

    async def lines(self, client, path: str) -> AsyncIterator[dict]:
        """The JSON lines of a results file, as they download."""
        async with client.stream("GET", self.base + path) as r:
            if r.status_code >= 400:
                raise http_error(r.status_code, f"GET {path}: {(await r.aread())[:500]!r}")
            async for line in r.aiter_lines():
                if line.strip():
                    yield json.loads(line)


class _OpenAI(_Http):
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

    async def find(self, client, file_id: str) -> str | None:
        """The id of a batch made from ``file_id``, if the account has one."""
        after = None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = (await self.call(client, "GET", "/batches", params=params)).json()
            for b in page.get("data", []):
                if b.get("input_file_id") == file_id:
                    return b["id"]
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]

    async def create(self, client, b: _Batch) -> str:
        body = {
            "input_file_id": b.file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"kdata_batch": b.uid},
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

    def unanswered(self, status: Status) -> str:
        return {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(
            status.label, "batch_failed" if status.label == "failed" else "batch_missing"
        )

    async def results(self, client, status: Status) -> AsyncIterator[tuple[str, Any]]:
        """``(key, response or TeacherError)`` of each line of the output and error files."""
        import litellm

        for file_id in (status.raw.get("output_file_id"), status.raw.get("error_file_id")):
            if not file_id:
                continue
            async for line in self.lines(client, f"/files/{file_id}/content"):
                resp, error = line.get("response") or {}, line.get("error")
                if resp.get("status_code") == 200 and not error:
                    yield line["custom_id"], litellm.ModelResponse(**resp["body"])
                elif error and error.get("code") == "batch_expired":
                    yield line["custom_id"], TeacherError(
                        "batch_expired", error.get("message", ""), retryable=True
                    )
                else:
                    body = (resp.get("body") or {}).get("error") or error or {}
                    message = body.get("message") or json.dumps(body)
                    yield line["custom_id"], http_error(resp.get("status_code") or 500, message)


class _Anthropic(_Http):
    """Anthropic's Message Batches API: ``/v1/messages/batches``, results as JSON lines."""

    provider = "anthropic"
    VERSION = "2023-06-01"

    def __init__(self, base: str, key: str, model: str, timeout: float) -> None:
        super().__init__(base.removesuffix("/v1"), key, model, timeout)

    def headers(self) -> dict[str, str]:
        return {"x-api-key": self.key, "anthropic-version": self.VERSION}

    def line(self, key: str, messages: list[dict], params: dict) -> str:
        return json.dumps({"custom_id": key, "params": self.params(messages, params)}) + "\n"

    def params(self, messages: list[dict], params: dict) -> dict:
        """The Messages API request litellm's online path would send for these."""
        from kdata.teachers.pool import DEFAULT_MAX_TOKENS_ESTIMATE, _litellm

        config = _litellm().AnthropicConfig()
        optional = config.map_openai_params(dict(params), {}, self.model, drop_params=False)
        body = config.transform_request(self.model, messages, optional, {}, {})
        body.pop("stream", None)
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS_ESTIMATE)
        return {**body, "model": self.model}

    async def create(self, client, b: _Batch) -> str:
        requests = [json.loads(self.line(k, m, p)) for k, (m, p) in b.requests.items()]
        r = await self.call(client, "POST", "/v1/messages/batches", json={"requests": requests})
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

    def unanswered(self, status: Status) -> str:
        return "batch_missing"

    async def results(self, client, status: Status) -> AsyncIterator[tuple[str, Any]]:
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
                yield key, config.transform_parsed_response(
                    message, httpx.Response(200, json=message), litellm.ModelResponse()
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
