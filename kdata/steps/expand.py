"""Expansion: new instructions from a teacher. `self_instruct` and `evol_instruct`.

Both are multi-call methods run in rounds. A round's requests are built from the state at the
round's start (seeded sampling, never the order in which answers arrive) and their results are
processed in a fixed order, so a rerun sends the same requests and is served from the cache.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from jinja2 import TemplateError
from pydantic import Field, model_validator

from kdata import prompts
from kdata.answers import normalize, rouge_l, words
from kdata.blocks import batched
from kdata.errors import KdataError, TeacherError
from kdata.steps.base import (
    PROVENANCE,
    GlobalStep,
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
from kdata.steps.filters import builtin_refusal
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


def _missing(row: dict, column: str) -> dict:
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
            _missing(row, self.column)
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
                (out.rows if PROVENANCE in r else out.failed).append(r)
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
        (out.dropped if "reason" in r else out.failed).append(r)
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
                if PROVENANCE in r:
                    out.rows.append(r)
                elif "reason" in r:
                    out.dropped.append(r)
                else:
                    out.failed.append(r)
        return out

    async def _lineage(self, row: dict, ctx: StepContext) -> list[dict]:
        """A row's evolutions, round by round until one is dropped or fails: the records."""
        if not (isinstance(row.get(self.column), str) and row[self.column].strip()):
            ctx.advance(self.rounds)
            return [_missing(row, self.column)]
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
