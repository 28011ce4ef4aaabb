"""Builds against scripted teachers: the loopback OpenAI stand-in answering from a reply hook.

The stand-in (tests/openai_standin.py) is a fake of the chat-completions protocol, real HTTP on
127.0.0.1; the hook decides each answer from the request body, so a test knows which answers
are right, wrong, tied, malformed or refused, and checks what a step does with them. Teachers
here send ``seed: 0``, so a request's ``seed`` is its sample index, which lets a hook answer
each sample of a row differently (and makes retries visible).

Two ways to build:

- a test that starts its own ``StandIn`` writes teachers with ``teacher`` and builds seeds plus
  one step with ``build``, read as ``Tables``;
- ``build_scripted`` starts a stand-in for one build from a reply hook, its teachers written by
  ``teachers_yaml``; ``step_tables`` reads a step of the run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openai_standin import Config, StandIn, last_user_message

import kdata
from kdata.blocks import read_dropped, read_table

__all__ = [
    "Config",
    "StandIn",
    "Tables",
    "build",
    "build_scripted",
    "last_user_message",
    "qid",
    "step_tables",
    "tables",
    "teacher",
    "teachers_yaml",
]

KEY_VAR = "KDATA_TEST_KEY"  # the tests set it; the stand-in ignores it


def teacher(name: str, port: int, *, model: str | None = None, params: str = "") -> str:
    """YAML of a teacher served by the stand-in (``model`` defaults to the name)."""
    return (
        f"  {name}:\n    model: openai/{model or name}\n"
        f"    api_base: http://127.0.0.1:{port}/v1\n    api_key: ${{{KEY_VAR}}}\n"
        f"    max_retries: 0\n    timeout: 10\n"  # a reply hook that raises fails fast
        f"    params: {{temperature: 0, seed: 0{params}}}\n"
    )


def qid(body: dict) -> int:
    """The seed row a request is about: prompts start their question with ``Q<id>:``."""
    return int(re.search(r"Q(\d+):", last_user_message(body)).group(1))


@dataclass
class Tables:
    """A step's stats and tables as the run directory holds them."""

    stats: dict
    rows: list[dict]
    dropped: list[dict]
    failed: list[dict]

    def ids(self, table: str) -> list[int]:
        """Seed ids of the rows of ``rows``, ``dropped`` or ``failed``, sorted."""
        recs = getattr(self, table)
        return sorted(r["id"] if table == "rows" else json.loads(r["row"])["id"] for r in recs)


def build(tmp_path: Path, seeds: list[dict], teachers: str, step: str, **kw) -> Tables:
    """Build seeds + one step (YAML of a list item, named ``s``) and read the step's tables."""
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seeds))
    text = f"name: t\nteachers:\n{teachers}steps:\n  - {{type: seeds, path: seeds.jsonl}}\n{step}"
    run = kdata.build(kdata.recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run", **kw)
    return tables(run.dir / "steps" / "s")


def tables(folder: Path) -> Tables:
    """The tables of a step folder; checks its row accounting on the way."""
    t = Tables(
        stats=json.loads((folder / "stats.json").read_text()),
        rows=read_table(folder).to_pylist(),
        dropped=read_dropped(folder),
        failed=read_table(folder, "failed").to_pylist(),
    )
    assert t.stats["expected"] == len(t.rows) + len(t.dropped) + len(t.failed)
    return t


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
            f"    api_key: ${{{KEY_VAR}}}",
            "    max_retries: 0",
            "    params: {temperature: 0.0, max_tokens: 64, seed: 0}",
            "    cost_per_1k_tokens: {input: 1.0, output: 1.0}",
        ]
    return "\n".join(lines) + "\n"


def build_scripted(
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
    os.environ.setdefault(KEY_VAR, "sk-scripted-test")
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
    rows = read_table(folder).to_pylist()
    drops = read_dropped(folder)
    for d in drops:
        d["detail"] = json.loads(d["detail"])
        d["row"] = json.loads(d["row"])
    failed = read_table(folder, "failed").to_pylist()
    assert stats["expected"] == len(rows) + len(drops) + len(failed)
    return stats, rows, drops, failed
