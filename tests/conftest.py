"""Shared fixtures. Everything here is real: files on disk, the embedded GGUF, loopback servers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SEED_TASKS = ROOT / "recipes" / "data" / "seed_tasks.jsonl"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """Five real Self-Instruct seed tasks, as a JSONL file in tmp_path."""
    lines = SEED_TASKS.read_text(encoding="utf-8").splitlines()[:5]
    p = tmp_path / "seeds.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p
