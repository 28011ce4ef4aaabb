"""Near-duplicate detection quality: precision, recall and F1 against planted duplicates.

One command: ``python benchmarks/near_dup_quality.py [--originals N]``.

Corpus: N GSM8K questions (``../shared/data/gsm8k_train_6000.jsonl``; the Self-Instruct seed
tasks in ``recipes/data`` when it is missing). Six in ten of them get one planted variant, in
equal numbers per edit rate (0, 2, 5, 10, 15, 20 or 30% of the words). Each edit is, at random,
a word swapped for another word of the corpus, a word deleted, a word inserted, or two
neighbouring words reordered. Originals and variants are shuffled together.

Ground truth: a pair of documents is a duplicate when the true Jaccard similarity of their word
3-gram sets (lowercased ``\\w+`` words, the shingles of ``minhash_dedup`` at its defaults) is at
least 0.7. Every such pair of the corpus is found exactly (a prefix-filtered similarity join),
planted or not, so duplicates already present in GSM8K count too.

Detected pairs: every pair of documents in one cluster of the method (for ``minhash_dedup``: a
kept row and the rows dropped as its duplicates).

Reported overall (all pairs of the corpus) and per edit rate (the planted pairs of that rate:
a planted pair below 0.7 that is detected is a false positive): precision, recall, F1, and the
errors by true-Jaccard band. A method is a function ``docs -> set of (i, j) pairs`` in
``METHODS``: ``minhash_dedup`` and ``semantic_dedup`` (cosine of sentence embeddings, so judged
here against a lexical truth it was not built for; its seconds include encoding). Written to
benchmarks/results/near_dup_quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np

from kdata.steps.dedup import MinHashDedupStep
from kdata.steps.semantic import SemanticDedupStep

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "near_dup_quality.json"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train_6000.jsonl"
SEEDS = REPO / "recipes" / "data" / "seed_tasks.jsonl"
THRESHOLD = 0.7
EDIT_RATES = (0.0, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30)
J_BANDS = (0.0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 1.01)
Pair = tuple[int, int]


def source_texts(n: int) -> tuple[str, list[str]]:
    """The first ``n`` GSM8K questions, or the seed tasks' instructions and outputs."""
    if GSM8K.exists():
        return GSM8K.name, [json.loads(line)["question"] for line in GSM8K.open()][:n]
    rows = [json.loads(line) for line in SEEDS.open()]
    return SEEDS.name, [r["instruction"] + " " + r["instances"][0]["output"] for r in rows][:n]


def variant(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """``text`` with ``round(rate * words)`` random edits (swap, delete, insert, reorder)."""
    words = text.split()
    for _ in range(round(rate * len(words))):
        op, p = rng.choice(("swap", "delete", "insert", "reorder")), rng.randrange(len(words))
        if op == "swap":
            words[p] = rng.choice(vocab)
        elif op == "delete" and len(words) > 1:
            del words[p]
        elif op == "insert":
            words.insert(p, rng.choice(vocab))
        elif op == "reorder" and p + 1 < len(words):
            words[p], words[p + 1] = words[p + 1], words[p]
    return " ".join(words)


def corpus(texts: list[str], seed: int = 0) -> tuple[list[str], dict[Pair, float]]:
    """Originals and planted variants, shuffled; and each planted pair's edit rate."""
    rng = random.Random(seed)
    vocab = sorted({w for t in texts for w in t.split()})
    planted = rng.sample(range(len(texts)), len(texts) * 6 // 10)
    docs = list(texts)
    rate_of: dict[Pair, float] = {}
    for k, i in enumerate(planted):
        rate = EDIT_RATES[k % len(EDIT_RATES)]
        docs.append(variant(texts[i], rate, vocab, rng))
        rate_of[(i, len(docs) - 1)] = rate
    order = list(range(len(docs)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    pairs = {tuple(sorted((where[i], where[j]))): r for (i, j), r in rate_of.items()}
    return [docs[i] for i in order], pairs


def shingles(text: str) -> set[tuple[str, ...]]:
    """Word 3-grams as minhash_dedup cuts them (a shorter text is one shingle)."""
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i : i + 3]) for i in range(max(len(w) - 2, 1))} if w else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def true_duplicates(sets: list[set]) -> set[Pair]:
    """Every pair with Jaccard >= THRESHOLD, exactly: the All-Pairs prefix-filtered join."""
    freq: dict = defaultdict(int)
    for s in sets:
        for g in s:
            freq[g] += 1
    index: dict = defaultdict(list)
    found = set()
    for j, s in enumerate(sets):
        if not s:
            continue
        rare_first = sorted(s, key=lambda g: (freq[g], g))
        prefix = rare_first[: len(s) - math.ceil(THRESHOLD * len(s)) + 1]
        candidates = {i for g in prefix for i in index[g]}
        found |= {(i, j) for i in candidates if jaccard(sets[i], s) >= THRESHOLD}
        for g in prefix:
            index[g].append(j)
    return found


def cluster_pairs(canonical: np.ndarray) -> set[Pair]:
    """Every pair of documents with the same canonical document."""
    clusters: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(canonical.tolist()):
        clusters[c].append(i)
    return {(a, b) for m in clusters.values() for k, a in enumerate(m) for b in m[k + 1 :]}


def minhash(docs: list[str]) -> set[Pair]:
    """minhash_dedup at its defaults: pairs within each cluster."""
    return cluster_pairs(MinHashDedupStep(columns=["text"]).find(docs)[0])


def semantic(docs: list[str]) -> set[Pair]:
    """semantic_dedup at its defaults (all-MiniLM-L6-v2, cosine 0.9): pairs within each cluster."""
    step = SemanticDedupStep(columns=["text"])
    return cluster_pairs(step.find(step.embed(docs))[0])


METHODS: dict[str, Callable[[list[str]], set[Pair]]] = {
    "minhash_dedup": minhash,
    "semantic_dedup": semantic,
}


def scores(tp: int, fp: int, fn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else None
    r = tp / (tp + fn) if tp + fn else None
    f1 = 2 * p * r / (p + r) if p and r else None
    rnd = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {"tp": tp, "fp": fp, "fn": fn, "precision": rnd(p), "recall": rnd(r), "f1": rnd(f1)}


def evaluate(found: set[Pair], truth: set[Pair], planted: dict[Pair, float], sets) -> dict:
    """Overall scores, scores per edit rate, and the errors by true-Jaccard band."""
    out = {"overall": scores(len(found & truth), len(found - truth), len(truth - found))}
    for rate in EDIT_RATES:
        pairs = [p for p, r in planted.items() if r == rate]
        js = [jaccard(sets[i], sets[j]) for i, j in pairs]
        pos = {p for p in pairs if p in truth}
        got = {p for p in pairs if p in found}
        out[f"edit_rate_{rate:.2f}"] = {
            "pairs": len(pairs),
            "mean_true_jaccard": round(float(np.mean(js)), 3),
            "share_duplicates": round(len(pos) / len(pairs), 3),
            **scores(len(got & pos), len(got - pos), len(pos - got)),
        }
    bands = {f"{lo:.2f}-{min(hi, 1):.2f}": [0, 0] for lo, hi in pairwise(J_BANDS)}
    for kind, pairs in ((0, truth - found), (1, found - truth)):
        for i, j in pairs:
            k = int(np.searchsorted(J_BANDS, jaccard(sets[i], sets[j]), side="right")) - 1
            bands[list(bands)[k]][kind] += 1
    out["errors_by_true_jaccard"] = {b: {"fn": v[0], "fp": v[1]} for b, v in bands.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--originals", type=int, default=3000)
    args = parser.parse_args()
    source, texts = source_texts(args.originals)
    docs, planted = corpus(texts)
    sets = [shingles(d) for d in docs]
    truth = true_duplicates(sets)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "source": source,
        "originals": len(texts),
        "docs": len(docs),
        "threshold": THRESHOLD,
        "true_duplicate_pairs": len(truth),
        "planted_pairs": len(planted),
        "methods": {},
    }
    for name, method in METHODS.items():
        t0 = time.perf_counter()
        found = method(docs)
        seconds = round(time.perf_counter() - t0, 3)
        result["methods"][name] = {"seconds": seconds, **evaluate(found, truth, planted, sets)}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(result: dict) -> None:
    """The results, one line per edit rate and method."""
    print(f"{result['docs']} docs, {result['true_duplicate_pairs']} true duplicate pairs")
    widths = (6, 8, 6, 7, 7, 7)
    for name, m in result["methods"].items():
        print(f"\n{name} ({m['seconds']} s)")
        heads = ("pairs", "mean J", "dup", "P", "R", "F1")
        print(f"{'':16}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)))
        for key, v in m.items():
            if key == "overall" or key.startswith("edit_rate"):
                cells = [v.get(k, "") for k in ("pairs", "mean_true_jaccard", "share_duplicates")]
                cells += [
                    "-" if v[k] is None else f"{v[k]:.3f}" for k in ("precision", "recall", "f1")
                ]
                print(
                    f"{key:16}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
                )
        bands = m["errors_by_true_jaccard"].items()
        print(
            "errors (fn/fp) by true Jaccard: "
            + ", ".join(f"{b} {e['fn']}/{e['fp']}" for b, e in bands)
        )


if __name__ == "__main__":
    main()
