"""One writer per run directory: real CLI processes against the loopback stand-in."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, write_jsonl
from scripted import Config, StandIn, qid, teachers_yaml

import kdata

LOCK_FILE = "lock"  # RUN_DIR/lock, as the README documents it

N_ROWS = 6


def _recipe(folder: Path, port: int) -> Path:
    seeds = [{"id": i, "q": f"Q{i}: what is {i}?"} for i in range(N_ROWS)]
    write_jsonl(folder / "seeds.jsonl", seeds)
    text = (
        "name: locked\n"
        + teachers_yaml(port, "t")
        + "steps:\n  - {type: seeds, path: seeds.jsonl}\n"
        + "  - {type: label, name: answer, teacher: t, prompt: '{{ q }}', output: a}\n"
    )
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _cli(recipe: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdata.cli", "build", str(recipe), "-o", str(run_dir)],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_build_of_the_same_run_directory_refuses_at_once(tmp_path):
    # The first build's first request is held until the second build has ended, so the first
    # build holds the run directory throughout, however slowly either process starts.
    gate = threading.Event()

    def reply(body: dict) -> str:
        gate.wait(120)  # blocks the stand-in, and so every request of either build
        return f"answer {qid(body)}"

    with StandIn(Config(reply=reply)) as standin:
        recipe, run_dir = _recipe(tmp_path, standin.port), tmp_path / "run"
        first = _cli(recipe, run_dir)
        try:
            deadline = time.monotonic() + 90
            while standin.count() == 0:
                assert first.poll() is None, first.communicate()
                assert time.monotonic() < deadline, "the first build sent nothing"
                time.sleep(0.05)
            holder = json.loads((run_dir / LOCK_FILE).read_text())
            assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

            second = _cli(recipe, run_dir)
            try:
                _, err = second.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                second.kill()
                second.communicate()
                pytest.fail("the second build did not refuse: it is building into the same run")
            assert second.returncode == 4, err
            assert f"{run_dir} is in use by another build (pid {first.pid} on host " in err
            assert "Traceback" not in err
        finally:
            gate.set()
            _, err = first.communicate(timeout=90)
        assert first.returncode == 0, err
    # Every request was sent once, by the first build; the lock went with it.
    assert standin.count() == N_ROWS and set(standin.counts().values()) == {1}
    assert not (run_dir / LOCK_FILE).exists()


def test_a_lock_left_by_a_dead_build_is_taken_over_with_a_note(tmp_path, standin):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    left = {"pid": dead.pid, "host": socket.gethostname(), "started_at": "earlier"}
    (run_dir / LOCK_FILE).write_text(json.dumps(left))

    class Notes:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def step_started(self, name, type, total): ...
        def set_total(self, total): ...
        def advance(self, n, in_flight, tokens, cost_usd): ...
        def step_finished(self, stats): ...

        def note(self, text: str) -> None:
            self.lines.append(text)

    notes = Notes()
    recipe = kdata.load_recipe(_recipe(tmp_path, standin.port))
    run = kdata.build(recipe, run_dir=run_dir, reporter=notes)

    assert run.status == "complete" and len(run.rows()) == N_ROWS
    assert notes.lines == [
        f"took over the lock of {run_dir} left by pid {dead.pid} on host {socket.gethostname()}, "
        "started earlier, which is gone"
    ]
    assert not (run_dir / LOCK_FILE).exists()


def test_the_lock_is_released_when_a_build_fails(tmp_path, standin):
    recipe = kdata.load_recipe(_recipe(tmp_path, standin.port))
    (tmp_path / "seeds.jsonl").unlink()
    with pytest.raises(kdata.KdataError):
        kdata.build(recipe, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    write_jsonl(tmp_path / "seeds.jsonl", [{"id": 0, "q": "Q0: zero?"}])
    assert kdata.build(recipe, run_dir=tmp_path / "run").status == "complete"
