"""The local executor: one process, an event loop for teacher calls, threads for CPU work.

The runner hands it a step, the step's input blocks and the step's folder; it decides how the
blocks are scheduled and writes the step's parts (see `kdata.blocks`). By the step's ``kind``:

- ``map``: each block is run on its own (``step.run(rows, ctx)`` on the block's rows, or
  ``step.run_table(block)`` in the thread pool when the step can: ``filter``). Teacher
  steps keep two blocks in flight, so the teacher pool stays full across a block's tail; a step
  with a ``batch: true`` teacher `BATCH_BLOCKS_IN_FLIGHT` (one batch per block, and a batch may
  take hours: they must run side by side); other steps one. A block already finished by an
  earlier build of the same step is not run again.
- ``global``: ``step.decide`` sees every block through `Blocks.map` (compact per-row summaries,
  computed block by block in the thread pool), then each block is marked
  (``step.mark(block, decision)``, in the thread pool) and written, as map steps are; then the
  blocks the step makes from its decision, if any (``step.blocks(ctx, block_rows, decision)``:
  ``self_instruct``'s rounds).
- ``source``: the input blocks pass through, then the blocks the step reads or makes
  (``step.blocks(ctx, block_rows)``: an iterator, or an async one for a source that asks a
  teacher, ``curate`` or ``magpie``, which then counts its own progress). Such a step makes
  a finished block again on a rerun, from the cache, and does not write it again.

Parquet encoding and decoding, and a global step's summaries, run in a thread pool sized to the
cores, off the event loop, so teacher calls and CPU work overlap.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from kdata.blocks import Block, input_blocks, read_json, to_table, write_parts
from kdata.errors import KdataError
from kdata.steps.base import StepBase, StepContext, StepOutput, rid
from kdata.teachers.batch import BLOCK

T = TypeVar("T")
BATCH_BLOCKS_IN_FLIGHT = 16  # blocks of a step with a batch teacher run at once: its batches


@dataclass
class Counts:
    """Row accounting of a step, summed over its blocks: expected = rows + dropped + failed."""

    expected: int = 0
    rows: int = 0
    dropped: int = 0
    failed: int = 0
    drop_reasons: Counter = field(default_factory=Counter)
    failure_classes: Counter = field(default_factory=Counter)

    def add(self, block: dict) -> None:
        """Add one block's counts (as its JSON holds them)."""
        for k in ("expected", "rows", "dropped", "failed"):
            setattr(self, k, getattr(self, k) + block[k])
        self.drop_reasons.update(block["drop_reasons"])
        self.failure_classes.update(block["failure_classes"])


class Blocks:
    """A global step's view of its input: passes over the blocks, each block in the pool.

    ``partitions``: into how many parts a step cuts work that `shuffle` or `each` runs in
    parallel (1 here; the Ray executor's `_RayBlocks` runs the same calls as tasks).
    """

    partitions = 1

    def __init__(self, executor: LocalExecutor, blocks: Callable[..., Iterator[Block]]) -> None:
        self._executor, self._blocks = executor, blocks

    async def map(
        self, fn: Callable[[Block], T], columns: list[str] | None = None, gpu: bool = False
    ) -> list[T]:
        """``fn(block)`` of every block, in block order, computed in the thread pool.

        ``columns``: read only these (``a``, or ``a.b`` of a struct) of the rows. ``gpu``: the
        pass gains from a GPU (the Ray executor's concern; here a model uses one if torch sees
        it).
        """
        loop, pool = asyncio.get_running_loop(), self._executor.pool
        it = self._blocks(columns)
        out = []
        ahead = loop.run_in_executor(pool, next, it, None)
        try:
            while (block := await ahead) is not None:
                ahead = loop.run_in_executor(pool, next, it, None)  # read on while fn runs
                out.append(await loop.run_in_executor(pool, fn, block))
        finally:
            if not ahead.done():  # fn failed: no read runs on after the pass
                await asyncio.wait([ahead])
        return out

    async def shuffle(
        self,
        split: Callable[[Block, int], list],
        reduce: Callable[[list], T],
        columns: list[str] | None = None,
    ) -> list[T]:
        """``split(block, partitions)`` of every block cuts it into `partitions` pieces; then
        ``reduce(pieces)`` of each partition, its pieces in block order: the results."""
        pieces = await self.map(lambda b: split(b, self.partitions), columns)
        return await self.each(reduce, [[p[k] for p in pieces] for k in range(self.partitions)])

    async def each(self, fn: Callable[[Any], T], items: list) -> list[T]:
        """``fn(item)`` of every item (a step's `partitions` parts of one piece of work)."""
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(self._executor.pool, fn, item) for item in items]


class OneBlock(Blocks):
    """Every row as one block: how a global step runs outside a build (``step.run(rows)``)."""

    def __init__(self, rows: list[dict]) -> None:
        self.block = Block(0, 0, to_table([]), given=rows)

    async def map(
        self, fn: Callable[[Block], T], columns: list[str] | None = None, gpu: bool = False
    ) -> list[T]:
        return [fn(self.block)]

    async def each(self, fn: Callable[[Any], T], items: list) -> list[T]:
        return [fn(item) for item in items]


class LocalExecutor:
    """Runs steps over blocks in this process (see the module doc)."""

    def __init__(
        self, block_rows: int, workers: int | None = None, map_in_flight: int | None = None
    ) -> None:
        self.block_rows = block_rows
        self.pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2)
        self.map_in_flight = map_in_flight  # blocks of a step run at once (default: 2 or 1)

    def close(self) -> None:
        """Stop the thread pool."""
        self.pool.shutdown(wait=True)

    async def run(
        self, step: Any, source: Path | None, folder: Path, ctx: StepContext, fingerprint: str
    ) -> Counts:
        """Run ``step`` over the rows of the step folder ``source`` and write its parts.

        Blocks an earlier build of the same step (same fingerprint and block size) finished
        are kept; any other content of ``folder`` is removed first.
        """
        stamp = {"fingerprint": fingerprint, "block_rows": self.block_rows}
        target = _Target(folder, stamp, _finished(folder, stamp), ctx, step.curates)
        (folder / "blocks").mkdir(parents=True, exist_ok=True)  # there even for no block
        (folder / "stats.json").unlink(missing_ok=True)

        def blocks(columns: list[str] | None = None) -> Iterator[Block]:
            return input_blocks(source, self.block_rows, columns)

        if step.kind == "source":
            passed = ((b, _Same()) for b in blocks())
            await self._blocks(target, _chain(passed, step.blocks(ctx, self.block_rows), self.pool))
        elif step.kind == "global":
            decision = await step.decide(Blocks(self, blocks), ctx)
            # a step marked elsewhere (on Ray) has the driver read only what writing needs
            marked = (
                (b, _Marked(step, decision)) for b in blocks(getattr(step, "mark_reads", None))
            )
            made = step.blocks(ctx, self.block_rows, decision)
            await self._blocks(target, _chain(marked, made, self.pool), self.map_in_flight or 1)
        else:  # map: teacher steps keep a second block in flight to keep the pool full
            names = step.teacher_names()
            batched = bool(names) and ctx.pool is not None and ctx.pool.batched(names)
            in_flight = self.map_in_flight or (
                BATCH_BLOCKS_IN_FLIGHT if batched else 2 if names else 1
            )
            work = ((b, _Mapped(step)) for b in blocks())
            await self._blocks(target, _chain(work, (), self.pool), in_flight)
        counts = Counts()
        for index in sorted(target.results):
            counts.add(target.results[index])
        return counts

    async def _blocks(self, target: _Target, work: AsyncIterator, in_flight: int = 1) -> None:
        """Run each ``(block, make)`` of ``work`` (`_chain`), at most ``in_flight`` at once,
        skipping the blocks already finished. After a failure no block starts; those in flight
        finish."""
        running: set[asyncio.Task] = set()
        error: BaseException | None = None

        async def one(block: Block, make: _Make) -> None:
            BLOCK.set(block.id)  # a batch teacher's requests are batched per block
            rows, out = await make(block, target.ctx, self.pool)
            target.results[block.index] = await self._write(target, block, rows, out)

        try:
            while error is None:
                unit = await anext(work, None)
                if unit is None:
                    break
                block, make = unit
                if block.id in target.done:
                    target.results[block.index] = target.done[block.id]
                    target.ctx.advance(target.done[block.id]["expected"])
                    continue
                running.add(asyncio.create_task(one(block, make)))
                while len(running) >= in_flight:
                    finished, running = await asyncio.wait(running, return_when="FIRST_COMPLETED")
                    first = _first_error(finished)  # retrieves every exception
                    error = error or first
            if running:
                finished, running = await asyncio.wait(running)
                first = _first_error(finished)  # retrieves every exception
                error = error or first
        except (asyncio.CancelledError, KeyboardInterrupt):
            # Interrupted: the blocks in flight stop too (every response received is stored
            # already) and are waited for, so that none runs on once the build closes its cache.
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)
            raise
        except BaseException:  # reading the next block failed: those in flight finish first
            if running:
                await asyncio.wait(running)
            raise
        if error is not None:
            raise error

    async def _write(
        self, target: _Target, block: Block, rows: list[dict] | None, out: StepOutput
    ) -> dict:
        """Check a block's accounting and write its parts and counts (in the thread pool).

        ``rows``: the block's rows the step saw as dicts (None: it saw the block's table).
        """
        name = block.id
        got = len(out.rows) + len(out.dropped) + len(out.failed)
        if got != out.expected:
            raise KdataError(
                f"step {target.folder.name}, block {name}: row accounting broken: "
                f"{out.expected} expected, {len(out.rows)} out + {len(out.dropped)} dropped + "
                f"{len(out.failed)} failed; this is a kdata bug, please report it"
            )
        counts = {
            **target.stamp,
            "block": name,
            "start": block.start,
            "rows_in": len(block) if rows is None else len(rows),
            "expected": out.expected,
            "rows": len(out.rows),
            "dropped": len(out.dropped),
            "failed": len(out.failed),
            "drop_reasons": dict(Counter(d["reason"] for d in out.dropped)),
            "failure_classes": dict(Counter(f["error_class"] for f in out.failed)),
        }
        dropped = out.dropped
        if any(d["row"] is not None for d in dropped):
            # a dropped input row is in the input parts already: its id stands for it
            given = set(block.ids().to_pylist()) if rows is None else {rid(r) for r in rows}
            dropped = [{**d, "row": None} if d["row_id"] in given else d for d in dropped]
        tables = {"rows": _kept(target, block, rows, out), "dropped": dropped, "failed": out.failed}
        loop = asyncio.get_running_loop()
        written = await loop.run_in_executor(
            self.pool, write_parts, target.folder, name, tables, counts
        )
        await loop.run_in_executor(self.pool, target.ctx.written, written)
        return counts


@dataclass
class _Target:
    """Where a step's blocks go: its folder, the blocks finished before, the counts so far."""

    folder: Path
    stamp: dict
    done: dict[str, dict]
    ctx: StepContext
    curates: bool  # the step's kept rows are its input rows, unchanged
    results: dict[int, dict] = field(default_factory=dict)


def _kept(target: _Target, block: Block, rows: list[dict] | None, out: StepOutput) -> Any:
    """The kept rows; a curation step's as a slice of the block's own table, which saves
    converting them back to Arrow (its rows are the block's dicts, kept or not)."""
    if isinstance(out.rows, pa.Table) or not target.curates or len(block) != len(rows):
        return out.rows
    at = {id(r): i for i, r in enumerate(rows)}
    index = [at.get(id(r)) for r in out.rows]
    return out.rows if None in index else block.table.take(pa.array(index, type=pa.int64()))


def _finished(folder: Path, stamp: dict) -> dict[str, dict]:
    """The blocks of ``folder`` an earlier build finished with ``stamp``; clears it otherwise.

    A block with ``not_cached`` failures (a cache-only build) is not finished: it runs again.
    """
    found = {p.stem: read_json(p) for p in (folder / "blocks").glob("*.json")}
    if any(c is None or {k: c.get(k) for k in stamp} != stamp for c in found.values()):
        shutil.rmtree(folder)
        return {}
    return {b: c for b, c in found.items() if "not_cached" not in c["failure_classes"]}


def _first_error(tasks: set[asyncio.Task]) -> BaseException | None:
    errors = [t.exception() for t in tasks]  # every one retrieved: none is logged as lost
    return next((e for e in errors if e is not None), None)


class _Make:
    """How a block's output is made: ``await make(block, ctx, pool)`` gives the block's rows
    as the step saw them (None: it saw the block's table) and the step's output."""

    async def __call__(
        self, block: Block, ctx: StepContext, pool: ThreadPoolExecutor
    ) -> tuple[list[dict] | None, StepOutput]:  # pragma: no cover
        raise NotImplementedError


class _Mapped(_Make):
    def __init__(self, step: Any) -> None:
        self.step = step

    async def __call__(self, block, ctx, pool):
        loop = asyncio.get_running_loop()
        if isinstance(self.step, StepBase):  # not a step another executor wraps (Ray's)
            out = await loop.run_in_executor(pool, self.step.run_table, block)
            if out is not None:  # made from the block's table: no dicts
                ctx.advance(len(block))
                return None, out
        rows = await loop.run_in_executor(pool, block.rows)
        return rows, await self.step.run(rows, ctx)


class _Marked(_Make):
    def __init__(self, step: Any, decision: Any) -> None:
        self.step, self.decision = step, decision

    async def __call__(self, block, ctx, pool):
        mark = self.step.mark
        if asyncio.iscoroutinefunction(mark):  # marked elsewhere (a Ray task)
            out = await mark(block, self.decision)
        else:
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(pool, mark, block, self.decision)
        ctx.advance(len(block))
        return None, out


class _Same(_Make):
    """An input block that a source step passes through unchanged."""

    async def __call__(self, block, ctx, pool):
        ctx.advance(len(block))
        return None, StepOutput(rows=block.table, expected=len(block))


class _Read(_Make):
    """A block a step read or made; ``counted``: the step advanced the progress for it."""

    def __init__(self, out: StepOutput, counted: bool) -> None:
        self.out, self.counted = out, counted

    async def __call__(self, block, ctx, pool):
        if not self.counted:
            ctx.advance(self.out.expected)
        return [], self.out


async def _chain(
    given: Iterator[tuple[Block, _Make]],
    made: Iterable[StepOutput] | AsyncIterator[StepOutput],
    pool: ThreadPoolExecutor,
) -> AsyncIterator[tuple[Block, _Make]]:
    """The units of the input blocks, then the blocks a step made, numbered on from them.

    Blocks are read (and a plain iterator's outputs made) in the thread pool, off the loop.
    """
    index = start = 0
    async for block, make in _pooled(given, pool):
        yield block, make
        index, start = block.index + 1, block.start + len(block)
    asked = isinstance(made, AsyncIterator)  # a teacher's: the step counts its progress
    async for out in made if asked else _pooled(iter(made), pool):
        yield Block(index, start, to_table([])), _Read(out, asked)
        index, start = index + 1, start + len(out.rows)


async def _pooled(it: Iterator[T], pool: ThreadPoolExecutor) -> AsyncIterator[T]:
    """The items of ``it``, each read in the pool (a block read from Parquet, say)."""
    loop = asyncio.get_running_loop()
    while (item := await loop.run_in_executor(pool, next, it, None)) is not None:
        yield item
