"""`filter`: quality checks that call no teacher (`decontaminate` is in its own module).

Every dropped row is recorded with its reason and the measured value behind the decision (a
length, a ratio, a score, the matched pattern, the benchmark item and the overlap), so a threshold
can be re-cut from the ``dropped`` parts without recomputing anything or asking a teacher again.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from kdata.blocks import Block
from kdata.steps.base import (
    PROVENANCE,
    StepBase,
    StepContext,
    StepOutput,
    StrictModel,
    dropped,
    failure,
)
from kdata.steps.traces import ScriptBound, disagreement, foreign_share

# Built-in refusal and apology patterns, searched in the lowercased text at word starts. Apologies
# count only at the start of the text ("I'm sorry to hear that" inside a helpful answer is not a
# refusal); refusal phrases count anywhere. "I can't help but..." is an idiom, not a refusal.
_CANNOT = r"(?:cannot|can ?not|can[’']t|won[’']t|will not)"
REFUSAL_PATTERNS = (
    r"^\W*(?:i[’']m|i am) (?:so |very |really |truly )?sorry\b",
    r"^\W*(?:i apologi[sz]e|my apologies|apologies)\b",
    r"as an ai(?: language)? model\b",
    r"as an ai(?: assistant)?, i\b",
    rf"i {_CANNOT} (?:help(?! but)|assist|provide|comply|fulfil|answer|create|generate|write)",
    r"i(?:[’']m| am) (?:unable|not able|not allowed|not permitted) to\b",
    r"i must (?:decline|refuse)\b",
)
_REFUSALS = tuple(re.compile(p) for p in REFUSAL_PATTERNS)
_WORD = re.compile(r"[^\W_]+")
_REPETITION_NGRAM = 3


def normalise(text: str) -> list[str]:
    """Lowercase words split at punctuation and whitespace: ``"Don't!"`` -> ``["don", "t"]``."""
    return _WORD.findall(text.lower())


def builtin_refusal(text: str) -> re.Match | None:
    """The first built-in refusal pattern found in ``text``, matched against its lowercase.

    The patterns begin with a literal, not ``\\b``, which lets `re` skip ahead (over ten times
    faster on long texts); whether a match starts a word is checked here instead.
    """
    lowered = text.lower()
    for pattern in _REFUSALS:
        for m in pattern.finditer(lowered):
            if m.start() == 0 or not lowered[m.start() - 1].isalnum():
                return m
    return None


def repetition(text: str, n: int = 3) -> float:
    """The share of the word n-grams of ``text`` that repeat an earlier n-gram of it.

    Words are `normalise`d. A text of fewer than ``n`` words has no n-gram to repeat: 0.0.
    """
    words = normalise(text)
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


class ScoreBound(StrictModel):
    """A numeric column and the lowest value kept: ``{column: judge_score, value: 7}``."""

    column: str
    value: float


class FilterStep(StepBase):
    """Drop rows whose text in ``column`` fails quality checks. Every check is optional.

    The checks run in this order; the first that fails is the drop reason:

    1. ``drop_empty``: the text is blank -> ``empty``.
    2. ``drop_truncated``: the row's last teacher response stopped at its token limit
       (``_kdata.finish_reason == "length"``) -> ``truncated``.
    3. ``min_chars`` / ``max_chars``: characters, surrounding whitespace excluded ->
       ``too_short`` / ``too_long``.
    4. ``min_words`` / ``max_words``: whitespace-separated words -> ``too_short`` / ``too_long``.
    5. ``refusal`` (the built-in `REFUSAL_PATTERNS`, see `builtin_refusal`), then
       ``refusal_patterns`` (your regexes, searched case-insensitively anywhere) -> ``refusal``,
       with the pattern and the matched text.
    6. ``max_repetition``: the `repetition` ratio of ``repetition_ngram``-word n-grams is above
       it -> ``repetition``.
    7. ``max_reasoning_tokens``: the row's reasoning tokens (``_kdata.reasoning_tokens``, as
       the provider counted them, or estimated from the share of characters when a
       ``think_tags`` teacher inlined the trace) are above it -> ``reasoning_too_long``.
    8. ``language_mixing``: in the text or its trace (the ``<column>_reasoning`` column, when
       the row has one), the share of letters outside ``scripts`` is above ``max_share`` ->
       ``language_mixing``, with ``where`` (``text`` or ``reasoning``).
    9. ``answer_agreement``: the trace's final answer differs from the text's (numbers within
       1e-6, anything else as normalised text) -> ``answer_disagrees``, with both answers (a
       row where either states none is kept).
    10. ``min_score``: the score column is below ``value`` -> ``low_score``.

    Drop details hold ``score`` (the measured value), ``threshold`` and, for lengths, ``bound``
    (the field that dropped it). A row whose ``column`` is absent or null fails with
    ``missing_column`` (a Parquet round trip turns an absent key into a null), one whose value is
    not a string with ``not_text``; under ``min_score``, a score that is absent, null or NaN fails
    with ``missing_score`` and one that is not a number with ``bad_score``.
    """

    curates: ClassVar[bool] = True
    kind: ClassVar[str] = "map"
    type: Literal["filter"] = "filter"
    column: str
    drop_empty: bool = False
    drop_truncated: bool = False
    min_chars: int | None = Field(default=None, ge=0)
    max_chars: int | None = Field(default=None, ge=0)
    min_words: int | None = Field(default=None, ge=0)
    max_words: int | None = Field(default=None, ge=0)
    refusal: bool = False
    refusal_patterns: list[str] = []
    max_repetition: float | None = Field(default=None, ge=0, lt=1)
    repetition_ngram: int = Field(default=_REPETITION_NGRAM, ge=1)
    max_reasoning_tokens: int | None = Field(default=None, ge=0)
    language_mixing: ScriptBound | None = None
    answer_agreement: bool = False
    min_score: ScoreBound | None = None

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"refusal pattern {p!r} does not compile: {e}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FilterStep:
        optional = (self.min_chars, self.max_chars, self.min_words, self.max_words)
        optional += (self.max_repetition, self.max_reasoning_tokens, self.language_mixing)
        optional += (self.min_score,)
        flags = (self.drop_empty, self.drop_truncated, self.refusal, self.refusal_patterns)
        flags += (self.answer_agreement,)
        if not any(flags) and all(v is None for v in optional):
            raise ValueError(
                "a filter needs at least one check: drop_empty, drop_truncated, min_chars, "
                "max_chars, min_words, max_words, refusal, refusal_patterns, max_repetition, "
                "max_reasoning_tokens, language_mixing, answer_agreement or min_score"
            )
        for lo, hi in (("min_chars", "max_chars"), ("min_words", "max_words")):
            low, high = getattr(self, lo), getattr(self, hi)
            if low is not None and high is not None and low > high:
                raise ValueError(f"{lo} ({low}) is above {hi} ({high}); no row could pass")
        # A non-default value, not any value given: a recipe dumped with its defaults reloads.
        if self.repetition_ngram != _REPETITION_NGRAM and self.max_repetition is None:
            raise ValueError("repetition_ngram is only used with max_repetition; set both")
        return self

    @functools.cached_property
    def _patterns(self) -> tuple[re.Pattern, ...]:
        # Not a pydantic private attribute: those cost microseconds a read, and a row reads it.
        return tuple(re.compile(p, re.IGNORECASE) for p in self.refusal_patterns)

    @functools.cached_property
    def _traced(self) -> bool:
        """Whether a check of reasoning traces is set (7 to 9 in the class docstring)."""
        mixing = self.language_mixing is not None
        return self.max_reasoning_tokens is not None or mixing or self.answer_agreement

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        out = StepOutput(rows=[], expected=len(rows))
        for row in rows:
            verdict = self.check(row)
            if verdict is None:
                out.rows.append(row)
            elif "reason" in verdict:
                out.dropped.append(verdict)
            else:
                out.failed.append(verdict)
        ctx.advance(len(rows))
        return out

    def run_table(self, block: Block) -> StepOutput | None:
        """A block judged on its ``column`` alone, as `run` would judge its rows, when no check
        set needs more of a row and the column is text without nulls (else None): the kept rows
        a slice of the block's table, the dropped ones alone decoded for their records."""
        if self.drop_truncated or self._traced or self.min_score is not None:
            return None
        texts = block.strings(self.column)
        if texts is None:
            return None
        kept, verdicts = [], {}
        for i, text in enumerate(texts):
            if self.drop_empty and not text.strip():
                verdicts[i] = ("empty", {})
            elif (verdict := self._text(text)) is not None:
                verdicts[i] = verdict
            else:
                kept.append(i)
        rows = block.table.take(pa.array(list(verdicts), pa.int64())).to_pylist()
        drops = [
            dropped(r, why, **detail)
            for r, (why, detail) in zip(rows, verdicts.values(), strict=True)
        ]
        return StepOutput(
            rows=block.table.take(pa.array(kept, pa.int64())), expected=len(texts), dropped=drops
        )

    def check(self, row: dict) -> dict | None:
        """None to keep the row, else its `dropped` or `failure` record."""
        text = row.get(self.column)
        if text is None:
            columns = ", ".join(k for k in row if k != PROVENANCE)
            return failure(
                row,
                "missing_column",
                f"filter: column '{self.column}' is missing or null; the row has: {columns}",
            )
        if not isinstance(text, str):
            return failure(
                row, "not_text", f"filter: column '{self.column}' holds a {type(text).__name__}"
            )
        if self.drop_empty and not text.strip():
            return dropped(row, "empty")
        if self.drop_truncated and row[PROVENANCE].get("finish_reason") == "length":
            return dropped(row, "truncated", finish_reason="length")
        if (verdict := self._text(text)) is not None:
            return dropped(row, verdict[0], **verdict[1])
        if self._traced and (verdict := self._trace(row, text)) is not None:
            return verdict
        if self.min_score is not None:
            return self._score(row, self.min_score)
        return None

    def _text(self, text: str) -> tuple[str, dict[str, Any]] | None:
        """The checks of the text alone (3 to 6 in the class docstring): a drop reason and its
        detail, or None."""
        n_chars, n_words = len(text.strip()), len(text.split())
        for bound, measured in (
            ("min_chars", n_chars),
            ("max_chars", n_chars),
            ("min_words", n_words),
            ("max_words", n_words),
        ):
            limit = getattr(self, bound)
            if limit is None:
                continue
            if bound.startswith("min") and measured < limit:
                return "too_short", {"score": measured, "threshold": limit, "bound": bound}
            if bound.startswith("max") and measured > limit:
                return "too_long", {"score": measured, "threshold": limit, "bound": bound}
        if self.refusal and (m := builtin_refusal(text)):
            return "refusal", {"pattern": m.re.pattern, "match": m.group(0)}
        for pattern in self._patterns:
            if m := pattern.search(text):
                return "refusal", {"pattern": pattern.pattern, "match": m.group(0)}
        if self.max_repetition is not None:
            ratio = repetition(text, self.repetition_ngram)
            if ratio > self.max_repetition:
                detail = {"score": ratio, "threshold": self.max_repetition}
                return "repetition", {**detail, "ngram": self.repetition_ngram}
        return None

    def _trace(self, row: dict, text: str) -> dict | None:
        """The checks of reasoning traces (7 to 9 in the class docstring)."""
        if self.max_reasoning_tokens is not None:
            used = row[PROVENANCE].get("reasoning_tokens") or 0
            if used > self.max_reasoning_tokens:
                return dropped(
                    row, "reasoning_too_long", score=used, threshold=self.max_reasoning_tokens
                )
        trace = row.get(f"{self.column}_reasoning")
        trace = trace if isinstance(trace, str) else None
        if self.language_mixing is not None:
            bound = self.language_mixing
            for where, value in (("text", text), ("reasoning", trace)):
                share = foreign_share(value, bound.scripts) if value else 0.0
                if share > bound.max_share:
                    return dropped(
                        row,
                        "language_mixing",
                        score=round(share, 4),
                        threshold=bound.max_share,
                        scripts=bound.scripts,
                        where=where,
                    )
        if self.answer_agreement and trace and (found := disagreement(trace, text)):
            return dropped(row, "answer_disagrees", trace_answer=found[0], answer=found[1])
        return None

    @staticmethod
    def _score(row: dict, bound: ScoreBound) -> dict | None:
        score = row.get(bound.column)
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return failure(
                row, "missing_score", f"filter: score column '{bound.column}' is missing or null"
            )
        if isinstance(score, bool) or not isinstance(score, int | float):
            error = f"filter: score column '{bound.column}' holds {score!r}, not a number"
            return failure(row, "bad_score", error)
        if score < bound.value:
            return dropped(
                row, "low_score", score=score, threshold=bound.value, column=bound.column
            )
        return None
