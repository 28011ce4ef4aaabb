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
with the error class, as online. Once a batch is submitted, nothing but its own answers fails
its rows: errors polling it are retried while retrying can help, and otherwise stop the build
(the next build polls it again). Anthropic gives no way to find a batch whose create answer
was lost: a build killed during that one call may submit it again on the next run.

The calls are made over HTTP here rather than through litellm's batch functions: in the litellm
this was written against, creating an Anthropic batch raises ``NotImplementedError``, and one
client of ~5 endpoints per provider keeps the retries in kdata's hands (`kdata.teachers.batch_api`;
litellm still translates requests to Anthropic's format and answers back, as online).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdata.errors import KdataError, TeacherError
from kdata.teachers.batch_api import BASES, KEY_VARS, LIMITS, Anthropic, Http, OpenAI, provider

if TYPE_CHECKING:
    from kdata.teachers.pool import TeacherPool, _TeacherState

BLOCK: contextvars.ContextVar[str | None] = contextvars.ContextVar("kdata_block", default=None)
COLLECT_S = 1.0  # a batch is sent once no request joined it for this long
PRICE_FACTOR = 0.5  # batch prices: half of online, for both providers
POLL_GROWTH, POLL_CAP = 1.5, 20  # each wait 1.5x the one before, at most 20x batch_poll_s


@dataclass
class _Batch:
    """One batch: its requests, where it stands, and the requests waiting for it."""

    uid: str
    teacher: str
    file_id: str | None = None  # OpenAI: the uploaded request file
    batch_id: str | None = None
    since: float = 0.0  # OpenAI: when its file was uploaded (time.time)
    requests: dict[str, tuple[list[dict], dict]] = field(default_factory=dict)  # key -> request
    waiting: dict[str, asyncio.Future] = field(default_factory=dict)
    live: int = 0  # futures of ``waiting`` not done yet
    task: asyncio.Task | None = None
    size: int = 0  # bytes of the provider's request file so far


class Batches:
    """The batches of a pool's ``batch: true`` teachers (see the module doc).

    Args:
        pool: the pool whose cache, ledger, budget and online path the batches use.
        folder: ``batches/`` of the run directory.
        note: receives the progress lines.
        kept: called with the journal each time it is written.
    """

    def __init__(
        self,
        pool: TeacherPool,
        folder: Path,
        note: Callable[[str], None],
        kept: Callable[[Path], None],
    ) -> None:
        self.pool, self.folder, self.note, self.kept = pool, folder, note, kept
        self.journal = folder / "journal.jsonl"
        self._open: dict[tuple, _Batch] = {}  # (teacher, block) -> the batch collecting requests
        self._timers: dict[tuple, asyncio.TimerHandle] = {}
        self._known: dict[str, _Batch] = {}  # key -> the recorded batch that holds it
        self._apis: dict[str, Http] = {}
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
            b = _Batch(uid, s["teacher"], s.get("file_id"), s.get("batch_id"), s.get("at", 0.0))
            path = self.folder / f"{uid}.jsonl"
            if not path.exists():
                self.note(f"{path} is missing: the requests of its batch are sent again")
                continue
            with path.open(encoding="utf-8") as fh:
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
                fut = self._wait(known, key, st)
            else:
                fut = self._join(st, messages, params, key)
            self.pool.in_flight += 1  # progress counts the requests in a batch as in flight
            try:
                return await fut
            finally:
                self.pool.in_flight -= 1
        finally:
            await self.pool._release(reserved)

    def _wait(self, b: _Batch, key: str, st: _TeacherState) -> asyncio.Future:
        """A future for one request of batch ``b``, which ``st`` (the teacher now asking: it may
        have been renamed) polls while any request waits."""
        fut = self._future(b, key)
        if b.task is None or b.task.done():  # recorded by an earlier build, or failed
            b.task = asyncio.create_task(self._run(b, st))
        return fut

    def _future(self, b: _Batch, key: str) -> asyncio.Future:
        """A future of one request's answer from batch ``b``."""
        fut = asyncio.get_running_loop().create_future()
        b.waiting[key] = fut
        b.live += 1
        fut.add_done_callback(lambda _: self._settled(b))
        return fut

    def _settled(self, b: _Batch) -> None:
        """One request of ``b`` has its answer or stopped waiting. A batch submitted that nobody
        waits for any more (an interrupted build) is not polled; the next build polls it."""
        b.live -= 1
        if b.live == 0 and b.batch_id and b.task and not b.task.done():
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
        fut = self._future(b, key)
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
            b.task = asyncio.create_task(self._run(b, self.pool._teachers[b.teacher]))

    def _api(self, st: _TeacherState) -> Http:
        """The client of a teacher's provider (made once; its key read from the environment)."""
        if st.name not in self._apis:
            name, model = provider(st.cfg)
            key = self.pool._api_key(st)
            if key is None:
                key = os.environ.get(KEY_VARS[name], "")
                self.pool._secrets.add(key)
            base = (st.cfg.api_base or BASES[name]).rstrip("/")
            api = (OpenAI if name == "openai" else Anthropic)(base, key, model, st.cfg.timeout)
            self._apis[st.name] = api
        return self._apis[st.name]

    async def _run(self, b: _Batch, st: _TeacherState) -> None:
        """Submit a batch (unless the journal says it was), poll it, store its answers."""
        api = self._api(st)
        try:
            async with api.client() as client:
                if b.batch_id is None:
                    await self._submit(b, st, api, client)
                    if b.live == 0:
                        return  # recorded; nobody waits any more (an interrupted build)
                outcome = await self._poll(b, st, api, client)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if b.batch_id is None:  # not submitted: the requests waiting fail with it
                outcome = dict.fromkeys(b.requests, _as_teacher_error(e))
            else:  # paid for: never sent again, nor its rows failed; the build stops instead
                stop = KdataError(
                    f"batch {b.batch_id} of teacher '{b.teacher}' was submitted, but reading "
                    f"it failed: {self.pool.redact(str(e))}. It is kept in {self.journal}: fix "
                    "the cause (the key, api_base) and run the same command to go on polling it"
                )
                for fut in b.waiting.values():
                    if not fut.done():
                        fut.set_exception(stop)
                return
        for key, fut in b.waiting.items():
            if not fut.done():
                fut.set_result(outcome.get(key) or self.pool.cache.get(key))

    async def _submit(self, b: _Batch, st: _TeacherState, api, client) -> None:
        """Write, upload and create the batch, recording each stage before the next."""
        self.pool.cache.check()
        path = self.folder / f"{b.uid}.jsonl"
        if not path.exists():  # a new batch (a resumed one has its file)
            self.folder.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_write_requests, path, b.requests)
            for key in b.requests:
                self._known[key] = b
        if isinstance(api, OpenAI) and b.file_id is None:
            data = "".join(api.line(k, m, p) for k, (m, p) in b.requests.items()).encode()
            b.file_id = await _retrying(st, lambda: api.upload(client, data))
            b.since = time.time()
            event = {"event": "uploaded", "uid": b.uid, "teacher": b.teacher}
            self._record({**event, "file_id": b.file_id, "at": b.since})
        b.batch_id = await _retrying(
            st, lambda: api.create(client, b.uid, b.requests, b.file_id, b.since)
        )
        self._record(
            {"event": "submitted", "uid": b.uid, "teacher": b.teacher, "batch_id": b.batch_id}
        )
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
                    f"{time.monotonic() - started:.0f}s; next check in {wait:.3g}s"
                )
        missing: dict[str, TeacherError] = {}
        await _retrying(st, lambda: self._results(b, st, api, client, status, missing))
        unanswered, why = api.unanswered(status)
        for key in b.requests:
            if key not in missing and self.pool.cache.get(key) is None:
                message = f"batch {b.batch_id} ended {status.label} without answering it{why}"
                missing[key] = TeacherError(unanswered, message, retryable=True)
                st.ledger.failures[unanswered] += 1
        self._record({"event": "ended", "uid": b.uid, "teacher": b.teacher, "status": status.label})
        for key in b.requests:
            self._known.pop(key, None)
        self.note(
            f"batch {b.batch_id} ({b.teacher}) {status.label}: "
            f"{len(b.requests) - len(missing)} answered, {len(missing)} not"
        )
        return missing

    async def _results(self, b: _Batch, st, api, client, status, missing: dict) -> None:
        """Store the answers of an ended batch; the errors of the others, in ``missing``. A
        download cut short is read again, skipping what was stored."""
        async for key, answer in api.results(client, status, b.requests):
            if key not in b.requests or key in missing or self.pool.cache.get(key) is not None:
                continue
            if isinstance(answer, TeacherError):
                missing[key] = answer
                st.ledger.failures[answer.error_class] += 1
            else:
                messages, params = b.requests[key]
                self.pool._record(st, answer.model_dump(), messages, params, key, PRICE_FACTOR)

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
        self.kept(self.journal)


def _as_teacher_error(error: Exception) -> TeacherError:
    if isinstance(error, TeacherError):
        return error
    from kdata.teachers.retries import classify

    error_class, retryable = classify(error)
    return TeacherError(error_class, f"{type(error).__name__}: {error}", retryable=retryable)


async def _retrying(st: _TeacherState, call: Callable[[], Any]) -> Any:
    """``call()`` with the pool's backoff and the server's ``Retry-After``, up to the teacher's
    ``max_retries`` retries."""
    from kdata.teachers.retries import backoff_delay, retry_after

    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except TeacherError as e:
            if not e.retryable or attempt > st.cfg.max_retries:
                raise
            after = retry_after(e)
        await asyncio.sleep(backoff_delay(attempt, after))


def _write_requests(path: Path, requests: dict) -> None:
    """Write a batch's requests (key, messages, params a line) durably, whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for k, (m, p) in requests.items():
            fh.write(json.dumps({"key": k, "messages": m, "params": p}, ensure_ascii=False) + "\n")
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
