"""A CLI build whose stderr is a file: plain progress lines while it runs, not at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from conftest import ROOT, write_jsonl
from scripted import Config, StandIn, qid, teachers_yaml

N_ROWS = 4


def test_progress_lines_reach_a_file_while_the_build_runs(tmp_path):
    # Row 0 is answered at once; row 1 waits until the test has read the log: whatever is in
    # the file by then was written while the build was running.
    gate = threading.Event()

    def reply(body: dict) -> str:
        if qid(body) == 1:
            gate.wait(120)  # holds the stand-in, so the build can go no further
        return f"answer {qid(body)}"

    write_jsonl(tmp_path / "seeds.jsonl", [{"q": f"Q{i}: what is {i}?"} for i in range(N_ROWS)])
    recipe = tmp_path / "recipe.yaml"
    log = tmp_path / "stderr.log"
    with StandIn(Config(reply=reply)) as standin:
        teachers = teachers_yaml(standin.port, "t").replace(
            "    max_retries: 0", "    max_retries: 0\n    max_concurrency: 1"
        )
        recipe.write_text(
            "name: progress\n" + teachers + "steps:\n  - {type: seeds, path: seeds.jsonl}\n"
            "  - {type: label, name: answer, teacher: t, prompt: '{{ q }}', output: a}\n"
        )
        with log.open("w") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kdata.cli",
                    "build",
                    str(recipe),
                    "-o",
                    str(tmp_path / "run"),
                ],
                cwd=ROOT,
                env={**os.environ, "KDATA_PROGRESS_EVERY": "0.2"},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            try:
                deadline = time.monotonic() + 90
                while log.read_text().count(f"answer: 1/{N_ROWS} rows, ") < 2:
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, f"no progress lines:\n{log.read_text()}"
                    time.sleep(0.05)
                during = log.read_text()
            finally:
                gate.set()
                proc.wait(timeout=90)
    assert proc.returncode == 0, log.read_text()
    assert "00_seeds (seeds): started" in during
    assert f"00_seeds: done, {N_ROWS} rows out, 0 dropped, 0 failed" in during
    assert "answer (label): started" in during
    assert " in flight, " in during and " tok, $" in during
    assert f"answer: done, {N_ROWS} rows out, 0 dropped, 0 failed, {N_ROWS} requests" in (
        log.read_text()
    )
    assert "\x1b[" not in log.read_text()  # no terminal control codes in a file
