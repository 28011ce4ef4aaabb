"""`build(recipe) -> Run`: the steps in order, the run directory, resume.

Run directory::

    lock                     held by the build writing here: its pid, host and start time
    manifest.json            recipe, fingerprints, package versions, status, ledger
    cache.sqlite             every teacher response, stored as it arrived
    batches/                 the batches of batch teachers: journal.jsonl and each one's requests
    steps/<name>/            rows/, dropped/, failed/ and blocks/ per block, stats.json last
    data/train-0000k-of-0000n.parquet   the final dataset, sharded in the Hub's layout
    diversity/               report.json and plots of the final rows against the generated ones

Each step is handed to the executor (`kdata.executors.local`, or `kdata.executors.ray_executor`
with ``execution.executor: ray``) with its input blocks: the rows of
the step before, cut into blocks of ``execution.block_rows`` (see `kdata.blocks`). A step whose
fingerprint (its config, its teachers, its inputs, the step before it) matches the one on disk
is not run again; a step a build left unfinished resumes at its first unfinished block; a
teacher step that is run again is served from the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from kdata.blocks import DATA_DIR, dataset_files, read_dataset, write_dataset, write_json
from kdata.errors import BudgetExceeded, CacheError, KdataError
from kdata.executors.local import Counts, LocalExecutor
from kdata.lock import hold
from kdata.recipe import Recipe, Teacher
from kdata.steps.base import StepContext
from kdata.storage import Remote, is_url
from kdata.teachers.cache import RequestCache


def _version() -> str:
    from kdata import __version__

    return __version__


@dataclass
class StepStats:
    """What one step did. ``expected`` = ``rows_out`` + ``dropped`` + ``failed``, always."""

    name: str
    type: str
    fingerprint: str
    reused: bool = False
    rows_in: int = 0
    expected: int = 0
    rows_out: int = 0
    dropped: int = 0
    failed: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)
    failure_classes: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    cache_hits: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0


@dataclass
class Run:
    """The outcome of `build`: where it is, what each step did, what the teachers cost."""

    dir: Path  # the stage, when the run directory is at a URL (`kdata.storage`)
    status: str  # complete | budget_exceeded | interrupted
    steps: list[StepStats]
    ledger: dict[str, dict[str, Any]]
    cost_usd_total: float = 0.0
    url: str | None = None  # the run directory's URL, if it is at one

    @property
    def dataset_path(self) -> Path:
        """The final dataset's folder: ``train-0000k-of-0000n.parquet`` shards, which
        ``datasets.load_dataset("parquet", data_dir=...)`` reads."""
        return self.dir / DATA_DIR

    @property
    def dataset_files(self) -> list[Path]:
        """The final dataset's shards, in order."""
        return dataset_files(self.dir)

    def rows(self) -> list[dict]:
        """The final dataset's rows (all of them in memory: for small datasets)."""
        return read_dataset(self.dir).to_pylist()


class Reporter(Protocol):
    """Receives progress: `kdata.progress.RichReporter` draws it; the default ignores it."""

    def step_started(self, name: str, type: str, total: int | None) -> None: ...
    def set_total(self, total: int) -> None: ...
    def advance(self, n: int, in_flight: int, tokens: int, cost_usd: float) -> None: ...
    def step_finished(self, stats: StepStats) -> None: ...
    def note(self, text: str) -> None: ...


class _Silent:
    def step_started(self, name: str, type: str, total: int | None) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def advance(self, n: int, in_flight: int, tokens: int, cost_usd: float) -> None:
        pass

    def step_finished(self, stats: StepStats) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def build(
    recipe: Recipe,
    *,
    run_dir: str | os.PathLike | None = None,
    reporter: Reporter | None = None,
    cache_only: bool = False,
) -> Run:
    """Run a recipe, resuming whatever an earlier run in the same directory finished.

    Args:
        recipe: a loaded or Python-built recipe.
        run_dir: overrides ``output.dir``; a path, or a URL (``s3://bucket/runs/x``) that the
            build keeps up to date from a local copy (`kdata.storage`).
        reporter: progress receiver (the CLI passes a rich one).
        cache_only: send no teacher request (keys and prices are not checked): a request whose
            response is not in the run's cache fails its row with error class ``not_cached``,
            and a step with such failures is run again by the next build.

    Returns:
        The finished run.

    Raises:
        RecipeError: a key, price or input file the recipe needs is missing or unusable;
            raised before the run directory is created.
        RunLocked: another build is writing to the run directory.
        CacheError: the run's cache is damaged or lost responses (it is set aside and what could
            be read is kept; the next build goes on from there), or vanished during the build.
        BudgetExceeded: the run stopped before passing ``budget_usd``; ``.run`` is the stopped
            run, and rerunning with a larger budget resumes it.
    """
    if not cache_only:
        recipe.check_runtime()
    reporter = reporter or _Silent()
    where = run_dir or recipe.run_dir
    remote = Remote(where) if is_url(where) else None
    run_dir = remote.local if remote else Path(where)
    with hold(run_dir, reporter.note), remote.hold() if remote else contextlib.nullcontext():
        if remote:
            remote.pull()
        coro = _build(recipe, run_dir, reporter, cache_only, remote)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            in_loop = False  # run below, not in this handler: errors keep their own causes
        else:
            in_loop = True
        if not in_loop:
            return asyncio.run(coro)
        # Called from a running loop (a notebook): run on a loop of our own in a thread.
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["run"] = asyncio.run(coro)
            except BaseException as e:  # re-raised in the caller's thread
                box["error"] = e

        t = threading.Thread(target=target)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["run"]


def _teacher_print(cfg: Teacher) -> dict[str, Any]:
    """What of a teacher decides a step's rows: the model, its parameters, and how its stored
    responses are read (``think_tags``, only when set, so other fingerprints stay as they were)."""
    out: dict[str, Any] = {"model": cfg.model, "params": cfg.params.sent()}
    if cfg.think_tags:
        out["think_tags"] = True
    return out


def fingerprints(recipe: Recipe) -> list[str]:
    """Each step's fingerprint: hash of its config, teachers, inputs and the step before."""
    out, prev = [], ""
    for step in recipe.steps:
        teachers = {t: _teacher_print(recipe.teachers[t]) for t in sorted(step.teacher_names())}
        digest = step.inputs_digest(recipe.base_dir)
        blob = json.dumps(
            {
                "prev": prev,
                "kdata": _version(),
                "step": step.model_dump(mode="json"),
                "teachers": teachers,
                "inputs": digest,
            },
            sort_keys=True,
        )
        prev = hashlib.sha256(blob.encode()).hexdigest()[:16]
        out.append(prev)
    return out


async def _build(
    recipe: Recipe, run_dir: Path, reporter: Reporter, cache_only: bool, remote: Remote | None
) -> Run:
    from kdata.steps.diversity import final_report, remove_final_report
    from kdata.teachers.loop import LoopExecutor
    from kdata.teachers.pool import TeacherPool

    asyncio.get_running_loop().set_default_executor(LoopExecutor())
    executor = _executor(recipe, run_dir, remote)  # first: joining a Ray cluster may fail
    stored_before = _stored_responses(run_dir)
    cache = RequestCache(run_dir / "cache.sqlite")
    if remote:  # what the URL held: the responses of its builds, absorbed
        for store in sorted((run_dir / "cache").glob("*.sqlite")):
            cache.absorb(store)
        remote.begin(cache.path)
    pool = TeacherPool(
        recipe.teachers,
        cache,
        recipe.budget_usd,
        cache_only,
        run_dir / "batches",
        reporter.note,
        remote.send if remote else None,
    )
    names, fps = recipe.step_names(), fingerprints(recipe)
    manifest = _manifest(recipe, names, fps)
    manifest["teachers"] = cache.totals_by_teacher()  # what the cache holds, should this build die
    url = remote.url if remote else None
    run = Run(dir=run_dir, status="running", steps=[], ledger={}, url=url)
    write_json(run_dir / "manifest.json", manifest)
    if remote:
        remote.sync("manifest.json")
    source: Path | None = None  # the folder of the step before, whose rows are the input
    try:
        _check_cache(cache, stored_before)
        for step, name, fp in zip(recipe.steps, names, fps, strict=True):
            rows_in = run.steps[-1].rows_out if run.steps else 0
            stats = StepStats(name=name, type=step.type, fingerprint=fp, rows_in=rows_in)
            folder = run_dir / "steps" / name
            reporter.step_started(name, step.type, rows_in if step.kind == "global" else None)
            done = _read_stats(folder) or {}
            if (
                done.get("fingerprint") == fp
                and "not_cached" not in done.get("failure_classes", {})
                and (folder / "blocks").is_dir()  # not a run directory of an older layout
            ):
                stats = StepStats(**{**done, "reused": True})
            else:
                before = {
                    n: (led.requests, led.cache_hits, led.cost_usd)
                    for n, led in pool.ledgers.items()
                }
                t0 = time.monotonic()
                total = [0]

                def add_total(n: int, total=total) -> None:  # blocks add their units
                    total[0] += n
                    reporter.set_total(total[0])

                ctx = StepContext(
                    name=name,
                    base_dir=recipe.base_dir,
                    pool=pool,
                    run_dir=run_dir,
                    set_total=add_total,
                    advance=lambda n: reporter.advance(
                        n, pool.in_flight, pool.tokens, pool.spent_usd
                    ),
                    written=remote.block if remote else lambda paths: None,
                    url=url,
                )
                counts = await executor.run(step, source, folder, ctx, fp)
                _check_accounting(name, counts)
                stats.seconds = round(time.monotonic() - t0, 3)
                _fill_stats(stats, counts, pool, before)
                write_json(folder / "stats.json", asdict(stats))
                if remote:
                    remote.sync(f"steps/{name}")
            source = folder
            run.steps.append(stats)
            reporter.step_finished(stats)
        cache.check()
        write_dataset(source, run_dir / DATA_DIR)
        if recipe.report.diversity:
            final_report(recipe, run_dir)
        else:
            remove_final_report(run_dir)
        run.status = "complete"
    except BudgetExceeded as e:
        run.status = "budget_exceeded"
        e.run = run
        raise
    except (KeyboardInterrupt, asyncio.CancelledError):
        run.status = "interrupted"
        raise
    except Exception:
        run.status = "failed"
        raise
    finally:
        run.ledger = {
            n: led.as_dict() for n, led in pool.ledgers.items() if led.requests or led.cache_hits
        }
        run.cost_usd_total = cache.total_cost()
        manifest.update(
            status=run.status,
            finished_at=time.time(),
            ledger=run.ledger,
            cost_usd_total=run.cost_usd_total,
            teachers=cache.totals_by_teacher(),
        )
        done = {s.name: asdict(s) for s in run.steps}
        for m in manifest["steps"]:
            m["stats"] = done.get(m["name"])
        write_json(run_dir / "manifest.json", manifest)
        await pool.aclose()
        cache.close()
        executor.close()
        if remote:
            reporter.note(f"sending the run directory to {remote.url}")
            remote.finish(cache.path)
    if recipe.publish and recipe.publish.dir:  # last: the folder reads everything above
        from kdata.publish import write_folder

        write_folder(run_dir, recipe.publish.dir, cfg=recipe.publish)
    return run


def _executor(recipe: Recipe, run_dir: Path, remote: Remote | None) -> Any:
    """The recipe's executor: this process, or a Ray cluster (`kdata.executors.ray_executor`)."""
    if recipe.execution.executor == "ray":
        from kdata.executors.ray_executor import RayExecutor

        return RayExecutor(recipe, run_dir, remote)
    return LocalExecutor(recipe.execution.block_rows)


def _stored_responses(run_dir: Path) -> int:
    """How many responses the run's cache held when its last build wrote ``manifest.json``."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
        return sum(int(t["responses"]) for t in manifest.get("teachers", {}).values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def _check_cache(cache: RequestCache, stored_before: int) -> None:
    """Stop before any request when the cache lost responses that earlier builds stored.

    The manifest this build writes records what the cache holds now, so the next build goes on
    from there: what is missing is requested (and paid for) again, once the user has been told.
    """
    held = len(cache)
    if cache.damage is None and held >= stored_before:
        return
    what = cache.damage or f"{cache.path} holds {held} responses"
    if held < stored_before:
        what += f", of the {stored_before} that earlier builds of this run directory stored"
    raise CacheError(
        f"{what}. To keep the responses missing, restore {cache.path.name} from a backup before "
        "the next build; running the same command again requests them again, and pays for them"
    )


def _check_accounting(name: str, c: Counts) -> None:
    if c.rows + c.dropped + c.failed != c.expected:
        raise KdataError(
            f"step {name}: row accounting broken: {c.expected} expected, "
            f"{c.rows} out + {c.dropped} dropped + {c.failed} failed; "
            "this is a kdata bug, please report it"
        )


def _fill_stats(stats: StepStats, c: Counts, pool, before: dict) -> None:
    stats.expected = c.expected
    stats.rows_out, stats.dropped, stats.failed = c.rows, c.dropped, c.failed
    stats.drop_reasons = dict(c.drop_reasons)
    stats.failure_classes = dict(c.failure_classes)
    for n, led in pool.ledgers.items():
        r, h, c = before[n]
        stats.requests += led.requests - r
        stats.cache_hits += led.cache_hits - h
        stats.cost_usd += led.cost_usd - c


def _read_stats(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest(recipe: Recipe, names: list[str], fps: list[str]) -> dict[str, Any]:
    versions = {"python": sys.version.split()[0]}
    for pkg in ("kdata", "litellm", "datasets", "pyarrow", "pydantic", "llama_cpp_python"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {
        "kdata_version": _version(),
        "recipe_path": recipe.source_path,
        "base_dir": str(recipe.base_dir.resolve()),
        "recipe": recipe.model_dump(mode="json", exclude_none=True),
        "status": "running",
        "started_at": time.time(),
        "versions": versions,
        "steps": [
            {"name": n, "type": s.type, "fingerprint": f}
            for n, s, f in zip(names, recipe.steps, fps, strict=True)
        ],
    }
