"""What the dedup steps share: comparable texts, clusters, and stored neighbours.

A dedup step reads the text of one or more columns (`comparable`), orders the texts by its
``keep`` rule (`preference`), and decides per text which kept text it duplicates (`Clusters`,
or only the duplicates, per block: `Drops`), from which `outcome` makes a block's kept and
dropped rows (`Clusters.of` and `Drops.of`: what one block's marking needs). The near-duplicate
steps find every pair of texts at least ``floor`` similar and keep them, with what clustering
needs, as `Neighbours`, stored in the run directory (`neighbours_path`) for re-cutting.

Clustering (`clusters`) splits each connected group of pairs greedily, best first: the best text
left is kept, every text left at least ``threshold`` similar to it is its duplicate, and so on.
It runs in batches (`_split`): one matrix product compares up to `_BATCH` candidate kept texts
with the rest of their group, a chunk at a time, so a group costs about its size times its kept
texts in products, and memory holds the group's vectors and about `_TEMP_BYTES` more. Cosines are
summed in float64 (`similarities`), so a pair's similarity does not depend on the batch. The
vectors of every text in a pair stay in memory with the `Neighbours` (texts x dim x 4 bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from kdata.blocks import Block
from kdata.steps.base import PROVENANCE, StepOutput, dropped, failure, rid

COSINE_DECIMALS = 6  # cosine similarities are rounded, so identical texts are exactly 1.0
# Clustering compares up to _BATCH candidate kept texts with the rest of their group at once,
# the rest a chunk at a time, within about _TEMP_BYTES of temporaries.
_BATCH, _TEMP_BYTES = 256, 16 << 20


def column_texts(
    rows: list[dict], columns: list[str]
) -> tuple[list[int], list[list[str]], list[dict]]:
    """The string values of ``columns`` in each row; rows lacking one become failures."""
    idx, values, failed = [], [], []
    for i, row in enumerate(rows):
        vals, bad = [row.get(c) for c in columns], None
        for c, v in zip(columns, vals, strict=True):  # a plain loop: it runs for every row
            if not isinstance(v, str):
                bad = c
                break
        if bad is None:
            idx.append(i)
            values.append(vals)
        elif row.get(bad) is None:
            why = f"column '{bad}' is missing or null; drop or fill such rows before this step"
            failed.append(failure(row, "missing_column", why))
        else:
            why = f"column '{bad}' holds {type(row[bad]).__name__}, not text"
            failed.append(failure(row, "wrong_type", why))
    return idx, values, failed


def comparable(
    rows: list[dict], columns: list[str], keep: str, score_column: str | None
) -> tuple[list[int], list[str], list[float], list[dict]]:
    """The rows that can be compared, their texts, their scores, and failures.

    Returns ``idx`` (positions in ``rows``), ``texts`` (the columns joined by a newline),
    ``scores`` (``keep: score``; else empty) and ``failed`` (rows lacking a column, or a finite
    number in ``score_column``).
    """
    idx, values, failed = column_texts(rows, columns)
    scores: list[float] = []
    if keep == "score":
        kept_idx, kept_values = [], []
        for i, vals in zip(idx, values, strict=True):
            s = rows[i].get(score_column)
            if s is None:
                why = (
                    f"score column '{score_column}' is missing or null; "
                    "keep: score needs it in every row"
                )
                failed.append(failure(rows[i], "missing_column", why))
            elif isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
                why = f"score column '{score_column}' is {s!r}"
                failed.append(failure(rows[i], "wrong_type", why))
            else:
                kept_idx.append(i)
                kept_values.append(vals)
                scores.append(s)
        idx, values = kept_idx, kept_values
    return idx, ["\n".join(v) for v in values], scores, failed


def block_values(
    block: Block, columns: list[str]
) -> tuple[Sequence[int], Sequence[Sequence[str]], list[dict], pa.Array]:
    """`column_texts` of a block's rows, and the row ids of those with texts. A block whose
    columns are all text without nulls is read column-wise, without its rows' dicts."""
    cols = [block.strings(c) for c in columns]
    if all(c is not None for c in cols):
        return range(len(block)), list(zip(*cols, strict=True)), [], block.ids()
    rows = block.rows()
    idx, values, failed = column_texts(rows, columns)
    return idx, values, failed, pa.array([rid(rows[i]) for i in idx], pa.string())


def block_texts(
    block: Block, columns: list[str], keep: str, score_column: str | None
) -> tuple[Sequence[int], Sequence[str], list[float], list[dict], pa.Array]:
    """`comparable` of a block's rows, and the row ids of its comparable texts (read
    column-wise as `block_values` reads them, unless ``keep`` is ``score``)."""
    cols = [block.strings(c) for c in columns] if keep != "score" else [None]
    if all(c is not None for c in cols):
        texts = cols[0] if len(cols) == 1 else ["\n".join(v) for v in zip(*cols, strict=True)]
        return range(len(block)), texts, [], [], block.ids()
    rows = block.rows()
    idx, texts, scores, failed = comparable(rows, columns, keep, score_column)
    return idx, texts, scores, failed, pa.array([rid(rows[i]) for i in idx], pa.string())


def summary(
    block: Block, columns: list[str], keep: str, score_column: str | None
) -> tuple[np.ndarray, list[float], bytes, pa.Array]:
    """What a near-duplicate step keeps of a block's comparable texts to decide over every
    block: their lengths, scores (``keep: score``), `text_digest`s joined, and row ids."""
    _, texts, scores, _, ids = block_texts(block, columns, keep, score_column)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    return lengths, scores, b"".join(map(text_digest, texts)), ids


def preference(keep: str, lengths: Sequence[int], scores: Sequence[float]) -> np.ndarray:
    """Indices of texts, the one to keep first by ``keep`` first; ties go to the earliest."""
    first = np.arange(len(lengths))
    if keep == "first":
        return first
    if keep == "longest":
        return np.lexsort((first, -np.asarray(lengths, dtype=np.int64)))
    return np.lexsort((first, -np.asarray(scores, dtype=float)))


@dataclass
class Clusters:
    """A dedup step's decision over all its blocks, indexed by comparable text in row order.

    ``offsets[b]``: the index of block ``b``'s first text; ``canonical``: each text's kept
    text (its own index when kept); ``similarity``: to that text; ``ids[b]``: the row ids of
    block ``b``'s texts.
    """

    offsets: np.ndarray
    canonical: np.ndarray
    similarity: np.ndarray
    ids: list[pa.Array]

    def id_of(self, text: int) -> str:
        """The row id of text ``text``."""
        b = int(np.searchsorted(self.offsets, text, side="right")) - 1
        return self.ids[b][text - int(self.offsets[b])].as_py()

    def of(self, block: int) -> Drops:
        """The duplicates of block ``block``, what its marking needs."""
        base = int(self.offsets[block])
        keeper = self.canonical[base : int(self.offsets[block + 1])]
        k = np.flatnonzero(keeper != np.arange(base, base + len(keeper)))
        ids = [self.id_of(int(t)) for t in keeper[k].tolist()]
        return Drops({block: (k, ids, self.similarity[base + k])})


@dataclass
class Drops:
    """A dedup step's duplicates, per block index: ``(k, keepers, similarity)``, the indices of
    its dropped texts among the block's comparable texts (ascending), the row id each
    duplicates and the similarity to it. A block without duplicates may be absent."""

    blocks: dict[int, tuple[np.ndarray, list[str], np.ndarray]]

    def of(self, block: int) -> Drops:
        """The duplicates of block ``block`` alone."""
        return Drops({block: self.blocks[block]} if block in self.blocks else {})


def outcome(
    block: Block, idx: Sequence[int], decision: Clusters | Drops, failed: list[dict]
) -> StepOutput:
    """Kept rows, a slice of the block's table (or its given rows), and dropped duplicates
    naming their kept row; ``idx``: the block's rows with texts."""
    empty = (np.empty(0, np.int64), [], np.empty(0))
    k, keepers, similarity = decision.of(block.index).blocks.get(block.index, empty)
    idx = np.asarray(idx, dtype=np.int64)
    keep = np.ones(len(idx), dtype=bool)
    keep[k] = False
    kept = idx[keep]
    if block.given is None:
        rows: Any = block.table.take(pa.array(kept, type=pa.int64()))
        ids = block.ids()
    else:
        rows = [block.given[i] for i in kept.tolist()]
    out = StepOutput(rows=rows, expected=len(block), failed=failed)
    for i, keeper, sim in zip(idx[k].tolist(), keepers, similarity.tolist(), strict=True):
        detail = {"duplicate_of": keeper, "similarity": float(sim)}
        if block.given is not None:
            out.dropped.append(dropped(block.given[i], "duplicate", **detail))
        else:  # the row is in the step's input parts: its id stands for it
            row = {PROVENANCE: {"id": ids[i].as_py()}}
            out.dropped.append({**dropped(row, "duplicate", **detail), "row": None})
    return out


def offsets(counts: Sequence[int]) -> np.ndarray:
    """The index of each block's first text, from each block's number of texts."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def texts_key(digests: Sequence[bytes]) -> bytes:
    """A key of texts in order, from each text's `text_digest`."""
    return hashlib.sha256(b"".join(digests)).digest()


def text_digest(text: str) -> bytes:
    """A 16-byte hash of one text."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass
class Neighbours:
    """Every pair of texts found at least ``floor`` similar, and what clustering needs of them.

    ``pairs`` (2, m) holds indices of texts, first < second, each pair once, and ``similarity``
    (m,) their similarity; ``members`` are the sorted indices of the texts in a pair, ``vectors``
    their MinHash signatures (``metric`` ``jaccard``) or normalised embeddings (``cosine``). Only
    texts in a pair can share a cluster, so the clusters at any threshold at or above the floor
    follow from these alone.
    """

    n: int
    metric: Literal["jaccard", "cosine"]
    pairs: np.ndarray
    similarity: np.ndarray
    members: np.ndarray
    vectors: np.ndarray

    @classmethod
    def of(
        cls,
        n: int,
        metric: Literal["jaccard", "cosine"],
        pairs: np.ndarray,
        similarity: np.ndarray,
        vectors_of: Callable[[np.ndarray], np.ndarray],
    ) -> Neighbours:
        """Neighbours of ``n`` texts; ``vectors_of(indices)`` gives those texts' vectors."""
        members = np.unique(pairs)
        return cls(n, metric, pairs, similarity, members, vectors_of(members))

    def clusters(self, order: np.ndarray | None, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Cluster at ``threshold`` (at least the floor the pairs were found at).

        Args:
            order: indices of texts, most preferred first (None: input order); the first of a
                cluster in this order is the one kept.
            threshold: the lowest similarity of a duplicate to its kept text.

        Returns:
            ``canonical``: for each text, the index of the text it duplicates, or its own index
            when it is kept; ``similarity``: each text's similarity to its canonical text (1.0
            for kept texts).
        """
        rank = np.empty(self.n, dtype=np.int64)
        rank[np.arange(self.n) if order is None else np.asarray(order)] = np.arange(self.n)
        pairs = self.pairs[:, self.similarity >= threshold]
        return clusters(self.n, pairs, rank, threshold, self.metric, self.vectors_of)

    def vectors_of(self, texts: np.ndarray) -> np.ndarray:
        """The vectors of ``texts`` (members), in that order."""
        return self.vectors[np.searchsorted(self.members, texts)]

    def save(self, path: Path) -> None:
        """Write to ``path`` (.npz), atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            np.savez(
                f,
                n=self.n,
                metric=self.metric,
                pairs=self.pairs,
                similarity=self.similarity,
                members=self.members,
                vectors=self.vectors,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, n: int) -> Neighbours | None:
        """The neighbours stored at ``path`` if they are of ``n`` texts, else None."""
        try:
            with np.load(path) as z:
                found = cls(
                    int(z["n"]),
                    str(z["metric"]),
                    z["pairs"],
                    z["similarity"],
                    z["members"],
                    z["vectors"],
                )
        except (OSError, ValueError, KeyError):  # not there, or unreadable: find them again
            return None
        return found if found.n == n else None


def neighbours_path(run_dir: Path | None, settings: dict, key: bytes) -> Path | None:
    """Where the neighbours of the texts of `texts_key` ``key``, found with ``settings``, are
    stored (None: no run dir)."""
    if run_dir is None:
        return None
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(key)
    return Path(run_dir) / "neighbours" / f"{h.hexdigest()[:32]}.npz"


def check_floor(threshold: float, floor: float) -> None:
    """A near-duplicate step's threshold cannot be below the floor its pairs are found at."""
    if threshold < floor:
        raise ValueError(
            f"threshold ({threshold}) is below floor ({floor}), the lowest similarity whose "
            f"pairs are found and stored; lower floor to at most {threshold}"
        )


def clusters(
    n: int,
    pairs: np.ndarray,
    rank: np.ndarray,
    threshold: float,
    metric: Literal["jaccard", "cosine"],
    vectors_of: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Split the connected groups of ``pairs`` into clusters around their best-ranked items.

    In each group the best-ranked item left is kept and every item left at least ``threshold``
    similar to it is its duplicate (by `similarities`), until none is left (`_split`).
    ``vectors_of(items)`` gives the vectors of ``items`` (all in a pair), asked one group at a
    time.
    """
    members = np.unique(pairs)  # only these can share a cluster: union-find over them alone
    parent = list(range(len(members)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    local = np.searchsorted(members, pairs)
    for i, j in zip(local[0].tolist(), local[1].tolist(), strict=True):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    canonical, similarity = np.arange(n), np.ones(n)
    group = np.array([root(k) for k in range(len(members))], dtype=np.int64)
    by_group = np.lexsort((rank[members], group))  # by group, then best first
    members, group = members[by_group], group[by_group]
    for items in np.split(members, np.flatnonzero(np.diff(group)) + 1):
        keeper, sim = _split(metric, vectors_of(items), threshold)
        canonical[items] = items[keeper]
        similarity[items] = sim
    return canonical, similarity


def similarities(metric: Literal["jaccard", "cosine"], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The similarity of each of the vectors ``a`` to each of ``b``, shape (len(a), len(b)).

    ``jaccard``: the share of equal MinHash values. ``cosine``: the dot product of normalised
    float32 embeddings, summed in float64 and rounded to `COSINE_DECIMALS`, so that it does not
    depend on how the products are batched (float32 sums differ in their last bits).
    """
    if metric == "jaccard":
        return (a[:, None, :] == b[None, :, :]).mean(axis=2)
    dot = a.astype(np.float64) @ b.astype(np.float64).T
    return np.minimum(np.round(dot, COSINE_DECIMALS, out=dot), 1.0, out=dot)


def _split(
    metric: Literal["jaccard", "cosine"], vectors: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """One group's greedy clusters, its ``vectors`` best first: each item's keeper (a position
    in ``vectors``, its own when kept) and its similarity to it.

    Batched: the next `_BATCH` items left are the candidates; those not the duplicate of an
    earlier kept candidate are kept, in order; each other item left becomes the duplicate of the
    first kept candidate it is at least ``threshold`` similar to. The items left are compared a
    chunk at a time (`_rows`), so temporaries stay within about `_TEMP_BYTES`.
    """
    keeper, similarity = np.arange(len(vectors)), np.ones(len(vectors))
    left = np.arange(len(vectors))
    while len(left) > 1:
        cand, rest = left[:_BATCH], left[_BATCH:]
        sim = similarities(metric, vectors[cand], vectors[cand])
        free = np.ones(len(cand), dtype=bool)
        for j in range(len(cand)):
            if free[j]:
                hit = free & (sim[:, j] >= threshold)
                hit[: j + 1] = False
                keeper[cand[hit]], similarity[cand[hit]] = cand[j], sim[hit, j]
                free &= ~hit
        kept = cand[free]
        rows, still = _rows(metric, vectors.shape[1], len(kept)), []
        for at in range(0, len(rest), rows):
            part = rest[at : at + rows]
            sim = similarities(metric, vectors[part], vectors[kept])
            hit = sim >= threshold
            first = hit.argmax(axis=1)  # the first kept candidate each is a duplicate of
            dup = np.flatnonzero(hit[np.arange(len(part)), first])
            keeper[part[dup]], similarity[part[dup]] = kept[first[dup]], sim[dup, first[dup]]
            still.append(np.delete(part, dup))
        left = np.concatenate(still) if still else rest
    return keeper, similarity


def _rows(metric: Literal["jaccard", "cosine"], width: int, kept: int) -> int:
    """How many items to compare with ``kept`` vectors of ``width`` values at once: the
    temporaries of `similarities` (and the items' vectors) within about `_TEMP_BYTES`."""
    # jaccard: the vectors, their equalities; cosine: the vectors in float32 and float64;
    # both: the similarities and the hits
    values = 4 * width + width * kept if metric == "jaccard" else 12 * width
    return max(1, _TEMP_BYTES // (values + 9 * kept))
