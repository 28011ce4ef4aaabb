"""The seeds step reads every format it claims to, from real files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

import kdata
from kdata.blocks import read_table
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


def build_seeds(tmp_path: Path, path: Path) -> kdata.Run:
    recipe = kdata.recipe_from_yaml(f"name: s\nsteps:\n  - {{type: seeds, path: {path}}}\n")
    return kdata.build(recipe, run_dir=tmp_path / "run")


def failed_rows(tmp_path: Path) -> list[dict]:

    return read_table(tmp_path / "run/steps/00_seeds", "failed").to_pylist()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "datasets"])
def test_seed_formats(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, fmt)
    recipe = kdata.recipe_from_yaml(
        f"name: s\nsteps:\n  - {{type: seeds, path: {path}, limit: 3}}\n"
    )
    assert kdata.plan(recipe).steps[0].rows == 3
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


def test_missing_seed_file_is_refused_before_the_run_directory_exists(tmp_path: Path) -> None:
    recipe = kdata.recipe_from_yaml(
        "name: s\nsteps:\n  - {type: seeds, path: nope.jsonl}\n", base_dir=tmp_path
    )
    with pytest.raises(kdata.RecipeError, match="no such file") as info:
        kdata.build(recipe, run_dir=tmp_path / "run")
    assert (info.value.line, info.value.step, info.value.field) == (3, "steps[0] (seeds)", "path")
    assert not (tmp_path / "run").exists()


def test_mixed_column_types_name_the_column_and_record(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"k": 1}\n{"k": 2.5}\n{"k": null}\n{"k": [3]}\n{"k": "x"}\n')
    recipe = kdata.recipe_from_yaml(f"name: s\nsteps:\n  - {{type: seeds, path: {path}}}\n")
    with pytest.raises(kdata.RecipeError) as info:
        kdata.build(recipe, run_dir=tmp_path / "run")
    assert (
        "s.jsonl: column 'k' holds list<item: int64> in record 4 but double in the records"
        in str(info.value)
    )
    assert not (tmp_path / "run").exists()
    # Only the records the step uses count: the first three agree.
    limited = kdata.recipe_from_yaml(
        f"name: s\nsteps:\n  - {{type: seeds, path: {path}, limit: 3}}\n"
    )
    assert [r["k"] for r in kdata.build(limited, run_dir=tmp_path / "run").rows()] == [1, 2.5, None]


def test_empty_csv_cells_are_nulls(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("q,k\na,1\n,2\nc,\n", encoding="utf-8")
    rows = build_seeds(tmp_path, path).rows()
    assert [(r["q"], r["k"]) for r in rows] == [("a", 1), (None, 2), ("c", None)]


def test_a_column_only_later_rows_have_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"q": "a"}\n{"q": "b", "score": 3}\n', encoding="utf-8")
    recipe = kdata.recipe_from_yaml(f"name: s\nsteps:\n  - {{type: seeds, path: {path}}}\n")
    rows = kdata.build(recipe, run_dir=tmp_path / "run").rows()
    assert [(r["q"], r["score"]) for r in rows] == [("a", None), ("b", 3)]


def test_lone_surrogate_fails_its_row_as_bad_seed(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"q": "a"}\n{"q": "\\ud800 b"}\n{"q": "c"}\n', encoding="utf-8")
    run = build_seeds(tmp_path, path)
    s = run.steps[0]
    assert (s.expected, s.rows_out, s.failed) == (3, 2, 1)
    assert [r["q"] for r in run.rows()] == ["a", "c"]
    [f] = failed_rows(tmp_path)
    assert f["error_class"] == "bad_seed" and "s.jsonl line 2" in f["error"]
    assert "\\ud800" in f["error"] and "not valid Unicode" in f["error"]


def test_lone_surrogate_in_a_json_file_fails_its_row(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('[{"q": "a"}, {"\\udfff": "b"}]', encoding="utf-8")
    run = build_seeds(tmp_path, path)
    assert (run.steps[0].rows_out, run.steps[0].failed) == (1, 1)
    [f] = failed_rows(tmp_path)
    assert f["error_class"] == "bad_seed" and "s.json record 2" in f["error"]


def test_line_that_is_not_utf8_fails_as_bad_seed_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"q": "a"}\n\n{"q": "caf\xe9"}\n{"q": "c"}\n')
    run = build_seeds(tmp_path, path)
    s = run.steps[0]
    assert (s.expected, s.rows_out, s.failed) == (3, 2, 1)
    assert [r["q"] for r in run.rows()] == ["a", "c"]
    [f] = failed_rows(tmp_path)
    assert f["error_class"] == "bad_seed" and "s.jsonl line 3" in f["error"]
    assert "not UTF-8" in f["error"] and "0xe9" in f["error"]
    assert f["raw"] == '{"q": "caf\\xe9"}'


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_file_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"s.{fmt}"
    body = b'[{"q": "a"},\n {"q": "caf\xe9"}]' if fmt == "json" else b"q\na\ncaf\xe9\n"
    path.write_bytes(body)
    recipe = kdata.recipe_from_yaml(f"name: s\nsteps:\n  - {{type: seeds, path: {path}}}\n")
    with pytest.raises(kdata.KdataError, match=f"s.{fmt}:{2 if fmt == 'json' else 3}: not UTF-8"):
        kdata.build(recipe, run_dir=tmp_path / "run")


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


CONFIGS_CARD = """---
configs:
- config_name: easy
  data_files:
  - {split: train, path: easy/train.parquet}
- config_name: hard
  data_files:
  - {split: train, path: hard/train.parquet}
  - {split: test, path: hard/test.parquet}
---
"""


def test_a_hub_dataset_is_streamed_by_config_and_split(tmp_path: Path, hub) -> None:
    def table(rows: list[dict]) -> bytes:
        return parquet(rows)["data/train-00000-of-00001.parquet"]

    hub.commit_as_someone_else(
        "alice/seeds",
        {
            "README.md": CONFIGS_CARD.encode(),
            "easy/train.parquet": table(RECORDS[:1]),
            "hard/train.parquet": table(RECORDS[1:3]),
            "hard/test.parquet": table(RECORDS[3:]),
        },
    )

    runs = iter(range(10))

    def rows(fields: str) -> list[str]:
        text = f"name: s\nsteps:\n  - {{type: seeds, path: alice/seeds{fields}}}\n"
        run = kdata.build(kdata.recipe_from_yaml(text), run_dir=tmp_path / f"run{next(runs)}")
        return [r["q"] for r in run.rows()]

    assert rows(", config: easy") == ["question 0"]
    assert rows(", config: hard") == ["question 1", "question 2"]
    assert rows(", config: hard, split: test") == ["question 3"]
    assert rows(", config: hard, limit: 1") == ["question 1"]
    # Streamed: no Arrow copy of the dataset was prepared in the datasets cache.
    assert not list((tmp_path / "datasets_cache").rglob("*.arrow"))
