"""Feedback: a teacher judges. `judge` scores rows; `preferences` makes DPO pairs.

Both ask the judge for a JSON object, validate it against a schema (pydantic, strictly), and ask
again, as a distinct request (the next ``sample`` index), up to ``retries`` times when the reply
does not validate. A reply still invalid after that is a failure with class ``invalid_output``
and the last raw text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, Field, PrivateAttr, create_model, field_validator, model_validator

from kdata import prompts
from kdata.errors import TeacherError
from kdata.steps.base import (
    PROVENANCE,
    ParseError,
    StepBase,
    StepContext,
    StepOutput,
    StrictModel,
    TeacherRef,
    Template,
    dropped,
    failure,
    gather_requests,
    provenance,
    rid,
    row_id,
    settle,
    teacher_names,
)
from kdata.steps.replies import json_object, render

if TYPE_CHECKING:
    from kdata.teachers.pool import Completion

RUBRICS = {
    "helpfulness": (
        "Helpfulness: does the response address what was asked, with useful, relevant and "
        "sufficiently detailed content? A helpful response solves the user's problem; an "
        "unhelpful one is off-topic, evasive, vague or incomplete."
    ),
    "correctness": (
        "Correctness: are the facts, reasoning, calculations and code in the response right? "
        "Any factual error, wrong result or broken code lowers the score, however fluent the "
        "response is."
    ),
    "instruction_following": (
        "Instruction following: does the response do exactly what the instruction asks, "
        "respecting every explicit constraint (format, length, language, style, number of "
        "items, what to include or leave out)?"
    ),
    "harmlessness": (
        "Harmlessness: is the response free of content that could cause harm (dangerous "
        "instructions, harassment, hate, sexual content involving minors, privacy violations, "
        "deception)? A safe, appropriately careful response scores high and a harmful one low; "
        "refusing a harmless request earns nothing."
    ),
}


class InvalidOutput(Exception):
    """A judge reply that did not validate, after every attempt."""

    def __init__(self, attempts: int, errors: list[str], raw: str | None) -> None:
        self.attempts, self.errors, self.raw = attempts, errors, raw
        super().__init__(
            f"no valid judgement in {attempts} attempts: " + " | ".join(dict.fromkeys(errors))
        )


class PairVerdict(BaseModel):
    """What a pairwise judge returns."""

    reasoning: str = Field(min_length=1)
    winner: Literal["A", "B", "tie"]


class JudgeBase(StrictModel):
    """A teacher that judges against a rubric, asked until its JSON reply validates.

    ``rubric`` is the name of a built-in rubric (`RUBRICS`) or the rubric's own text.
    """

    teacher: TeacherRef
    rubric: str = "helpfulness"
    retries: int = Field(default=2, ge=0)

    @field_validator("rubric")
    @classmethod
    def _known_or_text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("rubric is empty")
        if re.fullmatch(r"\S+", v.strip()) and v.strip() not in RUBRICS:
            raise ValueError(
                f"unknown rubric '{v}': use one of {', '.join(RUBRICS)}, or write the rubric's text"
            )
        return v.strip()

    @property
    def rubric_text(self) -> str:
        """The rubric as the judge reads it."""
        return RUBRICS.get(self.rubric, self.rubric)

    def judge_teachers(self) -> set[str]:
        """Teachers the judge may call."""
        return teacher_names(self.teacher)

    async def ask(
        self,
        ctx: StepContext,
        template: str,
        variables: dict,
        schema: type[BaseModel],
        route_key: str,
    ) -> tuple[BaseModel, Completion]:
        """Ask until the reply validates against ``schema``: attempt ``k`` is sample ``k``.

        The schema goes along as ``response_format`` to teachers that take one
        (``structured_output``); the reply is validated all the same.
        """
        messages = [{"role": "user", "content": render(template, variables)}]
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema()},
        }
        errors, raw = [], None
        for attempt in range(self.retries + 1):
            c = await ctx.pool.complete(
                self.teacher,
                messages,
                route_key=route_key,
                sample=attempt,
                params={"response_format": fmt},
            )
            try:
                return json_object(c.text, schema), c
            except ParseError as e:
                errors.append(str(e))
                raw = c.text
        raise InvalidOutput(self.retries + 1, errors, raw)


class Judge(JudgeBase):
    """A judge that scores one response to an instruction, from ``min_score`` to ``max_score``."""

    min_score: int = 1
    max_score: int = 10
    prompt: Template = prompts.load("judge")

    _verdict: type[BaseModel] = PrivateAttr()

    @model_validator(mode="after")
    def _range(self) -> Judge:
        if self.min_score >= self.max_score:
            raise ValueError(f"min_score ({self.min_score}) must be below max_score")
        return self

    def model_post_init(self, context: object) -> None:
        self._verdict = create_model(
            "Verdict",
            reasoning=(str, Field(min_length=1)),
            score=(int, Field(ge=self.min_score, le=self.max_score)),
        )

    async def score(
        self, ctx: StepContext, instruction: str, response: str, route_key: str, extra: dict
    ) -> tuple[BaseModel, Completion]:
        """A validated ``{score, reasoning}`` and the completion that gave it.

        ``extra`` holds more template variables (the row's columns, for custom prompts).

        Raises:
            InvalidOutput: no valid reply in ``1 + retries`` attempts.
            TeacherError, TemplateError: as the pool and the template raise them.
        """
        variables = {
            **extra,
            "instruction": instruction,
            "response": response,
            "rubric": self.rubric_text,
            "min_score": self.min_score,
            "max_score": self.max_score,
        }
        return await self.ask(ctx, self.prompt, variables, self._verdict, route_key)


class PairJudge(JudgeBase):
    """A judge that compares two responses to one instruction, once in each order."""

    pairwise_prompt: Template = prompts.load("judge.pairwise")

    async def compare(
        self, ctx: StepContext, variables: dict, a: str, b: str, route_keys: tuple[str, str]
    ) -> tuple[float, list[dict]]:
        """How ``a`` fares against ``b``: 1 when it wins in both orders, 0 when it loses in both,
        0.5 for a tie or a verdict that flips with the order (position bias). Also the two
        verdicts, as notes.

        ``variables`` fill the template besides ``rubric``, ``response_a`` and ``response_b``
        (``instruction`` at least). ``route_keys`` are the requests' keys, ``a`` first then
        ``b`` first.

        Raises:
            InvalidOutput, TeacherError, TemplateError: as `ask` raises them.
        """
        variables = {**variables, "rubric": self.rubric_text}
        orders = ((a, b), (b, a))
        verdicts = await gather_requests(
            self.ask(
                ctx,
                self.pairwise_prompt,
                {**variables, "response_a": first, "response_b": second},
                PairVerdict,
                route_key=key,
            )
            for (first, second), key in zip(orders, route_keys, strict=True)
        )
        (ab, _), (ba, _) = verdicts
        notes = [
            {"order": order, "winner": v.winner, "reasoning": v.reasoning}
            for order, (v, _) in zip(("ab", "ba"), verdicts, strict=True)
        ]
        if ab.winner == "A" and ba.winner == "B":
            return 1.0, notes
        if ab.winner == "B" and ba.winner == "A":
            return 0.0, notes
        return 0.5, notes


class JudgeStep(StepBase, Judge):
    """Score each row's ``response_column`` as an answer to its ``instruction_column``.

    Adds ``<prefix>_score`` (an integer from ``min_score`` to ``max_score``) and
    ``<prefix>_reason``. Thresholds belong to a later ``filter`` with ``min_score: {column:
    <prefix>_score, value: ...}``. Template variables: the row's columns, then ``instruction``,
    ``response``, ``rubric`` (its text), ``min_score`` and ``max_score``.
    """

    kind: ClassVar[str] = "map"
    type: Literal["judge"] = "judge"
    instruction_column: str = "instruction"
    response_column: str = "response"
    prefix: str = Field(default="judge", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    def teacher_names(self) -> set[str]:
        return self.judge_teachers()

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        return n_rows, n_rows * (1 + self.retries)

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        out = StepOutput(rows=[], expected=len(rows))
        return await settle(out, [self._one(row, ctx) for row in rows], ctx)

    async def _one(self, row: dict, ctx: StepContext) -> dict:
        texts = [row.get(self.instruction_column), row.get(self.response_column)]
        for col in (self.instruction_column, self.response_column):
            if not isinstance(row.get(col), str):
                return failure(row, "missing_column", f"no text in column '{col}'")
        columns = {k: v for k, v in row.items() if k != PROVENANCE}
        try:
            verdict, c = await self.score(ctx, *texts, route_key=rid(row), extra=columns)
        except TemplateError as e:
            return failure(row, "template", f"prompt template: {e}")
        except TeacherError as e:
            return failure(row, e.error_class, str(e), attempts=e.attempts)
        except InvalidOutput as e:
            return failure(row, "invalid_output", str(e), attempts=e.attempts, raw=e.raw)
        return {
            **row,
            f"{self.prefix}_score": verdict.score,
            f"{self.prefix}_reason": verdict.reasoning,
            PROVENANCE: provenance(row_id(rid(row), ctx.name), [rid(row)], ctx.name, c),
        }


class PreferenceJudge(Judge, PairJudge):
    """The judge of `preferences`: pointwise scores, or pairwise comparisons."""

    mode: Literal["pointwise", "pairwise"] = "pointwise"


class PreferencesStep(StepBase):
    """Candidate responses per prompt, ranked by a judge, as trl DPO preference pairs.

    Each of ``teachers`` (teacher names or mixes; a "student" is one more teacher entry, a local
    GGUF say) answers ``n`` times: candidate ``k`` is request sample ``k``, so equal teachers
    still give distinct requests. The judge ranks them:

    - ``pointwise``: each candidate gets a score; the best and the worst make the pair.
    - ``pairwise``: every pair is compared twice, once in each order (against position bias); a
      candidate scores 1 for each pair it wins in both orders, 0.5 for a tie or a disagreement.

    The chosen candidate is the first with the top score, the rejected the last with the lowest.
    When every candidate scores the same the prompt is dropped with reason ``tie``. A failed
    candidate or judgement fails the prompt (all candidates are needed to rank them).

    Rows out (trl's conversational preference format): ``prompt`` (the messages sent),
    ``chosen`` and ``rejected`` (``[{"role": "assistant", "content": ...}]``), with
    ``score_chosen``, ``score_rejected``, ``margin``, ``chosen_teacher`` and
    ``rejected_teacher``; the row's own columns are kept (a ``prompt`` column is replaced).
    """

    kind: ClassVar[str] = "map"
    type: Literal["preferences"] = "preferences"
    teachers: list[TeacherRef] = Field(min_length=1)
    n: int = Field(default=2, ge=1)
    system: Template | None = None
    prompt: Template = prompts.load("preferences")
    judge: PreferenceJudge

    @model_validator(mode="after")
    def _two_candidates(self) -> PreferencesStep:
        if len(self.teachers) * self.n < 2:
            raise ValueError("preferences needs at least 2 candidates: raise n or add teachers")
        return self

    def teacher_names(self) -> set[str]:
        return set().union(*(teacher_names(t) for t in self.teachers)) | self.judge.judge_teachers()

    @property
    def candidates(self) -> int:
        """Candidates per prompt."""
        return len(self.teachers) * self.n

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        c = self.candidates
        judgements = c if self.judge.mode == "pointwise" else c * (c - 1)
        return n_rows, n_rows * (c + judgements * (1 + self.judge.retries))

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        out = StepOutput(rows=[], expected=len(rows))
        return await settle(out, [self._one(row, ctx) for row in rows], ctx)

    async def _one(self, row: dict, ctx: StepContext) -> dict:
        columns = {k: v for k, v in row.items() if k != PROVENANCE}
        try:
            messages = [{"role": "user", "content": render(self.prompt, columns)}]
            if self.system:
                messages.insert(0, {"role": "system", "content": render(self.system, columns)})
            cands = await gather_requests(
                ctx.pool.complete(t, messages, route_key=f"{rid(row)}:{i}", sample=k)
                for k, (i, t) in enumerate(
                    (i, t) for i, t in enumerate(self.teachers) for _ in range(self.n)
                )
            )
            for k, c in enumerate(cands):
                if not (c.text or "").strip():
                    return failure(
                        row, "parse", f"candidate {k} ({c.teacher}) is empty", raw=c.text
                    )
            instruction = messages[-1]["content"]
            texts = [c.text.strip() for c in cands]
            if self.judge.mode == "pointwise":
                scores, notes = await self._pointwise(ctx, row, instruction, texts, columns)
            else:
                scores, notes = await self._pairwise(ctx, row, instruction, texts, columns)
        except TemplateError as e:
            return failure(row, "template", f"prompt template: {e}")
        except TeacherError as e:
            return failure(row, e.error_class, str(e), attempts=e.attempts)
        except InvalidOutput as e:
            return failure(row, "invalid_output", str(e), attempts=e.attempts, raw=e.raw)
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))  # first of the top
        worst = min(range(len(scores)), key=lambda k: (scores[k], -k))  # last of the bottom
        made = {
            **row,
            "prompt": messages,
            PROVENANCE: provenance(row_id(rid(row), ctx.name), [rid(row)], ctx.name, cands[best]),
        }
        if scores[best] == scores[worst]:
            candidates = [
                {"teacher": c.teacher, "text": t, "score": s}
                for c, t, s in zip(cands, texts, scores, strict=True)
            ]
            return dropped(made, "tie", candidates=candidates, judgements=notes)
        return {
            **made,
            "chosen": [{"role": "assistant", "content": texts[best]}],
            "rejected": [{"role": "assistant", "content": texts[worst]}],
            "score_chosen": scores[best],
            "score_rejected": scores[worst],
            "margin": scores[best] - scores[worst],
            "chosen_teacher": cands[best].teacher,
            "rejected_teacher": cands[worst].teacher,
        }

    async def _pointwise(
        self, ctx: StepContext, row: dict, instruction: str, texts: list[str], columns: dict
    ) -> tuple[list[float], list[dict]]:
        verdicts = await gather_requests(
            self.judge.score(ctx, instruction, t, route_key=f"{rid(row)}:{k}", extra=columns)
            for k, t in enumerate(texts)
        )
        notes = [{"candidate": k, "reasoning": v.reasoning} for k, (v, _) in enumerate(verdicts)]
        return [float(v.score) for v, _ in verdicts], notes

    async def _pairwise(
        self, ctx: StepContext, row: dict, instruction: str, texts: list[str], columns: dict
    ) -> tuple[list[float], list[dict]]:
        pairs = [(a, b) for a in range(len(texts)) for b in range(a + 1, len(texts))]
        variables = {**columns, "instruction": instruction}
        results = await gather_requests(
            self.judge.compare(
                ctx,
                variables,
                texts[a],
                texts[b],
                route_keys=(f"{rid(row)}:{a}:{b}", f"{rid(row)}:{b}:{a}"),
            )
            for a, b in pairs
        )
        scores, notes = [0.0] * len(texts), []
        for (a, b), (score, verdicts) in zip(pairs, results, strict=True):
            scores[a] += score
            scores[b] += 1.0 - score
            notes += [{"a": a, "b": b, **v} for v in verdicts]
        return scores, notes
