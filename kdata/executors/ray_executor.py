"""The Ray executor: the same steps, blocks, ids and parts as the local one, run on a cluster.

``execution: {executor: ray}`` (or ``kdata build --executor ray``) starts a Ray instance on
this machine, bound to 127.0.0.1; with ``address`` it joins that cluster instead. Workers get
this kdata (``runtime_env`` ``py_modules``) and ``LITELLM_LOCAL_MODEL_COST_MAP=True``; the
teachers' API keys go to the teacher actors from the driver's environment, as constructor
arguments (never through ``runtime_env``, which Ray logs).

The driver keeps what the local executor does: it cuts the input into blocks, skips the blocks
finished before, checks each block's accounting and writes its parts (`LocalExecutor`, handed
the steps below in place of the recipe's). What runs on the cluster, by the step's ``kind``:

- ``map`` with a ``batch: true`` teacher: on the driver, as the local executor runs it (its
  requests go to the provider in batches, `kdata.teachers.batch`; there is nothing to spread).
- ``map`` with other teachers: each block goes to one of ``workers`` `TeacherWorker` actors (one per
  node by default), two blocks per actor in flight; limits and budget are global (`Limits`),
  each worker stores its responses in ``cache/`` and reads every store, and the driver merges
  the stores into ``cache.sqlite`` once the step ends (and at the start of the next build, after
  a driver that died). A worker that dies is restarted by Ray and its blocks are run again.
- ``map`` without teachers: each block is a task (`map_block`); the step is put in the object
  store once and each worker process fetches it once (``decontaminate``'s n-gram index of the
  benchmarks is built on the driver before, so it is built once per build). A step that embeds
  with a transformer (its ``gpu()``), on a cluster with GPUs: each block on one of the GPU
  actors of `kdata.executors.ray_gpus` instead.
- ``global``: ``decide``'s passes over the blocks run as tasks (`_RayBlocks`): ``blocks.map``
  is one task per block, reading its rows from the input parts itself (``blocks.map(...,
  gpu=True)``, ``semantic_dedup``'s embedding pass, on GPU actors when the cluster has GPUs,
  as for a map step); ``blocks.shuffle`` is
  a map task per block cutting its summaries into ``partitions`` (the cluster's CPUs) pieces
  kept in the object store, then one reduce task per partition (``exact_dedup``: the
  duplicates of its hashes); ``blocks.each`` runs a step's parts of one piece of work as tasks
  (``minhash_dedup``: the candidate edges of a group of bands). Reduce and ``each`` tasks go to
  the nodes in turn. The driver gets back only what they found (drops, edges), and each block
  is marked in a task that reads it, the driver reading only its ids and writing its parts.
- ``source`` steps run on the driver, as the local executor runs them.

With the run directory at a URL (`kdata.storage`), the nodes need no filesystem in common: the
driver works in its stage, a task reads the input parts it needs from its own machine's stage,
fetched from the URL first (`Files`), and the teacher workers send what they store to the URL
after each block; ``semantic_dedup``'s embedding passes send each block's file there.
``minhash_dedup``, whose tasks write into shared signature files under ``tmp/``, then runs on
the driver.
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
from kdata.steps.base import PROVENANCE, StepContext, StepOutput
from kdata.storage import Files, Remote

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
                "head's address (HOST:6379 from a node of the cluster, or ray://HOST:10001 "
                "through its Ray Client server)"
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

    def __init__(self, recipe: Any, run_dir: Path, remote: Remote | None = None) -> None:
        import ray

        ex = recipe.execution
        self.recipe, self.run_dir, self.block_rows = recipe, Path(run_dir), ex.block_rows
        self.remote = remote  # the run directory's URL, if it is at one (`kdata.storage`)
        self.files = Files(str(self.run_dir), remote.url if remote else None)  # for the workers
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
        self.merge_stores(ctx)  # what the workers of a build that died stored
        self.local.map_in_flight = None
        if step.kind == "global" and step.shares_files and self.files.url is not None:
            pass  # on the driver: its passes share files, which the nodes have no place for
        elif step.kind == "global":
            self.local.map_in_flight = 2 * self.cpus  # blocks marked at once
            step = _Global(step, _RayBlocks(source, self.block_rows, self.cpus, self.files))
        elif step.kind == "map" and ctx.pool is not None and ctx.pool.batched(step.teacher_names()):
            pass  # on the driver, as locally: its batches are the provider's work
        elif step.kind == "map" and step.teacher_names():
            async with _Workers(self, step, ctx) as workers:
                self.local.map_in_flight = BLOCKS_PER_WORKER * self.workers
                return await self.local.run(
                    _Remote(step, workers.run), source, folder, ctx, fingerprint
                )
        elif step.kind == "map":
            self.local.map_in_flight = self.cpus
            import ray

            if step.type == "decontaminate" and step.method == "ngram":
                step.index(ctx.base_dir)  # the benchmark index, built here once: sent with it
            setup = {**self._setup(ctx), "fingerprint": fingerprint}
            # the step in the object store once, its ref nested so a task fetches it only when
            # its worker process has no copy yet
            from kdata.executors.ray_gpus import Gpus, gpu_slots

            ref = [ray.put(step)]
            if step.gpu() and gpu_slots():  # its blocks on GPU actors
                async with Gpus() as gpus:
                    remote = _Remote(step, functools.partial(gpus.run_block, ref, setup))
                    return await self.local.run(remote, source, folder, ctx, fingerprint)
            step = _Remote(step, functools.partial(_tasks, ref, setup))
        return await self.local.run(step, source, folder, ctx, fingerprint)

    def merge_stores(self, ctx: StepContext) -> None:
        """Merge the workers' stores (``cache/*.sqlite``; with a URL, those they sent there
        too) into the run's cache, and delete them."""
        if ctx.pool is None:
            return
        got = self.remote.pull_stores() if self.remote is not None else []
        for path in sorted((self.run_dir / "cache").glob("*.sqlite")):
            ctx.pool.cache.absorb(path)
        if got:  # what they sent, sent again in one segment of the driver's, then forgotten
            self.remote.send_responses()
            self.remote.forget([p.name for p in got])

    def _setup(self, ctx: StepContext) -> dict:
        r = self.recipe
        return {
            "name": ctx.name,
            "base_dir": str(ctx.base_dir),
            "files": self.files,
            "teachers": r.teachers,
            "budget_usd": r.budget_usd,
            "cache_only": ctx.pool.cache_only if ctx.pool is not None else False,
        }


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


async def _tasks(step: list, setup: dict, rows: list[dict]) -> StepOutput:
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
        spent = self.ctx.pool.spent_before + self.ctx.pool.spent_usd
        self.limits = Limits.options(name=f"kdata-limits-{tag}", namespace=NAMESPACE).remote(
            {n: (t.rpm, t.tpm) for n, t in used.items()}, r.budget_usd, spent
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
        self.executor.merge_stores(self.ctx)


class _Global:
    """A global step as the local executor sees it when its passes over blocks, its reduce
    tasks and the marking of its blocks run on Ray (the driver reads only the blocks' ids)."""

    kind = "global"
    mark_reads = [f"{PROVENANCE}.id"]

    def __init__(self, step: Any, blocks: _RayBlocks) -> None:
        self.step, self._blocks = step, blocks
        self._decision: tuple[Any, Any] | None = None  # (decision, its object ref)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.step, name)

    async def decide(self, blocks: Any, ctx: StepContext) -> Any:
        return await self.step.decide(self._blocks, ctx)

    async def mark(self, block: Block, decision: Any) -> StepOutput:
        """The block marked in a task that reads it from the input parts; a decision that can
        be cut per block (`Clusters`, `Drops`) is sent cut, any other once."""
        import ray

        if hasattr(decision, "of"):
            part = decision.of(block.index)
        else:
            if self._decision is None or self._decision[0] is not decision:
                self._decision = (decision, ray.put(decision))
            part = self._decision[1]
        return await self._blocks.mark(self.step, block.index, part)


class _RayBlocks:
    """A global step's passes over its input blocks, one Ray task per block (`Blocks` of the
    local executor, distributed): each task reads its block's rows from the input parts.
    ``shuffle`` keeps the pieces in the object store, each reduce task taking its partition's
    pieces from there; reduce and ``each`` tasks go to the nodes in turn, and ``nodes`` records
    the nodes they ran on."""

    def __init__(self, source: Path | None, block_rows: int, partitions: int, files: Files) -> None:
        self.source, self.block_rows, self.partitions = source, block_rows, partitions
        self.files = files
        self.nodes: set[str] = set()
        self._cut: list[list[tuple[str, int, int]]] | None = None
        self._step: tuple[Any, Any] | None = None
        self._nodes: list[str] = []

    def _pieces(self) -> list[list[tuple[str, int, int]]]:
        """Per block: (part, first row, end row) of each input part it takes rows from."""
        if self._cut is not None:
            return self._cut
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
        self._cut = out
        return out

    def _read(self, index: int, columns: list[str] | None = None) -> tuple:
        """What a task needs to read block ``index``: (its pieces, index, start, columns, how
        it reaches the files)."""
        return self._pieces()[index], index, index * self.block_rows, columns, self.files

    async def map(
        self, fn: Callable[[Block], T], columns: list[str] | None = None, gpu: bool = False
    ) -> list[T]:
        """``fn(block)`` of every block, in block order, each in a Ray task; with ``gpu`` and
        a cluster that has GPUs, on `GpuWorker` actors instead."""
        import ray

        from kdata.executors.ray_gpus import Gpus, gpu_slots

        f, blocks = ray.put(fn), range(len(self._pieces()))
        if gpu and gpu_slots():
            async with Gpus() as gpus:
                calls = [gpus.call(_summarise, f, *self._read(i, columns)) for i in blocks]
                return list(await asyncio.gather(*calls))
        task = _remote(_summarise)
        refs = [task.remote(f, *self._read(i, columns)) for i in blocks]
        return list(await asyncio.gather(*(_await(r) for r in refs)))

    async def shuffle(
        self,
        split: Callable[[Block, int], list],
        reduce: Callable[[list], T],
        columns: list[str] | None = None,
    ) -> list[T]:
        """As `Blocks.shuffle`: a map task per block returns its ``partitions`` pieces as
        objects of their own; a reduce task per partition gets that partition's pieces."""
        import ray

        n = self.partitions
        task = _remote(_split).options(num_returns=n)
        f, r = ray.put(split), ray.put(reduce)
        maps = [task.remote(f, n, *self._read(i, columns)) for i in range(len(self._pieces()))]
        maps = [m if n > 1 else [m] for m in maps]
        refs = [self._on(_reduce, k).remote(r, *(m[k] for m in maps)) for k in range(n)]
        return await self._results(refs)

    async def each(self, fn: Callable[[Any], T], items: list) -> list[T]:
        """``fn(item)`` of every item, each in a task, spread over the nodes."""
        import ray

        f = ray.put(fn)
        return await self._results([self._on(_each, k).remote(f, x) for k, x in enumerate(items)])

    def _on(self, fn: Callable, k: int) -> Any:
        """``fn`` as a task for the ``k``-th node with CPUs, round robin (soft: another node
        when it is gone), so a step's reduce tasks are spread evenly (Ray's ``SPREAD`` is best
        effort: it ran them all on one node here)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not self._nodes:
            alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
            self._nodes = sorted(n["NodeID"] for n in alive)
        node = self._nodes[k % len(self._nodes)]
        where = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        return _remote(fn).options(scheduling_strategy=where)

    async def mark(self, step: Any, index: int, decision: Any) -> StepOutput:
        """``step.mark(block, decision)`` of block ``index``, read whole, in a task (the step
        put in the object store once)."""
        import ray

        if self._step is None or self._step[0] is not step:
            self._step = (step, ray.put(step))
        task = _remote(_mark).remote(self._step[1], decision, *self._read(index))
        return await _await(task)

    async def _results(self, refs: list) -> list:
        out = []
        for node, result in await asyncio.gather(*(_await(r) for r in refs)):
            self.nodes.add(node)
            out.append(result)
        return out


@functools.cache
def _remote(fn: Callable) -> Any:
    """``fn`` as a Ray remote function, made once."""
    import ray

    return ray.remote(fn)


def _block(pieces: list, index: int, start: int, columns: list[str] | None, files: Files) -> Block:
    """Block ``index`` read from the rows ``pieces`` of the input parts."""
    tables = [
        pa.concat_tables(list(tables_of([files.read(p)], columns))).slice(a, b - a)
        for p, a, b in pieces
    ]
    return Block(index, start, pa.concat_tables(tables, promote_options="permissive"))


def _summarise(fn: Callable, *read: Any) -> Any:
    return fn(_block(*read))


def _split(split: Callable, partitions: int, *read: Any) -> Any:
    pieces = split(_block(*read), partitions)
    return pieces if partitions > 1 else pieces[0]


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _reduce(reduce: Callable, *pieces: Any) -> tuple[str, Any]:
    return _node(), reduce(list(pieces))


def _each(fn: Callable, item: Any) -> tuple[str, Any]:
    return _node(), fn(item)


def _mark(step: Any, decision: Any, *read: Any) -> StepOutput:
    return step.mark(_block(*read), decision)
