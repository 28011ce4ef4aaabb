"""MinHash LSH on disk: signatures and band keys in files, candidate pairs band by band.

`minhash_dedup` signs each block and writes, at the block's own place (its texts' indices), the
signatures to one file and each band's keys to one file per band (`Signatures.write`: any block
may be written at any time, by any worker). Candidates are then found one band at a time: that
band's keys of every text are sorted, and rows with equal keys paired (`candidates`), so memory
is a few arrays of one number per text, and the pairs, which scale with the duplicates. The
bands are the shuffle's partitions: a bucket (texts with equal keys on a band) never spans two
bands, so the pairs of a group of bands (`edges`) are found and checked on their own, one group
per reduce task under Ray, and the groups' pairs joined (`union`). The
similarity of a pair reads the two signatures from the file, row by row (`Signatures.take`), so
the signatures do not count towards the process's memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

WINDOW = 16  # in an LSH bucket, each row is compared with at most this many rows before it
_TAKE = 32_768  # pairs compared at once


class Signatures:
    """The MinHash signatures and band keys of ``n`` texts, in files under ``folder``.

    A text without shingles has no signature (its rows stay zero); ``has`` names the others.
    """

    def __init__(self, folder: Path, n: int, num_perm: int, bands: int, rows: int) -> None:
        self.folder, self.n, self.num_perm, self.bands, self.rows = folder, n, num_perm, bands, rows
        folder.mkdir(parents=True, exist_ok=True)
        self._weights = np.random.default_rng(0).integers(0, 2**64, rows, dtype=np.uint64)
        self._weights |= np.uint64(1)
        self._files = [folder / "signatures", *(folder / f"band-{b}" for b in range(bands))]
        for path, width in zip(self._files, [num_perm * 4] + [8] * bands, strict=True):
            with path.open("wb") as f:
                f.truncate(n * width)

    def write(self, start: int, has: np.ndarray, sig: np.ndarray, count: int) -> None:
        """Write the signatures ``sig`` of texts ``start + has`` of ``count`` texts from
        ``start``, and their band keys."""
        full = np.zeros((count, self.num_perm), dtype=np.uint32)
        full[has] = sig
        keys = [self._band(full, b) for b in range(self.bands)]
        for path, data, width in zip(
            self._files, [full, *keys], [self.num_perm * 4] + [8] * self.bands, strict=True
        ):
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, np.ascontiguousarray(data).tobytes(), start * width)
            finally:
                os.close(fd)

    def _band(self, sig: np.ndarray, band: int) -> np.ndarray:
        cols = sig[:, band * self.rows : (band + 1) * self.rows].astype(np.uint64)
        return (cols * self._weights).sum(axis=1)

    def band(self, band: int) -> np.ndarray:
        """Band ``band``'s key of every text."""
        return np.fromfile(self._files[1 + band], dtype=np.uint64)

    def take(self, index: np.ndarray) -> np.ndarray:
        """The signatures of texts ``index``, read from the file row by row (``pread``): only
        they are in the process's memory. (A memory map of the file, read at random, maps far
        more than the rows read: Linux 6.18 maps a whole large folio of the page cache, about
        1.3 MB here, per row faulted in, so a Ray worker's RSS counted most of the file.)"""
        out = np.empty((len(index), self.num_perm), dtype=np.uint32)
        if len(index) == 0:
            return out
        width = self.num_perm * 4
        rows = memoryview(out).cast("B")
        fd = os.open(self._files[0], os.O_RDONLY)
        try:
            for k, i in enumerate(index.tolist()):
                os.preadv(fd, [rows[k * width : (k + 1) * width]], i * width)
        finally:
            os.close(fd)
        return out


def edges(
    sig: Signatures, has: np.ndarray, bands: Iterable[int], floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs of the buckets of ``bands`` (`candidates`) at least ``floor``
    similar, and their similarities: one reduce task's share of the pairs under Ray."""
    pairs = candidates(sig, has, bands)
    sim = similarity(sig, pairs)
    hit = sim >= floor
    return pairs[:, hit], sim[hit]


def union(found: Sequence[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of several `edges` (a pair may be in several), each once, in order, with their
    similarities."""
    pairs = np.concatenate([p for p, _ in found], axis=1) if found else np.empty((2, 0), np.int64)
    sims = np.concatenate([s for _, s in found]) if found else np.empty(0)
    code, first = np.unique(pairs[0] * n + pairs[1], return_index=True)
    return np.stack([code // n, code % n]), sims[first]


def candidates(sig: Signatures, has: np.ndarray, bands: Iterable[int]) -> np.ndarray:
    """Pairs (2, k) of texts, first < second, equal on one of ``bands``, each pair once; of
    texts ``has`` only (those with signatures). Within a band's bucket, each text is paired
    with the `WINDOW` texts before it, so huge buckets cost linear time."""
    n = sig.n
    found = []
    for band in bands:
        key = sig.band(band)[has]
        order = np.argsort(key, kind="stable")
        key = key[order]
        order = has[order]
        for d in range(1, min(WINDOW, len(key) - 1) + 1):
            same = np.flatnonzero(key[d:] == key[:-d])
            if len(same) == 0:
                break
            found.append(order[same] * n + order[same + d])
        del key, order
    if not found:
        return np.empty((2, 0), dtype=np.int64)
    code = np.unique(np.concatenate(found))
    return np.stack([code // n, code % n])


def similarity(sig: Signatures, pairs: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each pair: the fraction of equal signature values."""
    out = [
        (sig.take(pairs[0, k : k + _TAKE]) == sig.take(pairs[1, k : k + _TAKE])).mean(axis=1)
        for k in range(0, pairs.shape[1], _TAKE)
    ]
    return np.concatenate(out) if out else np.empty(0)
