"""Semantic dedup: encoding, exact and approximate neighbour search, and the default threshold.

One command: ``python benchmarks/semantic_dedup.py [--rows 20000] [--synthetic 100000]``.

Corpus: the 6,000 GSM8K questions (``../shared/data/gsm8k_train_6000.jsonl``; the Self-Instruct
seed tasks in ``recipes/data`` when it is missing) and planted variants of random ones up to
``--rows`` rows, in equal numbers per kind: word edits at 2, 5, 10, 20 or 30% of the words
(swap, delete, insert, reorder, as in ``near_dup_quality.py``), every number changed (the same
problem with other numbers), or the question wrapped in an instruction ("Solve this problem:
... Show your work."). Originals and variants are shuffled together.

Measured, on the CPU of this machine, with the step's default model (all-MiniLM-L6-v2):

1. encoding: seconds and rows per second (``SemanticDedupStep.embed``, batch size 64);
2. threshold: for each kind of variant, its cosine to its original (quantiles, share at or above
   0.80, 0.85, 0.90, 0.95); and for each original the cosine of its nearest other original,
   the share of originals above each cut (distinct GSM8K questions: a proxy for false positives),
   with example pairs near the default;
3. index, at ``--rows`` rows (the real embeddings) and at ``--synthetic`` rows: build and search
   times (k = 10 neighbours per row, as the step's default) of the exact ``IndexFlatIP`` and of
   approximate indexes (HNSW at several ``M`` / ``efSearch``, IVF at several ``nprobe``); for
   each approximate one, the recall of the exact search's duplicate pairs (neighbour pairs at
   cosine >= 0.9) and the share of rows that the step keeps or drops alike.

The ``--synthetic`` vectors are made from the real ones, not encoded (encoding 100,000 texts takes
about an hour on 2 cores): the real set is copied ``synthetic / rows`` times, each copy turned by
its own random rotation and given small Gaussian noise (sigma 0.003 per dimension, cosine about
0.998 to the clean vector), then re-normalised. Within a copy the neighbour structure is the real
one, slightly blurred; across copies vectors are unrelated. (Noise alone would make the copies of
a vector duplicates of one another, clusters bigger than k.) Written to
benchmarks/results/semantic_dedup.json; ``--cache DIR`` keeps the embeddings between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

from kdata.steps.semantic import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, SemanticDedupStep

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from near_dup_quality import source_texts, variant  # noqa: E402

RESULTS = HERE / "results" / "semantic_dedup.json"
THRESHOLD, K = 0.9, 10
CUTS = (0.8, 0.85, 0.9, 0.95)
EDIT_RATES = (0.02, 0.05, 0.10, 0.20, 0.30)
KINDS = (*(f"edit_{r:.2f}" for r in EDIT_RATES), "numbers", "wrapped")
PREFIXES = ("Solve this problem: ", "Question: ", "Here is a math word problem. ")
SUFFIXES = (" Show your work.", " Explain your answer step by step.", "")
SIGMA = 0.003


def corpus(texts: list[str], rows: int, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
    """Originals and variants, shuffled; each doc's original (its index in ``texts``), its kind."""
    rng = random.Random(seed)
    vocab = sorted({w for t in texts for w in t.split()})
    docs, origin, kind = list(texts), list(range(len(texts))), ["original"] * len(texts)
    for k in range(rows - len(texts)):
        i, what = rng.randrange(len(texts)), KINDS[k % len(KINDS)]
        if what.startswith("edit_"):
            doc = variant(texts[i], float(what[5:]), vocab, rng)
        elif what == "numbers":
            doc = re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(1, 9)), texts[i])
        else:
            doc = rng.choice(PREFIXES) + texts[i] + rng.choice(SUFFIXES)
        docs.append(doc)
        origin.append(i)
        kind.append(what)
    order = list(range(len(docs)))
    rng.shuffle(order)
    return [docs[j] for j in order], [origin[j] for j in order], [kind[j] for j in order]


def threshold_study(emb: np.ndarray, docs: list[str], origin: list[int], kind: list[str]) -> dict:
    """Cosine of variants to their originals, and of each original to its nearest other one."""
    where = {origin[j]: j for j in range(len(docs)) if kind[j] == "original"}
    out: dict = {"variants": {}}
    for what in KINDS:
        js = [j for j in range(len(docs)) if kind[j] == what]
        sims = np.einsum("ij,ij->i", emb[js], emb[[where[origin[j]] for j in js]])
        out["variants"][what] = {
            "n": len(js),
            "quantiles_5_25_50": [round(float(q), 3) for q in np.quantile(sims, [0.05, 0.25, 0.5])],
            **{f"share_ge_{c}": round(float((sims >= c).mean()), 3) for c in CUTS},
        }
    originals = sorted(where.values())
    sub = emb[originals]
    sims = sub @ sub.T
    np.fill_diagonal(sims, -1)
    nearest, best = sims.max(axis=1), sims.argmax(axis=1)
    out["originals"] = {
        "n": len(originals),
        **{f"share_with_a_neighbour_ge_{c}": round(float((nearest >= c).mean()), 4) for c in CUTS},
        "examples": {},
    }
    for lo, hi in ((0.85, 0.9), (0.9, 0.95), (0.95, 1.01)):
        band = [a for a in np.flatnonzero((nearest >= lo) & (nearest < hi)) if a < best[a]][:3]
        out["originals"]["examples"][f"{lo}-{min(hi, 1.0)}"] = [
            {
                "cosine": round(float(nearest[a]), 3),
                "a": docs[originals[a]][:160],
                "b": docs[originals[best[a]]][:160],
            }
            for a in band
        ]
    return out


def synthesise(emb: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` vectors: rotated, slightly noisy copies of ``emb`` (the first copy unrotated)."""
    rng = np.random.default_rng(seed)
    dim, copies = emb.shape[1], []
    for c in range(-(-n // len(emb))):
        rot = np.eye(dim) if c == 0 else np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        v = emb @ rot.astype(np.float32) + rng.normal(0, SIGMA, emb.shape).astype(np.float32)
        copies.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return np.ascontiguousarray(np.concatenate(copies)[:n], dtype=np.float32)


def edges(sims: np.ndarray, nbrs: np.ndarray) -> np.ndarray:
    """Neighbour pairs at or above THRESHOLD, as sorted codes ``min * n + max``."""
    n = len(nbrs)
    me = np.broadcast_to(np.arange(n)[:, None], nbrs.shape)
    hit = (nbrs >= 0) & (nbrs != me) & (np.round(sims, 6) >= THRESHOLD)
    a, b = me[hit].astype(np.int64), nbrs[hit].astype(np.int64)
    return np.unique(np.minimum(a, b) * n + np.maximum(a, b))


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, round(time.perf_counter() - t0, 3)


def index_study(emb: np.ndarray, hnsw: list[tuple[int, int]], nprobes: list[int]) -> dict:
    """Exact search, then each approximate index: times, pair recall and agreement of kept rows."""
    import faiss

    n, dim = emb.shape
    step = SemanticDedupStep(columns=["t"])
    exact = faiss.IndexFlatIP(dim)
    _, t_build = timed(lambda: exact.add(emb))
    (sims, nbrs), t_search = timed(lambda: exact.search(emb, K + 1))
    truth = edges(sims, nbrs)
    kept = _kept(step, emb, truth)
    out = {
        "rows": n,
        "exact": {
            "build_s": t_build,
            "search_s": t_search,
            "duplicate_pairs": len(truth),
            "rows_dropped": int((~kept).sum()),
        },
        "approximate": [],
    }
    print(f"{n} rows: exact search {t_search} s, {len(truth)} duplicate pairs", flush=True)

    def measure(name: str, index, t_build: float, **params) -> None:
        (s, nb), t = timed(lambda: index.search(emb, K + 1))
        found = edges(s, nb)
        recall = len(np.intersect1d(found, truth, assume_unique=True)) / max(len(truth), 1)
        agree = float((_kept(step, emb, found) == kept).mean())
        row = {
            "index": name,
            **params,
            "build_s": t_build,
            "search_s": t,
            "pair_recall": round(recall, 4),
            "kept_rows_agree": round(agree, 5),
            "search_vs_exact": round(t / t_search, 4),
            "build_and_search_vs_exact": round((t_build + t) / t_search, 4),
        }
        out["approximate"].append(row)
        print("  ", json.dumps(row), flush=True)

    for m, ef_construction in hnsw:
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        _, t_b = timed(lambda index=index: index.add(emb))
        for ef in (16, 32, 64, 128):
            index.hnsw.efSearch = ef
            measure("hnsw", index, t_b, M=m, efConstruction=ef_construction, efSearch=ef)
    nlist = int(4 * np.sqrt(n))
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    _, t_b = timed(lambda: (ivf.train(emb), ivf.add(emb)))
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        measure("ivf_flat", ivf, t_b, nlist=nlist, nprobe=nprobe)
    return out


def _kept(step: SemanticDedupStep, emb: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Which rows the step keeps, given the neighbour pairs (as codes) that an index found."""
    from kdata.steps.clusters import clusters

    n = len(emb)
    pairs = np.stack([codes // n, codes % n])

    def similar(best: int, rest: np.ndarray) -> np.ndarray:
        return np.round(emb[rest] @ emb[best], 6)

    canonical, _ = clusters(n, pairs, np.arange(n), step.threshold, similar)
    return canonical == np.arange(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--originals", type=int, default=6_000)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--synthetic", type=int, default=100_000)
    parser.add_argument("--cache", type=Path, default=None, help="keep embeddings here")
    args = parser.parse_args()
    source, texts = source_texts(args.originals)
    docs, origin, kind = corpus(texts, args.rows)
    step = SemanticDedupStep(columns=["t"])
    cached = args.cache is not None and any(args.cache.glob("*.npy"))
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        print(f"\rencoding: {done[0]} / {len(docs)}", end="", file=sys.stderr, flush=True)

    emb, t_encode = timed(lambda: step.embed(docs, args.cache, advance))
    encode = {"seconds": t_encode, "rows_per_s": round(len(docs) / t_encode, 1)}
    if cached:  # an earlier run's figures stand
        previous = json.loads(RESULTS.read_text())["encode"] if RESULTS.exists() else {}
        encode = {**previous, "from_cache_s": t_encode}
    print(f"encoded {len(docs)} rows: {encode}", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, faiss on CPU",
        "source": source,
        "rows": len(docs),
        "originals": len(texts),
        "model": step.model,
        "threshold": THRESHOLD,
        "k": K,
        "step_hnsw": {
            "M": HNSW_M,
            "efConstruction": HNSW_EF_CONSTRUCTION,
            "efSearch": HNSW_EF_SEARCH,
        },
        "encode": encode,
        "threshold_study": threshold_study(emb, docs, origin, kind),
        "index": [],
        "synthetic": f"{args.synthetic} rows: rotated copies of the real ones, noise sigma {SIGMA}",
    }
    hnsw = [(16, 64), (32, 64)]
    result["index"].append(index_study(emb, hnsw, [4, 16]))
    result["index"].append(index_study(synthesise(emb, args.synthetic), hnsw, [4, 16]))
    result["step_default_index"] = [  # the HNSW settings the step uses, at each size
        {"rows": study["rows"], **row}
        for study in result["index"]
        for row in study["approximate"]
        if row.get("M") == HNSW_M and row.get("efSearch") == HNSW_EF_SEARCH
    ]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result["step_default_index"], indent=1))


if __name__ == "__main__":
    main()
