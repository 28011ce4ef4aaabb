"""Expansion: new instructions from a teacher. `self_instruct` (`evol_instruct` is in
`kdata.steps.evol`).

Both are multi-call methods run in rounds. A round's requests are built from the state at the
round's start (seeded sampling, never the order in which answers arrive) and their results are
processed in a fixed order, so a rerun sends the same requests and is served from the cache.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from jinja2 import TemplateError
from pydantic import Field, model_validator

from kdata import prompts
from kdata.blocks import batched
from kdata.errors import KdataError, TeacherError
from kdata.steps.base import (
    PROVENANCE,
    GlobalStep,
    ParseError,
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
from kdata.steps.novelty import NoveltyIndex
from kdata.steps.replies import labelled_fields, numbered_list, render

# The Self-Instruct paper's filters of generated instructions: length in words, and words that
# point at what a text-only model cannot do.
MIN_WORDS, MAX_WORDS = 3, 150
UNSUITABLE = re.compile(
    r"\b(images?|graphs?|pictures?|files?|maps?|draw|plot|go to|video|audio|music|flowchart|"
    r"diagram)\b",
    re.IGNORECASE,
)
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def missing_instruction(row: dict, column: str) -> dict:
    have = ", ".join(k for k in row if k != PROVENANCE)
    why = f"column '{column}' is missing or not text; the row has: {have}"
    return failure(row, "missing_column", why)


class SelfInstructStep(GlobalStep):
    """Self-Instruct (Wang et al. 2022): bootstrap new instructions from the rows in.

    The rows in are the human seed pool (their ``column`` holds the instruction). Each round
    sends ``prompts_per_round`` generation prompts, each listing ``human_per_prompt`` sampled seeds
    and ``machine_per_prompt`` sampled machine instructions (seeds fill in while there are too few
    machine ones), and asks for ``new_per_prompt`` more as a numbered list. Each new instruction
    is kept only when its ROUGE-L to every instruction in the pool (seeds and those kept so far,
    earlier in the same round included) is below ``threshold``; a kept one joins the pool at
    once. Rounds stop at ``target`` instructions, after ``patience`` rounds in a row that kept
    none, or after ``max_rounds``.

    Then the teacher decides whether each kept instruction is a classification task, and writes
    its instances: output first (class label, then an input) for classification tasks, input
    first otherwise. Rows out have ``column``, ``is_classification`` and ``instances`` (a list
    of ``{input, output}``, the seed tasks' own shape); the rows in are not passed through.

    Units of work (``expected``): every instruction the teacher proposed, plus every failed
    generation request, plus every row in without an instruction. A proposal ends up kept, dropped
    (``too_similar`` with the most similar pool instruction and its score; ``truncated``, the last
    item of a reply cut at the token limit; ``bad_length``; ``unsuitable``; ``target_reached``)
    or failed (classification or instance request).

    A global step over blocks: ``decide`` reads the seed pool through the blocks (each row's id
    and instruction, nothing else), ``mark`` fails each block's rows without an instruction, and
    the rounds run on the pool and the kept instructions (at most ``target``). Their drops and
    failed requests, then the kept rows, are written in blocks of at most ``block_rows``; the
    tables are the same whatever ``block_rows``.
    """

    type: Literal["self_instruct"] = "self_instruct"
    teacher: TeacherRef
    column: str = "instruction"
    target: int = Field(ge=1)
    threshold: float = Field(default=0.7, gt=0, le=1)
    human_per_prompt: int = Field(default=6, ge=0)
    machine_per_prompt: int = Field(default=2, ge=0)
    new_per_prompt: int = Field(default=8, ge=1)
    prompts_per_round: int = Field(default=4, ge=1)
    max_rounds: int = Field(default=20, ge=1)
    patience: int = Field(default=3, ge=1)
    seed: int = 0
    prompt: Template = prompts.load("self_instruct")
    classify_prompt: Template = prompts.load("self_instruct.classify")
    input_first_prompt: Template = prompts.load("self_instruct.input_first")
    output_first_prompt: Template = prompts.load("self_instruct.output_first")

    @model_validator(mode="after")
    def _some_examples(self) -> SelfInstructStep:
        if self.human_per_prompt + self.machine_per_prompt == 0:
            raise ValueError("human_per_prompt + machine_per_prompt must be at least 1")
        return self

    def teacher_names(self) -> set[str]:
        return teacher_names(self.teacher)

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        return self.target, self.max_rounds * self.prompts_per_round + 2 * self.target

    def plan_prompt_bytes(self, row_bytes: int) -> int:
        return (self.human_per_prompt + self.machine_per_prompt) * row_bytes

    async def decide(self, blocks: Any, ctx: StepContext) -> list[dict]:
        """The seed pool: each row in with an instruction, as its id and instruction only."""
        pools = await blocks.map(self._seeds, columns=[self.column, f"{PROVENANCE}.id"])
        seeds = [s for pool in pools for s in pool]
        if not seeds:
            raise KdataError(
                f"step {ctx.name}: self_instruct needs seed rows with a '{self.column}' column"
            )
        return seeds

    def _seeds(self, block: Any) -> list[dict]:
        texts = block.strings(self.column) or [r.get(self.column) for r in block.rows()]
        return [
            {self.column: t, PROVENANCE: {"id": i}}
            for t, i in zip(texts, block.ids().to_pylist(), strict=True)
            if isinstance(t, str) and t.strip()
        ]

    def mark(self, block: Any, decision: list[dict]) -> StepOutput:
        """A block in: its rows without an instruction fail; the others are the seed pool."""
        texts = block.strings(self.column)
        if texts is not None and all(t.strip() for t in texts):
            return StepOutput(rows=[], expected=0)
        failed = [
            missing_instruction(row, self.column)
            for row in block.rows()
            if not (isinstance(row.get(self.column), str) and row[self.column].strip())
        ]
        return StepOutput(rows=[], expected=len(failed), failed=failed)

    async def blocks(
        self, ctx: StepContext, block_rows: int, seeds: list[dict]
    ) -> AsyncIterator[StepOutput]:
        """The rounds' drops and failed requests, then the kept instructions with their
        instances, in blocks of at most ``block_rows`` records (the same tables whatever
        ``block_rows``)."""
        pool = NoveltyIndex()
        for s in seeds:
            pool.add(s[self.column])
        kept: list[dict] = []
        ctx.set_total(2 * self.target)
        stale, sent = 0, 0
        records: list[dict] = []  # the drops and failures not written yet
        for rnd in range(self.max_rounds):
            if len(kept) >= self.target or stale >= self.patience:
                break
            examples = [self._examples(seeds, kept, rnd, k) for k in range(self.prompts_per_round)]
            replies = await gather_requests(
                self._generate(ex, sent + k, ctx) for k, ex in enumerate(examples)
            )
            sent += len(examples)
            n_kept = len(kept)
            for reply in replies:
                if PROVENANCE in reply:  # a failure record carries no provenance key
                    verdicts = self._judge_candidates(reply, pool, kept)
                    records += [v for v in verdicts if v is not None]
                else:
                    records.append(reply)
            ctx.advance(len(kept) - n_kept)
            stale = 0 if len(kept) > n_kept else stale + 1
            while len(records) >= block_rows:
                yield _records(records[:block_rows])
                records = records[block_rows:]
        if records:
            yield _records(records)
        for todo in batched(kept, block_rows):
            out = StepOutput(rows=[], expected=len(todo))
            for r in await gather_requests(self._instances(c, ctx) for c in todo):
                out.add(r)
            ctx.advance(len(todo))
            yield out

    def _examples(self, seeds: list[dict], kept: list[dict], rnd: int, k: int) -> list[dict]:
        """The pool rows shown in prompt ``k`` of round ``rnd``: seeded, shuffled."""
        rng = random.Random(f"{self.seed}:{rnd}:{k}")
        machine = rng.sample(kept, min(self.machine_per_prompt, len(kept)))
        n_human = self.human_per_prompt + self.machine_per_prompt - len(machine)
        chosen = machine + rng.sample(seeds, min(n_human, len(seeds)))
        rng.shuffle(chosen)
        return chosen

    async def _generate(self, examples: list[dict], number: int, ctx: StepContext) -> dict:
        """One generation request: ``{"_kdata": ..., "items": [...]}`` or a failure record.

        ``number`` counts generation requests over the whole step; it is the request's sample
        index, so two prompts that happen to show the same examples are still distinct requests.
        """
        parents = [rid(r) for r in examples]
        stub = {
            "examples": [r[self.column] for r in examples],
            PROVENANCE: provenance(row_id(ctx.name, "generate", str(number)), parents, ctx.name),
        }
        variables = {"tasks": stub["examples"], "n": self.new_per_prompt}
        try:
            messages = [{"role": "user", "content": render(self.prompt, variables)}]
        except TemplateError as e:
            return failure(stub, "template", f"prompt template: {e}")
        try:
            c = await ctx.pool.complete(self.teacher, messages, route_key=rid(stub), sample=number)
        except TeacherError as e:
            return failure(stub, e.error_class, str(e), attempts=e.attempts)
        try:
            items = numbered_list(c.text)
        except ParseError as e:
            return failure(stub, "parse", str(e), attempts=c.attempts, raw=c.text)
        stub[PROVENANCE] = provenance(rid(stub), parents, ctx.name, c)
        return {**stub, "items": items}

    def _judge_candidates(self, reply: dict, pool: NoveltyIndex, kept: list[dict]):
        """Decide each proposed instruction of a reply, in order: yields a drop record or None."""
        prov = reply[PROVENANCE]
        for i, text in enumerate(reply["items"]):
            cand = {
                self.column: text,
                PROVENANCE: {**prov, "id": row_id(prov["id"], str(i))},
            }
            n_words = len(text.split())
            if len(kept) >= self.target:
                yield dropped(cand, "target_reached", target=self.target)
            elif i == len(reply["items"]) - 1 and prov["finish_reason"] == "length":
                yield dropped(cand, "truncated", finish_reason="length")
            elif not MIN_WORDS <= n_words <= MAX_WORDS:
                yield dropped(cand, "bad_length", words=n_words, bounds=[MIN_WORDS, MAX_WORDS])
            elif m := UNSUITABLE.search(text):
                yield dropped(cand, "unsuitable", word=m.group(0))
            elif hit := pool.most_similar(text, self.threshold):
                j, score = hit
                yield dropped(
                    cand,
                    "too_similar",
                    most_similar=pool.texts[j],
                    rouge_l=round(score, 6),
                    threshold=self.threshold,
                )
            else:
                pool.add(text)
                kept.append(cand)
                yield None

    async def _instances(self, cand: dict, ctx: StepContext) -> dict:
        """Identify the task type, then write its instances: a row, or a failure record."""
        text = cand[self.column]
        try:
            c = await self._ask(self.classify_prompt, text, cand, ctx)
            if not (m := _YES_NO.match(c.text or "")):
                raise ParseError("expected Yes or No")
            is_cls = m.group(1).lower() == "yes"
            template = self.output_first_prompt if is_cls else self.input_first_prompt
            c = await self._ask(template, text, cand, ctx)
            instances = parse_instances(c.text, output_first=is_cls)
        except TemplateError as e:
            return failure(cand, "template", f"prompt template: {e}")
        except TeacherError as e:
            return failure(cand, e.error_class, str(e), attempts=e.attempts)
        except ParseError as e:
            return failure(cand, "parse", str(e), attempts=c.attempts, raw=c.text)
        prov = cand[PROVENANCE]
        return {
            self.column: text,
            "is_classification": is_cls,
            "instances": instances,
            PROVENANCE: provenance(prov["id"], prov["parent_ids"], ctx.name, c),
        }

    async def _ask(self, template: str, instruction: str, cand: dict, ctx: StepContext):
        messages = [{"role": "user", "content": render(template, {"instruction": instruction})}]
        return await ctx.pool.complete(self.teacher, messages, route_key=rid(cand))


def _records(records: list[dict]) -> StepOutput:
    """A block of drop and failure records."""
    out = StepOutput(rows=[], expected=len(records))
    for r in records:
        out.add(r)
    return out


def parse_instances(text: str | None, *, output_first: bool) -> list[dict[str, str]]:
    """Instances ``{input, output}`` of a task from ``Input:`` / ``Output:`` lines.

    Input first: an optional ``Input:`` then an ``Output:`` per instance. Output first
    (classification): a ``Class label:`` (the output) then an optional ``Input:``.

    Raises:
        ParseError: no instance, or fields out of that order.
    """
    head = "Class label" if output_first else "Input"
    labels = ("Class label", "Input") if output_first else ("Input", "Output")
    instances: list[dict[str, str]] = []
    pending: str | None = None  # input-first: an Input waiting for its Output
    for label, value in labelled_fields(text, labels):
        if not value:
            raise ParseError(f"an empty '{label}:' field")
        if output_first:
            if label == head:
                instances.append({"input": "", "output": value})
            elif not instances or instances[-1]["input"]:
                raise ParseError("an 'Input:' without a 'Class label:' before it")
            else:
                instances[-1]["input"] = value
        elif label == head:
            if pending is not None:
                raise ParseError("two 'Input:' fields without an 'Output:' between them")
            pending = value
        else:
            instances.append({"input": pending or "", "output": value})
            pending = None
    if pending is not None:
        raise ParseError("an 'Input:' without its 'Output:'")
    if not instances:
        fields = "'Class label:' / 'Input:'" if output_first else "'Input:' / 'Output:'"
        raise ParseError(f"no {fields} fields in the reply")
    return instances
