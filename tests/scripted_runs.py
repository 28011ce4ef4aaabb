"""Scripted teachers for the multi-call elicitation steps, on the loopback OpenAI stand-in.

The stand-in (tests/openai_standin.py) is a fake of the chat-completions protocol; its ``reply``
hook decides each answer from the request body, so a test can give right and wrong answers,
invalid JSON and refusals on purpose and check what a step does with them. Teachers here send
``seed: 0``, so request sample ``k`` reaches the stand-in as ``seed: k`` (retries are visible).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

import kdata

sys.path.insert(0, str(Path(__file__).parent))
from openai_standin import Config, StandIn, last_user_message  # noqa: E402

__all__ = ["Config", "StandIn", "build", "last_user_message", "step_tables", "teachers_yaml"]


def teachers_yaml(port: int, *models: str) -> str:
    """A ``teachers:`` block: one teacher per model name, all on the stand-in at ``port``.

    Each costs $1 per 1,000 tokens either way (the stand-in reports 12 completion tokens).
    """
    lines = ["teachers:"]
    for m in models:
        lines += [
            f"  {m}:",
            f"    model: openai/{m}",
            f"    api_base: http://127.0.0.1:{port}/v1",
            "    api_key: ${KDATA_TEST_KEY}",
            "    max_retries: 0",
            "    params: {temperature: 0.0, max_tokens: 64, seed: 0}",
            "    cost_per_1k_tokens: {input: 1.0, output: 1.0}",
        ]
    return "\n".join(lines) + "\n"


def build(
    folder: Path,
    reply: Callable[[dict], str],
    steps: str,
    *models: str,
    seeds: list[dict] | None = None,
    run_dir: Path | None = None,
    latency: float | tuple[float, float] = 0.0,
    budget_usd: float | None = None,
) -> tuple[kdata.Run, StandIn, kdata.Recipe]:
    """Build a recipe whose teachers (``models``, default ``t``) are scripted by ``reply``.

    ``steps`` is the YAML of the steps list (without the ``steps:`` line); ``seeds``, when given,
    are written to ``seeds.jsonl`` in ``folder`` for a ``seeds`` step to read.
    """
    if seeds is not None:
        (folder / "seeds.jsonl").write_text(
            "".join(json.dumps(s) + "\n" for s in seeds), encoding="utf-8"
        )
    os.environ.setdefault("KDATA_TEST_KEY", "sk-scripted-test")
    standin = StandIn(Config(reply=reply, latency=latency)).start()
    try:
        text = "name: scripted\n" + teachers_yaml(standin.port, *(models or ("t",)))
        if budget_usd is not None:
            text += f"budget_usd: {budget_usd}\n"
        recipe = kdata.recipe_from_yaml(text + "steps:\n" + steps, base_dir=folder)
        run = kdata.build(recipe, run_dir=run_dir or folder / "run")
    finally:
        standin.stop()
    return run, standin, recipe


def step_tables(run: kdata.Run, name: str) -> tuple[dict, list[dict], list[dict], list[dict]]:
    """(stats, rows, dropped, failed) of one step of a run; drop details are parsed."""
    folder = run.dir / "steps" / name
    stats = json.loads((folder / "stats.json").read_text())
    rows = pq.read_table(folder / "rows.parquet").to_pylist()
    drops = pq.read_table(folder / "dropped.parquet").to_pylist()
    for d in drops:
        d["detail"] = json.loads(d["detail"])
        d["row"] = json.loads(d["row"])
    failed = pq.read_table(folder / "failed.parquet").to_pylist()
    assert stats["expected"] == len(rows) + len(drops) + len(failed)
    return stats, rows, drops, failed
