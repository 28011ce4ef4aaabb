"""The checks `filter` runs on reasoning traces: their length, the scripts they are written in,
and whether the trace reaches the answer the response gives.

Reasoning models drift into other languages mid-trace (DeepSeek-R1's "language mixing") and
sometimes conclude one thing in the trace and answer another; both make poor training data.
"""

from __future__ import annotations

import functools
import unicodedata

from pydantic import Field, field_validator

from kdata.answers import answers_match, extract_answer
from kdata.steps.base import StrictModel


class ScriptBound(StrictModel):
    """``language_mixing``: the scripts the text should be in and the largest share of letters
    written in any other: ``{scripts: [latin], max_share: 0.01}``.

    A script is the first word of a letter's Unicode name, lowercased: ``latin``, ``cyrillic``,
    ``greek``, ``arabic``, ``hebrew``, ``devanagari``, ``hangul``, ``hiragana``, ``katakana``,
    ``cjk`` (Chinese characters), ``thai``... Digits, punctuation, symbols and spaces count
    for no script.
    """

    scripts: list[str] = Field(min_length=1)
    max_share: float = Field(ge=0, lt=1)

    @field_validator("scripts")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [s.strip().lower() for s in v]


@functools.lru_cache(maxsize=65536)
def script(ch: str) -> str | None:
    """The script of a letter (see `ScriptBound`), ``None`` for anything else."""
    if ch.isascii():
        return "latin" if ch.isalpha() else None
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0].lower() if name else None


def foreign_share(text: str, scripts: list[str]) -> float:
    """The share of ``text``'s letters written in a script outside ``scripts`` (0 when it has
    no letters)."""
    letters = foreign = 0
    allowed = set(scripts)
    for ch in text:
        s = script(ch)
        if s is None:
            continue
        letters += 1
        foreign += s not in allowed
    return foreign / letters if letters else 0.0


def disagreement(trace: str, response: str) -> tuple[str, str] | None:
    """``(trace's answer, response's answer)`` when both state a final answer (see
    `kdata.answers.extract_answer`) and they differ; ``None`` when they agree or either has
    none."""
    a, b = extract_answer(trace), extract_answer(response)
    if a is None or b is None or answers_match(a, b):
        return None
    return a, b
