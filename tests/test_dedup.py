"""Exact and MinHash dedup: one row survives per cluster, the right one, and nothing vanishes."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from conftest import SEED_TASKS, write_jsonl

import kdata
from kdata.blocks import read_dropped, read_table
from kdata.steps.base import StepContext, provenance, rid
from kdata.steps.dedup import MinHashDedupStep

INSTRUCTIONS = [json.loads(line)["instruction"] for line in SEED_TASKS.open(encoding="utf-8")]
# 35 distinct texts of about 65 words: five consecutive Self-Instruct seed instructions each.
TEXTS = [" ".join(INSTRUCTIONS[i : i + 5]) for i in range(0, len(INSTRUCTIONS), 5)]
BASE = TEXTS[0]


def edit(text: str, positions: list[int]) -> str:
    """Replace the words at ``positions`` with words no seed text has."""
    words = text.split()
    for k, p in enumerate(positions):
        words[p] = f"zq{k}x"
    return " ".join(words)


def jaccard(a: str, b: str) -> float:
    """True Jaccard of word 3-grams, as the step shingles them."""

    def grams(t: str) -> set[tuple[str, ...]]:
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i : i + 3]) for i in range(len(w) - 2)}

    return len(grams(a) & grams(b)) / len(grams(a) | grams(b))


V1, V2 = edit(BASE, [10]), edit(BASE, [40])  # one word swapped
LONGER = BASE + " zq7x zq8x zq9x"  # three words more
NEAR_MISS = edit(BASE, [5, 15, 25, 35, 45, 55])  # six words swapped: Jaccard about 0.55


def build(tmp_path: Path, rows: list[dict], step: str) -> tuple[kdata.Run, list[dict], list[dict]]:
    """Seeds (the rows), then ``step`` (a YAML flow mapping); returns run, output and dropped."""
    write_jsonl(tmp_path / "seeds.jsonl", rows)
    recipe = kdata.recipe_from_yaml(
        f"name: t\nsteps:\n  - {{type: seeds, path: seeds.jsonl}}\n  - {step}\n",
        base_dir=tmp_path,
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    folder = run.dir / "steps" / run.steps[1].name
    drops = read_dropped(folder)
    for d in drops:
        d["detail"], d["row"] = json.loads(d["detail"]), json.loads(d["row"])
    s = run.steps[1]
    assert s.expected == s.rows_in == s.rows_out + s.dropped + s.failed
    out = run.rows()
    kept = {r["_kdata"]["id"] for r in out}
    assert all(d["detail"]["duplicate_of"] in kept for d in drops)
    return run, out, drops


def test_the_texts_are_what_the_tests_assume() -> None:
    assert len(TEXTS) == 35 and min(len(t.split()) for t in TEXTS) > 40
    assert min(jaccard(BASE, v) for v in (V1, V2, LONGER)) > 0.85
    assert min(jaccard(LONGER, v) for v in (V1, V2)) > 0.8
    assert 0.5 < jaccard(BASE, NEAR_MISS) < 0.6
    assert max(jaccard(a, b) for i, a in enumerate(TEXTS) for b in TEXTS[i + 1 :]) < 0.2


def test_one_row_of_a_planted_cluster_survives_and_near_misses_stay(tmp_path: Path) -> None:
    texts = [*TEXTS, V1, NEAR_MISS, V2, BASE]
    rows = [{"response": t, "n": i} for i, t in enumerate(texts)]
    _, out, drops = build(tmp_path, rows, "{type: minhash_dedup, columns: [response]}")
    assert sorted(r["n"] for r in out) == [*range(35), 36]  # TEXTS and the near miss
    assert sorted(d["row"]["n"] for d in drops) == [35, 37, 38]
    base_id = next(r["_kdata"]["id"] for r in out if r["n"] == 0)
    for d in drops:
        assert d["reason"] == "duplicate" and d["detail"]["duplicate_of"] == base_id
        assert abs(d["detail"]["similarity"] - jaccard(BASE, d["row"]["response"])) < 0.12
    assert next(d for d in drops if d["row"]["n"] == 38)["detail"]["similarity"] == 1.0


def test_keep_longest_keeps_the_longest(tmp_path: Path) -> None:
    rows = [{"response": t, "n": i} for i, t in enumerate([*TEXTS[:5], V1, LONGER, V2])]
    _, out, drops = build(
        tmp_path, rows, "{type: minhash_dedup, columns: [response], keep: longest}"
    )
    assert sorted(r["n"] for r in out) == [1, 2, 3, 4, 6]
    assert {d["detail"]["duplicate_of"] for d in drops} == {
        next(r["_kdata"]["id"] for r in out if r["n"] == 6)
    }


def test_keep_score_keeps_the_best_and_fails_rows_without_a_score(tmp_path: Path) -> None:
    rows = [
        {"response": BASE, "q": 0.2},
        {"response": V1, "q": 0.9},
        {"response": V2, "q": 0.5},
        {"response": TEXTS[1], "q": None},
        {"response": TEXTS[2]},
    ]
    step = "{type: minhash_dedup, columns: [response], keep: score, score_column: q}"
    run, out, drops = build(tmp_path, rows, step)
    assert [r["q"] for r in out] == [0.9]
    assert len(drops) == 2 and run.steps[1].failure_classes == {"missing_column": 2}


def test_a_dropped_row_is_within_threshold_of_its_kept_row_not_of_a_dropped_one(
    tmp_path: Path,
) -> None:
    # a ~ b and b ~ c, but a and c are too far apart: b goes, c stays.
    a = TEXTS[3] + " " + TEXTS[4]
    b = edit(a, [6, 32, 58, 84, 110])
    c = edit(b, [19, 45, 71, 97, 123])
    assert jaccard(a, b) > 0.78 and jaccard(b, c) > 0.78 and jaccard(a, c) < 0.64
    step = "{type: minhash_dedup, columns: [response], num_perm: 512}"
    _, out, drops = build(tmp_path, [{"response": t} for t in (a, b, c)], step)
    assert [r["response"] for r in out] == [a, c]
    assert [d["row"]["response"] for d in drops] == [b] and drops[0]["detail"]["similarity"] >= 0.7


def test_char_shingles_catch_typos(tmp_path: Path) -> None:
    typo = BASE.replace("breakfast", "brekfast").replace("protein", "protien")
    assert typo != BASE
    rows = [{"response": t} for t in (BASE, typo, *TEXTS[1:4])]
    step = "{type: minhash_dedup, columns: [response], shingle: char, ngram: 5}"
    _, out, drops = build(tmp_path, rows, step)
    assert len(out) == 4 and [d["row"]["response"] for d in drops] == [typo]


def test_missing_columns_fail_and_empty_texts_are_kept(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "response": BASE},
        {"prompt": "p", "response": V1},
        {"prompt": "p"},
        {"prompt": "p", "response": None},
        {"response": TEXTS[1]},
        {"prompt": "", "response": ""},
        {"prompt": "", "response": "?!"},
        {"prompt": "", "response": ""},
    ]
    run, out, _ = build(tmp_path, rows, "{type: minhash_dedup, columns: [prompt, response]}")
    assert [r["response"] for r in out] == [BASE, "", "?!", ""]
    assert run.steps[1].failure_classes == {"missing_column": 3}
    failed = read_table(run.dir / "steps/01_minhash_dedup", "failed").to_pylist()
    assert "column 'response' is missing or null" in failed[0]["error"]
    assert "column 'prompt' is missing or null" in failed[2]["error"]


HELLO = ["Hello  World.", "hello world.", "Hello World.", "Hello, world!", "Hello,world"]


@pytest.mark.parametrize(
    ("options", "duplicates"),
    [
        ("", {1: 0, 2: 0}),
        ("lowercase: false, ", {2: 0}),
        ("collapse_whitespace: false, ", {2: 1}),
        ("strip_punctuation: true, ", {1: 0, 2: 0, 3: 0}),
        ("lowercase: false, collapse_whitespace: false, ", {}),
    ],
)
def test_exact_dedup_normalisation(tmp_path: Path, options: str, duplicates: dict) -> None:
    rows = [{"r": t, "n": i} for i, t in enumerate(HELLO)]
    _, out, drops = build(tmp_path, rows, f"{{type: exact_dedup, {options}columns: [r]}}")
    assert [r["n"] for r in out] == [i for i in range(5) if i not in duplicates]
    n_of = {r["_kdata"]["id"]: r["n"] for r in out}
    assert {d["row"]["n"]: n_of[d["detail"]["duplicate_of"]] for d in drops} == duplicates
    assert all(d["detail"]["similarity"] == 1.0 for d in drops)


def test_exact_dedup_keeps_columns_apart_and_fails_missing_ones(tmp_path: Path) -> None:
    rows = [{"a": "x y", "b": "z"}, {"a": "x", "b": "y z"}, {"a": "x y", "b": "z"}, {"a": "x"}]
    run, out, drops = build(tmp_path, rows, "{type: exact_dedup, columns: [a, b]}")
    assert [(r["a"], r["b"]) for r in out] == [("x y", "z"), ("x", "y z")]
    assert len(drops) == 1 and run.steps[1].failure_classes == {"missing_column": 1}


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("bands: 20, rows: 7", "bands * rows = 140 exceeds num_perm = 128"),
        ("bands: 20", "give both bands and rows, or neither"),
        ("keep: score", "keep: score needs score_column"),
        ("score_column: q", "score_column needs keep: score"),
        ("shingle: token", "Input should be 'word' or 'char'"),
        ("threshold: 0.4", "threshold (0.4) is below floor (0.5), the lowest similarity"),
    ],
)
def test_bad_config_is_a_clear_recipe_error(step: str, message: str) -> None:
    with pytest.raises(kdata.RecipeError, match=re.escape(message)) as info:
        kdata.recipe_from_yaml(
            f"name: t\nsteps:\n  - {{type: seeds, path: s.jsonl}}\n"
            f"  - {{type: minhash_dedup, columns: [r], {step}}}\n"
        )
    assert info.value.step == "steps[1] (minhash_dedup)"


def test_lsh_shape_finds_pairs_at_the_floor_whatever_the_threshold() -> None:
    assert MinHashDedupStep(columns=["r"]).lsh_shape() == (42, 3)
    assert MinHashDedupStep(columns=["r"], threshold=0.9).lsh_shape() == (42, 3)
    assert MinHashDedupStep(columns=["r"], floor=0.7).lsh_shape() == (32, 4)
    assert MinHashDedupStep(columns=["r"], floor=0.9, threshold=0.9).lsh_shape() == (12, 10)
    assert MinHashDedupStep(columns=["r"], bands=16, rows=8).lsh_shape() == (16, 8)


def test_values_of_the_wrong_type_fail_and_progress_counts_every_row_once() -> None:
    values = [*TEXTS, V1, "", None, 42, BASE, V2]
    scores = [1.0] * 35 + ["high", True, 1.0, 1.0, float("nan"), None]
    rows = [
        {"r": t, "q": q, "_kdata": provenance(str(i), [], "s")}
        for i, (t, q) in enumerate(zip(values, scores, strict=True))
    ]
    totals, done = [], []
    ctx = StepContext("d", Path("."), None, advance=done.append, set_total=totals.append)
    out = asyncio.run(MinHashDedupStep(columns=["r"]).run(rows, ctx))
    assert totals == [41] and sum(done) == 41
    assert (len(out.rows), len(out.dropped), len(out.failed)) == (36, 3, 2)
    assert [f["error_class"] for f in out.failed] == ["missing_column", "wrong_type"]
    assert "column 'r' holds int, not text" in out.failed[1]["error"]
    step = MinHashDedupStep(columns=["r"], keep="score", score_column="q")
    out = asyncio.run(step.run(rows, StepContext("d", Path("."), None)))
    assert [f["row_id"] for f in out.failed] == ["37", "38", "35", "36", "39", "40"]
    assert [f["error_class"] for f in out.failed][2:] == [*["wrong_type"] * 3, "missing_column"]
    assert [rid(r) for r in out.rows] == [str(i) for i in range(35)] and not out.dropped


def test_partitioned_decisions_are_the_one_partition_decisions(tmp_path: Path) -> None:
    """`shuffle` and `each` cut into several partitions (as on Ray) decide as one partition."""
    from kdata.blocks import input_blocks
    from kdata.executors.local import Blocks, LocalExecutor
    from kdata.steps.dedup import ExactDedupStep

    rows = [{"text": TEXTS[i % 7] if i % 3 else edit(TEXTS[i % 7], [i % 40])} for i in range(90)]
    rows += [{"text": None}, {"text": " " + TEXTS[2].upper()}]  # a failure, an exact repeat
    write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = kdata.recipe_from_yaml(
        "name: p\nsteps:\n  - {type: seeds, path: rows.jsonl}\nexecution: {block_rows: 10}\n"
        "report: {diversity: false}\n",
        tmp_path,
    )
    kdata.build(recipe, run_dir=tmp_path / "run")
    seeds = tmp_path / "run" / "steps" / "00_seeds"
    ctx = StepContext(name="dedup", base_dir=tmp_path, pool=None)
    local = LocalExecutor(10)
    steps = [
        ExactDedupStep(columns=["text"]),
        MinHashDedupStep(columns=["text"], threshold=0.8, keep="longest"),
    ]
    try:
        for step in steps:
            found = []
            for partitions in (1, 3):
                blocks = Blocks(local, lambda columns: input_blocks(seeds, 10, columns))
                blocks.partitions = partitions
                decision = asyncio.run(step.decide(blocks, ctx))
                found.append(
                    [
                        [(list(k), ids, list(s)) for k, ids, s in decision.of(b).blocks.values()]
                        for b in range(10)
                    ]
                )
            assert found[0] == found[1], step.type
            assert sum(len(b) for b in found[0]) > 0, step.type  # it found duplicates
    finally:
        local.close()
