"""`plan(recipe) -> Plan`: what a build would send and what it could cost, before it runs.

Nothing is sent and nothing is written: the run's cache (``<run_dir>/cache.sqlite``) is only read,
when it exists. Each step's row and call counts come from its ``plan`` (upper bounds: no row
fails, every fan-out at its most: ``n`` samples, ``turns``, ``rounds``, ``max_rounds`` x
``prompts_per_round``). Its tokens and dollars:

- **Rendered**: a per-row teacher step (``kind: map``) over rows known before the run (read from
  the sources, passed through the steps between, or made by a step before it from cached
  responses only) is run on them, block by block, with a pool that answers from the cache and
  sends nothing. Each request it makes is counted as the build would make it (the same routing,
  parameters and cache key): a cached one costs nothing (the build will not send it again); the
  prompt of any other is counted by litellm's ``token_counter``, exactly where the teacher's
  tokenizer is known (OpenAI and Azure models: tiktoken), and bounded by its UTF-8 bytes plus
  `MESSAGE_OVERHEAD` per message otherwise (a byte-level BPE token is at least one byte).
- **Bounded**: every call of the step's plan that was not rendered (requests that follow an answer
  not cached yet, such as later turns of a conversation or rounds of ``evol_instruct``; steps
  over rows that teachers make; steps that are not per-row, ``self_instruct``, ``magpie`` and
  ``curate`` from topics or files) counts at the step's
  most expensive teacher, its prompt bounded by the longest prompt rendered in the step, else by
  the bytes of the step's settings and templates plus the longest row that can reach it (every
  generated column counted at its teacher's ``max_tokens``), plus ``max_tokens`` for every other
  call of the same unit of work (the earlier turns of a conversation, say). These figures are
  marked as bounds; their expected prompt is the mean of the step's rendered prompts, else the
  bound scaled by the tokens per byte of the prompts the plan counted (`TOKENS_PER_BYTE_GUESS`
  when it counted none).

Completion tokens: worst case ``max_tokens`` per call (for a teacher without it,
`DEFAULT_MAX_TOKENS_ESTIMATE`, as ``budget_usd`` assumes, which no provider promises: the plan
says so); expected, the mean completion of the teacher's responses already in the cache, else the
worst case. Dollars at the teacher's prices (``cost_per_1k_tokens``, else litellm's price table),
online and through a batch API (half). A teacher with no known price counts as free, and is named.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdata.errors import BudgetExceeded, KdataError, TeacherError
from kdata.recipe import Recipe, Teacher
from kdata.steps.base import StepContext
from kdata.storage import Remote, is_url
from kdata.teachers.pool import DEFAULT_MAX_TOKENS_ESTIMATE, TeacherPool, _litellm, prices

BATCH_DISCOUNT = 0.5  # OpenAI Batch and Anthropic Message Batches: half the online price
MESSAGE_OVERHEAD = 8  # tokens a chat template may add per message, as budget_usd reserves
TOKENS_PER_BYTE_GUESS = 0.25  # of a prompt's byte bound, when the plan counted no prompt
_EXACT_PROVIDERS = {"openai", "azure"}  # whose billing tokenizer litellm counts with (tiktoken)


@dataclass
class StepPlan:
    """One step's share of a build: rows, teacher calls, tokens and dollars (see `kdata.planning`).

    Token and dollar figures cover the calls to send, not the ``cached`` ones. ``bound``: some
    calls were not rendered from real rows, so their figures are upper bounds, not counts.
    """

    step: str
    type: str
    rows: int
    calls: int
    teachers: list[str]
    cached: int = 0
    prompt_tokens_expected: int = 0
    prompt_tokens_worst: int = 0
    completion_tokens_expected: int = 0
    completion_tokens_worst: int = 0
    usd_expected: float = 0.0
    usd_worst: float = 0.0
    bound: bool = False

    @property
    def batch_usd_expected(self) -> float:
        """``usd_expected`` through a batch API."""
        return self.usd_expected * BATCH_DISCOUNT

    @property
    def batch_usd_worst(self) -> float:
        """``usd_worst`` through a batch API."""
        return self.usd_worst * BATCH_DISCOUNT


@dataclass
class Plan:
    """What a build of a recipe would do and cost: its steps, teachers with no known price, and
    notes on what the figures assume."""

    steps: list[StepPlan]
    unpriced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        """Teacher calls at most, cached ones included."""
        return sum(s.calls for s in self.steps)

    @property
    def usd_expected(self) -> float:
        """Expected dollars, online."""
        return sum(s.usd_expected for s in self.steps)

    @property
    def usd_worst(self) -> float:
        """Dollars at most, online (what a build at these prices can spend, see the notes)."""
        return sum(s.usd_worst for s in self.steps)


class _Teacher:
    """What the plan needs of one teacher: prices, completion bounds, a prompt counter."""

    def __init__(self, name: str, cfg: Teacher, mean_completion: float | None) -> None:
        self.name, self.model = name, cfg.model
        price = prices(cfg)
        self.priced = price is not None
        self.p_in, self.p_out = price or (0.0, 0.0)
        self.max_tokens = cfg.params.max_tokens or DEFAULT_MAX_TOKENS_ESTIMATE
        self.capped = cfg.params.max_tokens is not None
        self.mean_completion = mean_completion if mean_completion is not None else self.max_tokens
        self.exact = _exact_tokenizer(cfg.model)

    def prompt(self, messages: list[dict], params: dict) -> tuple[int, int]:
        """(expected, worst) prompt tokens of a request."""
        text_bytes = sum(len(str(m.get("content", "")).encode()) for m in messages)
        schema = params.get("response_format")
        extra = len(json.dumps(schema).encode()) if schema else 0  # a schema is prompt too
        bound = text_bytes + extra + MESSAGE_OVERHEAD * (len(messages) + 1)
        try:
            counted = int(_litellm().token_counter(model=self.model, messages=messages))
        except Exception:  # litellm cannot count this model's messages: the bound stands
            return bound, bound
        return counted, (counted + extra if self.exact else max(bound, counted))

    def usd(self, prompt: int, completion: int) -> float:
        return prompt * self.p_in + completion * self.p_out


def _exact_tokenizer(model: str) -> bool:
    if model.startswith("local/"):
        return False
    try:
        info = _litellm().get_model_info(model)
    except Exception:  # not in litellm's table: its tokenizer is not known
        return False
    return info.get("litellm_provider") in _EXACT_PROVIDERS


class _StoredResponses:
    """The run's cache, read only (the plan writes nothing); empty when there is none."""

    def __init__(self, path: Path) -> None:
        self._db = None
        if path.is_file():
            try:
                self._db = _connect(f"file:{path}?mode=ro")
                self._db.execute("SELECT 1 FROM responses LIMIT 1")
            except sqlite3.Error:  # unreadable in place (a WAL file not there): as if immutable
                self._db = _connect(f"file:{path}?immutable=1")

    def get(self, key: str) -> dict[str, Any] | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT response FROM responses WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def mean_completion(self, teacher: str) -> float | None:
        if self._db is None:
            return None
        (mean,) = self._db.execute(
            "SELECT AVG(COALESCE(json_extract(response, '$.response.usage.completion_tokens'),"
            " json_extract(response, '$.usage.completion_tokens'))) FROM responses"
            " WHERE teacher=?",
            (teacher,),
        ).fetchone()
        return mean

    def total_cost(self) -> float:
        return 0.0  # the plan pool reserves nothing against a budget

    def spent(self) -> float:
        """USD paid for every stored response, as the budget counts it."""
        if self._db is None:
            return 0.0
        return self._db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM responses").fetchone()[0]

    def check(self) -> None:
        pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def _connect(uri: str) -> sqlite3.Connection:
    return sqlite3.connect(uri, uri=True, check_same_thread=False)  # a notebook's plan: a thread


class _Tally:
    """The requests one step made while planned."""

    def __init__(self) -> None:
        self.calls = self.cached = 0
        self.prompt_expected = self.prompt_worst = self.completion = self.completion_worst = 0
        self.usd_expected = self.usd_worst = 0.0
        self.longest_prompt = 0
        self.rows = 0  # rows run through the step
        self.pending = 0  # of their units of work, those stopped by an answer not cached


class _PlanPool(TeacherPool):
    """A pool that serves what the cache holds and, for anything else, counts the request it
    would send and fails it (``not_cached``) without sending it."""

    def __init__(self, recipe: Recipe, cache: _StoredResponses, teachers: dict[str, _Teacher]):
        super().__init__(recipe.teachers, cache)  # type: ignore[arg-type]
        self.info = teachers
        self.tally = _Tally()

    async def _send(self, st, messages, params, key):  # type: ignore[override]
        t, tally = self.info[st.name], self.tally
        expected, worst = t.prompt(messages, params)
        completion = params.get("max_tokens") or t.max_tokens
        tally.calls += 1
        tally.prompt_expected += expected
        tally.prompt_worst += worst
        tally.longest_prompt = max(tally.longest_prompt, worst)
        tally.completion += round(min(t.mean_completion, completion))
        tally.completion_worst += completion
        tally.usd_expected += t.usd(expected, min(t.mean_completion, completion))
        tally.usd_worst += t.usd(worst, completion)
        raise TeacherError("not_cached", "planned, not sent", retryable=False, attempts=0)

    def route(self, ref, route_key, sample):  # type: ignore[override]
        return super().route(ref, route_key, sample)[:1]  # fallbacks: only for failed calls

    def _completion(self, st, key, data, *, cached, attempts):  # type: ignore[override]
        self.tally.calls += 1
        self.tally.cached += 1
        return super()._completion(st, key, data, cached=cached, attempts=attempts)


def plan(recipe: Recipe, *, run_dir: str | os.PathLike | None = None) -> Plan:
    """What a build of ``recipe`` would do, call and cost, without calling a teacher or writing
    anything (the run's cache is read when there is one).

    Args:
        recipe: a loaded or Python-built recipe.
        run_dir: the run directory whose cache is read (default ``output.dir``), as `build`'s.

    Returns:
        A `Plan`: per step, rows and teacher calls at most, the calls the cache answers, and
        expected and worst-case tokens and dollars, online and batch (`StepPlan`).

    Raises:
        KdataError: a source cannot be read.
    """
    where = run_dir or recipe.run_dir
    local = Remote(where).local if is_url(where) else Path(where)  # a URL's stage, as it is
    cache = _StoredResponses(local / "cache.sqlite")
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(_plan(recipe, cache))
        # Called from a running loop (a notebook): plan on a loop of our own in a thread.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, _plan(recipe, cache)).result()
    finally:
        cache.close()


async def _plan(recipe: Recipe, cache: _StoredResponses) -> Plan:
    teachers = {n: _Teacher(n, cfg, cache.mean_completion(n)) for n, cfg in recipe.teachers.items()}
    names = recipe.step_names()
    counts, n_rows = [], 0
    for step in recipe.steps:
        n_rows, calls = step.plan(n_rows, recipe.base_dir)
        counts.append((n_rows, calls))
    tallies, row_bounds = await _render(recipe, cache, teachers, names)
    counted = sum(t.prompt_expected for t in tallies.values())
    bound = sum(t.prompt_worst for t in tallies.values())
    ratio = counted / bound if counted else TOKENS_PER_BYTE_GUESS
    out = Plan(steps=[])
    rows_in, row_bound = 0, 0  # tokens of the longest row that can reach a step, at most
    for i, (step, name) in enumerate(zip(recipe.steps, names, strict=True)):
        rows, calls = counts[i]
        used = sorted(step.teacher_names())
        s = StepPlan(step=name, type=step.type, rows=rows, calls=calls, teachers=used)
        row_bound = max(row_bound, row_bounds.get(i, 0))
        if used:
            tally = tallies.get(i, _Tally())
            _fill(s, tally, step, [teachers[t] for t in used], rows_in, row_bound, ratio)
            worst = max(teachers[t].max_tokens for t in used)
            row_bound += math.ceil(calls / max(rows, 1)) * worst  # what it adds to a row
        out.steps.append(s)
        rows_in = rows
    used_teachers = {t for s in out.steps for t in s.teachers}
    out.unpriced = sorted(t for t in used_teachers if not teachers[t].priced)
    for t in sorted(used_teachers):
        if not teachers[t].capped and teachers[t].priced and teachers[t].p_out:
            out.notes.append(
                f"teacher {t} sets no max_tokens: its worst case assumes "
                f"{DEFAULT_MAX_TOKENS_ESTIMATE} completion tokens per call, as budget_usd does; "
                "set params.max_tokens to make it a bound"
            )
    if recipe.budget_usd is not None and out.usd_worst > recipe.budget_usd - cache.spent():
        out.notes.append(
            f"budget_usd {recipe.budget_usd} (of which {cache.spent():.4f} spent by earlier "
            f"builds of this run directory) is below the worst case: the build may stop there"
        )
    return out


def _fill(
    s: StepPlan,
    tally: _Tally,
    step: Any,
    used: list[_Teacher],
    rows_in: int,
    row_bound: int,
    ratio: float,
) -> None:
    """The step's figures: what it rendered, plus a bound for every call of its plan not
    rendered (expected: the bound times ``ratio``, counted over bytes of the prompts rendered)."""
    s.cached = tally.cached
    s.prompt_tokens_expected, s.prompt_tokens_worst = tally.prompt_expected, tally.prompt_worst
    s.completion_tokens_expected = tally.completion
    s.completion_tokens_worst = tally.completion_worst
    s.usd_expected, s.usd_worst = tally.usd_expected, tally.usd_worst
    # Calls not rendered: every call of the rows never run, and the calls that a unit of work
    # stopped by an answer not cached yet may still make (retries, later turns).
    per_unit = math.ceil(s.calls / max(s.rows, 1))
    unrendered = math.ceil(s.calls * max(rows_in - tally.rows, 0) / max(rows_in, 1))
    rest = unrendered + tally.pending * (per_unit - 1)
    if not rest:
        return
    s.bound = True
    t = max(used, key=lambda t: (t.p_in + t.p_out, t.max_tokens))  # the priciest
    first = tally.longest_prompt or _settings_bytes(step) + step.plan_prompt_bytes(row_bound)
    prompt = first + (per_unit - 1) * t.max_tokens + MESSAGE_OVERHEAD * (2 * per_unit + 1)
    sent = tally.calls - tally.cached
    mean = tally.prompt_expected // sent if sent else round(prompt * ratio)
    s.prompt_tokens_expected += rest * min(mean, prompt)
    s.prompt_tokens_worst += rest * prompt
    s.completion_tokens_expected += rest * round(t.mean_completion)
    s.completion_tokens_worst += rest * t.max_tokens
    s.usd_expected += rest * t.usd(min(mean, prompt), t.mean_completion)
    s.usd_worst += rest * t.usd(prompt, t.max_tokens)


def _settings_bytes(step: Any) -> int:
    """A bound on what a step's own text adds to a prompt: the bytes of its settings (templates
    included)."""
    return len(json.dumps(step.model_dump(mode="json"), ensure_ascii=False).encode())


async def _render(
    recipe: Recipe, cache: _StoredResponses, teachers: dict[str, _Teacher], names: list[str]
) -> tuple[dict[int, _Tally], dict[int, int]]:
    """Run the per-row teacher steps on the rows known before the build, block by block.

    Returns each rendered step's `_Tally`, and for each source the tokens (bytes) of its
    longest row.
    """
    tallies: dict[int, _Tally] = {}
    row_bounds: dict[int, int] = {}
    pool = _PlanPool(recipe, cache, teachers)
    for block, first in _known_blocks(recipe, names, row_bounds):
        rows = block
        for i in range(first, len(recipe.steps)):
            step = recipe.steps[i]
            if step.kind == "source":
                break  # a source after other steps: its rows join unknown ones
            if not step.teacher_names():
                continue  # passes the rows through: a superset of what it keeps
            if step.kind != "map":
                break
            pool.tally = tallies.setdefault(i, _Tally())
            ctx = StepContext(name=names[i], base_dir=recipe.base_dir, pool=pool)
            try:
                out = await step.run(rows, ctx)
            except (KdataError, BudgetExceeded):
                break
            pending = sum(f.get("error_class") == "not_cached" for f in out.failed)
            pool.tally.rows += len(rows)
            pool.tally.pending += pending
            if pending:
                break  # the rows after this step are not known yet
            rows = out.rows
    return tallies, row_bounds


def _known_blocks(
    recipe: Recipe, names: list[str], row_bounds: dict[int, int]
) -> Iterator[tuple[list[dict], int]]:
    """The blocks of the recipe's leading sources, each with the index of the step after them;
    records the longest row of each source in ``row_bounds``."""
    lead = 0  # the sources that read (one that asks a teacher makes rows not known yet)
    while (
        lead < len(recipe.steps)
        and recipe.steps[lead].kind == "source"
        and not recipe.steps[lead].teacher_names()
    ):
        lead += 1
    for i in range(lead):
        ctx = StepContext(name=names[i], base_dir=recipe.base_dir, pool=None)
        for part in recipe.steps[i].blocks(ctx, recipe.execution.block_rows):
            longest = max((_row_bytes(r) for r in part.rows), default=0)
            row_bounds[i] = max(row_bounds.get(i, 0), longest)
            yield part.rows, lead


def _row_bytes(row: dict) -> int:
    return len(json.dumps({k: v for k, v in row.items() if k != "_kdata"}, default=str).encode())
