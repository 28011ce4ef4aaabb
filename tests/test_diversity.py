"""The diversity report: at the end of every build and as a step, before against after curation."""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from test_dedup import BASE, TEXTS, edit

import kdata
from kdata.blocks import read_table
from kdata.rethreshold import rethreshold
from kdata.steps.diversity import _keys, _survivors
from kdata.steps.semantic import SemanticDedupStep

sys.path.insert(0, str(Path(__file__).parent))
from openai_standin import StandIn  # noqa: E402

# 35 distinct texts, 10 near copies of the first (two words swapped), an empty and a short text.
ROWS = [
    *({"prompt": t, "tag": f"t{i}", "q": i % 10} for i, t in enumerate(TEXTS)),
    *({"prompt": edit(BASE, [k, k + 20]), "tag": "copy", "q": 5} for k in range(10)),
    {"prompt": "", "tag": "empty", "q": 5},
    {"prompt": "Sure.", "tag": "short", "q": 5},
]
CURATION = (
    "  - {type: exact_dedup, columns: [prompt]}\n"
    "  - {type: minhash_dedup, columns: [prompt]}\n"
    "  - {type: filter, column: prompt, drop_empty: true, min_words: 3,"
    " min_score: {column: q, value: 2}}\n"
)
MEASURES = {
    "rows",
    "distinct_1",
    "distinct_2",
    "minhash_cluster_share",
    "mean_cosine_distance",
    "kmeans_entropy",
    "length",
}


def build(folder: Path, steps: str, rows: list[dict] = ROWS, head: str = "") -> kdata.Run:
    write_jsonl(folder / "seeds.jsonl", rows)
    text = f"name: t\n{head}steps:\n  - {{type: seeds, path: seeds.jsonl}}\n{steps}"
    return kdata.build(kdata.recipe_from_yaml(text, base_dir=folder), run_dir=folder / "run")


def report(run: kdata.Run, sub: str = "") -> dict:
    return json.loads((run.dir / "diversity" / sub / "report.json").read_text())


def distinct(texts: list[str], n: int) -> float:
    grams = [
        tuple(w[i : i + n])
        for t in texts
        for w in [re.findall(r"[^\W_]+", t.lower())]
        for i in range(len(w) - n + 1)
    ]
    return round(len(set(grams)) / len(grams), 4)


def test_every_build_reports_before_and_after_curation(tmp_path: Path) -> None:
    run = build(tmp_path, CURATION)
    r = report(run)
    final = [row["prompt"] for row in run.rows()]
    assert r["text_column"] == "prompt"  # the longest text column; tag is short
    assert set(r["before"]) == set(r["after"]) == MEASURES
    assert set(r["before"]["length"]) == {"mean", "p10", "p50", "p90", "max"}
    assert r["before"]["rows"] == len(ROWS) and r["after"]["rows"] == len(final) == 27
    # BASE and its 10 copies form the one MinHash cluster; dedup leaves none.
    assert r["before"]["minhash_cluster_share"] == round(11 / len(ROWS), 4)
    assert r["after"]["minhash_cluster_share"] == 0.0
    assert r["after"]["distinct_1"] == distinct(final, 1)
    assert r["after"]["distinct_2"] == distinct(final, 2)
    assert r["before"]["distinct_2"] == distinct([row["prompt"] for row in ROWS], 2)
    assert r["before"]["distinct_2"] < r["after"]["distinct_2"]  # the copies repeat bigrams
    lengths = [len(t) for t in final]
    assert r["after"]["length"] == {
        "mean": round(float(np.mean(lengths)), 4),
        "p10": round(float(np.percentile(lengths, 10)), 4),
        "p50": round(float(np.percentile(lengths, 50)), 4),
        "p90": round(float(np.percentile(lengths, 90)), 4),
        "max": max(lengths),
    }
    assert r["before"]["length"]["p10"] < r["after"]["length"]["p10"]  # "" and "Sure." went
    # Mean pairwise cosine distance, against every pair computed one by one.
    emb = SemanticDedupStep(columns=["prompt"]).embed(final)
    pairs = [1 - emb[i] @ emb[j] for i in range(len(final)) for j in range(i + 1, len(final))]
    assert abs(r["after"]["mean_cosine_distance"] - np.mean(pairs)) < 1e-4
    for side in ("before", "after"):
        assert 0 < r[side]["kmeans_entropy"] <= 1
    assert r["settings"]["kmeans_k"] == 5  # sqrt(47 distinct texts / 2)
    assert r["waterfall"] == [
        {
            "step": s.name,
            "type": s.type,
            "rows_in": s.rows_in,
            "rows_out": s.rows_out,
            "dropped": s.drop_reasons,
            "failed": s.failed,
        }
        for s in run.steps[1:]
    ]
    assert r["waterfall"][1]["dropped"] == {"duplicate": 10}
    assert r["waterfall"][2]["dropped"] == {"empty": 1, "too_short": 1, "low_score": 8}
    assert r["plots"] == {
        "projection": "diversity/projection.png",
        "lengths": "diversity/lengths.png",
        "waterfall": "diversity/waterfall.png",
    }
    for path in r["plots"].values():
        assert (run.dir / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["notes"] == []
    # A rebuild that changes nothing leaves the report alone; one that changes rows rewrites it.
    mtime = (run.dir / "diversity/report.json").stat().st_mtime_ns
    build(tmp_path, CURATION)
    assert (run.dir / "diversity/report.json").stat().st_mtime_ns == mtime
    again = build(tmp_path, CURATION.replace("value: 2", "value: 5"))
    assert report(again)["after"]["rows"] == len(again.rows()) < 27


def test_without_the_embed_extra_embedding_figures_are_null(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "model2vec", None)  # find_spec says: absent (the static model)
    r = report(build(tmp_path, CURATION))
    for side in ("before", "after"):
        assert r[side]["mean_cosine_distance"] is None and r[side]["kmeans_entropy"] is None
        assert r[side]["distinct_1"] > 0 and r[side]["length"]["max"] > 0
    assert r["plots"]["projection"] is None and r["settings"]["kmeans_k"] is None
    assert (tmp_path / "run" / r["plots"]["lengths"]).exists()
    assert r["notes"] == [
        "embedding figures are null: model2vec not installed (pip install 'kdata[embed]')"
    ]


def test_the_diversity_step_measures_its_input_and_names_the_final_report_column(
    tmp_path: Path,
) -> None:
    steps = (
        "  - {type: minhash_dedup, columns: [prompt]}\n"
        "  - {type: diversity, name: mid, column: tag}\n"
        "  - {type: filter, column: prompt, min_words: 3}\n"
    )
    run = build(tmp_path, steps)
    mid, final = report(run, "mid"), report(run)
    assert run.steps[2].rows_in == run.steps[2].rows_out == 37 and run.steps[2].dropped == 0
    assert mid["text_column"] == final["text_column"] == "tag"
    assert mid["after"]["rows"] == 37 and final["after"]["rows"] == len(run.rows()) == 35
    assert [w["step"] for w in mid["waterfall"]] == ["01_minhash_dedup"]
    assert [w["step"] for w in final["waterfall"]] == ["01_minhash_dedup", "mid", "03_filter"]
    assert mid["plots"]["waterfall"] == "diversity/mid/waterfall.png"
    assert (run.dir / mid["plots"]["projection"]).exists()
    # the 10 copies share the tag "copy": a MinHash cluster of one-word texts before dedup
    assert mid["before"]["minhash_cluster_share"] == round(10 / len(ROWS), 4)
    (tmp_path / "bad").mkdir()
    with pytest.raises(kdata.KdataError, match="diversity: no row has column 'nope'"):
        build(tmp_path / "bad", steps.replace("column: tag", "column: nope"))


def test_a_build_that_drops_every_row_still_reports(tmp_path: Path) -> None:
    run = build(tmp_path, "  - {type: filter, column: prompt, min_chars: 100000}\n")
    r = report(run)
    assert r["text_column"] == "prompt" and r["before"]["rows"] == len(ROWS)
    assert r["after"] == {
        "rows": 0,
        "distinct_1": None,
        "distinct_2": None,
        "minhash_cluster_share": None,
        "mean_cosine_distance": None,
        "kmeans_entropy": None,
        "length": dict.fromkeys(("mean", "p10", "p50", "p90", "max")),
    }
    assert r["waterfall"][0]["dropped"] == {"too_short": len(ROWS)}
    assert all((run.dir / p).exists() for p in r["plots"].values())


def test_default_column_and_survivors_with_a_teacher_step(
    tmp_path: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KDATA_TEST_KEY", "sk-test-" + uuid.uuid4().hex)
    head = (
        "teachers:\n  t:\n    model: openai/standin-model\n"
        f"    api_base: http://127.0.0.1:{standin.port}/v1\n    api_key: ${{KDATA_TEST_KEY}}\n"
    )
    label = "  - {type: label, teacher: t, prompt: '{{ prompt }}'}\n"
    dedup = "  - {type: minhash_dedup, columns: [prompt]}\n"
    rows = ROWS[:40]  # TEXTS and 5 copies of BASE
    # Curation before the teacher: the generated rows have no response, so prompt is measured,
    # and a generated row is kept when its child reached the dataset.
    (tmp_path / "a").mkdir()
    run = build(tmp_path / "a", dedup + label, rows, head)
    r = report(run)
    assert r["text_column"] == "prompt" and r["after"]["rows"] == 35
    seeds = [row["_kdata"]["id"] for row in _rows(run, "00_seeds")]
    final_ids = [row["_kdata"]["id"] for row in run.rows()]
    alive = _survivors(run.dir, [{"name": s.name} for s in run.steps[1:]], _keys(final_ids))
    kept = [row["_kdata"]["id"] for row in _rows(run, "01_minhash_dedup")]
    assert [i for i in seeds if np.isin(_keys([i]), alive)[0]] == kept and len(kept) == 35
    # Curation after the teacher: the column the teacher added is measured.
    (tmp_path / "b").mkdir()
    r = report(build(tmp_path / "b", label + dedup.replace("prompt", "response"), rows, head))
    assert r["text_column"] == "response" and r["before"]["rows"] == 40


def _rows(run: kdata.Run, step: str) -> list[dict]:

    return read_table(run.dir / "steps" / step).to_pylist()


def test_a_recipe_can_turn_the_final_report_off(tmp_path: Path) -> None:
    run = build(tmp_path, CURATION)
    plots = report(run)["plots"]
    assert all((run.dir / p).exists() for p in plots.values())
    off = build(tmp_path, CURATION, head="report: {diversity: false}\n")
    assert off.status == "complete" and len(off.rows()) == len(run.rows())
    assert not (off.dir / "diversity" / "report.json").exists()  # no stale figures for a card
    assert not any((off.dir / p).exists() for p in plots.values())
    for bad, words in (("{diversity: nope}", "diversity"), ("{divrsity: false}", "divrsity")):
        with pytest.raises(kdata.RecipeError, match=words):
            kdata.recipe_from_yaml(
                f"name: t\nreport: {bad}\nsteps:\n  - {{type: seeds, path: x}}\n"
            )


def test_the_report_embeds_only_texts_not_stored_and_recomputes_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdata.steps import diversity
    from kdata.steps.semantic import DEFAULT_MODEL, _load_model

    model = _load_model(DEFAULT_MODEL)
    encoded: list[int] = []
    encode = model.encode
    monkeypatch.setattr(
        model, "encode", lambda texts, **kw: encoded.append(len(texts)) or encode(texts, **kw)
    )
    measured: list[int] = []
    measure = diversity._measure
    monkeypatch.setattr(
        diversity, "_measure", lambda texts, s: measured.append(len(texts)) or measure(texts, s)
    )
    monkeypatch.setattr(diversity, "SAMPLE", 30)  # 47 rows: a sample on both sides
    monkeypatch.setattr(diversity, "EMBED_SAMPLE", 20)
    run = build(tmp_path, "  - {type: semantic_dedup, name: dedup, columns: [prompt]}\n")
    r = report(run)
    assert encoded == [len(ROWS)]  # semantic_dedup's; the report found its 20 + 20 stored
    assert measured == [len(ROWS), r["after"]["rows"]] and r["after"]["rows"] < len(ROWS)
    assert r["settings"]["sample"] == 30 and r["settings"]["embed_sample"] == 20
    sampled = f"pairwise cosine distance and k-means over a sample of 20 of {len(ROWS)} texts"
    assert f"generated rows: {sampled}" in r["notes"]
    recut = rethreshold(run.dir, "dedup", 0.99)
    again = report(recut)
    assert again["after"]["rows"] == len(recut.rows()) > r["after"]["rows"]
    assert encoded == [len(ROWS)]  # nothing embedded again
    assert measured[2:] == [again["after"]["rows"]]  # the generated rows were not measured again
    assert again["before"] == r["before"] | {"kmeans_entropy": again["before"]["kmeans_entropy"]}


def test_the_sample_is_the_rows_whose_ids_hash_lowest(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from kdata.steps import diversity

    monkeypatch.setattr(diversity, "SAMPLE", 6)
    monkeypatch.setattr(diversity, "EMBED_SAMPLE", 3)
    ids = [f"row{i}" for i in range(20)]
    texts = [None if i % 5 == 0 else f"text {i}" for i in range(20)]
    notes: list[str] = []

    def sample_of(ids: list[str], texts: list[str | None], notes: list[str]):
        present = np.array([t is not None for t in texts])
        return diversity._sample(diversity._keys(ids), present, notes, "final")

    sample, embed = sample_of(ids, texts, notes)
    rank = sorted(
        (i for i, t in enumerate(texts) if t),
        key=lambda i: hashlib.blake2b(ids[i].encode(), digest_size=8).digest(),
    )
    assert list(sample) == sorted(rank[:6]) and list(embed) == sorted(rank[:3])
    kept = [i for i in range(20) if i not in rank[:2]]  # two of the embedded rows dropped
    _, embed_kept = sample_of([ids[i] for i in kept], [texts[i] for i in kept], [])
    assert {kept[j] for j in embed_kept} >= set(rank[2:3])  # the survivor stays sampled
    assert notes == [
        "final rows: distinct n-grams and MinHash over a sample of 6 of 16 texts",
        "final rows: pairwise cosine distance and k-means over a sample of 3 of 16 texts",
    ]
