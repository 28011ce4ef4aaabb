"""What every step shares: the strict model base, rows and provenance, and the step output.

A row is a plain ``dict``. Each carries ``_kdata``, its provenance: id, parent ids, step, teacher,
model, request hash, tokens, cost and finish reason. A step turns rows into a `StepOutput` in which
every unit of work it was given ends up kept, dropped (with a reason) or failed (with an error).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from kdata.errors import BudgetExceeded, TeacherError

if TYPE_CHECKING:
    from kdata.teachers.pool import Completion, TeacherPool

PROVENANCE = "_kdata"
T = TypeVar("T")
_JINJA = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)


class StrictModel(BaseModel):
    """Base of every recipe model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def _template_source(value: Any, info: ValidationInfo) -> Any:
    """``{path: file}`` becomes the file's text, read relative to the recipe's folder."""
    if isinstance(value, dict) and set(value) == {"path"}:
        path = Path((info.context or {}).get("base_dir", ".")) / str(value["path"])
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read template file {path}: {e.strerror}") from None
    return value


def _template_compiles(value: str) -> str:
    try:
        _JINJA.from_string(value)
    except TemplateError as e:
        raise ValueError(f"template does not compile: {e}") from None
    return value


def _schema_source(value: Any, info: ValidationInfo) -> Any:
    """``{path: file.json}`` becomes the JSON schema in the file, read relative to the recipe;
    a pydantic model class (from Python) becomes its JSON schema."""
    if isinstance(value, type) and issubclass(value, BaseModel):
        return value.model_json_schema()
    if isinstance(value, dict) and set(value) == {"path"}:
        path = Path((info.context or {}).get("base_dir", ".")) / str(value["path"])
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"cannot read schema file {path}: {e.strerror}") from None
        except ValueError as e:
            raise ValueError(f"schema file {path} is not JSON: {e}") from None
    return value


def _schema_valid(value: dict) -> dict:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.SchemaError as e:
        raise ValueError(f"not a valid JSON schema: {e.message}") from None
    if value.get("type") != "object" or not isinstance(value.get("properties"), dict):
        raise ValueError("the schema must describe an object (type: object, with properties)")
    return value


# A JSON schema of an object: inline, ``{path: schemas/mine.json}`` relative to the recipe, or
# (in Python) a pydantic model class.
JsonSchema = Annotated[
    dict[str, Any], BeforeValidator(_schema_source), AfterValidator(_schema_valid)
]


def _regex_compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    return value


# A regular expression field, checked when the recipe loads.
Regex = Annotated[str, AfterValidator(_regex_compiles)]

# A Jinja template field: inline text, or ``{path: prompts/mine.jinja}`` relative to the recipe.
# Method steps default such fields to their packaged template (`kdata.prompts.load`).
Template = Annotated[str, BeforeValidator(_template_source), AfterValidator(_template_compiles)]


class TeacherMix(StrictModel):
    """Several teachers for one step: rows are routed by weight; fallbacks are tried in order."""

    mix: dict[str, float] = Field(min_length=1)
    fallbacks: list[str] = []

    @field_validator("mix")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        if any(w <= 0 for w in v.values()):
            raise ValueError("mix weights must be positive")
        return v


TeacherRef = str | TeacherMix


def teacher_names(ref: TeacherRef) -> set[str]:
    """Every teacher a reference may call."""
    return {ref} if isinstance(ref, str) else set(ref.mix) | set(ref.fallbacks)


def row_id(*parts: str) -> str:
    """A stable 16-hex-digit id from the parts that make a row what it is."""
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def provenance(
    id: str,
    parent_ids: list[str],
    step: str,
    completion: Completion | None = None,
) -> dict[str, Any]:
    """The ``_kdata`` struct of a row (every key present, so tables keep one schema)."""
    c = completion
    return {
        "id": id,
        "parent_ids": parent_ids,
        "step": step,
        "teacher": c.teacher if c else None,
        "model": c.model if c else None,
        "request_hash": c.request_hash if c else None,
        "prompt_tokens": c.prompt_tokens if c else 0,
        "completion_tokens": c.completion_tokens if c else 0,
        "reasoning_tokens": c.reasoning_tokens if c else 0,
        "cost_usd": c.cost_usd if c else 0.0,
        "finish_reason": c.finish_reason if c else None,
    }


def reasoning_column(step: Any, c: Completion) -> dict[str, str]:
    """``{<output>_reasoning: trace}`` when the teacher returned a reasoning trace, else ``{}``."""
    output = getattr(step, "output", None)
    if c.reasoning is None or not isinstance(output, str):
        return {}
    return {f"{output}_reasoning": c.reasoning}


def chat_messages(request: list[dict[str, str]], c: Completion) -> list[dict[str, str]]:
    """The ``messages`` a teacher step can emit: the turns it sent, then the teacher's answer,
    whose reasoning trace (when there is one) goes under ``reasoning_content``, the key that
    chat templates of reasoning models read."""
    return [*request, assistant_turn(c.text or "", c)]


def assistant_turn(content: str, c: Completion) -> dict[str, str]:
    """An assistant message saying ``content``, with ``c``'s reasoning trace, if any, under
    ``reasoning_content``."""
    turn = {"role": "assistant", "content": content}
    if c.reasoning is not None:
        turn["reasoning_content"] = c.reasoning
    return turn


def rid(row: dict) -> str:
    """The id of a row."""
    return row[PROVENANCE]["id"]


class Outcome(Exception):
    """Ends a unit of work early with its record: a `failure` or a `dropped` record."""

    def __init__(self, record: dict) -> None:
        super().__init__(record.get("error") or record.get("reason"))
        self.record = record


@functools.lru_cache(maxsize=512)
def _compiled(template: str):
    return _JINJA.from_string(template)


def render(template: str, row: dict, **extra: Any) -> str:
    """Render a Jinja template with the row's columns (provenance excluded) and ``extra``.

    ``extra`` (a method's own variables, such as the answer under critique) wins over a column
    of the same name. A template that fails on this row fails the row: `Outcome` with error
    class ``template``.
    """
    ctx = {k: v for k, v in row.items() if k != PROVENANCE}
    try:
        return _compiled(template).render({**ctx, **extra})
    except TemplateError as e:
        raise Outcome(failure(row, "template", f"prompt template: {e}")) from None


def chat(system: str | None, prompt: str, row: dict, **extra: Any) -> list[dict[str, str]]:
    """Chat messages for a row: the rendered system prompt if any, then the rendered prompt."""
    msgs = [{"role": "system", "content": render(system, row, **extra)}] if system else []
    msgs.append({"role": "user", "content": render(prompt, row, **extra)})
    return msgs


@dataclass
class StepContext:
    """What a running step may use: its name, the recipe's folder, the teachers, progress.

    ``run_dir`` is where a step may keep what it can reuse on a rerun (embeddings, say).
    ``written`` gets the files of each block the executor has written (a run directory at a
    URL sends them there, `kdata.storage`); ``url`` is that URL.
    """

    name: str
    base_dir: Path
    pool: TeacherPool | None
    run_dir: Path | None = None
    advance: Callable[[int], None] = lambda n: None
    set_total: Callable[[int], None] = lambda n: None
    written: Callable[[list[Path]], None] = lambda paths: None
    url: str | None = None


@dataclass
class StepOutput:
    """The outcome of a step. ``expected`` units of work = rows + dropped + failed.

    ``rows``: dicts; from a global step's ``mark``, also a slice of its block's table.
    """

    rows: list[dict] | Any
    expected: int
    dropped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> None:
        """File a unit's record by its shape: a row (it has provenance), a `failure` (it has an
        error class) or a `dropped` record."""
        if PROVENANCE in record:
            self.rows.append(record)
        elif "error_class" in record:
            self.failed.append(record)
        else:
            self.dropped.append(record)


def dropped(row: dict, reason: str, **detail: Any) -> dict:
    """A record of the dropped table: which row, why, and the scores behind the decision.

    ``detail`` holds what lets a threshold be re-cut later without recomputing (a score, the
    row it duplicates and their similarity, the benchmark item it matches...).
    """
    return {
        "row_id": rid(row),
        "reason": reason,
        "detail": json.dumps(detail, default=str, ensure_ascii=False),
        "row": json.dumps(row, default=str, ensure_ascii=False),
    }


def failure(row: dict | None, error_class: str, error: str, *, attempts: int = 0, raw=None) -> dict:
    """A record of the failed table: which row, why, and whatever raw output came back."""
    return {
        "row_id": rid(row) if row else None,
        "error_class": error_class,
        "error": error,
        "attempts": attempts,
        "raw": raw,
        "row": json.dumps(row, default=str, ensure_ascii=False) if row is not None else None,
    }


async def ask(
    ctx: StepContext,
    ref: TeacherRef,
    messages: list[dict[str, str]],
    row: dict,
    *,
    sample: int = 0,
    params: dict[str, Any] | None = None,
) -> Completion:
    """One teacher request made for ``row``; a call that fails raises `Outcome` with its record.

    Requests of one row that differ in nothing but their purpose need distinct ``sample``
    indices: the cache keys requests by what is sent.
    """
    assert ctx.pool is not None
    try:
        return await ctx.pool.complete(
            ref, messages, route_key=rid(row), sample=sample, params=params
        )
    except TeacherError as e:
        raise Outcome(failure(row, e.error_class, str(e), attempts=e.attempts)) from None


async def ask_all(
    ctx: StepContext, row: dict, requests: list[tuple[TeacherRef, list[dict[str, str]], int]]
) -> list[Completion]:
    """Several requests for one row, ``(teacher, messages, sample)`` each, sent together.

    Every request is awaited (so each answer is stored) before a failure is raised: a
    `BudgetExceeded` first, else the first failed call's `Outcome`.
    """
    results = await asyncio.gather(
        *(ask(ctx, ref, msgs, row, sample=s) for ref, msgs, s in requests),
        return_exceptions=True,
    )
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Outcome):
            raise r
    for r in results:
        if isinstance(r, Outcome):
            raise r
    return results


async def gather_requests(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Await every request, in the order given, and return their results.

    When the budget refused a request, the others still finish (what they received is stored)
    and `BudgetExceeded` is raised after; any other exception is re-raised.
    """
    results = await asyncio.gather(*aws, return_exceptions=True)
    budget = None
    for r in results:
        if isinstance(r, BudgetExceeded):
            budget = r
        elif isinstance(r, BaseException):
            raise r
    if budget is not None:
        raise budget
    return results


async def settle(out: StepOutput, units: list[Awaitable[dict]], ctx: StepContext) -> StepOutput:
    """Run a step's units of work and sort what each ends as: a row, dropped or failed.

    A unit returns a row (it has provenance), a `failure` or a `dropped` record, or raises
    `Outcome`. Progress advances per unit. Every unit finishes before a `BudgetExceeded` is
    re-raised, so that no answer in flight is lost.
    """

    async def one(unit: Awaitable[dict]) -> dict:
        try:
            return await unit
        except Outcome as o:
            return o.record
        finally:
            ctx.advance(1)

    ctx.set_total(len(units))
    for r in await gather_requests(one(u) for u in units):
        out.add(r)
    return out


class StepBase(StrictModel):
    """Fields and hooks every step has.

    ``kind`` tells the executor how to run the step over blocks (`kdata.executors.local`):
    ``map`` (the default: ``run`` gets one block's rows at a time, the step is row-local),
    ``global`` (`GlobalStep`: phases over blocks) or ``source`` (``blocks`` yields what it reads
    or makes). No step ever gets every row at once.

    ``curates`` marks the steps that remove rows without asking a teacher (filters, dedup,
    decontamination): the rows entering the first of them are the "generated" rows that the
    diversity report compares the final rows with.
    """

    kind: ClassVar[str] = "map"
    curates: ClassVar[bool] = False
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")  # a folder name

    def teacher_names(self) -> set[str]:
        """Teachers this step may call."""
        return set()

    def inputs_digest(self, base_dir: Path) -> str:
        """A hash of the files the step reads, part of its fingerprint."""
        return ""

    def gpu(self) -> bool:
        """Whether the step's work gains from a GPU (embedding with a transformer): the Ray
        executor then runs it on GPU actors when the cluster has GPUs."""
        return False

    def check_teachers(self, models: dict[str, str]) -> None:
        """Check the step against the models its teachers are bound to (name -> model).

        Raises:
            ValueError: saying what the step cannot do with them.
        """

    def check_inputs(self, base_dir: Path) -> None:
        """Check the step's inputs before a build writes anything (a source reads its files).

        Raises:
            KdataError: saying what is wrong with them; the recipe adds the step and its line.
        """

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        """(rows out at most, teacher requests) for ``n_rows`` rows in, without running."""
        return n_rows, 0

    def plan_prompt_bytes(self, row_bytes: int) -> int:
        """At most how many bytes of row text one teacher request of this step carries (besides
        its own templates), when no row in has more than ``row_bytes`` (`kdata.planning`)."""
        return row_bytes

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def run_table(self, block: Any) -> StepOutput | None:
        """A map step's output for a whole block from its Arrow table (``block.table``), when
        the step can make it without the rows' dicts; None (the default): ``run`` on the rows.
        Called in the executor's thread pool."""
        return None


class GlobalStep(StepBase):
    """A step that must see every row (dedup): phases over blocks, on compact summaries.

    ``decide`` computes what the step needs of all rows through ``blocks.map(fn, columns)``,
    which applies ``fn(block)`` to every block in order (in the executor's thread pool; the
    block's table holds only ``columns``) and returns the results: keep them compact (hashes,
    signatures), never the rows; ``blocks.map(fn, columns, gpu=True)`` for a pass that gains
    from a GPU (on Ray, GPU actors when the cluster has GPUs).
    ``blocks.shuffle(split, reduce, columns)`` cuts each block's summaries into
    ``blocks.partitions`` pieces and reduces each partition's pieces on their own
    (``exact_dedup``, by hash); ``blocks.each(fn, items)`` runs independent parts of one piece of
    work (``minhash_dedup``: its groups of bands). Locally there is one partition; on Ray these
    are tasks. ``mark`` then makes one block's output from the block and the decision (on Ray,
    in a task: a decision with ``of(block_index)`` is sent cut to that block); a curation step's
    kept rows may be a slice of ``block.table``. A block outside a build (``run``) holds its
    rows as dicts instead (``block.given``). A step that makes rows of its own from the decision
    (``self_instruct``) yields them after the marked blocks, from ``blocks``, at most
    ``block_rows`` rows a block.
    """

    kind: ClassVar[str] = "global"
    # its passes share files under the run directory's tmp/ (Ray: a path every node must see)
    shares_files: ClassVar[bool] = False

    async def decide(self, blocks: Any, ctx: StepContext) -> Any:  # pragma: no cover
        raise NotImplementedError

    def mark(self, block: Any, decision: Any) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def blocks(
        self, ctx: StepContext, block_rows: int, decision: Any
    ) -> Iterable[StepOutput] | AsyncIterator[StepOutput]:
        """The blocks the step makes from its decision, after the marked ones: none."""
        return ()

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        """Every row as one block, then the blocks it makes: how the step runs outside a build."""
        from kdata.executors.local import OneBlock

        ctx.set_total(len(rows))
        one = OneBlock(rows)
        decision = await self.decide(one, ctx)
        out = self.mark(one.block, decision)
        ctx.advance(len(rows))
        made = self.blocks(ctx, max(len(rows), 1), decision)
        for more in [o async for o in made] if isinstance(made, AsyncIterator) else made:
            out.rows = [*out.rows, *more.rows]
            out.dropped += more.dropped
            out.failed += more.failed
            out.expected += more.expected
        return out


class ParseError(ValueError):
    """A teacher response that does not have the shape the step needs."""


class TeacherStep(StepBase):
    """A step that asks a teacher about each row: ``messages(row)`` then ``parse(row, text)``.

    Each of the ``n`` samples of a row is one unit of work: it becomes a row, a dropped record
    (when `reject` gives a reason) or a failure with its error class and the raw text, never a
    ``None``. With ``messages_column`` the row also gets the exchange as chat messages (what
    was sent, then the answer: `chat_messages`), the format trl's SFTTrainer trains on.
    """

    kind: ClassVar[str] = "map"
    teacher: TeacherRef
    system: Template | None = None
    prompt: Template
    n: int = Field(default=1, ge=1)
    messages_column: str | None = None  # also write the exchange as chat messages there

    def teacher_names(self) -> set[str]:
        return teacher_names(self.teacher)

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        return n_rows * self.n, n_rows * self.n

    def render(self, template: str, row: dict) -> str:
        """Render a Jinja template with the row's columns (provenance excluded)."""
        return render(template, row)

    def messages(self, row: dict) -> list[dict[str, str]]:
        """The chat messages for a row: optional system prompt, then the rendered prompt."""
        return chat(self.system, self.prompt, row)

    def request_params(self) -> dict[str, Any] | None:
        """Generation parameters this step adds to the teacher's own (logprobs, say)."""
        return None

    def parse(self, row: dict, completion: Completion) -> dict[str, Any]:  # pragma: no cover
        """The new columns made from a response; raise `ParseError` when it is unusable."""
        raise NotImplementedError

    def reject(self, row: dict) -> tuple[str, dict[str, Any]] | None:
        """Why a parsed row is dropped, with the detail behind it; ``None`` keeps it."""
        return None

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        assert ctx.pool is not None
        out = StepOutput(rows=[], expected=len(rows) * self.n)
        return await settle(
            out, [self._one(row, i, ctx) for row in rows for i in range(self.n)], ctx
        )

    async def _one(self, row: dict, sample: int, ctx: StepContext) -> dict:
        request = self.messages(row)
        c = await ask(ctx, self.teacher, request, row, sample=sample, params=self.request_params())
        try:
            new = self.parse(row, c)
        except ParseError as e:
            return failure(row, "parse", str(e), attempts=c.attempts, raw=c.text)
        child = {**row, **new, **reasoning_column(self, c)}
        if self.messages_column is not None:
            child[self.messages_column] = chat_messages(request, c)
        child[PROVENANCE] = provenance(
            row_id(rid(row), ctx.name, str(sample)), [rid(row)], ctx.name, c
        )
        # Off the event loop: a check may take seconds (code verification runs tests).
        rejected = await asyncio.to_thread(self.reject, child)
        return child if rejected is None else dropped(child, rejected[0], **rejected[1])
