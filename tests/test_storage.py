"""A run directory at an fsspec URL: the build works in a stage and keeps the URL up to date.

The URL here is ``file://`` (fsspec's local filesystem, written through the same calls as an
object store's); a fresh ``KDATA_STAGE`` stands for another machine, which has only the URL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_standin import body_hash

import kdata
from kdata.errors import KdataError, RunLocked
from kdata.storage import Remote, export_responses

REPO = Path(__file__).resolve().parent.parent


def recipe(folder: Path, port: int, rows: int = 30, block_rows: int = 5) -> Path:
    (folder / "seeds.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "q": f"what is {i} plus {i % 7}?"}) + "\n" for i in range(rows)
        )
    )
    path = folder / "recipe.yaml"
    path.write_text(
        f"name: remote\nexecution: {{block_rows: {block_rows}}}\nteachers:\n  t:\n"
        f"    model: openai/m\n    api_base: http://127.0.0.1:{port}/v1\n"
        "    api_key: ${KDATA_TEST_KEY}\n    max_concurrency: 4\n"
        "steps:\n  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: label, name: answer, teacher: t, prompt: '{{ q }}'}\n"
        "  - {type: exact_dedup, columns: [response]}\n"
    )
    return path


def stored(db_path: Path) -> set[str]:
    """The stand-in's body hashes of the requests a response store holds."""
    db = sqlite3.connect(db_path)
    try:
        requests = [json.loads(r) for (r,) in db.execute("SELECT request FROM responses")]
    finally:
        db.close()
    return {body_hash({"model": "m", "messages": r["messages"], **r["params"]}) for r in requests}


def remote_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_build_at_a_url_lands_there_and_another_machine_resumes_it(
    tmp_path: Path, standin, monkeypatch
) -> None:
    r = kdata.load_recipe(recipe(tmp_path, standin.port))
    plain = kdata.build(r, run_dir=tmp_path / "plain")  # the same recipe at a path
    sent = len(standin.records)
    assert sent == 30

    root = tmp_path / "bucket" / "runs" / "x"
    url = f"file://{root}"
    monkeypatch.setenv("KDATA_STAGE", str(tmp_path / "machine-a"))
    run = kdata.build(r, run_dir=url)
    assert run.url == url and run.dir.is_relative_to(tmp_path / "machine-a")
    files = remote_files(root)
    assert {"manifest.json", "cache.sqlite", "steps/answer/stats.json"} <= files
    assert "lock" not in files and not any(f.startswith(("cache/", "tmp/")) for f in files)
    assert [f for f in files if f.startswith("data/")] == ["data/train-00000-of-00001.parquet"]
    assert run.rows() == plain.rows()  # the same rows, order and ids as at a path
    assert len(stored(root / "cache.sqlite")) == 30  # every response, at the URL
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    for name in ("answer", "02_exact_dedup"):  # each step's parts as the stage's
        for kind in ("rows", "dropped", "failed", "blocks"):
            stage = sorted(p.name for p in (run.dir / "steps" / name / kind).iterdir())
            assert stage == sorted(p.name for p in (root / "steps" / name / kind).iterdir())

    # The same machine again: its cache holds the URL's, which is not fetched again.
    Remote(url, tmp_path / "machine-a").pull()
    assert not list((run.dir / "cache").glob("pulled-*"))

    # Another machine: a stage of its own, nothing but the URL. Nothing is sent again.
    monkeypatch.setenv("KDATA_STAGE", str(tmp_path / "machine-b"))
    again = kdata.build(r, run_dir=url)
    assert len(standin.records) == sent + 30  # the plain build's 30, the URL build's 30
    assert again.dir != run.dir and all(s.reused for s in again.steps)
    assert again.rows() == plain.rows()


def cli(recipe: Path, url: str, stage: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "KDATA_STAGE": str(stage),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "kdata.cli", "build", str(recipe), "-o", url],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_kill_9_then_another_machine_resumes_from_the_url(tmp_path: Path, standin) -> None:
    """The machine that died is gone with its stage: what the URL had is all there is. The
    finished blocks are not made again, and no response the URL held is paid for again."""
    standin.config.latency = 0.05
    path = recipe(tmp_path, standin.port, rows=60)
    root = tmp_path / "bucket"
    url = f"file://{root}"
    proc = cli(path, url, tmp_path / "machine-a")
    blocks = root / "steps" / "answer" / "blocks"
    deadline = time.monotonic() + 60
    while len(list(blocks.glob("*.json"))) < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build sent too few blocks"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    finished = sorted(p.stem for p in blocks.glob("*.json"))
    assert 4 <= len(finished) < 12 and (root / "lock").exists()  # the dead build's lock
    segments = sorted((root / "cache").glob("seg-*.sqlite"))
    held = set().union(*(stored(p) for p in segments))
    assert len(held) >= 5 * len(finished)  # the responses of the blocks sent, at least
    sent = [p for p in (root / "steps" / "answer").rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in sent}
    boundary = len(standin.records)

    proc = cli(path, url, tmp_path / "machine-b")  # the same host: the lock is taken over
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert not {r.body_hash for r in standin.records[boundary:]} & held  # not paid twice
    for p, t in mtimes.items():  # the finished blocks were not made or sent again
        assert p.stat().st_mtime_ns == t, p
    stage = Remote(url, tmp_path / "machine-b").local
    made = {p.stem: p.stat().st_mtime_ns for p in (stage / "steps/answer/blocks").glob("*.json")}
    pulled = max(made[b] for b in finished)  # before the build began: they were pulled
    assert pulled < min(t for b, t in made.items() if b not in finished)
    assert len(stored(root / "cache.sqlite")) == 60
    assert not list((root / "cache").glob("*.sqlite"))  # folded into the cache, then removed
    assert [r["id"] for r in kdata.Run(stage, "complete", [], {}).rows()] == list(range(60))


def test_a_url_another_build_holds_is_refused(tmp_path: Path, standin, monkeypatch) -> None:
    monkeypatch.setenv("KDATA_STAGE", str(tmp_path / "stage"))
    root = tmp_path / "bucket"
    root.mkdir()
    (root / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started_at": "x"}))
    r = kdata.load_recipe(recipe(tmp_path, standin.port))
    with pytest.raises(RunLocked, match=r"pid 1 on elsewhere.*delete .*bucket/lock"):
        kdata.build(r, run_dir=f"file://{root}")
    assert len(standin.records) == 0 and remote_files(root) == {"lock"}


def test_a_lock_a_dead_build_of_this_machine_left_is_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    root.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    (root / "lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    remote = Remote(f"file://{root}", tmp_path / "stage")
    with remote.hold():
        assert json.loads((root / "lock").read_text())["pid"] == os.getpid()
    assert not (root / "lock").exists()


def test_an_unknown_protocol_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KdataError, match="run directory nosuch://b/x: .*nosuch"):
        Remote("nosuch://b/x", tmp_path)


def test_segments_hold_each_response_once(tmp_path: Path) -> None:
    from kdata.teachers.cache import RequestCache

    cache = RequestCache(tmp_path / "cache.sqlite")
    for i in range(3):
        cache.put(f"k{i}", "t", "m", {"i": i}, {"r": i}, 0.5)
    last, n = export_responses(cache.path, tmp_path / "a.sqlite", 0)
    cache.put("k3", "t", "m", {"i": 3}, {"r": 3}, 0.5)
    assert (last, n) == (3, 3)
    assert export_responses(cache.path, tmp_path / "b.sqlite", last) == (4, 1)
    assert export_responses(cache.path, tmp_path / "c.sqlite", 4) == (4, 0)
    assert not (tmp_path / "c.sqlite").exists()  # none: no store
    other = RequestCache(tmp_path / "other.sqlite")
    assert other.absorb(tmp_path / "a.sqlite") + other.absorb(tmp_path / "b.sqlite") == 4
    assert other.get("k3") == {"r": 3} and other.total_cost() == 2.0


def test_the_readme_output_snippet_names_a_url(tmp_path: Path) -> None:
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    snippet = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "s3://" in b)
    r = kdata.recipe_from_yaml(
        "name: t\nsteps:\n  - {type: seeds, path: s.jsonl}\n" + snippet, tmp_path
    )
    assert r.run_dir == "s3://my-bucket/runs/quickstart"  # a URL, not a path that mangles it


def test_the_run_commands_take_a_url_from_another_machine(tmp_path: Path, monkeypatch) -> None:
    """``inspect`` and ``rethreshold`` given the URL, on a machine that has only the URL."""
    from typer.testing import CliRunner

    from kdata.cli import app

    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "near",
        "the",
        "river",
        "bank",
        "today",
    ]
    rows = [{"t": " ".join(words[: 8 + i % 4] + [f"w{i // 4}"])} for i in range(80)]
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = "  - {type: minhash_dedup, name: near, columns: [t], threshold: 0.9, floor: 0.3}\n"
    r = kdata.recipe_from_yaml(
        "name: t\nsteps:\n  - {type: seeds, path: seeds.jsonl}\n" + steps, tmp_path
    )
    url = f"file://{tmp_path}/bucket"
    monkeypatch.setenv("KDATA_STAGE", str(tmp_path / "machine-a"))
    before = kdata.build(r, run_dir=url).steps[-1].rows_out

    monkeypatch.setenv("KDATA_STAGE", str(tmp_path / "machine-b"))
    cli = CliRunner()
    shown = cli.invoke(app, ["inspect", url, "-n", "1"])
    assert shown.exit_code == 0, shown.output
    assert f"({before} rows in 1 shards" in shown.output.replace("\n", "")
    recut = cli.invoke(app, ["rethreshold", url, "--step", "near", "--threshold", "0.3"])
    assert recut.exit_code == 0, recut.output
    after = json.loads((tmp_path / "bucket" / "steps" / "near" / "stats.json").read_text())
    assert after["rows_out"] < before  # the URL has the re-cut
    stage = Remote(url, tmp_path / "machine-b").local
    assert (
        kdata.Run(stage, "complete", [], {}).rows()
        == kdata.Run(tmp_path / "bucket", "complete", [], {}).rows()
    )
