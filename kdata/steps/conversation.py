"""Multi-turn conversations for chat distillation, in the chat format trl trains on.

`conversation` makes them two ways:

- *self-chat* (UltraChat, Baize): from a seed (``prompt``: a topic, a question, a persona), a
  user-simulator teacher writes each user turn and the assistant teacher answers it, for
  ``turns`` assistant turns or until the simulator's message matches ``stop``;
- *re-answering* (Vicuna): ``regenerate`` names a column of existing conversations; their user
  turns are kept and every assistant turn is answered afresh given the history so far.

Each turn is its own request, so it is cached on its own: a build stopped half-way through a
conversation resumes it and pays only for the turns it had not received.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from kdata import prompts
from kdata.steps.base import (
    PROVENANCE,
    Outcome,
    Regex,
    StepBase,
    StepContext,
    StepOutput,
    TeacherRef,
    Template,
    ask,
    assistant_turn,
    failure,
    provenance,
    render,
    rid,
    row_id,
    settle,
    teacher_names,
)

if TYPE_CHECKING:
    from kdata.teachers.pool import Completion


class ConversationStep(StepBase):
    """Conversations of a user and an assistant; the ``messages`` column holds each one.

    ``messages`` is a list of ``{role, content}`` (the assistant's ``system`` prompt first when
    set), as trl's SFTTrainer takes it; an assistant turn whose teacher returned a reasoning
    trace keeps it under ``reasoning_content`` (it is not sent back in later turns);
    ``<output>_turns`` counts the assistant turns. The user simulator sees the seed and the
    conversation so far through ``user_prompt`` (variables: the row's columns, ``seed``, and
    ``history``: the user and assistant turns so far). An
    empty turn fails the row (``parse``), its text kept.
    """

    kind: ClassVar[str] = "map"  # each conversation is its row's own
    type: Literal["conversation"] = "conversation"
    assistant: TeacherRef
    user: TeacherRef | None = None  # the user simulator; self-chat needs it
    system: Template | None = None  # the assistant's system prompt
    prompt: Template | None = None  # self-chat: the seed of each conversation
    user_prompt: Template = prompts.load("conversation.user")
    regenerate: str | None = None  # re-answering: a column of existing conversations
    turns: int = Field(default=3, ge=1, le=50)  # assistant turns (self-chat)
    stop: Regex | None = None  # a regex: a user turn matching it ends the conversation
    output: str = "messages"

    @model_validator(mode="after")
    def _one_source(self) -> ConversationStep:
        if (self.prompt is None) == (self.regenerate is None):
            raise ValueError(
                "conversation takes either prompt (a seed, for self-chat with a user teacher) "
                "or regenerate (a column of conversations whose assistant turns are re-answered)"
            )
        if self.prompt is not None and self.user is None:
            raise ValueError("self-chat needs user: the teacher that plays the user")
        return self

    def teacher_names(self) -> set[str]:
        users = teacher_names(self.user) if self.user is not None else set()
        return teacher_names(self.assistant) | users

    def plan(self, n_rows: int, base_dir: Path) -> tuple[int, int]:
        return n_rows, n_rows * 2 * self.turns  # self-chat at most; re-answering: one per turn

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        out = StepOutput(rows=[], expected=len(rows))
        make = self._self_chat if self.regenerate is None else self._reanswer
        return await settle(out, [make(row, ctx) for row in rows], ctx)

    async def _self_chat(self, row: dict, ctx: StepContext) -> dict:
        seed = render(self.prompt, row)
        history = self._system(row)
        used: list[Completion] = []
        for turn in range(self.turns):
            said_so_far = [m for m in history if m["role"] != "system"]
            ask_user = render(self.user_prompt, row, seed=seed, history=said_so_far)
            c = await ask(ctx, self.user, [{"role": "user", "content": ask_user}], row)
            used.append(c)
            said = self._text(row, c, "user")
            if turn and self.stop is not None and re.search(self.stop, said):
                break
            history.append({"role": "user", "content": said})
            history.append(await self._answer(row, ctx, history, used))
        return self._row(row, ctx, history, used)

    async def _reanswer(self, row: dict, ctx: StepContext) -> dict:
        given = row.get(self.regenerate)
        if not isinstance(given, list) or not given:
            return failure(
                row, "input", f"the row has no conversation in column '{self.regenerate}'"
            )
        history = self._system(row)
        used: list[Completion] = []
        for m in given:
            role = m.get("role") if isinstance(m, dict) else None
            if role == "user":
                history.append({"role": "user", "content": str(m.get("content") or "")})
                history.append(await self._answer(row, ctx, history, used))
            elif role not in ("assistant", "system"):
                return failure(row, "input", f"a turn of '{self.regenerate}' has role {role!r}")
        if len(history) == len(self._system(row)):
            return failure(
                row, "input", f"the conversation in '{self.regenerate}' has no user turn"
            )
        return self._row(row, ctx, history, used)

    async def _answer(
        self, row: dict, ctx: StepContext, history: list[dict], used: list[Completion]
    ) -> dict[str, str]:
        c = await ask(ctx, self.assistant, [_sent(m) for m in history], row)
        used.append(c)
        # The trace is kept with its turn and never sent back to the teacher (`_sent`).
        return assistant_turn(self._text(row, c, "assistant"), c)

    def _system(self, row: dict) -> list[dict[str, str]]:
        return [{"role": "system", "content": render(self.system, row)}] if self.system else []

    def _row(self, row: dict, ctx: StepContext, history: list[dict], used: list) -> dict:
        child: dict[str, Any] = {
            **row,
            self.output: history,
            f"{self.output}_turns": sum(m["role"] == "assistant" for m in history),
        }
        p = provenance(row_id(rid(row), ctx.name), [rid(row)], ctx.name, used[-1])
        p["prompt_tokens"] = sum(c.prompt_tokens for c in used)
        p["completion_tokens"] = sum(c.completion_tokens for c in used)
        p["reasoning_tokens"] = sum(c.reasoning_tokens for c in used)
        p["cost_usd"] = sum(c.cost_usd for c in used)
        child[PROVENANCE] = p
        return child

    @staticmethod
    def _text(row: dict, c: Completion, role: str) -> str:
        text = (c.text or "").strip()
        if not text:
            error = f"empty {role} turn (finish_reason={c.finish_reason})"
            raise Outcome(failure(row, "parse", error, attempts=c.attempts, raw=c.text))
        return text


def _sent(message: dict[str, str]) -> dict[str, str]:
    """A turn as it is sent again: role and content (an earlier turn's trace stays out)."""
    return {"role": message["role"], "content": message["content"]}
