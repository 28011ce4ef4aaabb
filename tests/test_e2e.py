"""End to end with real parts: the embedded SmolLM2 teacher, the CLI, a real llama.cpp server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import kdata
from kdata.blocks import read_table

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdata.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


DATASET_FILE = "data/train-00000-of-00001.parquet"  # a small dataset is one shard


def test_quickstart_runs_on_the_embedded_teacher(tmp_path: Path) -> None:
    run_dir = tmp_path / "qs"
    res = cli("build", "recipes/quickstart.yaml", "-o", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert "20 rows" in res.stdout
    rows = pq.read_table(run_dir / DATASET_FILE).to_pylist()
    assert len(rows) == 20
    assert len({r["id"] for r in rows}) == 20  # each seed task exactly once
    for r in rows:
        p = r["_kdata"]
        assert r["response"].strip()
        assert p["teacher"] == "smol" and p["model"] == "local/smollm2-135m-instruct"
        assert len(p["request_hash"]) == 64 and p["completion_tokens"] > 0
        assert len(p["parent_ids"]) == 1 and p["step"] == "01_label"
    # datasets loads the final Parquet as it is
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(run_dir / "data"), split="train")
    assert ds.num_rows == 20 and "response" in ds.column_names
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["versions"]["litellm"]
    assert [s["name"] for s in manifest["steps"]] == ["00_seeds", "01_label"]
    for step in manifest["steps"]:
        st = step["stats"]
        assert st["expected"] == st["rows_out"] + st["dropped"] + st["failed"]
        assert (run_dir / "steps" / step["name"] / "failed").is_dir()
    # A rerun reuses both steps and calls nobody.
    again = cli("build", "recipes/quickstart.yaml", "-o", str(run_dir))
    assert again.returncode == 0 and again.stdout.count("reused") == 2
    assert pq.read_table(run_dir / DATASET_FILE).to_pylist() == rows
    shown = cli("inspect", str(run_dir), "-n", "1")
    assert shown.returncode == 0 and "20 responses stored" in shown.stdout


RECIPE = """\
name: small
teachers:
  smol:
    model: local/smollm2-135m-instruct
    params: {{temperature: 0.7, max_tokens: 24, seed: 1}}
steps:
  - type: seeds
    path: {seeds}
  - type: label
    teacher: smol
    prompt: "{{{{ instruction }}}}"
    output: {output}
    n: {n}
"""


def test_samples_and_reparse_from_cache(tmp_path: Path, seeds: Path) -> None:
    run_dir = tmp_path / "run"
    r1 = kdata.build(
        kdata.recipe_from_yaml(RECIPE.format(seeds=seeds, output="response", n=2)), run_dir=run_dir
    )
    label = r1.steps[1]
    assert (label.rows_in, label.expected, label.rows_out) == (5, 10, 10)
    assert label.requests == 10 and label.cache_hits == 0
    rows = r1.rows()
    assert len({r["_kdata"]["request_hash"] for r in rows}) == 10  # samples are distinct requests
    by_parent: dict[str, set] = {}
    for r in rows:
        by_parent.setdefault(r["_kdata"]["parent_ids"][0], set()).add(r["response"])
    assert any(len(texts) == 2 for texts in by_parent.values())  # seeds differ per sample
    # Changing only how a response is parsed (the output column) re-parses stored responses.
    r2 = kdata.build(
        kdata.recipe_from_yaml(RECIPE.format(seeds=seeds, output="answer", n=2)), run_dir=run_dir
    )
    assert r2.steps[1].requests == 0 and r2.steps[1].cache_hits == 10 and not r2.steps[1].reused
    assert sorted(r["answer"] for r in r2.rows()) == sorted(r["response"] for r in rows)


def test_bad_seed_lines_are_failed_rows_not_lost(tmp_path: Path, seeds: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(seeds.read_text() + "{not json\n[1, 2]\n", encoding="utf-8")
    recipe = kdata.recipe_from_yaml(f"name: b\nsteps:\n  - {{type: seeds, path: {bad}}}\n")
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    s = run.steps[0]
    assert (s.expected, s.rows_out, s.failed) == (7, 5, 2)
    failed = read_table(tmp_path / "run/steps/00_seeds", "failed").to_pylist()
    assert {f["error_class"] for f in failed} == {"bad_seed"}
    assert any("bad.jsonl line 6" in f["error"] for f in failed)


def test_bad_recipe_fails_cleanly_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\noutput: {dir: " + str(tmp_path / "out") + "}\nsteps:\n"
        "  - type: seedz\n    path: a.jsonl\n",
        encoding="utf-8",
    )
    for cmd in ("validate", "build"):
        res = cli(cmd, str(bad))
        assert res.returncode == 2
        assert f"{bad}:4" in res.stderr and "did you mean 'seeds'" in res.stderr
    assert not (tmp_path / "out").exists()


BAD_RECIPE = """\
name: x
output: {{dir: {out}}}
teachers:
  gpt:
    api_key: ${{KDATA_TEST_KEY}}
    model: openai/gpt-4o-mini
steps:
  - type: seeds
    path: seeds.jsonl
  - {{type: label, teacher: gpt, prompt: "{{{{ q }}}}"}}
"""
BAD_RECIPES = {
    # kind of bad: (recipe text replaced, by what, the seed file, where and what the error says)
    "missing_key": (
        "KDATA_TEST_KEY",
        "KDATA_T_UNSET_KEY",
        '{"q": "a"}\n',
        ":5, field 'teachers.gpt.api_key'",
        "environment variable KDATA_T_UNSET_KEY is not set",
    ),
    "missing_seeds": (
        "seeds.jsonl",
        "nope.jsonl",
        None,
        ":9, steps[0] (seeds), field 'path'",
        "seeds: no such file or folder",
    ),
    "mixed_types": (
        "",
        "",
        '{"q": "a", "k": 1}\n{"q": "b", "k": "two"}\n',
        ":9, steps[0] (seeds), field 'path'",
        "seeds: seeds.jsonl: column 'k' holds string in record 2 but int64 in the records",
    ),
}


@pytest.mark.parametrize("kind", BAD_RECIPES)
def test_every_kind_of_bad_recipe_exits_2_and_writes_nothing(tmp_path: Path, kind: str) -> None:
    old, new, seeds, where, what = BAD_RECIPES[kind]
    if seeds is not None:
        (tmp_path / "seeds.jsonl").write_text(seeds, encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_RECIPE.format(out=tmp_path / "out").replace(old, new), encoding="utf-8")
    for cmd in ("validate", "build"):
        res = cli(cmd, str(bad))
        err = " ".join(res.stderr.split())
        assert res.returncode == 2, (cmd, res.stderr)
        assert f"{bad}{where}: {what}" in err, (cmd, err)
    assert not (tmp_path / "out").exists()


def test_dry_run_counts_calls_and_writes_nothing(tmp_path: Path) -> None:
    res = cli("build", "recipes/quickstart.yaml", "--dry-run", "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert "20 teacher calls at most" in res.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("client", ["auto", "litellm"])  # kdata's HTTP client, and litellm
def test_openai_compatible_server(tmp_path, seeds, llama_server, monkeypatch, client):
    monkeypatch.setenv("KDATA_TEST_KEY", "not-needed-by-llama-cpp")
    recipe = kdata.recipe_from_yaml(f"""\
name: served
teachers:
  served:
    model: openai/smollm2
    api_base: {llama_server}
    api_key: ${{KDATA_TEST_KEY}}
    client: {client}
    params: {{max_tokens: 16, temperature: 0}}
steps:
  - {{type: seeds, path: {seeds}, limit: 3}}
  - {{type: label, teacher: served, prompt: "{{{{ instruction }}}}"}}
""")
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    rows = run.rows()
    assert len(rows) == 3 and all(r["response"] for r in rows)
    assert {r["_kdata"]["model"] for r in rows} == {"openai/smollm2"}
    assert all(r["_kdata"]["completion_tokens"] > 0 for r in rows)
    assert run.ledger["served"]["responses"] == 3


def _stored(cache: Path) -> int:
    import sqlite3

    if not cache.exists():
        return 0
    db = sqlite3.connect(f"file:{cache}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet
        return 0
    finally:
        db.close()


def test_ctrl_c_keeps_every_response_and_the_rerun_sends_only_the_rest(tmp_path: Path) -> None:
    import signal

    run_dir = tmp_path / "qs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdata.cli", "build", "recipes/quickstart.yaml", "-o", str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while _stored(run_dir / "cache.sqlite") < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    stored = _stored(run_dir / "cache.sqlite")
    assert 4 <= stored < 20
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    run = kdata.build(kdata.load_recipe(ROOT / "recipes/quickstart.yaml"), run_dir=run_dir)
    label = run.steps[1]
    assert (label.cache_hits, label.requests, label.rows_out) == (stored, 20 - stored, 20)
