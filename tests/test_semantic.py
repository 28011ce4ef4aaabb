"""Semantic dedup: planted paraphrases collapse to one row, the right one, offline and cached."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SEED_TASKS, write_jsonl

import kdata
from kdata.blocks import read_dropped
from kdata.steps import semantic
from kdata.steps.base import StepContext, provenance
from kdata.steps.semantic import SemanticDedupStep

INSTRUCTIONS = [json.loads(line)["instruction"] for line in SEED_TASKS.open(encoding="utf-8")]
# Planted paraphrases of seed instructions; every one is >= 0.9 cosine to its seed, and the seed
# instructions are all < 0.8 to one another (checked below).
PARAPHRASES = {
    6: [
        "Brainstorm a list of possible New Year resolutions.",
        "Brainstorm some possible resolutions for the New Year.",
        "Brainstorm a list of possible New Year's resolutions!",
    ],
    11: [
        "Write a grocery list for a healthy meal.",
        "Make a grocery list for a healthy dinner.",
        "Make a grocery list for a healthy meal, please.",
    ],
    39: ["Extract every country name in the paragraph and list them, separated by commas."],
    34: ["I broke up with my girlfriend and I feel so sad. Can you give me some suggestions?"],
}
# Near misses (0.83 to 0.86 to seed 34), but 0.97 to each other: a second cluster of their own.
BOYFRIEND = [
    "I broke up with my boyfriend and I am feeling so sad. Can you give me some advice?",
    "I broke up with my boyfriend and I feel so sad. Can you give me some suggestions?",
]
# These tests pin cosines of MiniLM itself; tests/test_embedders.py covers the static default.
STEP = "{type: semantic_dedup, model: all-MiniLM-L6-v2, columns: [t]"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network (a model download, say) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def model():
    """The bundled MiniLM, loaded once (the step keeps it loaded for the process)."""
    return semantic._load_model(semantic.MINILM)


def cos(model, a: str, b: str) -> float:
    e = model.encode([a, b], normalize_embeddings=True)
    return float(e[0] @ e[1])


def build(tmp_path: Path, rows: list[dict], step: str) -> tuple[kdata.Run, list[dict], list[dict]]:
    """Seeds (the rows), then ``step`` (a YAML flow mapping); returns run, output and dropped."""
    write_jsonl(tmp_path / "seeds.jsonl", rows)
    recipe = kdata.recipe_from_yaml(
        f"name: t\nreport: {{model: {semantic.MINILM}}}\n"  # the report shares the store
        f"steps:\n  - {{type: seeds, path: seeds.jsonl}}\n  - {step}\n",
        base_dir=tmp_path,
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    drops = read_dropped(run.dir / "steps" / run.steps[1].name)
    for d in drops:
        d["detail"], d["row"] = json.loads(d["detail"]), json.loads(d["row"])
    s = run.steps[1]
    assert s.expected == s.rows_in == s.rows_out + s.dropped + s.failed
    out = run.rows()
    kept = {r["_kdata"]["id"] for r in out}
    assert all(d["reason"] == "duplicate" and d["detail"]["duplicate_of"] in kept for d in drops)
    return run, out, drops


def test_the_texts_are_what_the_tests_assume(model) -> None:
    emb = model.encode(INSTRUCTIONS, normalize_embeddings=True)
    sims = emb @ emb.T
    np.fill_diagonal(sims, 0)
    assert len(INSTRUCTIONS) == 175 and sims.max() < 0.8
    for seed, texts in PARAPHRASES.items():
        assert all(cos(model, INSTRUCTIONS[seed], t) >= 0.9 for t in texts)
    assert all(0.8 < cos(model, INSTRUCTIONS[34], t) < 0.88 for t in BOYFRIEND)
    assert cos(model, *BOYFRIEND) > 0.95


def test_one_row_per_planted_cluster_survives_and_unrelated_rows_stay(
    tmp_path: Path, model
) -> None:
    texts = [*INSTRUCTIONS, *(t for ts in PARAPHRASES.values() for t in ts), *BOYFRIEND]
    rows = [{"t": t, "n": i} for i, t in enumerate(texts)]
    _, out, drops = build(tmp_path, rows, STEP + "}")
    assert sorted(r["n"] for r in out) == [*range(175), 183]  # the seeds and one boyfriend row
    assert sorted(d["row"]["n"] for d in drops) == [*range(175, 183), 184]
    id_of = {r["n"]: r["_kdata"]["id"] for r in out}
    for d in drops:
        text = d["row"]["t"]
        seed = next((s for s, ts in PARAPHRASES.items() if text in ts), None)
        assert d["detail"]["duplicate_of"] == id_of[183 if seed is None else seed]
        kept_text = texts[183 if seed is None else seed]
        assert d["detail"]["similarity"] >= 0.9
        assert d["detail"]["similarity"] == pytest.approx(cos(model, kept_text, text), abs=1e-4)


def test_keep_longest_keeps_the_longest(tmp_path: Path) -> None:
    texts = [INSTRUCTIONS[11], *PARAPHRASES[11], *INSTRUCTIONS[:3]]
    rows = [{"t": t, "n": i} for i, t in enumerate(texts)]
    _, out, drops = build(tmp_path, rows, STEP + ", keep: longest}")
    assert sorted(r["n"] for r in out) == [3, 4, 5, 6]  # "..., please." and the three others
    kept = next(r["_kdata"]["id"] for r in out if r["n"] == 3)
    assert [d["detail"]["duplicate_of"] for d in drops] == [kept] * 3


def test_keep_score_keeps_the_best_and_fails_rows_without_a_score(tmp_path: Path) -> None:
    rows = [
        {"t": INSTRUCTIONS[6], "q": 0.2},
        *({"t": t, "q": q} for t, q in zip(PARAPHRASES[6], (0.5, 0.9, 0.1), strict=True)),
        {"t": INSTRUCTIONS[1], "q": None},
        {"t": INSTRUCTIONS[2]},
        {"q": 1.0},
    ]
    run, out, drops = build(tmp_path, rows, STEP + ", keep: score, score_column: q}")
    assert [r["q"] for r in out] == [0.9]
    assert len(drops) == 3 and run.steps[1].failure_classes == {"missing_column": 3}


def test_a_dropped_row_is_within_threshold_of_its_kept_row_not_of_a_dropped_one(
    tmp_path: Path, model
) -> None:
    # a ~ b and b ~ c, but a and c are too far apart: b goes, c stays.
    a, b, c = (
        "Create a birthday planning checklist.",
        "Create a birthday party planning checklist.",
        "Make a checklist for planning a birthday party.",
    )
    assert cos(model, a, b) > 0.9 and cos(model, b, c) > 0.9 and cos(model, a, c) < 0.88
    _, out, drops = build(tmp_path, [{"t": t} for t in (a, b, c)], STEP + "}")
    assert [r["t"] for r in out] == [a, c]
    assert [d["row"]["t"] for d in drops] == [b] and drops[0]["detail"]["similarity"] >= 0.9


def test_approximate_index_finds_the_pairs_of_the_exact_one() -> None:
    outputs = [json.loads(line)["instances"][0]["output"] for line in SEED_TASKS.open()]
    texts = [*INSTRUCTIONS, *(t for ts in PARAPHRASES.values() for t in ts), *outputs[:100]]
    exact = SemanticDedupStep(columns=["t"], threshold=0.5, floor=0.5, model=semantic.MINILM)
    approx = exact.model_copy(update={"approximate_above": 0})
    emb = exact.embed(texts)
    assert type(exact.build_index(emb)).__name__ == "IndexFlatIP"
    assert type(approx.build_index(emb)).__name__ == "IndexHNSWFlat"

    def pairs(step: SemanticDedupStep) -> set[tuple[int, int]]:
        return set(map(tuple, step.neighbours(emb).pairs.T.tolist()))

    truth, found = pairs(exact), pairs(approx)
    assert len(truth) > 100
    assert len(found & truth) / len(truth) >= 0.95
    kept_exact, kept_approx = (s.find(emb)[0] == np.arange(len(emb)) for s in (exact, approx))
    assert (kept_exact == kept_approx).mean() >= 0.95


def test_approximate_index_in_a_run(tmp_path: Path) -> None:
    texts = [*INSTRUCTIONS[:20], *PARAPHRASES[6], *PARAPHRASES[11]]
    _, out, drops = build(tmp_path, [{"t": t} for t in texts], STEP + ", approximate_above: 0}")
    assert len(out) == 20 and len(drops) == 6


def test_embeddings_are_cached_in_the_run_dir_and_reused(
    tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    encode = model.encode
    monkeypatch.setattr(
        model, "encode", lambda texts, **kw: calls.append(len(texts)) or encode(texts, **kw)
    )
    rows = [{"t": t} for t in [*INSTRUCTIONS[:10], *PARAPHRASES[6]]]
    _, out, _ = build(tmp_path, rows, STEP + "}")
    store = tmp_path / "run" / "embeddings" / "store.sqlite"
    assert len(out) == 10 and stored(store) == len(rows) and calls == [len(rows)]
    assert not (tmp_path / "run" / "tmp").exists()  # the step's block files are removed
    mtime = store.stat().st_mtime_ns
    _, out, _ = build(tmp_path, rows, STEP + ", threshold: 0.99}")  # the step runs again
    assert len(out) == 13 and calls == [len(rows)]  # ... without encoding anything
    assert store.stat().st_mtime_ns == mtime
    rows[0]["t"] += " Please."
    build(tmp_path, rows, STEP + "}")  # one text changed: it alone is embedded
    assert calls == [len(rows), 1] and stored(store) == len(rows) + 1
    emb = SemanticDedupStep(columns=["t"], model=semantic.MINILM).embed(
        [r["t"] for r in rows], store.parent
    )
    assert calls == [len(rows), 1]  # all stored
    fresh = model.encode([r["t"] for r in rows], normalize_embeddings=True)
    assert np.allclose(emb, fresh, atol=1e-5)  # each text's own embedding, in order


def stored(store: Path) -> int:
    """How many embeddings the store holds."""
    with sqlite3.connect(store) as db:
        return db.execute("SELECT count(*) FROM emb").fetchone()[0]


def test_a_build_stopped_mid_step_keeps_the_blocks_it_embedded(
    tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    encode = model.encode

    def failing_third(texts, **kw):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill in the middle of the third block
        return encode(texts, **kw)

    monkeypatch.setattr(model, "encode", failing_third)
    rows = [{"t": t} for t in [*INSTRUCTIONS[:14], *PARAPHRASES[6]]]  # 4 blocks of 5
    write_jsonl(tmp_path / "seeds.jsonl", rows)
    recipe = kdata.recipe_from_yaml(
        f"name: t\nexecution: {{block_rows: 5}}\nreport: {{model: {semantic.MINILM}}}\n"
        f"steps:\n  - {{type: seeds, path: seeds.jsonl}}\n  - {STEP}}}\n",
        base_dir=tmp_path,
    )
    with pytest.raises(KeyboardInterrupt):
        kdata.build(recipe, run_dir=tmp_path / "run")
    store = tmp_path / "run" / "embeddings" / "store.sqlite"
    assert calls == [5, 5, 5] and stored(store) == 10  # two blocks finished and stored
    assert not (tmp_path / "run" / "tmp").exists()
    calls.clear()
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    assert calls[:2] == [5, 2]  # only the two unfinished blocks are embedded
    assert len(run.rows()) == 14 and stored(store) == len(rows)


def test_the_store_finds_every_key_even_those_ending_in_a_nul_byte(tmp_path: Path) -> None:
    from kdata.steps.semantic import EmbeddingStore

    texts = [f"text {i}" for i in range(3000)]
    keys = EmbeddingStore.keys("m", texts)
    assert any(k.endswith(b"\0") for k in keys)  # about 1 in 256
    emb = np.arange(len(texts) * 4, dtype=np.float32).reshape(len(texts), 4)
    store = EmbeddingStore(tmp_path)
    store.put(keys[:2000], emb[:2000])
    store.put(keys[2000:], emb[2000:])
    found = store.get(keys[::-1] + EmbeddingStore.keys("other model", texts[:1]))
    assert found[-1] is None  # another model's key
    assert np.array_equal(np.stack(found[:-1]), emb[::-1])


def test_wrong_values_fail_and_progress_counts_every_row_once(tmp_path: Path) -> None:
    values = [INSTRUCTIONS[6], PARAPHRASES[6][0], None, 42, INSTRUCTIONS[7], ""]
    rows = [{"t": t, "_kdata": provenance(str(i), [], "s")} for i, t in enumerate(values)]
    rows[0].pop("t")
    totals, done = [], []
    ctx = StepContext("d", tmp_path, None, advance=done.append, set_total=totals.append)
    out = asyncio.run(SemanticDedupStep(columns=["t"]).run(rows, ctx))
    assert totals == [6] and sum(done) == 6
    assert (len(out.rows), len(out.dropped), len(out.failed)) == (3, 0, 3)
    assert [f["error_class"] for f in out.failed] == ["missing_column"] * 2 + ["wrong_type"]
    assert "column 't' holds int, not text" in out.failed[2]["error"]
    assert not (tmp_path / "embeddings").exists()  # this context has no run directory


def test_missing_packages_give_the_pip_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    rows = [{"t": "x", "_kdata": provenance("0", [], "s")}]
    with pytest.raises(kdata.KdataError, match=re.escape("pip install 'kdata[embed]'")):
        asyncio.run(SemanticDedupStep(columns=["t"]).run(rows, StepContext("d", Path("."), None)))


def test_an_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(kdata.KdataError, match="cannot load embedding model 'no/such-model'"):
        SemanticDedupStep(columns=["t"], model="no/such-model").embed(["x"])


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("keep: score", "keep: score needs score_column"),
        ("threshold: 1.5", "less than or equal to 1"),
        ("k: 0", "greater than or equal to 1"),
        ("metric: l2", "unknown key 'metric'"),
    ],
)
def test_bad_config_is_a_clear_recipe_error(step: str, message: str) -> None:
    with pytest.raises(kdata.RecipeError, match=re.escape(message)) as info:
        kdata.recipe_from_yaml(
            f"name: t\nsteps:\n  - {{type: seeds, path: s.jsonl}}\n  - {STEP}, {step}}}\n"
        )
    assert info.value.step == "steps[1] (semantic_dedup)"


def test_reading_a_recipe_imports_no_heavy_package() -> None:
    code = (
        "import sys, kdata\n"
        "r = kdata.recipe_from_yaml('name: t\\nsteps:\\n  - {type: seeds, path: s.jsonl}\\n"
        "  - {type: semantic_dedup, columns: [t]}\\n')\n"
        "heavy = ('torch', 'faiss', 'sentence_transformers', 'model2vec')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
