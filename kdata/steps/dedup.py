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

Both are global steps over blocks (`kdata.executors.local`): a pass over the blocks reads only
the text columns and row ids (column-wise, without making the rows' dicts), and keeps per row a
compact summary (``exact_dedup``: a 16-byte hash of the normalised text; ``minhash_dedup``: the
text's length or score and hash). ``minhash_dedup`` then, unless the neighbours are stored,
signs each block into files on disk (signatures and band keys at the block's own place, see
`kdata.steps.lsh`), finds candidates band by band, and clusters with union-find over the rows
in a pair. Each block is then marked, its kept rows a slice of its table. The decisions are
those of one pass over every row.

The work over every row is cut into the executor's partitions (one locally, the cluster's CPUs
on Ray), with the same functions either way: ``exact_dedup`` shuffles (hash, place, row id) by
hash and finds each partition's duplicates on its own (`_duplicates`), so only the duplicates
come back; ``minhash_dedup`` finds the candidate edges of each group of bands on its own
(`kdata.steps.lsh.edges`), a bucket never spanning two bands.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from kdata.blocks import Block
from kdata.steps.base import (
    PROVENANCE,
    GlobalStep,
    StepContext,
    StepOutput,
)
from kdata.steps.clusters import (
    Clusters,
    Drops,
    Neighbours,
    block_texts,
    block_values,
    check_floor,
    neighbours_path,
    offsets,
    outcome,
    preference,
    summary,
    texts_key,
)
from kdata.steps.lsh import Signatures, edges, union

if TYPE_CHECKING:
    from kdata.executors.local import Blocks

_PUNCTUATION = re.compile(r"[^\w\s]")
_WORD = re.compile(r"\w+")
# Shingle hashing: an n-gram of 64-bit token hashes is folded with _FOLD, then mixed by the
# splitmix64 finaliser; its high 32 bits are the shingle's hash.
_FOLD = np.uint64(0x9E3779B97F4A7C15)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_CHUNK = 1 << 20  # signature values computed per numpy pass: bounds memory, fits in cache
_LSH_RECALL = 0.99  # chance that a pair exactly at the floor shares at least one band


class ExactDedupStep(GlobalStep):
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

    def _digests(self, block: Block) -> tuple[np.ndarray, pa.Array]:
        """Per comparable row of a block: its normalised text's 16-byte hash and its id."""
        _, values, _, ids = block_values(block, self.columns)
        if len(self.columns) == 1:  # one text is its own key; several are kept apart by JSON
            keys = (self.normalise(vals[0]).encode("utf-8", "surrogatepass") for vals in values)
        else:
            keys = (
                json.dumps([self.normalise(v) for v in vals], ensure_ascii=False).encode()
                for vals in values
            )
        digest = b"".join(hashlib.blake2b(k, digest_size=16).digest() for k in keys)
        return np.frombuffer(digest, dtype=">u8").reshape(-1, 2), ids

    def _split(self, block: Block, partitions: int) -> list[tuple]:
        """A block's comparable texts cut by hash into ``partitions``: per partition, the
        texts' hashes, block index and index in the block (their order), and row ids."""
        digests, ids = self._digests(block)
        part = digests[:, 0] % np.uint64(partitions)
        out = []
        for p in range(partitions):
            at = np.flatnonzero(part == p)
            index = np.full(len(at), block.index, dtype=np.int64)
            out.append((digests[at], index, at, ids.take(pa.array(at, type=pa.int64()))))
        return out

    async def decide(self, blocks: Blocks, ctx: StepContext) -> Drops:
        """The first row of each normalised text: the blocks' hashes shuffled by hash, each
        partition's duplicates found on its own (`_duplicates`)."""
        found = await blocks.shuffle(self._split, _duplicates, self.read_columns())
        index = np.concatenate([f[0] for f in found])
        k = np.concatenate([f[1] for f in found])
        keepers = [i for f in found for i in f[2]]
        order = np.lexsort((k, index))
        cuts = np.flatnonzero(np.diff(index[order])) + 1
        out = {}
        for at in np.split(order, cuts) if len(order) else []:
            out[int(index[at[0]])] = (k[at], [keepers[i] for i in at.tolist()], np.ones(len(at)))
        return Drops(out)

    def mark(self, block: Block, decision: Drops) -> StepOutput:
        idx, _, failed, _ = block_values(block, self.columns)
        return outcome(block, idx, decision, failed)

    def read_columns(self) -> list[str]:
        """The columns the passes over the blocks read: the text columns and the row id."""
        return [*self.columns, f"{PROVENANCE}.id"]


class MinHashDedupStep(GlobalStep):
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
    shares_files: ClassVar[bool] = True
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

    def summary(self, block: Block) -> tuple:
        """`summary` of a block's comparable texts."""
        return summary(block, self.columns, self.keep, self.score_column)

    def _sign(self, block: Block, sig: Signatures, start: int) -> np.ndarray:
        """Sign a block's texts, the first of them text ``start``, into ``sig``; the indices
        of those with shingles."""
        texts = block_texts(block, self.columns, self.keep, self.score_column)[1]
        hashes, counts = _shingle_hashes(texts, self.shingle, self.ngram)
        has = np.flatnonzero(counts)
        signed = _signatures(hashes, counts[has], self.num_perm, self.seed, lambda n: None)
        sig.write(start, has, signed, len(texts))
        return has + start

    async def decide(self, blocks: Blocks, ctx: StepContext) -> Clusters:
        """Clusters of every block's texts: their stored neighbours, else each block signed
        into files on disk (`kdata.steps.lsh`), then LSH candidates band by band, their
        similarities and the clusters."""
        parts = await blocks.map(self.summary, self.read_columns())
        lengths = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        scores = [x for p in parts for x in p[1]]
        order = preference(self.keep, lengths, scores)
        starts = offsets([len(p[0]) for p in parts])
        n = int(starts[-1])
        path = self.store_path([p[2] for p in parts], ctx)
        graph = Neighbours.load(path, n) if path else None
        if graph is None:
            with self._signature_files(ctx, n) as sig:
                has = await blocks.map(
                    lambda b: self._sign(b, sig, int(starts[b.index])), self.read_columns()
                )
                has = np.concatenate(has) if has else np.empty(0, np.int64)
                groups = _band_groups(sig.bands, blocks.partitions)
                find = functools.partial(edges, sig, has, floor=self.floor)
                graph = self._graph(sig, await blocks.each(find, groups))
            if path is not None:
                graph.save(path)
        canonical, similarity = graph.clusters(order, self.threshold)
        return Clusters(starts, canonical, similarity, [p[3] for p in parts])

    def mark(self, block: Block, decision: Clusters) -> StepOutput:
        idx, _, _, failed, _ = block_texts(block, self.columns, self.keep, self.score_column)
        return outcome(block, idx, decision, failed)

    def read_columns(self) -> list[str]:
        """The text columns, the score column with ``keep: score``, and the row id."""
        score = [self.score_column] if self.score_column else []
        return [*self.columns, *score, f"{PROVENANCE}.id"]

    def store_path(self, digests: Sequence[bytes], ctx: StepContext) -> Path | None:
        """Where the neighbours of the texts of `text_digest`s ``digests`` are stored in the run
        directory (None: none)."""
        settings = {
            "type": self.type,
            "shingle": self.shingle,
            "ngram": self.ngram,
            "num_perm": self.num_perm,
            "seed": self.seed,
            "lsh": self.lsh_shape(),
            "floor": self.floor,
        }
        return neighbours_path(ctx.run_dir, settings, texts_key(digests))

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
        hashes, counts = _shingle_hashes(texts, self.shingle, self.ngram)
        advance(len(texts) - np.count_nonzero(counts))
        has = np.flatnonzero(counts)  # texts with shingles; the others are kept as they are
        with self._signature_files(None, len(texts)) as sig:
            sig.write(
                0,
                has,
                _signatures(hashes, counts[has], self.num_perm, self.seed, advance),
                len(texts),
            )
            return self._graph(sig, [edges(sig, has, range(sig.bands), self.floor)])

    @contextmanager
    def _signature_files(self, ctx: StepContext | None, n: int) -> Iterator[Signatures]:
        """Files for the signatures of ``n`` texts: in the run directory's ``tmp/<step>``
        (cleared first, so a killed build's are not left behind), else a temporary folder;
        removed after."""
        if ctx is None or ctx.run_dir is None:
            with tempfile.TemporaryDirectory(prefix="kdata-minhash-") as tmp:
                yield Signatures(Path(tmp), n, self.num_perm, *self.lsh_shape())
            return
        folder = Path(ctx.run_dir) / "tmp" / ctx.name
        shutil.rmtree(folder, ignore_errors=True)
        try:
            yield Signatures(folder, n, self.num_perm, *self.lsh_shape())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # tmp/ itself, once no step uses it
                folder.parent.rmdir()

    def _graph(self, sig: Signatures, found: list[tuple[np.ndarray, np.ndarray]]) -> Neighbours:
        """The neighbours of the texts in ``sig``, from the `edges` of every band."""
        return Neighbours.of(sig.n, "jaccard", *union(found, sig.n), sig.take)


def _band_groups(bands: int, partitions: int) -> list[range]:
    """The bands cut into at most ``partitions`` groups, one reduce task each."""
    return [range(p, bands, partitions) for p in range(min(bands, partitions))]


def _duplicates(pieces: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The duplicates among one partition's texts (`ExactDedupStep._split`'s pieces of it from
    every block): each text whose hash an earlier text has, as its block index and index in the
    block, and the row id of the first text of that hash."""
    if not pieces:
        return np.empty(0, np.int64), np.empty(0, np.int64), []
    digests = np.concatenate([p[0] for p in pieces])
    index = np.concatenate([p[1] for p in pieces])
    k = np.concatenate([p[2] for p in pieces])
    ids = pa.concat_arrays([p[3] for p in pieces])
    order = np.lexsort((k, index, digests[:, 1], digests[:, 0]))  # equal texts: in row order
    d = digests[order]
    new = np.ones(len(d), dtype=bool)
    new[1:] = (d[1:] != d[:-1]).any(axis=1)
    first = order[np.maximum.accumulate(np.where(new, np.arange(len(d)), 0))]
    dup = order[~new]
    return index[dup], k[dup], ids.take(pa.array(first[~new], type=pa.int64())).to_pylist()


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
