"""Duplicate removal: exact (hash of normalised text) and near-duplicate (MinHash and LSH).

Both steps read the text of one or more columns. A row whose column is missing or null fails with
error class ``missing_column``; one whose column holds something other than a string fails with
``wrong_type``. Such rows are never passed through unchecked, nor grouped with one another.

Every dropped row is recorded with reason ``duplicate`` and the detail
``{"duplicate_of": <id of the kept row>, "similarity": <0..1>}``; ``duplicate_of`` always names a
row that the step kept.

The near-duplicate steps (``minhash_dedup`` here, ``semantic_dedup``) find every pair of rows at
least ``floor`` similar, whatever their ``threshold``, and keep them with what clustering needs
(`Neighbours`). In a run directory these are stored in ``neighbours/<hash>.npz``, keyed by the
texts and the settings that find pairs (not ``threshold`` or ``keep``); a step that meets its
stored neighbours again re-cuts them without hashing or embedding anything. That is how
``kdata rethreshold`` works, and why a threshold below ``floor`` cannot be re-cut.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from kdata.steps.base import StepBase, StepContext, StepOutput, dropped, failure, rid

_PUNCTUATION = re.compile(r"[^\w\s]")
_WORD = re.compile(r"\w+")
# Shingle hashing: an n-gram of 64-bit token hashes is folded with _FOLD, then mixed by the
# splitmix64 finaliser; its high 32 bits are the shingle's hash.
_FOLD = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_CHUNK = 1 << 20  # signature values computed per numpy pass: bounds memory, fits in cache
_WINDOW = 16  # in an LSH bucket, each row is compared with at most this many rows before it
_LSH_RECALL = 0.99  # chance that a pair exactly at the floor shares at least one band
COSINE_DECIMALS = 6  # cosine similarities are rounded, so identical texts are exactly 1.0


def _texts(rows: list[dict], columns: list[str]) -> tuple[list[int], list[list[str]], list[dict]]:
    """The string values of ``columns`` in each row; rows lacking one become failures."""
    idx, values, failed = [], [], []
    for i, row in enumerate(rows):
        vals = [row.get(c) for c in columns]
        bad = next((c for c, v in zip(columns, vals, strict=True) if not isinstance(v, str)), None)
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


def ranked_texts(
    rows: list[dict], columns: list[str], keep: str, score_column: str | None
) -> tuple[list[int], list[str], np.ndarray, list[dict]]:
    """The rows that can be compared, their texts, their order of preference, and failures.

    Returns ``idx`` (positions in ``rows``), ``texts`` (the columns joined by a newline),
    ``order`` (indices of ``texts``, the one to keep first by ``keep``; ties go to the earliest)
    and ``failed`` (rows lacking a column, or a finite number in ``score_column``).
    """
    idx, values, failed = _texts(rows, columns)
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
    texts = ["\n".join(v) for v in values]
    first = np.arange(len(texts))
    if keep == "first":
        order = first
    elif keep == "longest":
        order = np.lexsort((first, [-len(t) for t in texts]))
    else:
        order = np.lexsort((first, -np.array(scores, dtype=float)))
    return idx, texts, order, failed


def outcome(
    rows: list[dict],
    idx: list[int],
    canonical: np.ndarray,
    similarity: np.ndarray,
    failed: list[dict],
) -> StepOutput:
    """Kept rows (their own canonical) and dropped duplicates naming their kept row."""
    out = StepOutput(rows=[], expected=len(rows), failed=failed)
    for k, i in enumerate(idx):
        if canonical[k] == k:
            out.rows.append(rows[i])
            continue
        keeper, sim = rid(rows[idx[canonical[k]]]), float(similarity[k])
        out.dropped.append(dropped(rows[i], "duplicate", duplicate_of=keeper, similarity=sim))
    return out


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

    def similar(self, best: int, rest: np.ndarray) -> np.ndarray:
        """The similarity of text ``best`` to each of the texts ``rest`` (all members)."""
        b = self.vectors[np.searchsorted(self.members, best)]
        v = self.vectors[np.searchsorted(self.members, rest)]
        if self.metric == "jaccard":
            return (v == b).mean(axis=1)
        return np.minimum(np.round(v @ b, COSINE_DECIMALS), 1.0)

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
        return clusters(self.n, pairs, rank, threshold, self.similar)

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


def neighbours_path(run_dir: Path | None, settings: dict, texts: Sequence[str]) -> Path | None:
    """Where the neighbours of ``texts`` found with ``settings`` are stored (None: no run dir)."""
    if run_dir is None:
        return None
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(list(texts), ensure_ascii=False).encode())
    return Path(run_dir) / "neighbours" / f"{h.hexdigest()[:32]}.npz"


def stored(
    path: Path | None, n: int, find: Callable[[], Neighbours], advance: Callable[[int], None]
) -> Neighbours:
    """The neighbours of ``n`` texts stored at ``path``; else ``find()``, stored there."""
    graph = Neighbours.load(path, n) if path else None
    if graph is not None:
        advance(n)
        return graph
    graph = find()
    if path is not None:
        graph.save(path)
    return graph


class ExactDedupStep(StepBase):
    """Drop rows whose normalised text repeats an earlier row's; the first of each group is kept.

    The values of ``columns`` are normalised (lowercased, punctuation removed, runs of
    whitespace made one space, as configured) and hashed together; columns stay apart, so
    ``("a b", "c")`` and ``("a", "b c")`` differ. Empty texts are equal to one another.
    ``strip_punctuation`` removes every character that is neither a word character nor
    whitespace (punctuation and symbols such as ``$``).
    """

    curates: ClassVar[bool] = True
    type: Literal["exact_dedup"] = "exact_dedup"
    columns: list[str] = Field(min_length=1)
    lowercase: bool = True
    collapse_whitespace: bool = True
    strip_punctuation: bool = False

    def normalise(self, text: str) -> str:
        """The text as it is compared."""
        if self.lowercase:
            text = text.lower()
        if self.strip_punctuation:
            text = _PUNCTUATION.sub("", text)
        if self.collapse_whitespace:
            text = " ".join(text.split())
        return text

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        ctx.set_total(len(rows))
        idx, values, failed = _texts(rows, self.columns)
        out = StepOutput(rows=[], expected=len(rows), failed=failed)
        first: dict[bytes, str] = {}  # normalised-text hash -> id of the row kept for it
        for i, vals in zip(idx, values, strict=True):
            key = json.dumps([self.normalise(v) for v in vals], ensure_ascii=False).encode()
            digest = hashlib.blake2b(key, digest_size=16).digest()
            if digest in first:
                dup = dropped(rows[i], "duplicate", duplicate_of=first[digest], similarity=1.0)
                out.dropped.append(dup)
            else:
                first[digest] = rid(rows[i])
                out.rows.append(rows[i])
        ctx.advance(len(rows))
        return out


class MinHashDedupStep(StepBase):
    """Drop near-duplicates: rows whose estimated Jaccard similarity to a kept row is high.

    The columns' texts (joined by a newline) are cut into shingles: word n-grams of the
    lowercased words (``\\w+``), or character n-grams of the lowercased text with whitespace
    collapsed (``ngram: 5`` is usual for characters). Each shingle gets a 32-bit hash; a row's
    signature holds, for each of ``num_perm`` random hash functions ``(a * h + b) mod 2**64``,
    the top 32 bits of the smallest value over its shingles. All of this is computed over every
    row at once with numpy.

    Rows whose signatures agree on one of ``bands`` bands of ``rows`` values are candidates;
    a candidate pair is kept when its estimated Jaccard (the fraction of equal signature values)
    is at least ``floor`` (these pairs are stored, see the module doc), and linked when it is at
    least ``threshold``. The connected groups of linked pairs are then split into clusters:
    the best row of a group by ``keep`` is kept, every row of the group at least ``threshold``
    similar to it is dropped as its duplicate, and the rest of the group is treated the same way.
    So each dropped row is within ``threshold`` of the row it names (``duplicate_of``, which is
    also the cluster's id).

    Without ``bands`` and ``rows``, the step uses the most rows per band that still gives a pair
    exactly at ``floor`` a 99% chance of becoming a candidate, so the candidates do not depend on
    the threshold and a re-cut threshold gives what a fresh run at it gives. Within a band's
    bucket, each row is compared with the 16 rows before it, so that huge buckets cost linear
    time.

    ``keep``: ``first`` keeps the earliest row, ``longest`` the longest text, ``score`` the
    highest value of ``score_column`` (a number in every row, or the row fails); ties go to
    the earliest row. Rows without a single shingle (empty text, or only punctuation with word
    shingles) cannot be compared and are kept; put ``exact_dedup`` first to collapse repeats.
    """

    curates: ClassVar[bool] = True
    type: Literal["minhash_dedup"] = "minhash_dedup"
    columns: list[str] = Field(min_length=1)
    shingle: Literal["word", "char"] = "word"
    ngram: int = Field(default=3, ge=1)
    num_perm: int = Field(default=128, ge=1)
    threshold: float = Field(default=0.7, gt=0, le=1)
    floor: float = Field(default=0.5, gt=0, le=1)
    bands: int | None = Field(default=None, ge=1)
    rows: int | None = Field(default=None, ge=1)
    keep: Literal["first", "longest", "score"] = "first"
    score_column: str | None = None
    seed: int = 1

    @model_validator(mode="after")
    def _check(self) -> MinHashDedupStep:
        check_floor(self.threshold, self.floor)
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both bands and rows, or neither (then they are chosen)")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}; "
                "lower bands or rows, or raise num_perm"
            )
        if (self.keep == "score") != (self.score_column is not None):
            raise ValueError("keep: score needs score_column, and score_column needs keep: score")
        return self

    def lsh_shape(self) -> tuple[int, int]:
        """(bands, rows per band) of the LSH index."""
        if self.bands is not None:
            return self.bands, self.rows
        for r in range(self.num_perm, 0, -1):
            b = self.num_perm // r
            if 1 - (1 - self.floor**r) ** b >= _LSH_RECALL:
                return b, r
        return self.num_perm, 1

    async def run(self, rows: list[dict], ctx: StepContext) -> StepOutput:
        ctx.set_total(len(rows))
        idx, texts, order, failed = ranked_texts(rows, self.columns, self.keep, self.score_column)
        ctx.advance(len(failed))
        path = self.store_path(texts, ctx)
        graph = stored(path, len(texts), lambda: self.neighbours(texts, ctx.advance), ctx.advance)
        canonical, similarity = graph.clusters(order, self.threshold)
        return outcome(rows, idx, canonical, similarity, failed)

    def store_path(self, texts: Sequence[str], ctx: StepContext) -> Path | None:
        """Where the neighbours of ``texts`` are stored in the run directory (None: none)."""
        settings = {
            "type": self.type,
            "shingle": self.shingle,
            "ngram": self.ngram,
            "num_perm": self.num_perm,
            "seed": self.seed,
            "lsh": self.lsh_shape(),
            "floor": self.floor,
        }
        return neighbours_path(ctx.run_dir, settings, texts)

    def find(
        self,
        texts: Sequence[str],
        order: np.ndarray | None = None,
        advance: Callable[[int], None] = lambda n: None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cluster near-duplicate texts: `neighbours`, then `Neighbours.clusters` at threshold.

        Args:
            texts: the texts to compare.
            order: indices of ``texts``, most preferred first (default: input order); the first
                of a cluster in this order is the one kept.
            advance: called with the number of texts hashed, as the work goes.

        Returns:
            ``canonical``: for each text, the index of the text it duplicates, or its own index
            when it is kept; ``similarity``: each text's estimated Jaccard to its canonical text
            (1.0 for kept texts).
        """
        return self.neighbours(texts, advance).clusters(order, self.threshold)

    def neighbours(
        self, texts: Sequence[str], advance: Callable[[int], None] = lambda n: None
    ) -> Neighbours:
        """The pairs of ``texts`` whose estimated Jaccard is at least ``floor``, with signatures.

        Texts without a single shingle are in no pair.
        """
        n = len(texts)
        hashes, counts = _shingle_hashes(texts, self.shingle, self.ngram)
        advance(n - np.count_nonzero(counts))
        has = np.flatnonzero(counts)  # texts with shingles; the others are kept as they are
        sig = _signatures(hashes, counts[has], self.num_perm, self.seed, advance)
        pairs = _candidates(sig, *self.lsh_shape())
        sim = _similarity(sig, pairs)
        hit = sim >= self.floor
        return Neighbours.of(
            n, "jaccard", has[pairs[:, hit]], sim[hit], lambda m: sig[np.searchsorted(has, m)]
        )


def check_floor(threshold: float, floor: float) -> None:
    """A near-duplicate step's threshold cannot be below the floor its pairs are found at."""
    if threshold < floor:
        raise ValueError(
            f"threshold ({threshold}) is below floor ({floor}), the lowest similarity whose "
            f"pairs are found and stored; lower floor to at most {threshold}"
        )


def _shingle_hashes(texts: Sequence[str], kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The 32-bit hashes (as uint64) of every text's shingles, concatenated, and their counts.

    A text with fewer than ``n`` tokens (but at least one) is padded to one shingle.
    """
    if kind == "word":
        docs = [_WORD.findall(t.lower()) for t in texts]
        docs = [d + [""] * (n - len(d)) if 0 < len(d) < n else d for d in docs]
        words = list(chain.from_iterable(docs))
        vocab = {w: _word_hash(w) for w in dict.fromkeys(words)}
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        tokens = np.fromiter(map(vocab.__getitem__, words), dtype=np.uint64, count=len(words))
    else:
        chars = [" ".join(t.lower().split()) for t in texts]
        chars = [c + "\0" * (n - len(c)) if 0 < len(c) < n else c for c in chars]
        lengths = np.array([len(c) for c in chars], dtype=np.int64)
        tokens = np.frombuffer("".join(chars).encode("utf-32-le"), dtype=np.uint32)
        tokens = tokens.astype(np.uint64)
    counts = np.where(lengths > 0, lengths - n + 1, 0)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.uint64), counts
    span = len(tokens) - n + 1
    h = tokens[:span].copy()
    for k in range(1, n):
        h *= _FOLD
        h += tokens[k : span + k]
    starts = np.cumsum(lengths) - lengths
    first_shingle = np.cumsum(counts) - counts
    h = h[np.arange(total) + np.repeat(starts - first_shingle, counts)]
    h ^= h >> np.uint64(30)
    h *= _MIX[0]
    h ^= h >> np.uint64(27)
    h *= _MIX[1]
    h ^= h >> np.uint64(31)
    return h >> np.uint64(32), counts


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def _signatures(
    hashes: np.ndarray, counts: np.ndarray, num_perm: int, seed: int, advance: Callable
) -> np.ndarray:
    """MinHash signatures, shape (texts, num_perm), of texts with ``counts`` (> 0) shingles."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**64, num_perm, dtype=np.uint64)
    ends = np.cumsum(counts)
    starts = ends - counts
    sig = np.empty((num_perm, len(counts)), dtype=np.uint32)  # reduced along contiguous axis
    per_chunk = max(1, _CHUNK // num_perm)
    d0 = 0
    while d0 < len(counts):
        d1 = max(d0 + 1, int(np.searchsorted(ends, starts[d0] + per_chunk, side="right")))
        s0, s1 = starts[d0], ends[d1 - 1]
        v = np.multiply(a[:, None], hashes[None, s0:s1])
        v += b[:, None]
        sig[:, d0:d1] = np.minimum.reduceat(v, starts[d0:d1] - s0, axis=1) >> np.uint64(32)
        advance(d1 - d0)
        d0 = d1
    return np.ascontiguousarray(sig.T)


def _candidates(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Pairs (2, k), first < second, of signatures equal on a band, each pair once."""
    n = len(sig)
    weights = np.random.default_rng(0).integers(0, 2**64, rows, dtype=np.uint64) | np.uint64(1)
    found = []
    for band in range(bands):
        key = (sig[:, band * rows : (band + 1) * rows].astype(np.uint64) * weights).sum(axis=1)
        order = np.argsort(key, kind="stable")
        key = key[order]
        for d in range(1, min(_WINDOW, n - 1) + 1):
            same = np.flatnonzero(key[d:] == key[:-d])
            if len(same) == 0:
                break
            found.append(order[same] * n + order[same + d])
    if not found:
        return np.empty((2, 0), dtype=np.int64)
    code = np.unique(np.concatenate(found))
    return np.stack([code // n, code % n])


def _similarity(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each pair: the fraction of equal signature values."""
    step = max(1, _CHUNK // sig.shape[1])
    out = [
        (sig[pairs[0, k : k + step]] == sig[pairs[1, k : k + step]]).mean(axis=1)
        for k in range(0, pairs.shape[1], step)
    ]
    return np.concatenate(out) if out else np.empty(0)


def clusters(
    n: int,
    pairs: np.ndarray,
    rank: np.ndarray,
    threshold: float,
    similar: Callable[[int, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Split the connected groups of ``pairs`` into clusters around their best-ranked rows.

    ``similar(best, rest)`` is the similarity of item ``best`` to each of the items ``rest``.
    """
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    canonical, similarity = np.arange(n), np.ones(n)
    members = np.unique(pairs)
    group = np.array([root(m) for m in members.tolist()], dtype=np.int64)
    by_group = np.lexsort((rank[members], group))  # by group, then best first
    members, group = members[by_group], group[by_group]
    for rest in np.split(members, np.flatnonzero(np.diff(group)) + 1):
        while len(rest) > 1:
            best, rest = rest[0], rest[1:]
            sim = similar(best, rest)
            hit = sim >= threshold
            canonical[rest[hit]] = best
            similarity[rest[hit]] = sim[hit]
            rest = rest[~hit]
    return canonical, similarity
