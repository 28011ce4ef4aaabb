"""Builds against scripted teachers: the loopback OpenAI stand-in answering from a reply hook.

The stand-in (tests/openai_standin.py) is a fake of the chat-completions protocol, real HTTP on
127.0.0.1; the hook decides each answer from the request body, so a test knows which answers
are right, wrong, tied or malformed. A request's ``seed`` is the teacher's seed plus the sample
index, which lets a hook answer each sample of a row differently.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from openai_standin import Config, StandIn, last_user_message

import kdata

__all__ = ["Config", "StandIn", "Tables", "build", "last_user_message", "qid", "teacher"]

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
        rows=pq.read_table(folder / "rows.parquet").to_pylist(),
        dropped=pq.read_table(folder / "dropped.parquet").to_pylist(),
        failed=pq.read_table(folder / "failed.parquet").to_pylist(),
    )
    assert t.stats["expected"] == len(t.rows) + len(t.dropped) + len(t.failed)
    return t
