"""`decontaminate`: drop rows that overlap a benchmark's items (n-grams or embeddings).

As `filter` does, it records each dropped row with the benchmark item and the overlap behind the
decision, so a threshold can be re-cut from the ``dropped`` parts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
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
from kdata.steps.clusters import COSINE_DECIMALS
from kdata.steps.embedders import STATIC

# Built-in refusal and apology patterns, searched in the lowercased text at word starts. Apologies
# count only at the start of the text ("I'm sorry to hear that" inside a helpful answer is not a
# refusal); refusal phrases count anywhere. "I can't help but..." is an idiom, not a refusal.
from kdata.steps.filters import normalise
from kdata.steps.semantic import MINILM, SemanticDedupStep

_NGRAM = 13  # the default n-gram length (GPT-3's)
_SEMANTIC_THRESHOLD = 0.9  # the default cosine for method: semantic


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

    def gpu(self) -> bool:
        """``method: semantic`` with a sentence-transformers model gains from a GPU (as in
        ``semantic_dedup``, the static model does not)."""
        return self.method == "semantic" and self.model != STATIC

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
