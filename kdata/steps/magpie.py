"""`magpie`: instructions an aligned model writes itself, then answers (Xu et al., 2024).

An instruction-tuned model that is sent only its chat template's opening of a user turn (the
"pre-query" text) writes a user query, drawn from what it was aligned on; asked that query
through the chat API, it answers. No seed data and no prompt engineering.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from pydantic import Field

from kdata.errors import KdataError, TeacherError
from kdata.steps.base import (
    PROVENANCE,
    StepBase,
    StepContext,
    StepOutput,
    dropped,
    failure,
    gather_requests,
    provenance,
    rid,
    row_id,
)

_SPACE = re.compile(r"\s+")


class MagpieStep(StepBase):
    """``rows`` instructions written by ``teacher`` from its pre-query prompt, each answered
    by ``response_teacher`` (default: the same teacher).

    The pre-query text is the teacher's chat template rendered up to where a user turn's text
    begins (with ``system`` as the system prompt when set), read from the GGUF of a ``local/``
    teacher; for a server (its ``/v1/completions`` endpoint) give it as ``pre_query``, with
    ``end_of_turn``, the text that ends a user turn in that template. Each instruction request
    is a sample of its own (``temperature`` overrides the teacher's: a greedy teacher writes one
    instruction over and over). An instruction already written (compared without regard to case
    and spacing) is dropped as ``duplicate`` (``duplicate_of``: the row that wrote it first)
    before it is answered, an empty one as ``empty``.
    Rows out: ``instruction``, ``response``; the rows in pass through first.

    A source step: its instructions are written and answered ``block_rows`` at a time, each
    block written as it is done; what it keeps across blocks is the set of instructions seen.
    Each block's rows, drops and failures are in the order of the instructions' numbers.
    """

    kind: ClassVar[str] = "source"
    type: Literal["magpie"] = "magpie"
    teacher: str
    response_teacher: str | None = None
    rows: int = Field(ge=1)
    system: str | None = None
    pre_query: str | None = None
    end_of_turn: str | None = None
    temperature: float = Field(default=1.0, ge=0)
    max_instruction_tokens: int = Field(default=128, ge=1)

    def teacher_names(self) -> set[str]:
        return {self.teacher, self.response_teacher or self.teacher}

    def check_teachers(self, models: dict[str, str]) -> None:
        """Raise ValueError when the step cannot know its teacher's pre-query text."""
        model = models.get(self.teacher, "")
        if self.pre_query is None and not model.startswith("local/"):
            raise ValueError(
                f"magpie: teacher '{self.teacher}' ({model}) is not a local GGUF, whose chat "
                "template kdata reads; give pre_query: its template's text before a user turn"
            )

    def plan(self, n_rows: int, base_dir: Any) -> tuple[int, int]:
        return n_rows + self.rows, 2 * self.rows

    def _prompt(self, model: str) -> tuple[str, str | None]:
        if self.pre_query is not None:
            return self.pre_query, self.end_of_turn
        from kdata.teachers.local import pre_query

        return pre_query(model, self.system)

    async def blocks(self, ctx: StepContext, block_rows: int) -> AsyncIterator[StepOutput]:
        """The instructions ``block_rows`` at a time (each written, deduplicated against every
        one before it, then answered), each block's records in the order of the instructions."""
        assert ctx.pool is not None
        prefix, end = self._prompt(ctx.pool.model(self.teacher))
        if not prefix:
            raise KdataError(f"magpie: the pre-query text of teacher '{self.teacher}' is empty")
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "max_tokens": self.max_instruction_tokens,
        }
        if end:
            params["stop"] = [end]
        seen: dict[str, str] = {}  # normalised instruction -> the id of the row that wrote it
        for first in range(0, self.rows, block_rows):
            numbers = range(first, min(first + block_rows, self.rows))
            ctx.set_total(2 * len(numbers))
            written = await gather_requests(self._write(i, prefix, params, ctx) for i in numbers)
            records: list[dict | None] = []  # per instruction: its record, None: to answer
            todo = []
            for i, c in zip(numbers, written, strict=True):
                if isinstance(c, dict):  # a failure record
                    records.append(c)
                    continue
                text = (c.text or "").strip()
                row_key = row_id("magpie", ctx.name, str(i))
                row = {"instruction": text, PROVENANCE: provenance(row_key, [], ctx.name, c)}
                key = _SPACE.sub(" ", text.lower())
                if not text:
                    records.append(dropped(row, "empty", finish_reason=c.finish_reason))
                elif key in seen:
                    records.append(dropped(row, "duplicate", duplicate_of=seen[key]))
                else:
                    seen[key] = row_key
                    records.append(None)
                    todo.append((row, c))
            ctx.advance(2 * len(numbers) - len(todo))
            answers = iter(await gather_requests(self._answer(row, c, ctx) for row, c in todo))
            out = StepOutput(rows=[], expected=len(numbers))
            for r in records:
                out.add(r or next(answers))
            yield out

    async def _write(self, i: int, prefix: str, params: dict, ctx: StepContext):
        """Instruction ``i``, written from the pre-query text: a completion or a failure record
        (returned, not raised: `gather_requests` re-raises exceptions)."""
        try:
            return await ctx.pool.complete(
                self.teacher, prefix, route_key=f"magpie:{i}", sample=i, params=params
            )
        except TeacherError as e:
            return failure(None, e.error_class, str(e), attempts=e.attempts)
        finally:
            ctx.advance(1)

    async def _answer(self, row: dict, asked: Any, ctx: StepContext) -> dict:
        """The answer to an instruction: its row, or a failure record."""
        answerer = self.response_teacher or self.teacher
        chat = [{"role": "system", "content": self.system}] if self.system else []
        try:
            c = await ctx.pool.complete(
                answerer,
                [*chat, {"role": "user", "content": row["instruction"]}],
                route_key=rid(row),
            )
        except TeacherError as e:
            return failure(row, e.error_class, str(e), attempts=e.attempts)
        finally:
            ctx.advance(1)
        text = (c.text or "").strip()
        if not text:
            error = f"empty response (finish_reason={c.finish_reason})"
            return failure(row, "parse", error, attempts=c.attempts, raw=c.text)
        p = provenance(rid(row), [], ctx.name, c)
        for k in ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cost_usd"):
            p[k] += getattr(asked, k)  # both requests of the row
        return {**row, "response": text, PROVENANCE: p}
