"""Clustering of near-duplicate groups: the batched split equals the plain greedy loop."""

from __future__ import annotations

import numpy as np
import pytest

from kdata.steps import clusters as mod
from kdata.steps.clusters import COSINE_DECIMALS, Neighbours, similarities


def greedy(n: int, pairs: np.ndarray, rank: np.ndarray, threshold: float, metric, vectors):
    """The reference: in each connected group, best first, keep the best text left and make
    every text left at least ``threshold`` similar to it its duplicate; one text at a time."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in pairs.T.tolist():
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in np.unique(pairs).tolist():
        groups.setdefault(root(i), []).append(i)
    canonical, similarity = np.arange(n), np.ones(n)
    for items in groups.values():
        rest = np.array(sorted(items, key=lambda i: rank[i]))
        while len(rest) > 1:
            best, rest = rest[0], rest[1:]
            sim = similarities(metric, vectors[rest], vectors[best][None])[:, 0]
            hit = sim >= threshold
            canonical[rest[hit]], similarity[rest[hit]] = best, sim[hit]
            rest = rest[~hit]
    return canonical, similarity


def signatures(rng: np.random.Generator, n: int) -> np.ndarray:
    """MinHash-like signatures: few values per position, so many texts tie on similarity."""
    base = rng.integers(0, 3, (8, 16), dtype=np.uint32)
    sig = base[rng.integers(0, len(base), n)]
    flip = rng.random(sig.shape) < rng.uniform(0.05, 0.4)
    return np.where(flip, rng.integers(0, 3, sig.shape, dtype=np.uint32), sig)


def embeddings(rng: np.random.Generator, n: int) -> np.ndarray:
    """Normalised float32 vectors on a coarse grid: many texts tie on their cosine."""
    emb = rng.integers(1, 4, (n, 4)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def walk(rng: np.random.Generator, n: int, dim: int = 64) -> np.ndarray:
    """Normalised float32 vectors of a random walk: each close to the one before."""
    emb = np.cumsum(rng.standard_normal((n, dim)), axis=0) + 30 * rng.standard_normal(dim)
    emb = emb.astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def random_pairs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random pairs and long chains (i, i+1), first < second, each once."""
    a = rng.integers(0, n, 3 * n)
    b = rng.integers(0, n, 3 * n)
    chain = np.arange(rng.integers(0, n // 2), n - 1)
    a, b = np.concatenate([a, chain]), np.concatenate([b, chain + 1])
    keep = a != b
    code = np.unique(np.minimum(a, b)[keep] * n + np.maximum(a, b)[keep])
    return np.stack([code // n, code % n])


@pytest.mark.parametrize("metric", ["jaccard", "cosine"])
@pytest.mark.parametrize("batch, temp", [(256, 16 << 20), (3, 200), (1, 1)])
def test_batched_clusters_equal_the_greedy_loop(monkeypatch, metric, batch, temp):
    monkeypatch.setattr(mod, "_BATCH", batch)
    monkeypatch.setattr(mod, "_TEMP_BYTES", temp)  # 1: one text compared at a time
    ties = 0
    for seed in range(25):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(2, 300))
        vectors = signatures(rng, n) if metric == "jaccard" else embeddings(rng, n)
        pairs = random_pairs(rng, n)
        sim = similarities(metric, vectors[pairs[0]], vectors[pairs[1]]).diagonal()
        threshold = float(rng.choice(sim))  # a similarity that occurs: ties at the threshold
        ties += int((sim == threshold).sum())
        graph = Neighbours.of(n, metric, pairs, sim, lambda m, v=vectors: v[m])
        order = rng.permutation(n)
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        expected = greedy(n, pairs[:, sim >= threshold], rank, threshold, metric, vectors)
        canonical, similarity = graph.clusters(order, threshold)
        np.testing.assert_array_equal(canonical, expected[0])
        np.testing.assert_array_equal(similarity, expected[1])
        kept = canonical == np.arange(n)
        assert kept[canonical].all()  # every duplicate names a kept text
        assert (similarity[~kept] >= threshold).all()
    assert ties > 4 * 25  # many pairs exactly at the threshold (not only the one it came from)


def test_similarities_are_the_share_of_equal_values_and_the_rounded_cosine():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2, (6, 16), dtype=np.uint32)
    expected = [[(x == y).mean() for y in sig[:4]] for x in sig]
    np.testing.assert_array_equal(similarities("jaccard", sig, sig[:4]), expected)
    emb = walk(rng, 40)
    dot = np.array([[sum(map(float, x * y.astype(np.float64))) for y in emb] for x in emb])
    got = similarities("cosine", emb, emb)
    np.testing.assert_allclose(got, np.minimum(np.round(dot, COSINE_DECIMALS), 1.0), atol=1e-12)
    assert (got.diagonal() == 1.0).all()  # a text is exactly as similar as itself
    # a row's similarities do not depend on what else is compared with it
    np.testing.assert_array_equal(got[7:9], similarities("cosine", emb[7:9], emb))
    np.testing.assert_array_equal(got[:, 3], similarities("cosine", emb, emb[3:4])[:, 0])


def test_one_large_group_is_split_in_batches_like_the_loop(monkeypatch):
    # a chain of 3,000 texts: one connected group, far more than a batch
    monkeypatch.setattr(mod, "_TEMP_BYTES", 1 << 16)
    rng = np.random.default_rng(1)
    n = 3000
    emb = walk(rng, n)
    pairs = np.stack([np.arange(n - 1), np.arange(1, n)])
    sim = similarities("cosine", emb[pairs[0]], emb[pairs[1]]).diagonal()
    graph = Neighbours.of(n, "cosine", pairs, sim, lambda m: emb[m])
    threshold = float(np.quantile(sim, 0.1))
    expected = greedy(n, pairs[:, sim >= threshold], np.arange(n), threshold, "cosine", emb)
    canonical, similarity = graph.clusters(None, threshold)
    np.testing.assert_array_equal(canonical, expected[0])
    np.testing.assert_array_equal(similarity, expected[1])
    assert len(np.unique(canonical)) < n // 2  # most texts are duplicates
