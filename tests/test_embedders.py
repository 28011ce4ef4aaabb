"""The static embedding model: the default of semantic_dedup and of the diversity report, offline.

The session's model is distilled once per checkout into pytest's cache folder (conftest's
``KDATA_CACHE_DIR``); the slow test distils a fresh one with the network refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from test_semantic import INSTRUCTIONS, PARAPHRASES, no_network  # noqa: F401 (autouse)

import kdata
from kdata.blocks import read_dropped
from kdata.recipe import ReportConfig
from kdata.steps import embedders
from kdata.steps.diversity import DiversityStep
from kdata.steps.semantic import MINILM, STATIC, THRESHOLDS, SemanticDedupStep


def test_static_is_the_default_with_a_threshold_of_its_own() -> None:
    step = SemanticDedupStep(columns=["t"])
    assert (step.model, step.threshold) == (STATIC, THRESHOLDS[STATIC])
    assert SemanticDedupStep(columns=["t"], model=MINILM).threshold == 0.9
    assert SemanticDedupStep(columns=["t"], model="some/st-model").threshold == 0.9
    assert SemanticDedupStep(columns=["t"], threshold=0.97).threshold == 0.97
    assert DiversityStep().model == STATIC and ReportConfig().model == STATIC
    # the recipe as dumped (manifest, fingerprint) carries the threshold in force, and reloads
    dumped = step.model_dump(mode="json")
    assert dumped["threshold"] == THRESHOLDS[STATIC]
    assert SemanticDedupStep(**dumped) == step


def test_the_static_encoder_gives_unit_vectors_of_each_text() -> None:
    emb = SemanticDedupStep(columns=["t"]).embed(["Write a poem.", "Write a poem.", "Sum 2 and 3."])
    assert emb.shape == (3, embedders.PCA_DIMS) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.array_equal(emb[0], emb[1]) and emb[0] @ emb[2] < 0.9


def test_static_semantic_dedup_in_a_build_and_the_report_reads_its_embeddings(
    tmp_path: Path,
) -> None:
    texts = [*INSTRUCTIONS, *(t for ts in PARAPHRASES.values() for t in ts)]
    write_jsonl(tmp_path / "seeds.jsonl", [{"t": t, "n": i} for i, t in enumerate(texts)])
    recipe = kdata.recipe_from_yaml(
        "name: t\nsteps:\n  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: semantic_dedup, name: dedup, columns: [t]}\n",
        base_dir=tmp_path,
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    kept = sorted(r["n"] for r in run.rows())
    # every seed instruction stays (the two closest are 0.94), every paraphrase goes (the least
    # similar to its seed is 0.96: "Brainstorm some possible resolutions for the New Year.")
    assert kept == list(range(175))
    drops = read_dropped(run.dir / "steps" / "dedup")
    assert len(drops) == len(texts) - 175
    assert all(json.loads(d["detail"])["similarity"] >= THRESHOLDS[STATIC] for d in drops)
    report = json.loads((run.dir / "diversity" / "report.json").read_text())
    assert report["settings"]["embedding_model"] == STATIC
    assert 0 < report["after"]["mean_cosine_distance"] < 1


def test_minilm_stays_selectable_for_the_report(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "seeds.jsonl", [{"t": t} for t in INSTRUCTIONS[:12]])
    recipe = kdata.recipe_from_yaml(
        f"name: t\nreport: {{model: {MINILM}}}\nsteps:\n  - {{type: seeds, path: seeds.jsonl}}\n"
        f"  - {{type: diversity, name: div, column: t}}\n",
        base_dir=tmp_path,
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    final = json.loads((run.dir / "diversity" / "report.json").read_text())
    step = json.loads((run.dir / "diversity" / "div" / "report.json").read_text())
    assert final["settings"]["embedding_model"] == MINILM
    assert step["settings"]["embedding_model"] == STATIC
    assert final["after"]["mean_cosine_distance"] != step["after"]["mean_cosine_distance"]


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDATA_CACHE_DIR", "/somewhere/kdata")
    assert embedders.cache_dir() == Path("/somewhere/kdata")
    monkeypatch.delenv("KDATA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert embedders.cache_dir() == Path("/xdg/kdata")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedders.cache_dir() == Path.home() / ".cache" / "kdata"


@pytest.mark.slow
def test_distillation_downloads_nothing_and_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """About a minute of CPU: MiniLM encodes each of its 30,000 tokens once."""
    session = embedders.static_encoder()
    monkeypatch.setenv("KDATA_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    embedders.static_encoder.cache_clear()
    try:
        fresh = embedders.static_encoder()
    finally:
        embedders.static_encoder.cache_clear()
    folder = tmp_path / embedders.STATIC_ID
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left
    texts = INSTRUCTIONS[:50]
    a, b = fresh.encode(texts), session.encode(texts)
    assert np.einsum("ij,ij->i", a, b).min() > 0.999  # the same model as the session's
