"""Feature knowledge: the teacher's top-k log-probabilities for every token it generates.

What logit distillation trains on. Each response comes with, per generated token, its
log-probability and the ``top_logprobs`` most likely tokens at that position, and with what
names the teacher's vocabulary, so a trainer can tell whether the tokens are its student's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kdata.steps.base import Outcome, ParseError, TeacherStep, failure

if TYPE_CHECKING:
    from kdata.teachers.pool import Completion


class FeaturesStep(TeacherStep):
    """A teacher answers each row; its per-token top-k log-probabilities are kept.

    Requests are sent with ``logprobs`` and ``top_logprobs``. A response that comes back
    without them (a backend that does not return log-probabilities) fails the row with error
    class ``no_logprobs``.
    """

    type: Literal["features"] = "features"
    output: str = "response"
    top_logprobs: int = Field(default=5, ge=1, le=20)

    def request_params(self) -> dict[str, Any]:
        return {"logprobs": True, "top_logprobs": self.top_logprobs}

    def parse(self, row: dict, completion: Completion) -> dict[str, Any]:
        if not (completion.text or "").strip():
            raise ParseError(f"empty response (finish_reason={completion.finish_reason})")
        content = (completion.logprobs or {}).get("content") or []
        if not content or not all(t.get("top_logprobs") for t in content):
            raise Outcome(
                failure(
                    row,
                    "no_logprobs",
                    f"teacher '{completion.teacher}' ({completion.model}) returned no top-"
                    f"{self.top_logprobs} log-probabilities; use a backend that returns them "
                    "(OpenAI-compatible servers such as vLLM or llama_cpp.server, local/ GGUF)",
                    attempts=completion.attempts,
                    raw=completion.text,
                )
            )
        tokens = [
            {
                "token": t["token"],
                "logprob": t["logprob"],
                "top": [{"token": a["token"], "logprob": a["logprob"]} for a in t["top_logprobs"]],
            }
            for t in content
        ]
        return {
            self.output: completion.text,  # as generated: the tokens spell it exactly
            f"{self.output}_logprobs": tokens,
            f"{self.output}_tokenizer": tokenizer_identity(completion),
        }


def tokenizer_identity(c: Completion) -> dict[str, str | None]:
    """What names the vocabulary a response's tokens belong to.

    ``model``: the teacher's model; ``served_model``: the model the response says answered;
    for a ``local/`` GGUF also ``gguf`` (file name), ``sha256`` (of the file) and ``tokenizer``
    (from the GGUF header); these are ``None`` for a served model, whose tokenizer only its
    name tells.
    """
    ident: dict[str, str | None] = {
        "model": c.model,
        "served_model": c.response_model,
        "gguf": None,
        "sha256": None,
        "tokenizer": None,
    }
    if c.model.startswith("local/"):
        from kdata.teachers.local import vocabulary

        ident.update(vocabulary(c.model))
    return ident
