"""The seeds step reads every format it claims to, from real files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import kdata

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
