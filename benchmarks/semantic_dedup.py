"""Semantic dedup: encoding, exact and approximate neighbour search, and the default threshold.

One command: ``python benchmarks/semantic_dedup.py [--rows 20000] [--synthetic 100000]
[--static-rows 100000] [--cache DIR] [--no-index] [--end-to-end]`` (``--end-to-end``: item 0's
end-to-end rate only, the other figures kept from the last full run).

Corpus: the 6,000 GSM8K questions (``../shared/data/gsm8k_train_6000.jsonl``; the Self-Instruct
seed tasks in ``recipes/data`` when it is missing) and planted variants of random ones up to
``--rows`` rows, in equal numbers per kind: word edits at 2, 5, 10, 20 or 30% of the words
(swap, delete, insert, reorder, as in ``near_dup_quality.py``), every number changed (the same
problem with other numbers), or the question wrapped in an instruction ("Solve this problem:
... Show your work."). Originals and variants are shuffled together.

Measured, on the CPU of this machine, with all-MiniLM-L6-v2 (``model: all-MiniLM-L6-v2``) and
with the step's default, the static model distilled from it (``model: static``):

0. the static model end to end: ``SemanticDedupStep.run`` (texts, embeddings, the HNSW index
   above 50,000 rows, clusters) on ``--static-rows`` rows of the same kind, rows per second, the
   same rate of MiniLM (its encoding alone, item 1: a lower bound of its end-to-end time) and peak
   RSS; then, on the ``--rows`` rows, the static model's duplicate pairs (exact search, k = 10)
   at several thresholds against MiniLM's at 0.9: pair recall and precision, and the rows each
   drops, with the threshold study (item 2) of the static model at the step's default;

1. encoding: seconds and rows per second (``SemanticDedupStep.embed``, batch size 64);
2. threshold: for each kind of variant, its cosine to its original (quantiles, share at or above
   0.80, 0.85, 0.90, 0.95); and for each original the cosine of its nearest other original,
   the share of originals above each cut (distinct GSM8K questions: a proxy for false positives),
   with example pairs near the default;
3. index, at ``--rows`` rows (the real embeddings) and at ``--synthetic`` rows: build and search
   times (k = 10 neighbours per row, as the step's default) of the exact ``IndexFlatIP`` and of
   approximate indexes (HNSW at several ``M`` / ``efSearch``, IVF at several ``nprobe``); for
   each approximate one, the recall of the exact search's duplicate pairs (neighbour pairs at
   cosine >= 0.9) and the share of rows that the step keeps or drops alike (``--no-index`` skips
this part and keeps its last figures).

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
import asyncio
import json
import os
import platform
import random
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

from kdata.steps.base import StepContext, provenance
from kdata.steps.semantic import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    MINILM,
    STATIC,
    THRESHOLDS,
    SemanticDedupStep,
)

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
STATIC_CUTS = (0.88, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96)


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


def edges(sims: np.ndarray, nbrs: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Neighbour pairs at or above ``threshold``, as sorted codes ``min * n + max``."""
    n = len(nbrs)
    me = np.broadcast_to(np.arange(n)[:, None], nbrs.shape)
    hit = (nbrs >= 0) & (nbrs != me) & (np.round(sims, 6) >= threshold)
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


def end_to_end(docs: list[str]) -> dict:
    """The static model's ``semantic_dedup`` over ``docs`` as rows: rows/s, drops, peak RSS."""
    rows = [{"t": d, "_kdata": provenance(f"r{i}", [], "seeds")} for i, d in enumerate(docs)]
    step = SemanticDedupStep(columns=["t"])
    step.embed(["warm up"])  # load (or distil) the model outside the timing
    ctx = StepContext(name="dedup", base_dir=Path("."), pool=None)
    cpu = time.process_time()
    out, seconds = timed(lambda: asyncio.run(step.run(rows, ctx)))
    cpu = time.process_time() - cpu
    return {
        "rows": len(docs),
        "model": step.model,
        "threshold": step.threshold,
        "seconds": seconds,
        "cpu_seconds": round(cpu, 3),
        "rows_per_s": round(len(docs) / seconds, 1),
        "rows_per_cpu_s": round(len(docs) / cpu, 1),
        "dropped": len(out.dropped),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def side_by_side(docs: list[str], rounds: int = 3) -> dict:
    """Encoding the same texts with MiniLM and with the static model, alternated, nothing
    stored: the median seconds and CPU-seconds of each, and their ratios."""
    runs: dict[str, list[tuple[float, float]]] = {MINILM: [], STATIC: []}
    for model in runs:
        SemanticDedupStep(columns=["t"], model=model).embed(["warm up"])
    for _ in range(rounds):
        for model, got in runs.items():
            step, cpu = SemanticDedupStep(columns=["t"], model=model), time.process_time()
            _, seconds = timed(lambda step=step: step.embed(docs))
            got.append((seconds, time.process_time() - cpu))
    med = {m: [float(np.median([r[i] for r in got])) for i in (0, 1)] for m, got in runs.items()}
    return {
        "rows": len(docs),
        "rounds": rounds,
        **{m: {"seconds": round(w, 3), "cpu_seconds": round(c, 3)} for m, (w, c) in med.items()},
        "speedup_wall": round(med[MINILM][0] / med[STATIC][0], 1),
        "speedup_cpu": round(med[MINILM][1] / med[STATIC][1], 1),
    }


def against_minilm(minilm: np.ndarray, static: np.ndarray) -> list[dict]:
    """The static model's duplicate pairs at each of STATIC_CUTS against MiniLM's at 0.9."""
    import faiss

    def search(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        return index.search(emb, K + 1)

    truth = edges(*search(minilm), THRESHOLD)
    kept = _kept(SemanticDedupStep(columns=["t"], model=MINILM), minilm, truth)
    sims, nbrs = search(static)
    out = []
    for cut in STATIC_CUTS:
        found = edges(sims, nbrs, cut)
        both = len(np.intersect1d(found, truth, assume_unique=True))
        step = SemanticDedupStep(columns=["t"], threshold=cut, floor=min(0.8, cut))
        static_kept = _kept(step, static, found)
        out.append(
            {
                "threshold": cut,
                "pairs": len(found),
                "minilm_pairs": len(truth),
                "pair_recall": round(both / max(len(truth), 1), 4),
                "pair_precision": round(both / max(len(found), 1), 4),
                "rows_dropped": int((~static_kept).sum()),
                "minilm_rows_dropped": int((~kept).sum()),
                "kept_rows_agree": round(float((static_kept == kept).mean()), 5),
            }
        )
        print("  ", json.dumps(out[-1]), flush=True)
    return out


def _kept(step: SemanticDedupStep, emb: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Which rows the step keeps, given the neighbour pairs (as codes) that an index found."""
    from kdata.steps.clusters import clusters

    n = len(emb)
    pairs = np.stack([codes // n, codes % n])
    canonical, _ = clusters(n, pairs, np.arange(n), step.threshold, "cosine", lambda m: emb[m])
    return canonical == np.arange(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--originals", type=int, default=6_000)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--synthetic", type=int, default=100_000)
    parser.add_argument("--static-rows", type=int, default=100_000)
    parser.add_argument("--cache", type=Path, default=None, help="keep embeddings here")
    parser.add_argument("--no-index", action="store_true", help="keep the last index figures")
    parser.add_argument(
        "--end-to-end", action="store_true", help="item 0's rows/s only; keep the other figures"
    )
    args = parser.parse_args()
    source, texts = source_texts(args.originals)
    static = end_to_end(corpus(texts, args.static_rows)[0])  # first: its peak RSS is its own
    print(f"static model end to end: {static}", flush=True)
    if args.end_to_end:
        result = json.loads(RESULTS.read_text())
        result["static"]["end_to_end"] = {**static, "date": time.strftime("%Y-%m-%d")}
        RESULTS.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        return
    paired = side_by_side(corpus(texts, 2_000, seed=1)[0][:300])  # MiniLM: ~20-60 texts/s
    print(f"side by side: {paired}", flush=True)
    docs, origin, kind = corpus(texts, args.rows)
    step = SemanticDedupStep(columns=["t"], model=MINILM)
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
    static_emb = SemanticDedupStep(columns=["t"]).embed(docs)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
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
        "static": {
            "end_to_end": static,
            "encode_side_by_side": paired,
            "against_minilm_pairs_at_0.9": against_minilm(emb, static_emb),
            "threshold_study": threshold_study(static_emb, docs, origin, kind),
            "threshold_study_cuts": list(CUTS),
            "step_default_threshold": THRESHOLDS[STATIC],
        },
        "index": [],
        "synthetic": f"{args.synthetic} rows: rotated copies of the real ones, noise sigma {SIGMA}",
    }
    hnsw = [(16, 64), (32, 64)]
    if args.no_index:
        result["index"] = previous.get("index", [])
    else:
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
    print(json.dumps(result["static"]["end_to_end"], indent=1))


if __name__ == "__main__":
    main()
