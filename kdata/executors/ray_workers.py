"""What runs on the Ray workers of a build (`kdata.executors.ray_executor` drives them).

- `TeacherWorker`: an async actor that runs one teacher step's blocks with a `TeacherPool` of
  its own (hundreds of requests in flight, the pool's retries and ledger), whose responses go
  to a store of its own, ``cache/<host>-<pid>.sqlite`` in the run directory (`WorkerCache`).
  A request is looked up in that store, then in the run's ``cache.sqlite`` and every other
  store there, so a response any worker stored is never paid for again; the driver merges
  the workers' stores into ``cache.sqlite`` after the step. With the run directory at a URL
  (`kdata.storage`), the run directory is the stage of the worker's machine: it fetches the
  URL's stores there first, and sends what it stored to the URL after each block.
- `Limits`: one named async actor per step holding each teacher's rpm and tpm buckets and the
  budget. Workers lease rpm/tpm permits a few at a time (at most one second's worth of the
  bucket, at most `PERMITS` requests), and budget `PERMITS` reservations at a time, fewer near
  the end of the budget. What was spent: what the run's cache held when the step began, and
  what each worker reports it paid (from its ledger) with each lease; a restarted `Limits` is
  made with the first again, and each worker's next report gives it the rest.
- `map_block`: a task that runs one block of a map step that asks no teacher (a filter, or
  ``decontaminate``, whose benchmark index the driver builds once and each worker process
  fetches once).
  The same function (`run_block`) runs on `kdata.executors.ray_gpus` actors for a step that
  embeds, when the cluster has GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import sqlite3
from dataclasses import fields
from pathlib import Path
from typing import Any

import ray

from kdata.errors import BudgetExceeded
from kdata.steps.base import StepContext, StepOutput
from kdata.storage import Files, Segments, remote
from kdata.teachers.cache import RequestCache
from kdata.teachers.loop import LoopExecutor
from kdata.teachers.pool import Ledger, TeacherPool, _Bucket

PERMITS = 20  # requests' worth of rpm permits or budget leased at once (fewer near the end)
RESTARTS = 3  # times a dead teacher worker is restarted, its blocks run again
_RECHECK_S = 0.5  # how often a lease waiting for budget re-reads what was spent


def stores(run_dir: Path) -> list[Path]:
    """Every response store of a run: its ``cache.sqlite``, then the workers' own."""
    return [run_dir / "cache.sqlite", *sorted((run_dir / "cache").glob("*.sqlite"))]


class WorkerCache(RequestCache):
    """A worker's own store, read together with every other store of the run."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir / "cache" / f"{socket.gethostname()}-{os.getpid()}.sqlite")
        self._run_dir = run_dir
        self._peers: dict[Path, sqlite3.Connection] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        found = super().get(key)
        for path in stores(self._run_dir):
            if found is not None:
                break
            if path == self.path or not path.exists():
                continue
            if path not in self._peers:
                self._peers[path] = sqlite3.connect(path, check_same_thread=False)
            try:
                row = (
                    self._peers[path]
                    .execute("SELECT response FROM responses WHERE key=?", (key,))
                    .fetchone()
                )
            except sqlite3.OperationalError:  # a store being created has no table yet
                continue
            found = json.loads(row[0]) if row else None
        return found

    def close(self) -> None:
        for db in self._peers.values():
            db.close()
        super().close()


def ledger_sum(into: Ledger, other: Ledger, sign: int = 1) -> None:
    """Add ``other`` (``sign`` -1: subtract it) into ``into``, field by field."""
    for f in fields(Ledger):
        if f.name == "failures":
            for k, v in other.failures.items():
                into.failures[k] += sign * v
            into.failures += type(into.failures)()  # drop zero counts
        else:
            setattr(into, f.name, getattr(into, f.name) + sign * getattr(other, f.name))


class _LeasedBucket:
    """A worker's side of a bucket that `Limits` holds: permits leased a few at a time."""

    def __init__(self, limits: Any, teacher: str, kind: str, per_minute: int) -> None:
        self.limits, self.teacher, self.kind = limits, teacher, kind
        self.capacity = max(per_minute / 60.0, 1.0)  # as `_Bucket`: one second's worth deep
        self.level = 0.0
        self.lock = asyncio.Lock()

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self.lock:
            if self.level < amount:
                want = min(self.capacity, max(amount - self.level, PERMITS * amount))
                self.level += await self.limits.take.remote(self.teacher, self.kind, want)
            self.level -= amount


class WorkerPool(TeacherPool):
    """A `TeacherPool` whose rpm/tpm and budget are leased from `Limits`, and whose
    ``max_concurrency`` is its share of each teacher's (the teacher's over ``share`` workers)."""

    def __init__(self, teachers: dict, cache: RequestCache, budget_usd, cache_only, limits, share):
        super().__init__(teachers, cache, budget_usd, cache_only)
        self._limits, self._me = limits, f"{socket.gethostname()}-{os.getpid()}"
        for st in self._teachers.values():
            if st.rpm:
                st.rpm = _LeasedBucket(limits, st.name, "rpm", st.cfg.rpm)
            if st.tpm:
                st.tpm = _LeasedBucket(limits, st.name, "tpm", st.cfg.tpm)
            if not st.cfg.model.startswith("local/"):
                st.sem = asyncio.Semaphore(max(1, math.ceil(st.cfg.max_concurrency / share)))
        self._free = 0.0  # budget leased and not reserved by a request
        self._held = 0.0  # budget reserved by the requests in flight
        self._holding = 0  # how many requests hold a reservation (floats never sum back to 0)
        self._tight = False  # the last lease got less than it asked: report every release
        self._lease = asyncio.Lock()

    async def _reserve(self, st, messages: list[dict], params: dict) -> float | None:
        if self.budget_usd is None:
            return None
        worst = self.worst_cost(st, messages, params)
        async with self._lease:
            if self._free < worst:
                self._free = 0.0  # handed back: a worker waiting for budget holds none idle
                got = await self._limits.lease.remote(
                    self._me, self._held, self.spent_usd, worst, PERMITS * worst
                )
                if got is None:
                    self.budget_hit = True
                    raise BudgetExceeded(
                        f"budget_usd={self.budget_usd} reached (spent by every Ray worker)"
                    )
                self._free, self._tight = got, got < PERMITS * worst
            self._free -= worst
            self._held += worst
            self._holding += 1
        return worst

    async def _release(self, reserved: float | None) -> None:
        if reserved is None:
            return
        self._holding -= 1  # its real cost is stored by now
        self._held = self._held - reserved if self._holding else 0.0
        if self._tight:
            self._limits.hold.remote(self._me, self._held + self._free, self.spent_usd)

    async def give_back(self) -> None:
        """Hand the budget leased and not reserved back to `Limits`."""
        if self.budget_usd is not None:
            async with self._lease:
                self._free = 0.0
                await self._limits.hold.remote(self._me, self._held, self.spent_usd)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Limits:
    """Each teacher's rpm/tpm buckets and the budget of one step, for all its workers."""

    def __init__(self, rates: dict[str, tuple], budget_usd: float | None, spent: float) -> None:
        self.budget, self.before = budget_usd, spent
        self.buckets = {
            (name, kind): _Bucket(per_minute)
            for name, (rpm, tpm) in rates.items()
            for kind, per_minute in (("rpm", rpm), ("tpm", tpm))
            if per_minute
        }
        self.holds: dict[str, float] = {}  # budget each worker holds (in flight or leased)
        self.paid: dict[str, float] = {}  # what each worker paid, as it last reported
        self.hit = False
        self.room: asyncio.Condition | None = None

    async def take(self, teacher: str, kind: str, amount: float) -> float:
        """Take ``amount`` (at most the bucket's depth) from a bucket; returns what was taken."""
        bucket = self.buckets[(teacher, kind)]
        amount = min(amount, bucket.capacity)
        await bucket.take(amount)
        return amount

    def spent(self) -> float:
        """USD spent: before the step, and by each worker since (as it last reported)."""
        return self.before + sum(self.paid.values())

    async def lease(
        self, worker: str, held: float, paid: float, need: float, want: float
    ) -> float | None:
        """Budget for ``worker``, which holds ``held`` for its requests in flight and has paid
        ``paid`` in all: between ``need`` and ``want``, once there is room; None when there
        never will be."""
        self.room = self.room or asyncio.Condition()
        self.holds[worker], self.paid[worker] = held, paid
        async with self.room:
            while not self.hit:
                room = self.budget - self.spent() - sum(self.holds.values())
                if room >= need:
                    got = min(want, room)
                    self.holds[worker] += got
                    return got
                if not any(self.holds.values()):  # nothing in flight anywhere will free room
                    self.hit = True
                    self.room.notify_all()
                    break
                with contextlib.suppress(TimeoutError):  # what was spent grows meanwhile
                    await asyncio.wait_for(self.room.wait(), _RECHECK_S)
        return None

    async def hold(self, worker: str, held: float, paid: float) -> None:
        """``worker`` holds ``held`` now (its requests settled, or it gave leased budget back),
        and has paid ``paid`` in all."""
        self.room = self.room or asyncio.Condition()
        self.holds[worker], self.paid[worker] = held, paid
        async with self.room:
            self.room.notify_all()


@ray.remote(num_cpus=1, max_restarts=RESTARTS, max_task_retries=RESTARTS)
class TeacherWorker:
    """Runs blocks of one teacher step (see the module doc); restarted if its process dies (up
    to `RESTARTS` times: a crash that repeats fails the build), and the blocks it had are run
    again, served from the stores for what was answered."""

    def __init__(self, step, setup: dict, limits: str, share: int, secrets: dict[str, str]) -> None:
        os.environ.update(secrets)  # the teachers' API keys, from the driver's environment
        self.step, self.setup, self.share = step, setup, share
        self.limits = ray.get_actor(limits)  # by name: a restarted worker finds it again
        self.pool: WorkerPool | None = None
        self.reported: dict[str, Ledger] = {}
        self.files: Files = setup["files"]
        self.seen: set[str] = set()  # the URL's stores fetched
        self.fetching = asyncio.Lock()

    def _ready(self) -> WorkerPool:
        if self.pool is None:  # on the actor's event loop, where the pool's locks live
            asyncio.get_running_loop().set_default_executor(LoopExecutor())
            s = self.setup
            cache = WorkerCache(self.files.here())
            self.segments = Segments(self.files.here())  # what it sends to a URL
            self.fetched = RequestCache(cache.path.with_suffix(".fetched.sqlite"))  # and gets
            self.pool = WorkerPool(
                s["teachers"], cache, s["budget_usd"], s["cache_only"], self.limits, self.share
            )
            self.reported = {n: Ledger() for n in self.pool.ledgers}
        return self.pool

    async def run(self, rows: list[dict]) -> tuple[StepOutput, dict[str, Ledger]]:
        """One block's output, and the ledger entries since the last block returned."""
        pool = self._ready()
        if self.files.url is not None:
            async with self.fetching:
                await asyncio.to_thread(self._fetch)
        s = self.setup
        ctx = StepContext(
            name=s["name"], base_dir=Path(s["base_dir"]), pool=pool, run_dir=self.files.here()
        )
        try:
            out = await self.step.run(rows, ctx)
        finally:
            await pool.give_back()
        # what it stored, to the URL if there is one (off the loop: other blocks go on)
        await asyncio.to_thread(self.files.send, pool.cache.path, self.segments)
        delta = {}
        for name, led in pool.ledgers.items():
            delta[name] = Ledger()
            ledger_sum(delta[name], led)
            ledger_sum(delta[name], self.reported[name], -1)
            ledger_sum(self.reported[name], delta[name])
        return out, delta

    def _fetch(self) -> None:
        """The response stores at the URL that are new to this worker: the run's cache (once,
        into this machine's stage) and the segments the driver and the other workers sent,
        folded into the worker's store of fetched responses (which `WorkerCache` reads)."""
        for path in remote(self.files.url).pull_stores(self.seen):
            self.seen.add(path.name)
            if path.name.startswith("seg-"):
                self.fetched.absorb(path)

    def pid(self) -> int:
        """The worker's process id (tests kill it)."""
        return os.getpid()

    def store(self) -> str | None:
        """The worker's own store, once it has one."""
        return None if self.pool is None else str(self.pool.cache.path)

    async def close(self) -> None:
        """Close the worker's HTTP connections and its store (the driver merges it next)."""
        if self.pool is not None:
            await self.pool.aclose()
            self.pool.cache.close()
            self.fetched.close()


_STEPS: dict[str, Any] = {}  # per worker process: the step of each fingerprint, as first received


def run_block(step: list, rows: list[dict], setup: dict) -> StepOutput:
    """One block of a map step that asks no teacher; ``step``: the step's object ref, in a
    list so that Ray does not fetch it for each task. A worker process fetches the step once
    and keeps it, so what the step holds (``decontaminate``'s benchmark index, built by the
    driver) is deserialised once per process, and what it builds once, once per process."""
    if setup["fingerprint"] not in _STEPS:
        _STEPS[setup["fingerprint"]] = ray.get(step[0])
    step = _STEPS[setup["fingerprint"]]
    ctx = StepContext(
        name=setup["name"],
        base_dir=Path(setup["base_dir"]),
        pool=None,
        run_dir=setup["files"].here(),
    )
    return asyncio.run(step.run(rows, ctx))


map_block = ray.remote(run_block)  # `run_block` as a task
