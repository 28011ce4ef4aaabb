"""Self-Instruct's novelty filter: `NoveltyIndex` against a ROUGE-L scan of the whole pool.

One command: ``python benchmarks/novelty_filter.py [--pool N] [--queries Q]``.

Texts: the 175 Self-Instruct seed instructions (``recipes/data/seed_tasks.jsonl``), each variant
made by replacing about 40% of a seed's words with words drawn from all seeds and, half the time,
appending up to 8 more: instruction-like texts of instruction-like lengths, some near their seed
and some not. The pool holds ``N`` variants (default 5,000); ``Q`` more are the queries.

(a) kdata: ``NoveltyIndex.most_similar(query, 0.7)`` over the pool (token-overlap bound, then
    the exact LCS only where the bound reaches the threshold);
(b) baseline: ``kdata.answers.rouge_l`` of the query against every pool text, keeping the best;
(c) the same scan with every text tokenised once beforehand (``rouge_l_tokens``), to tell the
    gain of the bound from that of tokenising once.

Both must reach the same decision and the same best score for every query the baseline runs
(the baseline is slow, so it runs on the first ``--checked`` queries). Reported: milliseconds per
query for each, their ratio, and how many queries the filter rejects. Printed and written to
benchmarks/results/novelty_filter.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from kdata.answers import rouge_l, rouge_l_tokens, words
from kdata.steps.novelty import NoveltyIndex

HERE = Path(__file__).resolve().parent
SEEDS = HERE.parent / "recipes" / "data" / "seed_tasks.jsonl"
RESULTS = HERE / "results" / "novelty_filter.json"
THRESHOLD = 0.7


def variants(n: int, rng: random.Random) -> list[str]:
    seeds = [json.loads(line)["instruction"] for line in SEEDS.open(encoding="utf-8")]
    vocab = sorted({w for s in seeds for w in s.split()})
    out = []
    for _ in range(n):
        words = [w if rng.random() > 0.4 else rng.choice(vocab) for w in rng.choice(seeds).split()]
        if rng.random() < 0.5:
            words += [rng.choice(vocab) for _ in range(rng.randint(0, 8))]
        out.append(" ".join(words))
    return out


def scan(query: str, pool: list[str]) -> tuple[int, float] | None:
    best = None
    for j, text in enumerate(pool):
        score = rouge_l(query, text)
        if score >= THRESHOLD and (best is None or score > best[1]):
            best = (j, score)
    return best


def scan_tokens(query: list[str], pool: list[list[str]]) -> tuple[int, float] | None:
    best = None
    for j, tokens in enumerate(pool):
        score = rouge_l_tokens(query, tokens)
        if score >= THRESHOLD and (best is None or score > best[1]):
            best = (j, score)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--checked", type=int, default=100)
    args = ap.parse_args()
    rng = random.Random(0)
    pool, queries = variants(args.pool, rng), variants(args.queries, rng)

    t0 = time.perf_counter()
    index = NoveltyIndex()
    for text in pool:
        index.add(text)
    build_s = time.perf_counter() - t0
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(index.most_similar(q, THRESHOLD))
        times.append(time.perf_counter() - t)
    fast_ms = statistics.mean(times) * 1000

    checked = queries[: args.checked]
    t0 = time.perf_counter()
    expected = [scan(q, pool) for q in checked]
    scan_ms = (time.perf_counter() - t0) / len(checked) * 1000
    pool_tokens = [words(t) for t in pool]
    t0 = time.perf_counter()
    expected_tok = [scan_tokens(words(q), pool_tokens) for q in checked]
    scan_tok_ms = (time.perf_counter() - t0) / len(checked) * 1000
    assert expected_tok == expected
    for got, want in zip(found, expected, strict=False):
        assert (got is None) == (want is None), (got, want)
        assert got is None or abs(got[1] - want[1]) < 1e-12, (got, want)

    result = {
        "pool": args.pool,
        "queries": args.queries,
        "checked_against_scan": len(checked),
        "threshold": THRESHOLD,
        "rejected": sum(f is not None for f in found),
        "index_build_s": round(build_s, 3),
        "index_ms_per_query": round(fast_ms, 3),
        "scan_ms_per_query": round(scan_ms, 1),
        "pretokenised_scan_ms_per_query": round(scan_tok_ms, 1),
        "speedup": round(scan_ms / fast_ms, 1),
        "speedup_over_pretokenised_scan": round(scan_tok_ms / fast_ms, 1),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
