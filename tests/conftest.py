"""Shared fixtures. Everything here is real: files on disk, the embedded GGUF, loopback servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from openai_standin import Config, StandIn

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SEED_TASKS = ROOT / "recipes" / "data" / "seed_tasks.jsonl"


@pytest.fixture(autouse=True, scope="session")
def _kdata_cache(request, tmp_path_factory):
    """kdata's model cache (the static embedding model, distilled on first use) in pytest's cache
    folder: one per checkout, kept between sessions, never the user's own."""
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("kdata") if cache is not None else tmp_path_factory.mktemp("kdata")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDATA_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    """The key stand-in teachers name (``${KDATA_TEST_KEY}``); the stand-in ignores it."""
    monkeypatch.setenv("KDATA_TEST_KEY", "sk-test")


@pytest.fixture
def standin():
    """A loopback OpenAI stand-in answering every request normally, stopped after the test."""
    with StandIn(Config()) as s:
        yield s


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def llama_server():
    """A real OpenAI-compatible server: llama_cpp.server serving the embedded GGUF on loopback."""
    from kdata.teachers.local import embedded_gguf

    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(embedded_gguf()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            "smollm2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/models", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("llama_cpp.server did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
