"""Evol-Instruct (`evol_instruct`): each row's instruction evolved by a teacher over rounds.

A lineage's requests are built from its own state (an operation chosen from the seed, the
lineage's first row id and the round), so a rerun sends the same requests and is served from
the cache; lineages are independent, so the step is a map step over blocks.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ClassVar, Literal

from jinja2 import TemplateError
from pydantic import Field, model_validator

from kdata import prompts
from kdata.answers import normalize, rouge_l, words
from kdata.errors import TeacherError
from kdata.steps.base import (
    PROVENANCE,
    ParseError,
    StepBase,
    StepContext,
    StepOutput,
    TeacherRef,
    Template,
    dropped,
    failure,
    gather_requests,
    provenance,
    rid,
    row_id,
    teacher_names,
)
from kdata.steps.expand import missing_instruction
from kdata.steps.filters import builtin_refusal
from kdata.steps.replies import render

Operation = Literal[
    "add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input", "breadth"
]
OPERATIONS: tuple[str, ...] = (
    "add_constraints",
    "deepen",
    "concretize",
    "increase_reasoning",
    "complicate_input",
    "breadth",
)
# Words of the evolving prompt that WizardLM's elimination step watches for in an evolution.
PROMPT_MARKERS = ("given prompt", "rewritten prompt", "created prompt")
COPY_NGRAM = 5  # a run of this many words of the evolving prompt's own text counts as copying


class EvolInstructStep(StepBase):
    """Evol-Instruct (Xu et al. 2023, WizardLM): evolve each row's instruction over rounds.

    Each round, every live instruction is rewritten by one operation, chosen from
    ``operations`` by a generator seeded with ``seed``, the lineage's first row id and the round
    (so a rerun chooses alike): in depth (``add_constraints``, ``deepen``, ``concretize``,
    ``increase_reasoning``, ``complicate_input``) or in breadth (``breadth``: a new instruction
    of the same domain). The teacher then answers the evolved instruction. The elimination step
    drops an evolution, ending its lineage, when:

    - ``copies_prompt``: it holds words of the evolving prompt ("given prompt", "rewritten
      prompt"...) or a run of ``COPY_NGRAM`` words of that prompt's own text;
    - ``no_new_information``: it equals its parent once normalised, or its ROUGE-L to the parent
      is at or above ``max_similarity``;
    - ``refusal``: the answer matches the built-in refusal patterns (see `filter`);
    - ``too_short``: the answer has fewer than ``min_answer_words`` words.

    Rows out are the successful evolutions of every round (the rows in are their parents and are
    not passed through): the row's columns, with ``column`` evolved, ``output`` the answer,
    ``evol_operation`` and ``evol_round``. They come in the order of the rows in, each row's
    rounds in order (``block_rows`` changes nothing); so do the drop and failure records. Units
    of work: one per evolution attempted, plus one per row in without an instruction.

    A map step: each lineage evolves on its own (its rounds one after another, the lineages of
    a block at once), so blocks are run as other teacher steps' are.
    """

    kind: ClassVar[str] = "map"
    type: Literal["evol_instruct"] = "evol_instruct"
    teacher: TeacherRef
    column: str = "instruction"
    output: str = "response"
    rounds: int = Field(default=4, ge=1)
    operations: list[Operation] = Field(default=list(OPERATIONS), min_length=1)
    templates: dict[Operation, Template] = {}
    answer_prompt: Template = prompts.load("evol_instruct.answer")
    max_similarity: float = Field(default=0.9, gt=0, le=1)
    min_answer_words: int = Field(default=10, ge=0)
    seed: int = 0

    @model_validator(mode="after")
    def _templates_used(self) -> EvolInstructStep:
        unused = sorted(set(self.templates) - set(self.operations))
        if unused:
            raise ValueError(f"templates given for operations not in 'operations': {unused}")
        if len(set(self.operations)) != len(self.operations):
            raise ValueError("an operation is listed twice")
        return self

    def teacher_names(self) -> set[str]:
        return teacher_names(self.teacher)

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        return n_rows * self.rounds, 2 * n_rows * self.rounds

    def template(self, op: str) -> str:
        """The evolving prompt of an operation: the recipe's, else the packaged one."""
        return self.templates.get(op) or prompts.load(f"evol_instruct.{op}")

    def operation(self, root_id: str, rnd: int) -> str:
        """The operation applied to a lineage in a round (1-based)."""
        return random.Random(f"{self.seed}:{root_id}:{rnd}").choice(self.operations)

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        ctx.set_total(len(rows) * self.rounds)
        out = StepOutput(rows=[], expected=0)
        for records in await gather_requests(self._lineage(row, ctx) for row in rows):
            out.expected += len(records)
            for r in records:
                out.add(r)
        return out

    async def _lineage(self, row: dict, ctx: StepContext) -> list[dict]:
        """A row's evolutions, round by round until one is dropped or fails: the records."""
        if not (isinstance(row.get(self.column), str) and row[self.column].strip()):
            ctx.advance(self.rounds)
            return [missing_instruction(row, self.column)]
        records, parent = [], row
        for rnd in range(1, self.rounds + 1):
            records.append(r := await self._evolve(parent, rid(row), rnd, ctx))
            if PROVENANCE not in r:
                ctx.advance(self.rounds - rnd)  # the lineage ends: its later rounds are done
                break
            parent = r
        return records

    async def _evolve(self, parent: dict, root: str, rnd: int, ctx: StepContext) -> dict:
        """One evolution attempt: the evolved row, a drop record or a failure record."""
        op = self.operation(root, rnd)
        before = parent[self.column]
        base = {k: v for k, v in parent.items() if k != self.output}
        try:
            try:
                evolving = render(self.template(op), _variables(base, before))
                c = await ctx.pool.complete(
                    self.teacher, [{"role": "user", "content": evolving}], route_key=rid(parent)
                )
                after = (c.text or "").strip()
                if not after:
                    raise ParseError(f"empty evolution (finish_reason={c.finish_reason})")
                child = {
                    **base,
                    self.column: after,
                    "evol_operation": op,
                    "evol_round": rnd,
                    PROVENANCE: provenance(
                        row_id(rid(parent), ctx.name, str(rnd)), [rid(parent)], ctx.name, c
                    ),
                }
                if copied := copied_from_prompt(after, evolving, before):
                    return dropped(child, "copies_prompt", copied=copied, operation=op)
                similarity = rouge_l(after, before)
                if normalize(after) == normalize(before) or similarity >= self.max_similarity:
                    return dropped(
                        child,
                        "no_new_information",
                        rouge_l=round(similarity, 6),
                        threshold=self.max_similarity,
                        parent=before,
                    )
                answering = render(self.answer_prompt, _variables(child, after))
                c = await ctx.pool.complete(
                    self.teacher, [{"role": "user", "content": answering}], route_key=rid(child)
                )
            except TemplateError as e:
                return failure(parent, "template", f"prompt template: {e}")
            except TeacherError as e:
                return failure(parent, e.error_class, str(e), attempts=e.attempts)
            except ParseError as e:
                return failure(parent, "parse", str(e), attempts=c.attempts, raw=c.text)
            answer = (c.text or "").strip()
            child = {**child, self.output: answer}
            child[PROVENANCE] = provenance(rid(child), [rid(parent)], ctx.name, c)
            if m := builtin_refusal(answer):
                return dropped(child, "refusal", pattern=m.re.pattern, match=m.group(0))
            n_words = len(answer.split())
            if n_words < self.min_answer_words:
                return dropped(child, "too_short", words=n_words, threshold=self.min_answer_words)
            return child
        finally:
            ctx.advance(1)


def _variables(row: dict, instruction: str) -> dict[str, Any]:
    """Template variables: the row's columns, and ``instruction`` whatever its column."""
    return {**{k: v for k, v in row.items() if k != PROVENANCE}, "instruction": instruction}


def copied_from_prompt(evolved: str, evolving_prompt: str, parent: str) -> str | None:
    """What an evolved instruction copied from the prompt that evolved it, if anything.

    A marker phrase of `PROMPT_MARKERS`, or a run of `COPY_NGRAM` words that the evolving prompt
    has and its parent instruction has not (the prompt's own text, not the instruction it shows).
    """
    lowered = " ".join(words(evolved))
    for marker in PROMPT_MARKERS:
        if marker in lowered:
            return marker
    own = _ngrams(words(evolving_prompt)) - _ngrams(words(parent))
    copied = sorted(_ngrams(words(evolved)) & own)
    return " ".join(copied[0]) if copied else None


def _ngrams(tokens: list[str]) -> set[tuple[str, ...]]:
    return set(zip(*(tokens[i:] for i in range(COPY_NGRAM)), strict=False))
