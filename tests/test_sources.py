"""The seeds step reads every format it claims to, from real files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

import kdata
from kdata.runner import fingerprints

RECORDS = [{"q": f"question {i}", "k": i} for i in range(4)]


def write(tmp_path: Path, fmt: str) -> Path:
    df = pd.DataFrame(RECORDS)
    p = tmp_path / f"seeds.{fmt}"
    if fmt == "jsonl":
        df.to_json(p, orient="records", lines=True)
    elif fmt == "json":
        p.write_text(json.dumps({"data": RECORDS}))
    elif fmt == "csv":
        df.to_csv(p, index=False)
    elif fmt == "parquet":
        df.to_parquet(p)
    elif fmt == "datasets":
        import datasets

        p = tmp_path / "ds"
        datasets.Dataset.from_list(RECORDS).save_to_disk(str(p))
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "datasets"])
def test_seed_formats(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, fmt)
    recipe = kdata.recipe_from_yaml(
        f"name: s\nsteps:\n  - {{type: seeds, path: {path}, limit: 3}}\n"
    )
    assert kdata.plan(recipe)[0]["rows"] == 3
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    rows = run.rows()
    assert [(r["q"], r["k"]) for r in rows] == [(f"question {i}", i) for i in range(3)]
    assert len({r["_kdata"]["id"] for r in rows}) == 3


def test_editing_the_seed_file_reruns_the_step(tmp_path: Path) -> None:
    path = write(tmp_path, "jsonl")
    recipe = kdata.recipe_from_yaml(f"name: s\nsteps:\n  - {{type: seeds, path: {path}}}\n")
    assert not kdata.build(recipe, run_dir=tmp_path / "run").steps[0].reused
    assert kdata.build(recipe, run_dir=tmp_path / "run").steps[0].reused
    path.write_text(path.read_text() + json.dumps({"q": "new", "k": 9}) + "\n")
    again = kdata.build(recipe, run_dir=tmp_path / "run")
    assert not again.steps[0].reused and again.steps[0].rows_out == 5


def test_missing_seed_file_is_a_clear_error(tmp_path: Path) -> None:
    recipe = kdata.recipe_from_yaml(
        "name: s\nsteps:\n  - {type: seeds, path: nope.jsonl}\n", base_dir=tmp_path
    )
    with pytest.raises(kdata.KdataError, match="no such file"):
        kdata.build(recipe, run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "failed"


def test_a_column_only_later_rows_have_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"q": "a"}\n{"q": "b", "score": 3}\n', encoding="utf-8")
    recipe = kdata.recipe_from_yaml(f"name: s\nsteps:\n  - {{type: seeds, path: {path}}}\n")
    rows = kdata.build(recipe, run_dir=tmp_path / "run").rows()
    assert [(r["q"], r["score"]) for r in rows] == [("a", None), ("b", 3)]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The Hub stand-in on 127.0.0.1 holding alice/seeds (one Parquet file), as the Hub for
    huggingface_hub and datasets, with their caches in tmp_path."""
    import datasets
    import huggingface_hub.constants as constants
    from hub_standin import GITATTRIBUTES, Blob, HubStandIn, Repo

    with HubStandIn(token="hf_standin") as h:
        monkeypatch.setenv("HF_TOKEN", "hf_standin")
        resolve = h.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", resolve)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", h.url)
        monkeypatch.setattr(
            datasets.config,
            "HUB_DATASETS_URL",
            h.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        )
        for module in (constants, datasets.config):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
        repo = h.repos["alice/seeds"] = Repo("alice/seeds", private=False)
        files = {p: Blob(d, True) for p, d in parquet(RECORDS[:2]).items()}
        files[".gitattributes"] = Blob(GITATTRIBUTES.encode(), False)
        h._new_commit(repo, "initial commit", files)
        yield h


def parquet(records: list[dict]) -> dict[str, bytes]:
    buf = io.BytesIO()
    pd.DataFrame(records).to_parquet(buf)
    return {"data/train-00000-of-00001.parquet": buf.getvalue()}


def test_a_changed_hub_dataset_is_read_again_at_its_new_commit(tmp_path: Path, hub) -> None:
    recipe = kdata.recipe_from_yaml("name: s\nsteps:\n  - {type: seeds, path: alice/seeds}\n")
    first = kdata.build(recipe, run_dir=tmp_path / "run")
    assert [r["q"] for r in first.rows()] == ["question 0", "question 1"]
    assert kdata.build(recipe, run_dir=tmp_path / "run").steps[0].reused  # same commit
    old = hub.repos["alice/seeds"].head.oid
    new = hub.commit_as_someone_else("alice/seeds", parquet(RECORDS))
    again = kdata.build(recipe, run_dir=tmp_path / "run")
    assert not again.steps[0].reused
    assert [r["q"] for r in again.rows()] == [r["q"] for r in RECORDS]
    # pinned to the old commit: its rows, and no request to resolve it
    pinned = kdata.recipe_from_yaml(
        f"name: s\nsteps:\n  - {{type: seeds, path: alice/seeds, revision: {old}}}\n"
    )
    requests = len(hub.log)
    assert fingerprints(pinned) != fingerprints(recipe)
    assert hub.stages()[requests:] == ["info"]  # the unpinned recipe's, not the pinned one's
    back = kdata.build(pinned, run_dir=tmp_path / "pinned")
    assert [r["q"] for r in back.rows()] == ["question 0", "question 1"]
    assert new != old


def test_an_unknown_hub_dataset_is_a_clear_error(tmp_path: Path, hub) -> None:
    recipe = kdata.recipe_from_yaml("name: s\nsteps:\n  - {type: seeds, path: alice/nope}\n")
    with pytest.raises(
        kdata.KdataError, match="cannot find the current commit of Hub dataset 'alice/nope'"
    ):
        kdata.build(recipe, run_dir=tmp_path / "run")
