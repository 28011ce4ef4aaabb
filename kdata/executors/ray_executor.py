"""The Ray executor: the same steps, blocks, ids and parts as the local one, run on a cluster.

``execution: {executor: ray}`` (or ``kdata build --executor ray``) starts a Ray instance on
this machine, bound to 127.0.0.1; with ``address`` it joins that cluster instead. Workers get
this kdata (``runtime_env`` ``py_modules``) and ``LITELLM_LOCAL_MODEL_COST_MAP=True``; the
teachers' API keys go to the teacher actors from the driver's environment, as constructor
arguments (never through ``runtime_env``, which Ray logs).

The driver keeps what the local executor does: it cuts the input into blocks, skips the blocks
finished before, checks each block's accounting and writes its parts (`LocalExecutor`, handed
the steps below in place of the recipe's). What runs on the cluster, by the step's ``kind``:

- ``map`` with teachers: each block goes to one of ``workers`` `TeacherWorker` actors (one per
  node by default), two blocks per actor in flight; limits and budget are global (`Limits`),
  each worker stores its responses in ``cache/`` and reads every store, and the driver merges
  the stores into ``cache.sqlite`` once the step ends (and at the start of the next build, after
  a driver that died). A worker that dies is restarted by Ray and its blocks are run again.
- ``map`` without teachers: each block is a task (`map_block`).
- ``global``: each pass of ``decide`` over the blocks (``blocks.map``: the hashes, signatures
  or other compact summaries of each block) runs as one task per block, reading its rows from
  the input parts itself; the decision over those summaries (grouping, clustering) and the
  marking of each block run on the driver, as the local executor runs them.
- ``source`` and ``whole`` steps run on the driver, as the local executor runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from kdata.blocks import Block, parts, tables_of
from kdata.errors import KdataError
from kdata.executors.local import Counts, LocalExecutor
from kdata.steps.base import StepContext, StepOutput

T = TypeVar("T")
NAMESPACE = "kdata"
BLOCKS_PER_WORKER = 2  # a teacher actor's blocks in flight: its pool stays full across a tail
LOCAL_ENV = {  # a Ray instance of this machine: loopback only, no token file
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
}


def connect(address: str | None) -> bool:
    """Connect this process to Ray: the cluster at ``address``, else a new local instance on
    127.0.0.1. Returns whether it connected (False: it was connected already)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # set before Ray is imported, which
    if address is None:  # reads them then
        for k, v in LOCAL_ENV.items():
            os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return False
    import kdata

    runtime_env = {
        "py_modules": [str(Path(kdata.__file__).parent)],
        "env_vars": {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "RAY_USAGE_STATS_ENABLED": "0"},
    }
    quiet = {"runtime_env": runtime_env, "log_to_driver": False, "logging_level": logging.WARNING}
    if address is not None:
        try:
            ray.init(address=address, namespace=NAMESPACE, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise KdataError(
                f"cannot join the Ray cluster at execution.address {address!r}: {e}; give the "
                "head's address (HOST:6379 from a node of the cluster)"
            ) from None
        return True
    tmp = Path(os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir()))
    (tmp / "ray").mkdir(parents=True, exist_ok=True)
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        namespace=NAMESPACE,
        **quiet,
    )
    return True


class RayExecutor:
    """Runs steps over blocks on a Ray cluster (see the module doc)."""

    def __init__(self, recipe: Any, run_dir: Path) -> None:
        import ray

        ex = recipe.execution
        self.recipe, self.run_dir, self.block_rows = recipe, Path(run_dir), ex.block_rows
        self.local = LocalExecutor(ex.block_rows)
        self._started = connect(ex.address)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        self.workers = ex.workers or len(nodes)
        self.cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes)) or 1
        if self.workers > self.cpus:
            self.close()
            raise KdataError(
                f"execution.workers is {self.workers}, but the Ray cluster has {self.cpus} CPUs "
                "and each teacher worker takes one: lower workers, or add nodes"
            )

    def close(self) -> None:
        """Stop the driver's threads, and the Ray instance this executor started."""
        import ray

        self.local.close()
        if self._started:
            ray.shutdown()

    async def run(
        self, step: Any, source: Path | None, folder: Path, ctx: StepContext, fingerprint: str
    ) -> Counts:
        """Run ``step`` over the rows of the step folder ``source`` and write its parts (as
        `LocalExecutor.run`)."""
        merge_stores(ctx, self.run_dir)  # what the workers of a build that died stored
        self.local.map_in_flight = None
        if step.kind == "global":
            step = _Global(step, _RayBlocks(source, self.block_rows))
        elif step.kind == "map" and step.teacher_names():
            async with _Workers(self, step, ctx) as workers:
                self.local.map_in_flight = BLOCKS_PER_WORKER * self.workers
                return await self.local.run(
                    _Remote(step, workers.run), source, folder, ctx, fingerprint
                )
        elif step.kind == "map":
            self.local.map_in_flight = self.cpus
            import ray

            setup = {**self._setup(ctx), "fingerprint": fingerprint}  # sent once, below
            step = _Remote(step, functools.partial(_tasks, ray.put(step), setup))
        return await self.local.run(step, source, folder, ctx, fingerprint)

    def _setup(self, ctx: StepContext) -> dict:
        r = self.recipe
        return {
            "name": ctx.name,
            "base_dir": str(ctx.base_dir),
            "run_dir": str(self.run_dir),
            "teachers": r.teachers,
            "budget_usd": r.budget_usd,
            "cache_only": ctx.pool.cache_only if ctx.pool is not None else False,
        }


def merge_stores(ctx: StepContext, run_dir: Path) -> None:
    """Merge the workers' stores (``cache/*.sqlite``) into the run's cache, and delete them."""
    if ctx.pool is None:
        return
    for path in sorted((run_dir / "cache").glob("*.sqlite")):
        ctx.pool.cache.absorb(path)


async def _await(ref: Any) -> Any:
    """A Ray result, raising the step's own exception (`BudgetExceeded`, say) when it raised."""
    import ray

    try:
        return await ref
    except ray.exceptions.RayTaskError as e:
        raise (e.cause if isinstance(e.cause, BaseException) else e) from None
    except asyncio.CancelledError:
        ray.cancel(ref)
        raise


async def _tasks(step: Any, setup: dict, rows: list[dict]) -> StepOutput:
    from kdata.executors.ray_workers import map_block

    return await _await(map_block.remote(step, rows, setup))


class _Remote:
    """A map step as the local executor sees it when its blocks run on Ray."""

    kind = "map"

    def __init__(self, step: Any, submit: Callable) -> None:
        self.step, self._submit = step, submit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.step, name)

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        out = await self._submit(rows)
        ctx.set_total(out.expected)
        ctx.advance(out.expected)
        return out


class _Workers:
    """The teacher actors and the `Limits` actor of one step; the stores merged at its end."""

    def __init__(self, executor: RayExecutor, step: Any, ctx: StepContext) -> None:
        self.executor, self.step, self.ctx = executor, step, ctx
        self.actors: list[Any] = []
        self.busy: list[int] = []

    async def __aenter__(self) -> _Workers:
        from kdata.executors.ray_workers import Limits, TeacherWorker

        ex, r = self.executor, self.executor.recipe
        names = sorted(self.step.teacher_names())
        used = {n: r.teachers[n] for n in names}
        tag = hashlib.sha1(f"{ex.run_dir.resolve()}:{self.ctx.name}".encode()).hexdigest()[:12]
        self.limits = Limits.options(name=f"kdata-limits-{tag}", namespace=NAMESPACE).remote(
            str(ex.run_dir), {n: (t.rpm, t.tpm) for n, t in used.items()}, r.budget_usd
        )
        secrets = {
            t.api_key_var: os.environ[t.api_key_var]
            for t in used.values()
            if t.api_key_var and t.api_key_var in os.environ
        }
        setup = ex._setup(self.ctx)
        self.actors = [
            TeacherWorker.options(scheduling_strategy="SPREAD").remote(
                self.step, setup, f"kdata-limits-{tag}", ex.workers, secrets
            )
            for _ in range(ex.workers)
        ]
        self.busy = [0] * len(self.actors)
        return self

    async def run(self, rows: list[dict]) -> StepOutput:
        """One block's output from the least busy actor; its ledger added to the driver's."""
        from kdata.executors.ray_workers import ledger_sum

        k = self.busy.index(min(self.busy))
        self.busy[k] += 1
        try:
            out, ledgers = await _await(self.actors[k].run.remote(rows))
        finally:
            self.busy[k] -= 1
        for name, led in ledgers.items():
            ledger_sum(self.ctx.pool.ledgers[name], led)
        return out

    async def __aexit__(self, *exc: Any) -> None:
        import ray

        with contextlib.suppress(ray.exceptions.RayError):
            await asyncio.wait_for(
                asyncio.gather(*(a.close.remote() for a in self.actors)), timeout=60
            )
        for a in [*self.actors, self.limits]:
            ray.kill(a)
        merge_stores(self.ctx, self.executor.run_dir)


class _Global:
    """A global step as the local executor sees it when its passes over blocks run on Ray."""

    kind = "global"

    def __init__(self, step: Any, blocks: _RayBlocks) -> None:
        self.step, self._blocks = step, blocks

    def __getattr__(self, name: str) -> Any:
        return getattr(self.step, name)

    async def decide(self, blocks: Any, ctx: StepContext) -> Any:
        return await self.step.decide(self._blocks, ctx)


class _RayBlocks:
    """A global step's passes over its input blocks, one Ray task per block (`Blocks` of the
    local executor, distributed): each task reads its block's rows from the input parts."""

    def __init__(self, source: Path | None, block_rows: int) -> None:
        self.source, self.block_rows = source, block_rows

    def _pieces(self) -> list[list[tuple[str, int, int]]]:
        """Per block: (part, first row, end row) of each input part it takes rows from."""
        paths = parts(self.source) if self.source is not None else []
        counts = [pq.read_metadata(p).num_rows for p in paths]
        total, out, at = sum(counts), [], 0
        for lo in range(0, total, self.block_rows):
            hi, pieces, at = min(lo + self.block_rows, total), [], 0
            for path, n in zip(paths, counts, strict=True):
                a, b = max(lo, at), min(hi, at + n)
                if a < b:
                    pieces.append((str(path), a - at, b - at))
                at += n
            out.append(pieces)
        return out

    async def map(self, fn: Callable[[Block], T], columns: list[str] | None = None) -> list[T]:
        """``fn(block)`` of every block, in block order, each in a Ray task."""
        import ray

        task = ray.remote(_summarise)
        f = ray.put(fn)
        refs = [
            task.remote(f, pieces, i, i * self.block_rows, columns)
            for i, pieces in enumerate(self._pieces())
        ]
        return list(await asyncio.gather(*(_await(r) for r in refs)))


def _summarise(fn: Callable, pieces: list, index: int, start: int, columns: list[str] | None):
    """``fn`` of one block, read from the rows ``pieces`` of the input parts."""
    tables = [
        pa.concat_tables(list(tables_of([Path(p)], columns))).slice(a, b - a) for p, a, b in pieces
    ]
    table = pa.concat_tables(tables, promote_options="permissive")
    return fn(Block(index, start, table))
