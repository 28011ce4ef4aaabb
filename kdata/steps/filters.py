"""Curation steps that call no teacher: `filter` (quality checks) and `decontaminate`.

Every dropped row is recorded with its reason and the measured value behind the decision (a
length, a ratio, a score, the matched pattern, the benchmark item and the overlap), so a threshold
can be re-cut from the ``dropped`` parts without recomputing anything or asking a teacher again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, PrivateAttr, field_validator, model_validator

from kdata.blocks import Block
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
from kdata.steps.clusters import COSINE_DECIMALS
from kdata.steps.semantic import MINILM, SemanticDedupStep
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
_NGRAM = 13  # decontaminate's default n-gram length (GPT-3's)
_SEMANTIC_THRESHOLD = 0.9  # decontaminate's default cosine for method: semantic


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


def ngram_hashes(text: str, n: int) -> set[int]:
    """Hashes of the distinct word n-grams of `normalise`d ``text``.

    A text of fewer than ``n`` words is one n-gram: its whole normalised text, which only an
    equal short text shares. Hashes are Python's, stable within one process.
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
    """Drop rows that share word n-grams with a benchmark item, or mean nearly the same.

    ``method: ngram`` (the default) finds verbatim copies. Texts are `normalise`d (lowercase words
    split at punctuation and whitespace) and cut into ``ngram``-word n-grams. A row's n-grams are
    those of all its ``columns``, an item's those of all its benchmark columns; an item's text
    shorter than ``ngram`` words counts as one n-gram, present in a row wherever its whole word
    sequence occurs contiguously in one of the row's columns. A row matches an item when they
    share at least ``min_overlap`` n-grams, or all the n-grams of either one when it has fewer
    (an item wholly inside a row always matches, however short). A matched row is dropped as
    ``contaminated`` with the benchmark name, the item id and the overlap of the item it shares
    the most n-grams with (the first such item on ties).

    ``method: semantic`` finds paraphrases, which share no 13-gram (LMSYS, "Rethinking Benchmark
    and Contamination for Language Models with Rephrased Samples", 2023). Each of a row's
    ``columns`` and each item (its benchmark columns joined by a newline) is embedded with
    ``model`` as in ``semantic_dedup`` (the bundled all-MiniLM-L6-v2 by default; a text is cut at
    the model's 256 word pieces), and a row whose column has a cosine of at least ``threshold``
    with its nearest item (faiss, exact) is dropped as ``contaminated`` with the benchmark name,
    the item id and that ``similarity`` (its highest over the columns). The default 0.9 sits
    between GSM8K questions rewritten in other words (0.94 to 0.95) and another problem about
    the same person and theme (0.84), as ``tests/test_filters.py`` measures. Embeddings are
    stored in the run directory as ``semantic_dedup`` stores them.

    A null or absent column is skipped for that row; a column that no row has is an error (a
    typo would check nothing). A value that is not a string fails the row with ``not_text``.
    """

    curates: ClassVar[bool] = True
    kind: ClassVar[str] = "map"
    type: Literal["decontaminate"] = "decontaminate"
    columns: list[str] = Field(min_length=1)
    benchmarks: list[Benchmark] = Field(min_length=1)
    method: Literal["ngram", "semantic"] = "ngram"
    ngram: int = Field(default=_NGRAM, ge=1)
    min_overlap: int = Field(default=1, ge=1)
    threshold: float = Field(default=_SEMANTIC_THRESHOLD, gt=0, le=1)
    model: str = Field(default=MINILM, min_length=1)

    _index: Any = PrivateAttr(default=None)  # (base_dir, _Index) of the last build

    @field_validator("benchmarks")
    @classmethod
    def _unique_names(cls, v: list[Benchmark]) -> list[Benchmark]:
        names = [b.name for b in v]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"benchmark names must differ; used twice: {', '.join(twice)}")
        return v

    @model_validator(mode="after")
    def _method_fields(self) -> DecontaminateStep:
        # Non-default values, not any value given: a recipe dumped with its defaults reloads.
        other = {
            "ngram": {"threshold": _SEMANTIC_THRESHOLD, "model": MINILM},
            "semantic": {"ngram": _NGRAM, "min_overlap": 1},
        }[self.method]
        used = [f for f, default in other.items() if getattr(self, f) != default]
        if used:
            raise ValueError(
                f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} not used by "
                f"method: {self.method}; remove {'it' if len(used) == 1 else 'them'} or change "
                "method (ngram uses ngram and min_overlap, semantic threshold and model)"
            )
        return self

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
            index = _Index(self.ngram, self.min_overlap)
            for b in self.benchmarks:
                index.add(b, base_dir)
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
        out = StepOutput(rows=[], expected=len(rows))
        checked: list[tuple[dict, list[str]]] = []
        for row in rows:
            texts = [(c, row.get(c)) for c in self.columns if row.get(c) is not None]
            bad = [c for c, t in texts if not isinstance(t, str)]
            if bad:
                kinds = ", ".join(f"'{c}' holds a {type(row[c]).__name__}" for c in bad)
                out.failed.append(failure(row, "not_text", f"decontaminate: {kinds}"))
            else:
                checked.append((row, [t for _, t in texts]))
        find = self._semantic if self.method == "semantic" else self._ngram
        for (row, _), hit in zip(checked, find([t for _, t in checked], ctx), strict=True):
            if hit is None:
                out.rows.append(row)
            else:
                out.dropped.append(dropped(row, "contaminated", **hit))
        ctx.advance(len(rows))
        return out

    def _ngram(self, rows: list[list[str]], ctx: StepContext) -> list[dict | None]:
        """Each row's match by shared n-grams (None: none), from the texts of its columns."""
        index = self.index(ctx.base_dir)
        hits = []
        for texts in rows:
            words = [normalise(t) for t in texts]
            grams = set().union(*(index.ngrams(w) for w in words))
            hits.append(index.match(grams, set().union(*(index.short_texts(w) for w in words))))
        return hits

    def _semantic(self, rows: list[list[str]], ctx: StepContext) -> list[dict | None]:
        """Each row's match by the cosine of embeddings (None: none), its columns one by one."""
        items = [
            (b.name, item_id, "\n".join(texts))
            for b in self.benchmarks
            for item_id, texts in _items(b, ctx.base_dir)
            if texts
        ]
        flat = [(i, t) for i, texts in enumerate(rows) for t in texts]
        hits: list[dict | None] = [None] * len(rows)
        if not items or not flat:
            return hits
        encoder = SemanticDedupStep(columns=self.columns, model=self.model)
        cache = Path(ctx.run_dir) / "embeddings" if ctx.run_dir else None
        index = encoder.build_index(
            encoder.embed([t for *_, t in items], cache, base_dir=ctx.base_dir)
        )
        emb = encoder.embed([t for _, t in flat], cache, base_dir=ctx.base_dir)
        sims, nearest = index.search(emb, 1)
        best: dict[int, tuple[float, int]] = {}
        for (i, _), sim, j in zip(
            flat, np.round(sims[:, 0], COSINE_DECIMALS), nearest[:, 0], strict=True
        ):
            if sim >= self.threshold and sim > best.get(i, (-1.0, 0))[0]:
                best[i] = (float(sim), int(j))
        for i, (sim, j) in best.items():
            benchmark, item_id, _ = items[j]
            hits[i] = {"benchmark": benchmark, "item_id": item_id, "similarity": sim}
        return hits


class _Index:
    """Every benchmark item's n-gram hashes, in one dict from hash to the items holding it.

    An item's text shorter than ``n`` words is kept in a word trie instead (`short_items`).
    """

    def __init__(self, n: int, min_overlap: int) -> None:
        self.n, self.min_overlap = n, min_overlap
        self.items: list[tuple[str, Any]] = []  # (benchmark name, item id)
        self.sizes: list[int] = []  # distinct n-grams per item, a short text counting as one
        self.grams: dict[int, int | tuple[int, ...]] = {}  # a tuple only for shared n-grams
        self.trie: dict = {}  # word -> subtrie; key None: (item, text) of short texts ending here

    def add(self, b: Benchmark, base_dir: Path) -> None:
        for item_id, texts in _items(b, base_dir):
            item = len(self.items)
            self.items.append((b.name, item_id))
            words = [normalise(t) for t in texts]
            short = {tuple(w) for w in words if 0 < len(w) < self.n}
            for k, text in enumerate(short):
                node = self.trie
                for w in text:
                    node = node.setdefault(w, {})
                node.setdefault(None, set()).add((item, k))
            grams = set().union(*(self.ngrams(w) for w in words if len(w) >= self.n))
            self.sizes.append(len(grams) + len(short))
            for g in grams:
                prev = self.grams.setdefault(g, item)
                if prev != item:
                    self.grams[g] = (*prev, item) if isinstance(prev, tuple) else (prev, item)

    def ngrams(self, words: list[str]) -> set[int]:
        """Hashes of the distinct n-grams of normalised ``words`` (see `ngram_hashes`)."""
        if len(words) < self.n:
            return {hash(tuple(words))} if words else set()
        return {hash(g) for g in zip(*(words[i:] for i in range(self.n)), strict=False)}

    def short_texts(self, words: list[str]) -> set[tuple[int, int]]:
        """(item, text) of the items' short texts that occur contiguously in ``words``."""
        found: set[tuple[int, int]] = set()
        for start in range(len(words) if self.trie else 0):
            node = self.trie
            for w in words[start : start + self.n - 1]:
                node = node.get(w)
                if node is None:
                    break
                found |= node.get(None, set())
        return found

    def match(self, grams: set[int], short: set[tuple[int, int]]) -> dict[str, Any] | None:
        """``benchmark``, ``item_id`` and ``overlap`` of the matched item sharing the most.

        Args:
            grams: a row's n-gram hashes.
            short: (item, text) of the short item texts found in the row (`short_texts`).
        """
        counts: Counter[int] = Counter(item for item, _ in short)
        for g in self.grams.keys() & grams:
            hit = self.grams[g]
            counts.update((hit,) if isinstance(hit, int) else hit)
        matched = [
            (overlap, -item)
            for item, overlap in counts.items()
            if overlap >= min(self.min_overlap, len(grams), self.sizes[item])
        ]
        if not matched:
            return None
        overlap, neg_item = max(matched)  # the largest overlap, then the first item
        benchmark, item_id = self.items[-neg_item]
        return {"benchmark": benchmark, "item_id": item_id, "overlap": overlap}


def _items(b: Benchmark, base_dir: Path) -> list[tuple[Any, list[str]]]:
    """Each item of a benchmark: its id and the texts of its (non-null) columns."""
    records = _read_records(b, b.resolve(base_dir))
    keys = set().union(*records) if records else set()
    unknown = [c for c in (*b.columns, b.id_column) if c is not None and c not in keys]
    if unknown:
        raise KdataError(
            f"decontaminate: benchmark '{b.name}' has no column "
            f"{', '.join(map(repr, unknown))}; its columns: {', '.join(sorted(keys))}"
        )
    return [
        (
            rec.get(b.id_column) if b.id_column else pos,
            [str(rec[c]) for c in b.columns if rec.get(c) is not None],
        )
        for pos, rec in enumerate(records)
    ]


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
