"""Teacher steps that elicit knowledge by labeling.

`label`: a teacher answers each row, optionally reasoning first (``cot``) and with its final
answer checked against ground truth (``verify``: STaR-style rejection sampling). `consensus`:
several teachers answer the same prompt and the majority answer is kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from kdata import prompts
from kdata.answers import answers_match, extract_answer, group_answers, split_final_answer
from kdata.steps.base import (
    PROVENANCE,
    ParseError,
    StepBase,
    StepContext,
    StepOutput,
    StrictModel,
    TeacherStep,
    Template,
    ask_all,
    chat,
    dropped,
    failure,
    provenance,
    render,
    rid,
    row_id,
    settle,
)

if TYPE_CHECKING:
    from kdata.teachers.pool import Completion


def reasoned(output: str, text: str | None) -> dict[str, str] | None:
    """The columns of a response asked to reason, then state its final answer.

    ``<output>``: the whole response; ``<output>_rationale``: the reasoning before the final
    answer's marker; ``<output>_answer``: the final answer. ``None`` when the response has no
    explicit final answer (see `kdata.answers.split_final_answer`).
    """
    text = (text or "").strip()
    split = split_final_answer(text)
    if split is None:
        return None
    return {output: text, f"{output}_rationale": split[0], f"{output}_answer": split[1]}


def with_instruction(messages: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """``messages`` with ``instruction`` appended to the last user message."""
    last = messages[-1]
    return [*messages[:-1], {**last, "content": f"{last['content']}\n\n{instruction}"}]


class Verify(StrictModel):
    """A check of each response's final answer: against a reference column, or a regex."""

    reference: str | None = None  # the column holding the reference answer
    extract_reference: bool = False  # the reference is that column's final answer (last number)
    tolerance: float = Field(default=1e-6, ge=0)  # numeric answers: absolute or relative
    pattern: str | None = None  # a regex the whole final answer must match

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"pattern is not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_check(self) -> Verify:
        if (self.reference is None) == (self.pattern is None):
            raise ValueError("verify takes either reference (a column) or pattern (a regex)")
        if self.extract_reference and self.reference is None:
            raise ValueError("extract_reference needs reference: the column to extract from")
        return self

    def reference_of(self, row: dict) -> str:
        """The reference answer of a row.

        Raises:
            ValueError: the row has no usable reference.
        """
        value = row.get(self.reference)
        if value is None or not str(value).strip():
            raise ValueError(f"the row has no reference in column '{self.reference}'")
        ref = str(value).strip()
        if self.extract_reference:
            ref = extract_answer(ref)
            if ref is None:
                raise ValueError(f"no final answer found in column '{self.reference}': {value!r}")
        return ref

    def passes(self, answer: str, reference: str | None) -> bool:
        """Whether an extracted answer passes the check (``reference``: from `reference_of`)."""
        if self.pattern is not None:
            return re.fullmatch(self.pattern, answer) is not None
        return answers_match(answer, reference, tolerance=self.tolerance)


class LabelStep(TeacherStep):
    """A teacher answers each row from a Jinja prompt; the answer goes to ``output``.

    With ``n`` > 1 each row gives ``n`` rows, one per sample. ``cot`` appends ``cot_prompt``
    (reason step by step, then ``Final answer: ...``) and splits the response into rationale
    and answer columns; a response without a final-answer marker is a ``parse`` failure.
    ``verify`` checks each sample's final answer and drops a wrong one as ``wrong_answer``.
    """

    type: Literal["label"] = "label"
    output: str = "response"
    cot: bool = False
    cot_prompt: Template = prompts.load("label.cot")
    verify: Verify | None = None

    def messages(self, row: dict) -> list[dict[str, str]]:
        msgs = super().messages(row)
        return with_instruction(msgs, render(self.cot_prompt, row)) if self.cot else msgs

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        """Rows without a usable reference fail before any call is paid for."""
        if self.verify is None or self.verify.reference is None:
            return await super().run(rows, ctx)
        good, bad = [], []
        for row in rows:
            try:
                self.verify.reference_of(row)
                good.append(row)
            except ValueError as e:
                bad.append(failure(row, "reference", str(e)))
        out = await super().run(good, ctx)
        out.failed += bad
        out.expected += len(bad)
        return out

    def parse(self, row: dict, completion: Completion) -> dict[str, Any]:
        text = (completion.text or "").strip()
        if not text:
            raise ParseError(f"empty response (finish_reason={completion.finish_reason})")
        if self.cot:
            new = reasoned(self.output, text)
            if new is None:
                raise ParseError(
                    "no final answer marked (like 'Final answer: ...') in the response"
                )
        else:
            new = {self.output: text}
        if self.verify is not None:
            answer = new.get(f"{self.output}_answer") or extract_answer(text)
            if answer is None:
                raise ParseError("no final answer in the response to verify")
            new[f"{self.output}_answer"] = answer
            if self.verify.reference is not None:
                new[f"{self.output}_reference"] = self.verify.reference_of(row)
        return new

    def reject(self, row: dict) -> tuple[str, dict[str, Any]] | None:
        if self.verify is None:
            return None
        answer, reference = row[f"{self.output}_answer"], row.get(f"{self.output}_reference")
        if self.verify.passes(answer, reference):
            return None
        detail = {
            "answer": answer,
            "reference": reference,
            "pattern": self.verify.pattern,
            "rationale": row.get(f"{self.output}_rationale", row[self.output]),
        }
        return "wrong_answer", detail


class ConsensusStep(StepBase):
    """Several teachers answer the same prompt; the answer most of them give is kept.

    Each teacher reasons, then states ``Final answer: ...`` (``answer_prompt``). The row is kept
    when more than half of the teachers give matching answers (`kdata.answers.answers_match`);
    otherwise it is dropped as ``no_consensus``. A teacher whose call fails fails the row.
    """

    kind: ClassVar[str] = "map"
    type: Literal["consensus"] = "consensus"
    teachers: list[str] = Field(min_length=2)
    system: Template | None = None
    prompt: Template
    answer_prompt: Template = prompts.load("consensus")
    output: str = "response"
    tolerance: float = Field(default=1e-6, ge=0)

    @field_validator("teachers")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        twice = sorted({t for t in v if v.count(t) > 1})
        if twice:
            raise ValueError(f"teachers are listed more than once: {', '.join(twice)}")
        return v

    def teacher_names(self) -> set[str]:
        return set(self.teachers)

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        return n_rows, n_rows * len(self.teachers)

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        out = StepOutput(rows=[], expected=len(rows))
        return await settle(out, [self._one(row, ctx) for row in rows], ctx)

    async def _one(self, row: dict, ctx: StepContext) -> dict:
        msgs = with_instruction(
            chat(self.system, self.prompt, row), render(self.answer_prompt, row)
        )
        # sample i for teacher i: two teachers on the same model still make distinct requests
        completions = await ask_all(ctx, row, [(t, msgs, i) for i, t in enumerate(self.teachers)])
        parsed = [reasoned(self.output, c.text) for c in completions]
        answers = [p[f"{self.output}_answer"] if p else None for p in parsed]
        by_teacher = dict(zip(self.teachers, answers, strict=True))
        groups = group_answers(answers, tolerance=self.tolerance)
        if not groups:
            raw = "\n\n".join(f"[{c.teacher}] {c.text}" for c in completions)
            return failure(row, "no_answer", "no teacher stated a final answer", raw=raw)
        top = groups[0]
        if 2 * len(top) <= len(self.teachers):
            return dropped(row, "no_consensus", answers=by_teacher)
        first = top[0]
        child = {
            **row,
            **parsed[first],
            f"{self.output}_agreement": len(top) / len(self.teachers),
            f"{self.output}_teachers": [self.teachers[i] for i in top],
        }
        child[PROVENANCE] = provenance(
            row_id(rid(row), ctx.name), [rid(row)], ctx.name, completions[first]
        )
        return child
