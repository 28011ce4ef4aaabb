"""Self-knowledge: the teacher's own samples and critiques sharpen its answers.

`self_consistency` (Wang et al. 2022): several reasoning samples per row, majority vote on their
final answers. `self_refine` (Madaan et al. 2023): the teacher critiques its answer and revises
it until the critique says it is done.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from kdata import prompts
from kdata.answers import group_answers
from kdata.steps.base import (
    PROVENANCE,
    Outcome,
    StepBase,
    StepContext,
    StepOutput,
    TeacherRef,
    TeacherStep,
    Template,
    ask,
    ask_all,
    chat,
    chat_messages,
    failure,
    provenance,
    reasoning_column,
    render,
    rid,
    row_id,
    settle,
    teacher_names,
)
from kdata.steps.elicit import reasoned, with_instruction

if TYPE_CHECKING:
    from kdata.teachers.pool import Completion

# The critique's last non-empty line: the verdict alone (markdown emphasis or quotes tolerated).
_VERDICT = re.compile(r"""[\s*_`"']*VERDICT\s*:\s*(DONE|REVISE)[\s*_`"'.]*""", re.IGNORECASE)


class SelfConsistencyStep(TeacherStep):
    """``n`` reasoning samples per row; the answer most samples reach is kept.

    Each sample reasons, then states ``Final answer: ...`` (``answer_prompt``). Samples are
    grouped by matching final answers (`kdata.answers.answers_match`); the largest group wins,
    ties going to the answer sampled first. One row comes out per row in, with the first
    winning sample's response and the share of the ``n`` samples that agree with it. A row
    none of whose samples states a final answer fails (``no_answer``).
    """

    type: Literal["self_consistency"] = "self_consistency"
    n: int = Field(default=5, ge=2)
    answer_prompt: Template = prompts.load("self_consistency")
    output: str = "response"
    tolerance: float = Field(default=1e-6, ge=0)

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        return n_rows, n_rows * self.n

    def messages(self, row: dict) -> list[dict[str, str]]:
        return with_instruction(super().messages(row), render(self.answer_prompt, row))

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        out = StepOutput(rows=[], expected=len(rows))
        return await settle(out, [self._vote(row, ctx) for row in rows], ctx)

    async def _vote(self, row: dict, ctx: StepContext) -> dict:
        msgs = self.messages(row)
        completions = await ask_all(ctx, row, [(self.teacher, msgs, i) for i in range(self.n)])
        parsed = [reasoned(self.output, c.text) for c in completions]
        answers = [p[f"{self.output}_answer"] if p else None for p in parsed]
        groups = group_answers(answers, tolerance=self.tolerance)
        if not groups:
            raw = json.dumps([c.text for c in completions], ensure_ascii=False)
            return failure(
                row, "no_answer", f"none of the {self.n} samples stated a final answer", raw=raw
            )
        top = groups[0]
        child = {
            **row,
            **parsed[top[0]],
            **reasoning_column(self, completions[top[0]]),
            f"{self.output}_agreement": len(top) / self.n,
        }
        if self.messages_column is not None:
            child[self.messages_column] = chat_messages(msgs, completions[top[0]])
        child[PROVENANCE] = provenance(
            row_id(rid(row), ctx.name), [rid(row)], ctx.name, completions[top[0]]
        )
        return child


class SelfRefineStep(StepBase):
    """The teacher answers, critiques its answer and revises it, up to ``rounds`` times.

    A round is one critique (``critique_prompt``), which must end with the line ``VERDICT:
    DONE`` or ``VERDICT: REVISE``; on REVISE the teacher rewrites its answer from the critique
    (``refine_prompt``). The loop stops at DONE or after ``rounds`` rounds. With ``input`` the
    first answer is that column's instead of the teacher's. A critique without a verdict line
    fails the row (``parse``), its text kept.

    Templates see the row's columns and ``task`` (the rendered prompt), ``draft`` (the answer
    under review) and, in ``refine_prompt``, ``feedback`` (the critique without its verdict).
    """

    kind: ClassVar[str] = "map"
    type: Literal["self_refine"] = "self_refine"
    teacher: TeacherRef
    system: Template | None = None
    prompt: Template
    input: str | None = None  # a column holding the first answer; the teacher writes it if unset
    critique_prompt: Template = prompts.load("self_refine.critique")
    refine_prompt: Template = prompts.load("self_refine.refine")
    rounds: int = Field(default=3, ge=1)
    output: str = "response"

    def teacher_names(self) -> set[str]:
        return teacher_names(self.teacher)

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        first = 0 if self.input else 1
        return n_rows, n_rows * (first + 2 * self.rounds)

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        out = StepOutput(rows=[], expected=len(rows))
        return await settle(out, [self._refine(row, ctx) for row in rows], ctx)

    async def _refine(self, row: dict, ctx: StepContext) -> dict:
        task_msgs = chat(self.system, self.prompt, row)
        task = task_msgs[-1]["content"]
        answered = None  # the completion that wrote the current draft
        if self.input is not None:
            draft = str(row.get(self.input) or "").strip()
            if not draft:
                return failure(row, "input", f"the row has no answer in column '{self.input}'")
        else:
            last = answered = await ask(ctx, self.teacher, task_msgs, row)
            draft = self._text(row, last)
        history: list[dict[str, Any]] = []
        for r in range(self.rounds):
            # sample r: a draft that comes back unchanged is still critiqued afresh
            msgs = chat(self.system, self.critique_prompt, row, task=task, draft=draft)
            last = await ask(ctx, self.teacher, msgs, row, sample=r)
            feedback, done = self._critique(row, last)
            history.append({"answer": draft, "critique": feedback, "done": done})
            if done:
                break
            msgs = chat(
                self.system, self.refine_prompt, row, task=task, draft=draft, feedback=feedback
            )
            last = answered = await ask(ctx, self.teacher, msgs, row, sample=r)
            draft = self._text(row, last)
        child = {
            **row,
            **(reasoning_column(self, answered) if answered else {}),
            self.output: draft,
            f"{self.output}_rounds": history,
            f"{self.output}_rounds_used": len(history),
        }
        child[PROVENANCE] = provenance(row_id(rid(row), ctx.name), [rid(row)], ctx.name, last)
        return child

    @staticmethod
    def _text(row: dict, c: Completion) -> str:
        text = (c.text or "").strip()
        if not text:
            error = f"empty response (finish_reason={c.finish_reason})"
            raise Outcome(failure(row, "parse", error, attempts=c.attempts, raw=c.text))
        return text

    @staticmethod
    def _critique(row: dict, c: Completion) -> tuple[str, bool]:
        """The critique without its verdict line, and whether the verdict is DONE."""
        lines = (c.text or "").strip().splitlines()
        verdict = _VERDICT.fullmatch(lines[-1]) if lines else None
        if verdict is None:
            raise Outcome(
                failure(
                    row,
                    "parse",
                    "the critique does not end with 'VERDICT: DONE' or 'VERDICT: REVISE'",
                    attempts=c.attempts,
                    raw=c.text,
                )
            )
        return "\n".join(lines[:-1]).strip(), verdict.group(1).upper() == "DONE"
