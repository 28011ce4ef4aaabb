"""`TeacherPool`: every teacher call of a run goes through here, on one asyncio loop.

It routes a step's teacher reference (one teacher, or a weighted mix with fallbacks), serves
requests from the cache, holds per-teacher concurrency and rpm/tpm limits, retries what can be
retried (honouring ``Retry-After``) in one loop of its own, keeps a ledger of calls, tokens and
cost, and refuses to send a request that could take spending past the budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdata.errors import BudgetExceeded, TeacherError
from kdata.teachers import openai_http, response
from kdata.teachers.cache import RequestCache, request_key
from kdata.teachers.retries import (
    MAX_RETRY_AFTER_S,
    backoff_delay,
    classify,
    describe,
    retry_after,
)

if TYPE_CHECKING:
    from kdata.recipe import Teacher
    from kdata.steps.base import TeacherRef

DEFAULT_MAX_TOKENS_ESTIMATE = 4096  # reserved against the budget when a teacher sets no max_tokens
FATAL = {"auth", "permission", "not_found"}  # after one of these a teacher is sent nothing more


def _litellm():
    """Import litellm configured for kdata: offline price map, quiet, local provider on, and no
    connection cap of its own (it caps aiohttp at 500 per host; the pool's semaphores bound
    what is in flight). The variables are read when litellm is first imported."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("AIOHTTP_CONNECTOR_LIMIT", "1000000")
    os.environ.setdefault("AIOHTTP_CONNECTOR_LIMIT_PER_HOST", "0")  # 0: no limit per host
    import litellm

    if not getattr(litellm, "_kdata_ready", False):
        from kdata.teachers.local import register

        litellm.suppress_debug_info = True
        litellm.telemetry = False
        register(litellm)
        litellm._kdata_ready = True
    return litellm


@dataclass
class Completion:
    """One teacher answer, from the network or the cache (``cost_usd``: what it cost when paid)."""

    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    teacher: str
    model: str
    request_hash: str
    cached: bool
    attempts: int
    logprobs: Any = None
    response_model: str | None = None  # the model name the response gave, when it gave one
    reasoning: str | None = None  # the reasoning trace, when the teacher returned one
    reasoning_tokens: int = 0  # of completion_tokens, those spent reasoning


@dataclass
class Ledger:
    """Per-teacher account of a run."""

    requests: int = 0  # HTTP requests sent, retries included
    responses: int = 0  # successful responses received (and stored)
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # part of completion_tokens (and of their cost)
    cost_usd: float = 0.0
    failures: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON."""
        d = asdict(self)
        d["failures"] = dict(self.failures)
        return d


class _Bucket:
    """Token bucket refilled at ``per_minute / 60`` per second, one second's worth deep."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate, 1.0)
        self.level = self.capacity
        self.t = time.monotonic()

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        while True:
            now = time.monotonic()
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
            self.t = now
            if self.level >= amount:
                self.level -= amount
                return
            await asyncio.sleep((amount - self.level) / self.rate)


class _TeacherState:
    def __init__(self, name: str, cfg: Teacher, sem: asyncio.Semaphore) -> None:
        self.name, self.cfg = name, cfg
        self.sem = sem  # a slot in it is held from before a request is timed until it settles
        self.rpm = _Bucket(cfg.rpm) if cfg.rpm else None
        self.tpm = _Bucket(cfg.tpm) if cfg.tpm else None
        self.ledger = Ledger()
        self.dead: TeacherError | None = None  # set by an auth/permission/not-found failure
        self._prices: tuple[float, float] | None = None
        self._schemas: bool | None = cfg.structured_output
        self._endpoint: openai_http.Endpoint | None | bool = False  # False: not decided yet

    @property
    def takes_schema(self) -> bool:
        """Whether a ``response_format`` JSON schema is sent to this teacher."""
        if self._schemas is None:
            self._schemas = self.cfg.model.startswith("local/") or bool(
                _litellm().supports_response_schema(model=self.cfg.model)
            )
        return self._schemas

    @property
    def endpoint(self) -> openai_http.Endpoint | None:
        """Where the fast path sends this teacher's requests; None: through litellm."""
        if self._endpoint is False:
            self._endpoint = openai_http.endpoint(self.cfg, _litellm())
        return self._endpoint

    @property
    def prices(self) -> tuple[float, float]:
        """USD per prompt and completion token (0 for unpriced models, refused under a budget)."""
        if self._prices is None:
            self._prices = prices(self.cfg) or (0.0, 0.0)
        return self._prices


class TeacherPool:
    """All teacher calls of a run.

    Args:
        teachers: the recipe's teachers by name.
        cache: where responses are stored as they arrive.
        budget_usd: stop before total spending (earlier runs of this cache included) could pass it.
        cache_only: send nothing; a request the cache lacks fails with error class ``not_cached``.
        batch_dir: where the batches of ``batch: true`` teachers are recorded (the run
            directory's ``batches/``); without it those teachers are called online.
        note: receives a line on each batch's progress.
        kept: called with the batch journal each time it is written (a run directory at a URL
            sends it there, `kdata.storage`).
    """

    def __init__(
        self,
        teachers: dict[str, Teacher],
        cache: RequestCache,
        budget_usd: float | None = None,
        cache_only: bool = False,
        batch_dir: Path | None = None,
        note: Callable[[str], None] | None = None,
        kept: Callable[[Path], None] | None = None,
    ) -> None:
        self.cache = cache
        self.budget_usd = budget_usd
        self.cache_only = cache_only
        self.spent_before = cache.total_cost()
        # Local GGUF teachers share one slot: the process runs one local model, one request at a
        # time, so a request waits for the model here, before its timeout starts.
        local = asyncio.Semaphore(1)
        self._teachers = {
            name: _TeacherState(
                name,
                cfg,
                local if cfg.model.startswith("local/") else asyncio.Semaphore(cfg.max_concurrency),
            )
            for name, cfg in teachers.items()
        }
        self._reserved = 0.0  # USD reserved by requests holding a reservation
        self._holders = 0  # how many requests hold one (floats never sum back to exactly 0)
        self._budget = asyncio.Condition()
        self._pending: dict[str, asyncio.Future] = {}
        self._secrets: set[str] = set()
        self._http = openai_http.Sessions()
        self.in_flight = 0
        self.budget_hit = False
        self._batches = None
        if batch_dir is not None and any(t.batch for t in teachers.values()):
            from kdata.teachers.batch import Batches

            self._batches = Batches(
                self, batch_dir, note or (lambda text: None), kept or (lambda path: None)
            )

    def batched(self, names: set[str]) -> bool:
        """Whether any of the teachers ``names`` sends its requests through a batch API."""
        return self._batches is not None and any(self._teachers[n].cfg.batch for n in names)

    def model(self, name: str) -> str:
        """The model a teacher name is bound to."""
        return self._teachers[name].cfg.model

    async def aclose(self) -> None:
        """Close the fast path's HTTP connections (on the loop that made the requests)."""
        await self._http.aclose()

    @property
    def ledgers(self) -> dict[str, Ledger]:
        """Ledger of each teacher."""
        return {n: s.ledger for n, s in self._teachers.items()}

    @property
    def spent_usd(self) -> float:
        """USD spent by this pool (not counting earlier runs)."""
        return sum(s.ledger.cost_usd for s in self._teachers.values())

    @property
    def tokens(self) -> int:
        """Tokens received and sent by this pool."""
        return sum(
            s.ledger.prompt_tokens + s.ledger.completion_tokens for s in self._teachers.values()
        )

    def route(self, ref: TeacherRef, route_key: str, sample: int) -> list[str]:
        """The teachers to try for one request, in order: the routed one, then fallbacks."""
        if isinstance(ref, str):
            return [ref]
        names, weights = list(ref.mix), list(ref.mix.values())
        h = hashlib.sha1(f"{route_key}:{sample}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64 * sum(weights)
        chosen = names[-1]
        for name, w in zip(names, weights, strict=True):
            if u < w:
                chosen = name
                break
            u -= w
        return [chosen] + [f for f in ref.fallbacks if f != chosen]

    async def complete(
        self,
        ref: TeacherRef,
        messages: list[dict] | str,
        *,
        route_key: str,
        sample: int = 0,
        params: dict[str, Any] | None = None,
    ) -> Completion:
        """Answer one request, from the cache when it holds it.

        Args:
            ref: a teacher name or a `TeacherMix`.
            messages: chat messages; or raw text for a text completion, which no chat
                template wraps (Magpie's pre-query prompt).
            route_key: what routes the request within a mix (the row id), so reruns route alike.
            sample: index of the sample for the same messages (part of the cache key).
            params: generation parameters of this request over the teacher's own (part of the
                cache key), for a step that needs them (logprobs, say). A ``response_format`` is
                sent only to a teacher that takes schemas (``structured_output``).

        Raises:
            TeacherError: every teacher tried failed; the last failure is raised.
            BudgetExceeded: the request was not sent because of the budget.
        """
        last: TeacherError | None = None
        for name in self.route(ref, route_key, sample):
            try:
                return await self._complete_one(name, messages, sample, params)
            except TeacherError as e:
                last = e
        assert last is not None
        raise last

    async def _complete_one(
        self, name: str, messages: list[dict] | str, sample: int, extra: dict[str, Any] | None
    ) -> Completion:
        st = self._teachers[name]
        params = {**st.cfg.params.sent(), **(extra or {})}
        if not st.takes_schema:
            params.pop("response_format", None)
        if sample and "seed" in params:
            params["seed"] += sample  # distinct samples from a seeded backend
        key = request_key(st.cfg.model, messages, params, sample)
        if key in self._pending:  # the same request is in flight: share its answer
            data, attempts = await asyncio.shield(self._pending[key])
            return self._completion(st, key, data, cached=True, attempts=0)
        stored = self.cache.get(key)
        if stored is not None:
            st.ledger.cache_hits += 1
            return self._completion(st, key, stored, cached=True, attempts=0)
        if self.cache_only:
            raise TeacherError(
                "not_cached",
                "no stored response, and this build sends no request; a kdata build of a recipe "
                "that reaches this row fetches it",
                retryable=False,
                attempts=0,
            )
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            if st.cfg.batch and self._batches is not None and not isinstance(messages, str):
                data, attempts = await self._batches.send(st, messages, params, key)
            else:
                data, attempts = await self._send(st, messages, params, key)
            fut.set_result((data, attempts))
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._pending[key]
        return self._completion(st, key, data, cached=False, attempts=attempts)

    def _completion(
        self, st: _TeacherState, key: str, data: dict, *, cached: bool, attempts: int
    ) -> Completion:
        r = response.read(data, think_tags=st.cfg.think_tags)
        return Completion(
            text=r.text,
            finish_reason=r.finish_reason,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            cost_usd=data.get("cost_usd", 0.0),  # what the response cost, even when re-served
            teacher=st.name,
            model=st.cfg.model,
            request_hash=key,
            cached=cached,
            attempts=attempts,
            logprobs=r.logprobs,
            response_model=r.response_model,
            reasoning=r.reasoning,
            reasoning_tokens=r.reasoning_tokens,
        )

    def worst_cost(
        self, st: _TeacherState, messages: list[dict] | str, params: dict, factor: float = 1.0
    ) -> float:
        """The most a request could cost: its prompt bounded by its UTF-8 bytes (see `_reserve`),
        and ``max_tokens`` of completion, at ``factor`` times the prices."""
        p_in, p_out = st.prices
        prompt = _prompt_bytes(messages) + 8
        worst = prompt * p_in + params.get("max_tokens", DEFAULT_MAX_TOKENS_ESTIMATE) * p_out
        return worst * factor

    async def _reserve(
        self,
        st: _TeacherState,
        messages: list[dict] | str,
        params: dict,
        factor: float = 1.0,
        force: bool = False,
    ) -> float | None:
        """Reserve the most this request could cost; wait while calls in flight may free room.

        The prompt is bounded by its UTF-8 bytes (a byte-level BPE token is at least one byte)
        plus a margin for chat-template tokens, so the estimate never falls short. ``factor``
        scales the prices (a batch's half); ``force`` reserves without checking (a request in a
        batch submitted already, which will be paid for either way).

        Raises:
            BudgetExceeded: the request could pass the budget even with nothing in flight.
        """
        if self.budget_usd is None:
            return None
        worst = self.worst_cost(st, messages, params, factor)
        async with self._budget:
            if force:
                self._reserved += worst
                self._holders += 1
                return worst
            while True:
                if self.budget_hit:
                    raise BudgetExceeded(f"budget_usd={self.budget_usd} reached")
                spent = self.spent_before + self.spent_usd
                if spent + self._reserved + worst <= self.budget_usd:
                    self._reserved += worst
                    self._holders += 1
                    return worst
                if self._holders == 0:
                    self.budget_hit = True
                    self._budget.notify_all()  # whoever waits for room will not get it
                    raise BudgetExceeded(
                        f"budget_usd={self.budget_usd}: spent {spent:.4f}; the next request "
                        f"could cost up to {worst:.4f}"
                    )
                await self._budget.wait()  # calls in flight settle at their real cost

    async def _release(self, reserved: float | None) -> None:
        if reserved is not None:
            async with self._budget:
                self._holders -= 1
                self._reserved = self._reserved - reserved if self._holders else 0.0
                self._budget.notify_all()

    def _api_key(self, st: _TeacherState) -> str | None:
        var = st.cfg.api_key_var
        if var is None:  # the fast path reads the provider's variable, as litellm would
            key = os.environ.get(st.endpoint.key_var) if st.endpoint else None
            if key:
                self._secrets.add(key)
            return key
        key = os.environ.get(var)
        if key is None:
            raise TeacherError("auth", f"environment variable {var} is not set", retryable=False)
        self._secrets.add(key)
        return key

    def redact(self, text: str) -> str:
        """Text with every API key this pool has used replaced by ``***``."""
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return text

    async def _send(
        self, st: _TeacherState, messages: list[dict] | str, params: dict, key: str
    ) -> tuple[dict, int]:
        cfg = st.cfg
        ep = st.endpoint
        api_key = self._api_key(st)
        est_tokens = _prompt_bytes(messages) / 4 + params.get("max_tokens", 256)
        attempts, reserved = 0, None
        try:
            while True:
                attempts += 1
                if st.rpm:
                    await st.rpm.take(1)
                if st.tpm:
                    await st.tpm.take(est_tokens)
                if attempts == 1:  # before taking a slot: slot holders never wait for budget
                    reserved = await self._reserve(st, messages, params)
                async with st.sem:
                    if st.dead:
                        raise TeacherError(
                            st.dead.error_class,
                            f"not sent: teacher '{st.name}' failed with {st.dead}",
                            retryable=False,
                            attempts=attempts - 1,  # this one was not sent
                        )
                    self.cache.check()  # a cache file that vanished stops the sending
                    self.in_flight += 1
                    st.ledger.requests += 1
                    try:
                        if ep is not None and not isinstance(messages, str):
                            raw = await self._http.post(ep, messages, params, api_key, cfg.timeout)
                        else:  # litellm, or a raw text completion (see _call)
                            resp = await asyncio.wait_for(
                                _call(_litellm(), cfg, messages, api_key, params),
                                timeout=cfg.timeout + 5,
                            )
                            raw = resp if isinstance(resp, dict) else resp.model_dump()
                        error = None
                    except Exception as e:  # classified below; anything unknown is not retried
                        task = asyncio.current_task()
                        if task is not None and task.cancelling():
                            # The build is stopping and litellm turned the cancel into an
                            # error: stop, rather than retry past the cache's closing.
                            raise asyncio.CancelledError from e
                        error = e
                    finally:
                        self.in_flight -= 1
                if error is None:
                    return self._record(st, raw, messages, params, key), attempts
                error_class, retryable = classify(error)
                st.ledger.failures[error_class] += 1
                wait = retry_after(error)
                message = self.redact(describe(error))
                if retryable and wait is not None and wait > MAX_RETRY_AFTER_S:
                    retryable, message = (
                        False,
                        f"server asked to retry after {wait:.0f}s; {message}",
                    )
                if not retryable or attempts > cfg.max_retries:
                    failed = TeacherError(
                        error_class, message, retryable=retryable, attempts=attempts
                    )
                    if error_class in FATAL:
                        st.dead = failed
                    raise failed
                await asyncio.sleep(backoff_delay(attempts, wait))
        finally:
            await self._release(reserved)

    def _record(
        self,
        st: _TeacherState,
        raw: dict,
        messages: list[dict] | str,
        params: dict,
        key: str,
        factor: float = 1.0,
    ) -> dict:
        """Store the whole response (its JSON form) durably, then account for it (``factor``:
        of the prices)."""
        data = response.stored(raw, 0.0)
        reply = response.read(data)
        p_in, p_out = st.prices
        cost = reply.prompt_tokens * p_in + reply.completion_tokens * p_out
        cost = data["cost_usd"] = cost * factor
        self.cache.put(
            key, st.name, st.cfg.model, {"messages": messages, "params": params}, data, cost
        )
        led = st.ledger
        led.responses += 1
        led.prompt_tokens += reply.prompt_tokens
        led.completion_tokens += reply.completion_tokens
        led.reasoning_tokens += reply.reasoning_tokens
        led.cost_usd += cost
        return data


def _prompt_bytes(messages: list[dict] | str) -> int:
    """UTF-8 bytes of a request's text, plus 8 per chat message for its template's tokens."""
    if isinstance(messages, str):
        return len(messages.encode())
    return sum(len(str(m.get("content", "")).encode()) + 8 for m in messages)


def _call(litellm: Any, cfg: Teacher, messages: list[dict] | str, api_key, params: dict):
    """The coroutine of one request: a chat completion, or a text completion of raw text (a
    local model's directly, any other through litellm's ``atext_completion``)."""
    common = {"api_base": cfg.api_base, "api_key": api_key, "timeout": cfg.timeout}
    # One retry loop only: the pool's.
    common |= {"num_retries": 0, "max_retries": 0}
    if not isinstance(messages, str):
        return litellm.acompletion(model=cfg.model, messages=messages, **common, **params)
    if cfg.model.startswith("local/"):
        from kdata.teachers.local import generate_text

        return asyncio.to_thread(generate_text, cfg.model, messages, params)
    return litellm.atext_completion(model=cfg.model, prompt=messages, **common, **params)


def prices(cfg: Teacher) -> tuple[float, float] | None:
    """USD per prompt token and per completion token, or None when nobody knows them."""
    if cfg.cost_per_1k_tokens:
        return cfg.cost_per_1k_tokens.input / 1000, cfg.cost_per_1k_tokens.output / 1000
    if cfg.model.startswith("local/"):
        return 0.0, 0.0
    try:
        info = _litellm().get_model_info(cfg.model)
    except Exception:  # litellm raises for models missing from its price table
        return None
    if info.get("input_cost_per_token") is None:
        return None
    return info["input_cost_per_token"], info.get("output_cost_per_token") or 0.0
