"""MinHash dedup throughput: kdata's vectorised pipeline against datasketch used naively.

One command: ``python benchmarks/minhash_throughput.py [--docs N]``.

Documents: real text, GSM8K questions (``../shared/data/gsm8k_train_6000.jsonl``; the Self-Instruct
seed tasks in ``recipes/data`` when that file is missing) drawn at random, concatenated and cut to
100 words; a tenth of the documents are copies of an earlier one with 2% of the words replaced,
so that clustering has work to do. Both pipelines get the same documents, word 3-grams of the
lowercased ``\\w+`` words, 128 permutations, threshold 0.7, one process:

(a) kdata: ``MinHashDedupStep(columns=["text"]).find(docs)``: shingle, hash, LSH, verify and
    cluster (median of 3 runs after a warm-up); and the whole step, ``run()`` on rows, which
    also writes the dropped records;
(b) baseline: for each document one ``datasketch.MinHash(num_perm=128)`` fed by ``update()``
    per shingle, inserted into a ``MinHashLSH(threshold=0.7)``; then every document queried,
    candidates verified with ``MinHash.jaccard`` and joined by union-find (one run).

Reported: documents per second of each, their ratio, and how many documents each put in a
cluster with another. Printed and written to benchmarks/results/minhash_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import statistics
import time
from pathlib import Path

import numpy as np

from kdata.steps.base import StepContext, provenance
from kdata.steps.dedup import MinHashDedupStep

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "minhash_throughput.json"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train_6000.jsonl"
SEEDS = REPO / "recipes" / "data" / "seed_tasks.jsonl"
WORDS, NUM_PERM, THRESHOLD = 100, 128, 0.7


def source_texts() -> tuple[str, list[str]]:
    """Real texts to build documents from: GSM8K questions, or the seed tasks."""
    if GSM8K.exists():
        return GSM8K.name, [json.loads(line)["question"] for line in GSM8K.open()]
    rows = [json.loads(line) for line in SEEDS.open()]
    return SEEDS.name, [r["instruction"] + " " + r["instances"][0]["output"] for r in rows]


def documents(n: int, texts: list[str], seed: int = 0) -> list[str]:
    """``n`` documents of WORDS words; one in ten is a copy of an earlier one, 2% edited."""
    rng = random.Random(seed)
    vocab = sorted({w for t in texts for w in t.split()})
    docs: list[str] = []
    for _ in range(n):
        if docs and rng.random() < 0.1:
            words = rng.choice(docs).split()
            for p in rng.sample(range(len(words)), len(words) // 50):
                words[p] = rng.choice(vocab)
        else:
            words = []
            while len(words) < WORDS:
                words += rng.choice(texts).split()
        docs.append(" ".join(words[:WORDS]))
    return docs


def kdata_find(docs: list[str]) -> int:
    """Run kdata's pipeline; return how many documents share a cluster with another."""
    canonical, _ = MinHashDedupStep(columns=["text"], num_perm=NUM_PERM).find(docs)
    dropped = canonical != np.arange(len(docs))
    return int(dropped.sum() + len(np.unique(canonical[dropped])))


def kdata_step(docs: list[str]) -> None:
    """Run the whole step on rows, dropped records included."""
    rows = [{"text": d, "_kdata": provenance(str(i), [], "s")} for i, d in enumerate(docs)]
    step = MinHashDedupStep(columns=["text"], num_perm=NUM_PERM)
    asyncio.run(step.run(rows, StepContext("bench", REPO, None)))


def naive_datasketch(docs: list[str]) -> int:
    """The baseline; return how many documents share a cluster with another."""
    from datasketch import MinHash, MinHashLSH

    word = re.compile(r"\w+")
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    sigs = []
    for i, doc in enumerate(docs):
        w = word.findall(doc.lower())
        m = MinHash(num_perm=NUM_PERM, seed=1)
        for k in range(len(w) - 2):
            m.update(" ".join(w[k : k + 3]).encode())
        lsh.insert(i, m)
        sigs.append(m)
    parent = list(range(len(docs)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j != i and m.jaccard(sigs[j]) >= THRESHOLD:
                ri, rj = root(i), root(j)
                parent[max(ri, rj)] = min(ri, rj)
    roots = [root(i) for i in range(len(docs))]
    sizes: dict[int, int] = {}
    for r in roots:
        sizes[r] = sizes.get(r, 0) + 1
    return sum(s for s in sizes.values() if s > 1)


def timed(fn, docs: list[str]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(docs)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20_000)
    args = parser.parse_args()
    source, texts = source_texts()
    docs = documents(args.docs, texts)
    kdata_find(docs[:1000])  # warm-up: imports, first allocations
    runs = [timed(kdata_find, docs) for _ in range(3)]
    find_s, clustered_kdata = statistics.median(t for t, _ in runs), runs[0][1]
    step_s = statistics.median(timed(kdata_step, docs)[0] for _ in range(3))
    naive_s, clustered_naive = timed(naive_datasketch, docs)
    import datasketch

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "datasketch": datasketch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
        "source": source,
        "docs": len(docs),
        "words_per_doc": WORDS,
        "num_perm": NUM_PERM,
        "threshold": THRESHOLD,
        "kdata_lsh_bands_rows": list(MinHashDedupStep(columns=["text"]).lsh_shape()),
        "kdata_find_s": round(find_s, 3),
        "kdata_find_docs_per_s": round(len(docs) / find_s),
        "kdata_step_s": round(step_s, 3),
        "kdata_step_docs_per_s": round(len(docs) / step_s),
        "naive_datasketch_s": round(naive_s, 3),
        "naive_datasketch_docs_per_s": round(len(docs) / naive_s),
        "speedup_find": round(naive_s / find_s, 1),
        "speedup_step": round(naive_s / step_s, 1),
        "docs_clustered_kdata": clustered_kdata,
        "docs_clustered_naive": clustered_naive,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
