"""Curation steps that call no teacher: `filter` (quality checks) and `decontaminate`.

Every dropped row is recorded with its reason and the measured value behind the decision (a
length, a ratio, a score, the matched pattern, the benchmark item and the overlap), so a threshold
can be re-cut from the ``dropped`` parts without recomputing anything or asking a teacher again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from kdata.errors import KdataError
from kdata.steps.base import (
    PROVENANCE,
    StepBase,
    StepContext,
    StepOutput,
    StrictModel,
    dropped,
    failure,
)

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
    7. ``min_score``: the score column is below ``value`` -> ``low_score``.

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
    min_score: ScoreBound | None = None

    _patterns: tuple[re.Pattern, ...] = PrivateAttr(default=())

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
        optional += (self.max_repetition, self.min_score)
        flags = (self.drop_empty, self.drop_truncated, self.refusal, self.refusal_patterns)
        if not any(flags) and all(v is None for v in optional):
            raise ValueError(
                "a filter needs at least one check: drop_empty, drop_truncated, min_chars, "
                "max_chars, min_words, max_words, refusal, refusal_patterns, max_repetition "
                "or min_score"
            )
        for lo, hi in (("min_chars", "max_chars"), ("min_words", "max_words")):
            low, high = getattr(self, lo), getattr(self, hi)
            if low is not None and high is not None and low > high:
                raise ValueError(f"{lo} ({low}) is above {hi} ({high}); no row could pass")
        # A non-default value, not any value given: a recipe dumped with its defaults reloads.
        if self.repetition_ngram != _REPETITION_NGRAM and self.max_repetition is None:
            raise ValueError("repetition_ngram is only used with max_repetition; set both")
        return self

    def model_post_init(self, context: Any) -> None:
        self._patterns = tuple(re.compile(p, re.IGNORECASE) for p in self.refusal_patterns)

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
        stripped = text.strip()
        if self.drop_empty and not stripped:
            return dropped(row, "empty")
        if self.drop_truncated and row[PROVENANCE].get("finish_reason") == "length":
            return dropped(row, "truncated", finish_reason="length")
        n_chars, n_words = len(stripped), len(text.split())
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
                return dropped(row, "too_short", score=measured, threshold=limit, bound=bound)
            if bound.startswith("max") and measured > limit:
                return dropped(row, "too_long", score=measured, threshold=limit, bound=bound)
        if self.refusal and (m := builtin_refusal(text)):
            return dropped(row, "refusal", pattern=m.re.pattern, match=m.group(0))
        for pattern in self._patterns:
            if m := pattern.search(text):
                return dropped(row, "refusal", pattern=pattern.pattern, match=m.group(0))
        if self.max_repetition is not None:
            ratio = repetition(text, self.repetition_ngram)
            if ratio > self.max_repetition:
                return dropped(
                    row,
                    "repetition",
                    score=ratio,
                    threshold=self.max_repetition,
                    ngram=self.repetition_ngram,
                )
        if self.min_score is not None:
            return self._score(row, self.min_score)
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


def ngram_hashes(text: str, n: int) -> set[int]:
    """Hashes of the distinct word n-grams of `normalise`d ``text``.

    A text of fewer than ``n`` words is one n-gram: its whole normalised text. So a short text
    only matches an equal short text. Hashes are Python's, stable within one process.
    """
    words = normalise(text)
    if len(words) < n:
        return {hash(tuple(words))} if words else set()
    return {hash(g) for g in zip(*(words[i:] for i in range(n)), strict=False)}


class Benchmark(StrictModel):
    """A benchmark file whose items must not leak into the dataset.

    ``path`` (jsonl, json, csv or parquet) is relative to the recipe's folder. ``columns`` hold
    the item's text; ``id_column`` its id (by default its 0-based record position in the file).
    """

    name: str = Field(min_length=1)
    path: str
    columns: list[str] = Field(min_length=1)
    id_column: str | None = None

    def resolve(self, base_dir: Path) -> Path:
        """The benchmark file on disk."""
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else base_dir / p


class DecontaminateStep(StepBase):
    """Drop rows that share word n-grams with a benchmark item.

    Texts are `normalise`d (lowercase words split at punctuation and whitespace) and cut into
    ``ngram``-word n-grams (see `ngram_hashes` for texts shorter than that). A row's n-grams are
    those of all its ``columns``, an item's those of all its benchmark columns. A row matches an
    item when they share at least ``min_overlap`` n-grams, or all the n-grams of either one when
    it has fewer (an item wholly inside a row always matches). A matched row is dropped as
    ``contaminated`` with the benchmark name, the item id and the overlap of the item it shares
    the most n-grams with (the first such item on ties).

    A null or absent column is skipped for that row; a column that no row has is an error (a
    typo would check nothing). A value that is not a string fails the row with ``not_text``.
    """

    curates: ClassVar[bool] = True
    kind: ClassVar[str] = "map"
    type: Literal["decontaminate"] = "decontaminate"
    columns: list[str] = Field(min_length=1)
    benchmarks: list[Benchmark] = Field(min_length=1)
    ngram: int = Field(default=13, ge=1)
    min_overlap: int = Field(default=1, ge=1)

    _index: Any = PrivateAttr(default=None)  # (base_dir, _Index) of the last build

    @field_validator("benchmarks")
    @classmethod
    def _unique_names(cls, v: list[Benchmark]) -> list[Benchmark]:
        names = [b.name for b in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"benchmark names must differ; used twice: {', '.join(twice)}")
        return v

    def inputs_digest(self, base_dir: Path) -> str:
        """A hash of the benchmark files, so editing one reruns the step."""
        h = hashlib.sha256()
        for b in self.benchmarks:
            p = b.resolve(base_dir)
            h.update(b.name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"<missing>"))
        return h.hexdigest()

    def index(self, base_dir: Path) -> _Index:
        """The benchmarks' n-grams, read once per step (the step runs block by block)."""
        if self._index is None or self._index[0] != base_dir:
            index = _Index()
            for b in self.benchmarks:
                index.add(b, base_dir, self.ngram)
            self._index = (base_dir, index)
        return self._index[1]

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        absent = [c for c in self.columns if rows and not any(c in r for r in rows)]
        if absent:
            have = sorted({k for r in rows for k in r if k != PROVENANCE})
            raise KdataError(
                f"decontaminate: no row has column {', '.join(map(repr, absent))}; "
                f"the rows have: {', '.join(have)}"
            )
        index = self.index(ctx.base_dir)
        out = StepOutput(rows=[], expected=len(rows))
        for row in rows:
            texts = [(c, row.get(c)) for c in self.columns if row.get(c) is not None]
            bad = [c for c, t in texts if not isinstance(t, str)]
            if bad:
                kinds = ", ".join(f"'{c}' holds a {type(row[c]).__name__}" for c in bad)
                out.failed.append(failure(row, "not_text", f"decontaminate: {kinds}"))
                continue
            grams = set().union(*(ngram_hashes(t, self.ngram) for _, t in texts))
            hit = index.match(grams, self.min_overlap)
            if hit is None:
                out.rows.append(row)
            else:
                out.dropped.append(dropped(row, "contaminated", **hit))
        ctx.advance(len(rows))
        return out


class _Index:
    """Every benchmark item's n-gram hashes, in one dict from hash to the items holding it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []  # (benchmark name, item id)
        self.sizes: list[int] = []  # distinct n-grams per item
        self.grams: dict[int, int | tuple[int, ...]] = {}  # a tuple only for shared n-grams

    def add(self, b: Benchmark, base_dir: Path, n: int) -> None:
        records = _read_records(b, b.resolve(base_dir))
        keys = set().union(*records) if records else set()
        unknown = [c for c in (*b.columns, b.id_column) if c is not None and c not in keys]
        if unknown:
            raise KdataError(
                f"decontaminate: benchmark '{b.name}' has no column "
                f"{', '.join(map(repr, unknown))}; its columns: {', '.join(sorted(keys))}"
            )
        for pos, rec in enumerate(records):
            texts = [str(rec[c]) for c in b.columns if rec.get(c) is not None]
            grams = set().union(*(ngram_hashes(t, n) for t in texts))
            item = len(self.items)
            self.items.append((b.name, rec.get(b.id_column) if b.id_column else pos))
            self.sizes.append(len(grams))
            for g in grams:
                prev = self.grams.setdefault(g, item)
                if prev != item:
                    self.grams[g] = (*prev, item) if isinstance(prev, tuple) else (prev, item)

    def match(self, grams: set[int], min_overlap: int) -> dict[str, Any] | None:
        """``benchmark``, ``item_id`` and ``overlap`` of the matched item sharing the most."""
        counts: Counter[int] = Counter()
        for g in self.grams.keys() & grams:
            hit = self.grams[g]
            counts.update((hit,) if isinstance(hit, int) else hit)
        matched = [
            (overlap, -item)
            for item, overlap in counts.items()
            if overlap >= min(min_overlap, len(grams), self.sizes[item])
        ]
        if not matched:
            return None
        overlap, neg_item = max(matched)  # the largest overlap, then the first item
        benchmark, item_id = self.items[-neg_item]
        return {"benchmark": benchmark, "item_id": item_id, "overlap": overlap}


def _read_records(b: Benchmark, p: Path) -> list[dict]:
    """A benchmark file's records (jsonl, json, csv or parquet)."""
    if not p.is_file():
        raise KdataError(f"decontaminate: benchmark '{b.name}': no such file: {p}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise KdataError(f"decontaminate: {p.name}, line {i + 1}: {e}") from None
    elif suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} or a single record, as seeds read it
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        records = data
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        df = pd.read_csv(p) if suffix == ".csv" else pd.read_parquet(p)
        records = df.astype(object).where(df.notna(), None).to_dict(orient="records")
    else:
        raise KdataError(
            f"decontaminate: benchmark '{b.name}': cannot read {p.name}; "
            "use a .jsonl, .json, .csv or .parquet file"
        )
    if not all(isinstance(r, dict) for r in records):
        raise KdataError(f"decontaminate: {p.name} holds items that are not JSON objects")
    return records
