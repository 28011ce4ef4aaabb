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

from kdata import mathcheck, prompts, sandbox
from kdata.answers import answers_match, extract_answer, group_answers, split_final_answer
from kdata.steps.base import (
    PROVENANCE,
    JsonSchema,
    ParseError,
    Regex,
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
from kdata.steps.replies import schema_object

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


_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The code of a response: its first fenced block, else the whole response."""
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip()


def with_instruction(messages: list[dict[str, str]], instruction: str) -> list[dict[str, str]]:
    """``messages`` with ``instruction`` appended to the last user message."""
    last = messages[-1]
    return [*messages[:-1], {**last, "content": f"{last['content']}\n\n{instruction}"}]


class Verify(StrictModel):
    """A check of each response: its final answer against a reference column (as text or a
    number, or with ``math`` as mathematics: `kdata.mathcheck`) or a regex, or its code
    against the row's tests, run in `kdata.sandbox`."""

    reference: str | None = None  # the column holding the reference answer
    extract_reference: bool = False  # the reference is that column's final answer (last number)
    tolerance: float = Field(default=1e-6, ge=0)  # numeric answers: absolute or relative
    math: bool = False  # reference: equal as mathematics (math-verify), not as text or number
    pattern: Regex | None = None  # a regex the whole final answer must match
    tests: str | None = None  # a column of Python tests that the response's code must pass
    entry_point: str | None = None  # a column naming the function the tests' check() takes
    setup: str | None = None  # a column of code run before the response's (imports, say)
    timeout_s: float = Field(default=10.0, gt=0)  # tests, math: seconds per check

    @model_validator(mode="after")
    def _one_check(self) -> Verify:
        if [self.reference, self.pattern, self.tests].count(None) != 2:
            raise ValueError(
                "verify takes either reference (a column), pattern (a regex) or tests (a column)"
            )
        if self.extract_reference and self.reference is None:
            raise ValueError("extract_reference needs reference: the column to extract from")
        if self.entry_point is not None and self.tests is None:
            raise ValueError("entry_point needs tests: the column of tests that call check()")
        if self.setup is not None and self.tests is None:
            raise ValueError("setup needs tests: it is code run before the response's code")
        if self.math and self.reference is None:
            raise ValueError("math needs reference: the column of reference answers")
        return self

    def reference_of(self, row: dict) -> str:
        """The reference answer of a row (with ``tests``: its tests).

        Raises:
            ValueError: the row has no usable reference.
        """
        column = self.reference or self.tests
        value = row.get(column)
        if value is None or not str(value).strip():
            raise ValueError(f"the row has no reference in column '{column}'")
        if self.tests is not None:
            return str(value)
        ref = str(value).strip()
        if self.extract_reference:
            ref = extract_answer(ref)
            if ref is None:
                raise ValueError(f"no final answer found in column '{self.reference}': {value!r}")
        return ref

    def program(self, row: dict, code: str) -> str:
        """The program that runs ``code`` against the row's tests (HumanEval's shape: the
        ``setup`` column's code when set, the solution, the tests, then
        ``check(<entry point>)`` when ``entry_point`` is set)."""
        program = f"{code}\n\n{self.reference_of(row)}\n"
        if self.setup is not None:
            program = f"{row.get(self.setup) or ''}\n\n{program}"
        if self.entry_point is not None:
            program += f"\ncheck({row[self.entry_point]})\n"
        return program

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
    ``verify`` checks each sample's final answer and drops a wrong one as ``wrong_answer``
    (with ``verify.math`` the whole response goes to math-verify, which reads a boxed or last
    LaTeX answer; a check that runs out of ``timeout_s`` drops it with ``timed_out``);
    with ``verify.tests`` the response's code (its first fenced block, else all of it) goes to
    ``<output>_code`` and runs against the row's tests in `kdata.sandbox`, and a sample that
    fails them is dropped as ``tests_failed`` with how it ended and its output.

    ``schema`` asks for a JSON object: the schema goes along as ``response_format`` to teachers
    that take one (llama.cpp turns it into a grammar), the reply is validated against it, and
    its fields become columns (``output`` keeps the reply's text). A reply that does not
    validate is asked again as a distinct request, up to ``retries`` times, then fails as
    ``invalid_output`` with the last reply in ``raw``.
    """

    type: Literal["label"] = "label"
    output: str = "response"
    cot: bool = False
    cot_prompt: Template = prompts.load("label.cot")
    verify: Verify | None = None
    schema_: JsonSchema | None = Field(default=None, alias="schema")
    retries: int = Field(default=2, ge=0)  # schema: invalid replies asked again

    @model_validator(mode="after")
    def _schema_alone(self) -> LabelStep:
        if self.schema_ is not None and (self.cot or self.verify is not None):
            raise ValueError("schema replies are JSON: it does not go with cot or verify")
        return self

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        rows, calls = super().plan(n_rows, base_dir)
        return rows, calls * (1 + self.retries if self.schema_ is not None else 1)

    def request_params(self) -> dict[str, Any] | None:
        if self.schema_ is None:
            return None
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": self.schema_},
            }
        }

    async def _one(self, row: dict, sample: int, ctx: StepContext) -> dict:
        if self.schema_ is None:
            return await super()._one(row, sample, ctx)
        errors = []
        for attempt in range(self.retries + 1):  # attempt k is its own request and cache entry
            out = await super()._one(row, sample + attempt * self.n, ctx)
            if out.get("error_class") != "parse":
                return out
            errors.append(out["error"])
        return {
            **out,
            "error_class": "invalid_output",
            "error": f"no reply matched the schema in {len(errors)} attempts: {errors[-1]}",
            "attempts": len(errors),
        }

    def messages(self, row: dict) -> list[dict[str, str]]:
        msgs = super().messages(row)
        return with_instruction(msgs, render(self.cot_prompt, row)) if self.cot else msgs

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        """Rows without a usable reference fail before any call is paid for, and so does a
        step whose tests this machine cannot sandbox."""
        if self.verify is not None and self.verify.tests is not None:
            sandbox.require()
        if self.verify is not None and self.verify.math:
            mathcheck.available()
        if self.verify is None or self.verify.pattern is not None:
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
        if self.schema_ is not None:
            return {self.output: text, **schema_object(text, self.schema_)}
        if self.cot:
            new = reasoned(self.output, text)
            if new is None:
                raise ParseError(
                    "no final answer marked (like 'Final answer: ...') in the response"
                )
        else:
            new = {self.output: text}
        if self.verify is not None and self.verify.tests is not None:
            new[f"{self.output}_code"] = extract_code(text)
        elif self.verify is not None:
            answer = new.get(f"{self.output}_answer") or extract_answer(text)
            if answer is None and not self.verify.math:  # math-verify reads LaTeX answers too
                raise ParseError("no final answer in the response to verify")
            new[f"{self.output}_answer"] = answer
            if self.verify.reference is not None:
                new[f"{self.output}_reference"] = self.verify.reference_of(row)
        return new

    def reject(self, row: dict) -> tuple[str, dict[str, Any]] | None:
        if self.verify is None:
            return None
        if self.verify.tests is not None:
            code = row[f"{self.output}_code"]
            limits = sandbox.Limits(timeout_s=self.verify.timeout_s)
            outcome = sandbox.run_python(self.verify.program(row, code), limits)
            if outcome.passed:
                return None
            return "tests_failed", {"ended": outcome.reason, "output": outcome.output[-4000:]}
        answer, reference = row[f"{self.output}_answer"], row.get(f"{self.output}_reference")
        if self.verify.math:
            ok, read = mathcheck.equivalent(row[self.output], reference, self.verify.timeout_s)
            if ok:
                return None
            detail = {"answer": read, "reference": reference, "timed_out": ok is None}
            return "wrong_answer", {**detail, "rationale": row[self.output]}
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
