"""Diversity: how varied the rows are before curation and after, with plots for the dataset card.

A report compares two sets of rows on one text column. *Before* is the rows entering the run's
first curation step (a step that `curates`: filter, dedup, decontaminate), that is the generated
rows; without such a step it is the rows measured. *After* is the final dataset (the report written
at the end of every build, in ``<run_dir>/diversity/``) or the rows reaching a ``diversity`` step
(its report goes to ``<run_dir>/diversity/<step name>/``).

The figures that read texts one by one are measured on one sample per set, drawn once: the rows
with a text whose ids hash lowest (blake2b), at most `SAMPLE` of them, and the first `EMBED_SAMPLE`
of those for the embedding figures. A row sampled before curation is sampled after it wherever it
survived, so the two samples share their rows and embeddings. For each set:

- ``distinct_1``, ``distinct_2``: distinct word unigrams (bigrams) over all unigrams (bigrams) of
  the sampled texts; words as `kdata.steps.filters.normalise` cuts them.
- ``minhash_cluster_share``: the share of sampled texts with a near duplicate among the sampled
  texts, by ``minhash_dedup`` at its defaults (word 3-grams, estimated Jaccard at least 0.7).
- ``mean_cosine_distance``: 1 minus the mean cosine of all pairs of the embedding sample's texts,
  embedded with ``model`` (as in ``semantic_dedup``; default ``static``, the distilled
  all-MiniLM-L6-v2) and looked up first in the run's embedding store (``embeddings/``, where
  ``semantic_dedup`` keeps its own): only texts never embedded are.
- ``kmeans_entropy``: k-means (numpy, k-means++ seeding, seed 0) with k = sqrt(m / 2) clamped to
  2..50, fitted on the m distinct texts of both embedding samples; the entropy of each set's
  cluster occupancy divided by ln k (1: rows spread evenly over the clusters, 0: all in one).
- ``length``: characters per text, over every text of the set: mean, 10th, 50th and 90th
  percentiles, maximum.

A report whose rows are unchanged is not written again; when only the final rows changed (a
``rethreshold``), the generated rows' figures are kept and only k-means is fitted again.
Rows whose column is missing or not a string count in ``rows`` but in no other figure. Without
the ``embed`` extra the two embedding figures and the projection plot are null, with a note.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from kdata.blocks import Block, dataset_files, parts, schema_of, tables_of
from kdata.errors import KdataError
from kdata.steps import diversity_plots as plots
from kdata.steps.base import PROVENANCE, GlobalStep, StepContext, StepOutput, TeacherStep
from kdata.steps.dedup import MinHashDedupStep
from kdata.steps.embedders import missing
from kdata.steps.filters import normalise
from kdata.steps.semantic import DEFAULT_MODEL, SemanticDedupStep

SAMPLE = 10_000  # rows per set for distinct n-grams and MinHash: those whose ids hash lowest
EMBED_SAMPLE = 2_000  # the first of them, embedded for the pairwise distance and k-means
REPORT_DIR = "diversity"
_MINHASH = MinHashDedupStep(columns=["text"])  # its defaults say what a near duplicate is


class DiversityStep(GlobalStep):
    """Measure the rows at this point against the generated rows; they pass through unchanged.

    Writes ``<run_dir>/diversity/<step name>/`` (``report.json`` and three plots). ``column`` is
    the text measured; by default the last text column a teacher step added (if the generated
    rows have it too), else the text column with the longest texts on average. The ``column`` of
    the recipe's last ``diversity`` step that has one is also measured at the end of the build.
    ``model`` embeds the texts, as in ``semantic_dedup`` (default ``static``).

    A global step: the report is made from the step's input parts as `write_report` reads them
    (per-row numbers, and the texts of the sampled rows only), then each block is passed on.
    """

    type: Literal["diversity"] = "diversity"
    column: str | None = None
    model: str = Field(default=DEFAULT_MODEL, min_length=1)

    async def decide(self, blocks: Any, ctx: StepContext) -> None:
        if ctx.run_dir is None:
            raise KdataError(
                f"step {ctx.name}: diversity writes its report into the run directory; "
                "run it with kdata.build"
            )
        run_dir = Path(ctx.run_dir)
        steps = _manifest_steps(run_dir, ctx.name)
        paths = parts(run_dir / "steps" / steps[-1]["name"]) if steps else []
        await asyncio.to_thread(
            write_report, run_dir, paths, self.column, until=ctx.name, model=self.model
        )

    def mark(self, block: Block, decision: None) -> StepOutput:
        rows = block.table if block.given is None else block.given
        return StepOutput(rows=rows, expected=len(block))


def final_report(recipe: Any, run_dir: Path) -> dict:
    """The report on a build's final rows (the shards of ``<run_dir>/data``), in
    ``<run_dir>/diversity/``."""
    column = next(
        (s.column for s in reversed(recipe.steps) if isinstance(s, DiversityStep) and s.column),
        None,
    )
    return write_report(run_dir, dataset_files(run_dir), column, model=recipe.report.model)


def write_report(
    run_dir: Path,
    paths: list[Path],
    column: str | None,
    until: str | None = None,
    model: str = DEFAULT_MODEL,
) -> dict:
    """Measure the rows of the Parquet files ``paths`` against the generated rows of the run and
    write report and plots.

    Both sets are read a row group at a time, in passes (`_Side`): what is held of them is a
    few numbers per row (an id hash, a length) and the texts of the sampled rows.

    Args:
        run_dir: the run directory; its ``manifest.json`` and finished steps are read.
        paths: the Parquet files of the rows to measure ("after"), in order.
        column: the text column (None: the default described in `DiversityStep`).
        until: the name of the ``diversity`` step writing the report (None: the final report);
            only the steps before it count.
        model: the embedding model, as ``semantic_dedup``'s ``model``.

    Returns:
        The report, as written to ``report.json``. A report whose steps, column and rows have
        not changed since it was written is not computed again; one whose generated rows and
        column have not changed keeps their figures, except k-means, fitted on both sides.
    """
    from kdata.recipe import STEP_TYPES

    steps = _manifest_steps(run_dir, until)
    out = Path(REPORT_DIR) / until if until else Path(REPORT_DIR)
    after = _Side.of(paths)
    source = {
        "fingerprint": steps[-1]["fingerprint"] if steps else None,
        "column": column,
        "rows": after.digest,
        "model": model,
    }
    old = _read_json(run_dir / out / "report.json") or {}
    if old.get("source") == source:
        return old

    kinds = [STEP_TYPES[s["type"]] for s in steps]
    first = next((i for i, k in enumerate(kinds) if k.curates), len(steps))
    curation = steps[first:]
    if not curation:
        before = after
    elif first == 0:
        before = _Side.of([])
    else:
        before = _Side.of(parts(run_dir / "steps" / steps[first - 1]["name"]))
    if column is None:
        column = _default_column(run_dir, steps, kinds, after, before)
    elif (after.n or before.n) and column not in after.columns | before.columns:
        raise KdataError(
            f"diversity: no row has column '{column}'; "
            f"text columns: {', '.join(after.text_columns) or '(none)'}"
        )
    notes: list[str] = []
    if column is not None and before.n and column not in before.columns:
        notes.append(f"the generated rows have no column '{column}'")
    b_lengths, a_lengths = before.lengths(column), after.lengths(column)
    (b_sample, b_embed), (a_sample, a_embed) = (
        _sample(before.keys, b_lengths >= 0, notes, "generated"),
        _sample(after.keys, a_lengths >= 0, notes, "final" if until is None else "measured"),
    )
    b_texts, a_texts = before.texts(column, b_sample), after.texts(column, a_sample)
    before_source = {"column": column, "rows": before.digest}
    report: dict[str, Any] = {
        "text_column": column,
        "before": (
            old["before"]
            if old.get("before_source") == before_source
            else _measure(b_lengths, b_texts)
        ),
        "after": _measure(a_lengths, a_texts),
        "waterfall": [_waterfall_entry(run_dir, s) for s in curation],
    }
    (run_dir / out).mkdir(parents=True, exist_ok=True)
    projection, k = None, None
    b_embed_texts = [b_texts[i] for i in np.searchsorted(b_sample, b_embed)]
    a_embed_texts = [a_texts[i] for i in np.searchsorted(a_sample, a_embed)]
    embedded = _embed(run_dir, b_embed_texts, a_embed_texts, notes, model)
    if embedded is not None:
        b_emb, a_emb, pooled = embedded
        labels, k = _kmeans_labels(pooled, [b_emb, a_emb])
        for key, emb, lab in (("before", b_emb, labels[0]), ("after", a_emb, labels[1])):
            report[key]["mean_cosine_distance"] = _mean_cosine_distance(emb)
            report[key]["kmeans_entropy"] = _entropy(lab, k) if lab is not None else None
        if len(b_embed) >= 2:
            alive = _survivors(run_dir, curation, after.keys)
            kept = _among(before.keys[b_embed], alive)
            projection = plots.plot_projection(run_dir, out, b_emb, kept, column)
    report["plots"] = {
        "projection": projection,
        "lengths": plots.plot_lengths(run_dir, out, b_lengths, a_lengths, column),
        "waterfall": plots.plot_waterfall(run_dir, out, before.n, report["waterfall"], after.n),
    }
    report["settings"] = {
        "sample": SAMPLE,
        "embed_sample": EMBED_SAMPLE,
        "embedding_model": model,
        "kmeans_k": k,
        "minhash": _MINHASH.model_dump(include={"shingle", "ngram", "threshold"}),
        "length_unit": "characters",
    }
    report["notes"] = notes
    report["source"] = source
    report["before_source"] = before_source
    _write_json(run_dir / out / "report.json", report)
    return report


def _manifest_steps(run_dir: Path, until: str | None) -> list[dict]:
    """The steps of the run's manifest; those before step ``until`` only, when given."""
    steps = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))["steps"]
    if until is not None:
        steps = steps[: [s["name"] for s in steps].index(until)]
    return steps


def remove_final_report(run_dir: Path) -> None:
    """Remove the end-of-build report and its plots, so that no card shows stale figures."""
    path = run_dir / REPORT_DIR / "report.json"
    report = _read_json(path) or {}
    for rel in (report.get("plots") or {}).values():
        if isinstance(rel, str) and "/" in rel and Path(rel).parent == Path(REPORT_DIR):
            (run_dir / rel).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


_ID = f"{PROVENANCE}.id"


@dataclass
class _Side:
    """One side of a report: rows in Parquet files, read in passes a row group at a time.

    What `of` keeps is per row an 8-byte hash of its id (``keys``: the sample's order), and per
    text column its total length and count (the default column's mean); a column's lengths
    (`lengths`) and the texts of sampled rows (`texts`) are read by passes of their own.
    """

    paths: list[Path]
    n: int
    digest: str  # of the rows' ids, in order
    keys: np.ndarray  # uint64, per row: blake2b of its id (`_keys`)
    columns: set[str]
    text_columns: list[str]  # string columns, in the order first seen
    text_length: dict[str, tuple[int, int]]  # per text column: characters, texts

    @classmethod
    def of(cls, paths: list[Path]) -> _Side:
        """A side's ids and text columns, from one pass over ``paths``."""
        columns: set[str] = set()
        strings: dict[str, None] = {}
        for p in paths:
            schema = pq.read_schema(p)
            columns.update(schema.names)
            strings.update((f.name, None) for f in schema if _is_text(f.type))
        h, keys, n = hashlib.sha256(), [], 0
        length = dict.fromkeys(strings, (0, 0))
        for t in tables_of(paths, [_ID, *strings]):
            if PROVENANCE in t.column_names and t.num_rows:
                ids = t.column(PROVENANCE).combine_chunks().field("id").to_pylist()
                h.update(("\n" if n else "").encode() + "\n".join(ids).encode())
                keys.append(_keys(ids))
                n += len(ids)
            for c in t.column_names:
                if c in length and _is_text(t.schema.field(c).type):
                    col = t.column(c)
                    chars = pc.sum(pc.utf8_length(col)).as_py() or 0
                    total, count = length[c]
                    length[c] = (total + chars, count + len(col) - col.null_count)
        return cls(
            paths=paths,
            n=n,
            digest=h.hexdigest()[:16],
            keys=np.concatenate(keys) if keys else np.empty(0, np.uint64),
            columns=columns,
            text_columns=list(strings),
            text_length=length,
        )

    def lengths(self, column: str | None) -> np.ndarray:
        """Characters of each row's text in ``column``; -1 where it has none."""
        out = []
        for t in self._tables(column):
            if column in t.column_names and _is_text(t.schema.field(column).type):
                lengths = pc.fill_null(pc.utf8_length(t.column(column)), -1)
                out.append(lengths.to_numpy().astype(np.int64))
            else:
                out.append(np.full(t.num_rows, -1, np.int64))
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def texts(self, column: str | None, rows: np.ndarray) -> list[str]:
        """The texts in ``column`` of the rows at the sorted indices ``rows`` (all have one)."""
        out: list[str] = []
        start = 0
        for t in self._tables(column):
            lo, hi = np.searchsorted(rows, [start, start + t.num_rows])
            if hi > lo:
                at = pa.array(rows[lo:hi] - start, pa.int64())
                out += t.column(column).take(at).to_pylist()
            start += t.num_rows
        return out

    def _tables(self, column: str | None):
        """The files' row groups, column ``column`` only (the row ids when None: the rows are
        counted)."""
        return tables_of(self.paths, [column] if column is not None else [_ID])


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _keys(ids: list[str]) -> np.ndarray:
    """Each id's 8-byte blake2b hash, as a number: the order rows are sampled in."""
    digest = b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(digest, dtype=">u8").astype(np.uint64)


def _sample(
    keys: np.ndarray, present: np.ndarray, notes: list[str], side: str
) -> tuple[np.ndarray, np.ndarray]:
    """The rows measured on a sample: at most `SAMPLE` and `EMBED_SAMPLE` rows with a text.

    Both are the rows whose ids hash lowest (``keys``), so the embedding sample lies inside the
    other, and a row sampled on one side is sampled on the other wherever it is still there:
    rows a curation step kept keep their embeddings. ``present``: the rows with a text.
    Indices in row order.
    """
    present = np.flatnonzero(present)
    order = np.arange(len(present))
    if len(present) > EMBED_SAMPLE:
        order = np.argsort(keys[present], kind="stable")
    for size, what in (
        (SAMPLE, "distinct n-grams and MinHash"),
        (EMBED_SAMPLE, "pairwise cosine distance and k-means"),
    ):
        if len(present) > size:
            notes.append(f"{side} rows: {what} over a sample of {size:,} of {len(present):,} texts")
    return np.sort(present[order[:SAMPLE]]), np.sort(present[order[:EMBED_SAMPLE]])


def _waterfall_entry(run_dir: Path, step: dict) -> dict[str, Any]:
    st = _read_json(run_dir / "steps" / step["name"] / "stats.json") or {}
    return {
        "step": step["name"],
        "type": step["type"],
        "rows_in": st.get("rows_in", 0),
        "rows_out": st.get("rows_out", 0),
        "dropped": st.get("drop_reasons", {}),
        "failed": st.get("failed", 0),
    }


def _default_column(
    run_dir: Path, steps: list[dict], kinds: list, after: _Side, before: _Side
) -> str | None:
    """The last text column a teacher step added, else the longest text column on average.

    Only columns the measured rows have, and the generated rows too when any has one, count.
    """
    generated = before.text_columns
    both = [c for c in after.text_columns if c in generated] or after.text_columns or generated
    for i in range(len(steps) - 1, 0, -1):
        if issubclass(kinds[i], TeacherStep):
            new = _columns(run_dir, steps[i]) - _columns(run_dir, steps[i - 1])
            added = [c for c in both if c in new]
            if added:
                return added[-1]

    def mean_length(c: str) -> float:
        sides = [side.text_length.get(c, (0, 0)) for side in (after, before)]
        return sum(s[0] for s in sides) / sum(s[1] for s in sides)

    return max(both, key=mean_length, default=None)


def _columns(run_dir: Path, step: dict) -> set[str]:
    return set(schema_of(run_dir / "steps" / step["name"]).names)


def _measure(lengths: np.ndarray, sampled: list[str]) -> dict[str, Any]:
    """The figures that need no embedding (distinct n-grams and MinHash over the ``sampled``
    texts; lengths over every text: ``lengths``, -1 for a row without one); the embedding ones
    start as None."""
    unigrams = bigrams = 0
    distinct1: set[str] = set()
    distinct2: set[tuple[str, str]] = set()
    for t in sampled:
        words = normalise(t)
        unigrams += len(words)
        bigrams += max(len(words) - 1, 0)
        distinct1.update(words)
        distinct2.update(zip(words, words[1:], strict=False))
    share = None
    if sampled:
        canonical, _ = _MINHASH.find(sampled)
        own = np.arange(len(sampled))
        clustered = (canonical != own) | np.isin(own, canonical[canonical != own])
        share = _round(clustered.mean())
    present = lengths[lengths >= 0].astype(float)
    length = dict.fromkeys(("mean", "p10", "p50", "p90", "max"))
    if len(present):
        p10, p50, p90 = np.percentile(present, [10, 50, 90])
        length = {
            "mean": _round(present.mean()),
            "p10": _round(p10),
            "p50": _round(p50),
            "p90": _round(p90),
            "max": int(present.max()),
        }
    return {
        "rows": len(lengths),
        "distinct_1": _round(len(distinct1) / unigrams) if unigrams else None,
        "distinct_2": _round(len(distinct2) / bigrams) if bigrams else None,
        "minhash_cluster_share": share,
        "mean_cosine_distance": None,
        "kmeans_entropy": None,
        "length": length,
    }


def _embed(
    run_dir: Path, before: list[str], after: list[str], notes: list[str], model: str
) -> tuple | None:
    """Embeddings of each side's embedding sample (its texts), and of their distinct texts.

    They come from the run's embedding store (``embeddings/``, shared with ``semantic_dedup``);
    only texts never embedded before are. None when neither sample has a text, or (with a note)
    when the ``embed`` extra is missing.
    """
    absent = missing(model)
    if absent:
        notes.append(
            f"embedding figures are null: {', '.join(absent)} not installed "
            "(pip install 'kdata[embed]')"
        )
        return None
    if not before and not after:
        return None
    distinct = list(dict.fromkeys(before + after))
    emb = SemanticDedupStep(columns=["text"], model=model).embed(distinct, run_dir / "embeddings")
    where = {t: i for i, t in enumerate(distinct)}
    b_emb, a_emb = (
        emb[[where[t] for t in side]].reshape(len(side), emb.shape[1]) for side in (before, after)
    )
    return b_emb, a_emb, emb


def _mean_cosine_distance(emb: np.ndarray) -> float | None:
    """1 minus the mean cosine over all pairs of rows (normalised embeddings): O(n), no n x n."""
    n = len(emb)
    if n < 2:
        return None
    total = emb.sum(axis=0, dtype=np.float64)
    pairs_sum = (total @ total - (emb.astype(np.float64) ** 2).sum()) / 2
    return _round(1 - pairs_sum / (n * (n - 1) / 2))


def _kmeans_labels(
    pooled: np.ndarray, sets: list[np.ndarray], iterations: int = 50
) -> tuple[list[np.ndarray | None], int]:
    """Fit k-means on ``pooled``; the cluster of each row of each set (None: too few texts)."""
    k = min(50, max(2, round(math.sqrt(len(pooled) / 2))))
    if len(pooled) <= k:
        return [None] * len(sets), k
    x = pooled.astype(np.float64)
    rng = np.random.default_rng(0)
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):  # k-means++: far points are likelier centres
        p = d2 / d2.sum() if d2.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=p)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(axis=1))
    c = np.array(centres)
    for _ in range(iterations):
        lab = _nearest(x, c)
        moved = np.array([x[lab == j].mean(axis=0) if (lab == j).any() else c[j] for j in range(k)])
        if np.allclose(moved, c):
            break
        c = moved
    return [_nearest(s.astype(np.float64), c) if len(s) else None for s in sets], k


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.argmin((c**2).sum(axis=1) - 2 * x @ c.T, axis=1)


def _entropy(labels: np.ndarray, k: int) -> float:
    p = np.bincount(labels, minlength=k) / len(labels)
    p = p[p > 0]
    return _round(float(-(p * np.log(p)).sum() / math.log(k)))


def _among(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Whether each of ``keys`` is one of ``sorted_keys`` (sorted, unique): a binary search each,
    which, unlike `np.isin`, does not sort ``sorted_keys`` again on every call."""
    at = np.minimum(np.searchsorted(sorted_keys, keys), max(len(sorted_keys) - 1, 0))
    return sorted_keys[at] == keys if len(sorted_keys) else np.zeros(len(keys), bool)


def _survivors(run_dir: Path, steps: list[dict], final: np.ndarray) -> np.ndarray:
    """The `_keys` of the final rows' ids (``final``) and of their ancestors' through ``steps``
    (their parent ids), sorted; each step's ids read a row group at a time."""
    alive = np.unique(final)
    for s in reversed(steps):
        found = []
        for t in tables_of(parts(run_dir / "steps" / s["name"]), [_ID, f"{PROVENANCE}.parent_ids"]):
            if PROVENANCE not in t.column_names:  # a step that kept no row
                continue
            prov = t.column(PROVENANCE).combine_chunks()
            hit = _among(_keys(prov.field("id").to_pylist()), alive)
            parents = prov.field("parent_ids").filter(pa.array(hit)).flatten()
            found.append(_keys(parents.drop_null().to_pylist()))
        alive = np.union1d(alive, np.concatenate(found)) if found else alive
    return alive


def _round(x: float) -> float:
    return round(float(x), 4)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
