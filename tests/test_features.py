"""`features`: top-k log-probabilities from the embedded teacher, from llama_cpp.server, and a
backend that returns none."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from scripted import Config, StandIn, build, tables, teacher

import kdata
from kdata.errors import KdataError
from kdata.teachers.local import embedded_gguf, gguf_metadata

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "recipes" / "data" / "seed_tasks.jsonl"


def features_recipe(teacher_yaml: str, k: int = 3) -> kdata.Recipe:
    return kdata.recipe_from_yaml(f"""\
name: f
teachers:
{teacher_yaml}
steps:
  - {{type: seeds, path: {SEEDS}, limit: 2}}
  - {{name: s, type: features, teacher: t, top_logprobs: {k}, prompt: "{{{{ instruction }}}}"}}
""")


def check_tokens(row: dict, k: int) -> None:
    """The captured tokens spell the response; each has k alternatives, greedy picks the first."""
    tokens = row["response_logprobs"]
    assert tokens and "".join(t["token"] for t in tokens) == row["response"]
    assert len(tokens) == row["_kdata"]["completion_tokens"]
    for t in tokens:
        assert len(t["top"]) == k and t["logprob"] <= 0
        assert [a["logprob"] for a in t["top"]] == sorted(
            (a["logprob"] for a in t["top"]), reverse=True
        )
        assert t["top"][0]["token"] == t["token"]  # temperature 0
        assert t["top"][0]["logprob"] == pytest.approx(t["logprob"], abs=1e-5)


def test_embedded_teacher_logprobs_match_a_direct_llama_cpp_call(tmp_path):
    smol = "  t: {model: local/smollm2-135m-instruct, params: {temperature: 0, max_tokens: 12}}"
    run = kdata.build(features_recipe(smol), run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "s")
    assert len(t.rows) == 2 and t.failed == []
    gguf = embedded_gguf()
    for row in t.rows:
        check_tokens(row, 3)
        assert row["response_tokenizer"] == {
            "model": "local/smollm2-135m-instruct",
            "served_model": "local/smollm2-135m-instruct",
            "gguf": gguf.name,
            "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(),
            "tokenizer": "gpt2 (pre: smollm), 49152 tokens",
        }

    # The same requests straight to llama.cpp give the same tokens and log-probabilities.
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, logits_all=True, verbose=False)
    for row in t.rows:
        llm.reset()
        direct = llm.create_chat_completion(
            messages=[{"role": "user", "content": row["instruction"]}],
            temperature=0,
            max_tokens=12,
            logprobs=True,
            top_logprobs=3,
        )
        want = direct["choices"][0]["logprobs"]["content"]
        assert [x["token"] for x in want] == [x["token"] for x in row["response_logprobs"]]
        for got, exp in zip(row["response_logprobs"], want, strict=True):
            assert got["logprob"] == pytest.approx(exp["logprob"], abs=1e-4)
            assert [a["token"] for a in got["top"]] == [a["token"] for a in exp["top_logprobs"]]


@pytest.mark.parametrize("client", ["auto", "litellm"])  # kdata's HTTP client, and litellm
def test_llama_cpp_server_logprobs(tmp_path, llama_server, client):
    served = (
        f"  t:\n    model: openai/smollm2\n    api_base: {llama_server}\n"
        f"    api_key: ${{KDATA_TEST_KEY}}\n    client: {client}\n"
        "    params: {temperature: 0, max_tokens: 8}"
    )
    run = kdata.build(features_recipe(served, k=2), run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "s")
    assert len(t.rows) == 2 and t.failed == []
    for row in t.rows:
        check_tokens(row, 2)
        ident = row["response_tokenizer"]
        assert ident["model"] == "openai/smollm2" and ident["served_model"] == "smollm2"
        assert ident["gguf"] is None and ident["sha256"] is None


def test_a_backend_without_logprobs_fails_the_rows_with_a_clear_class(tmp_path):
    with StandIn(Config()) as s:  # answers with "logprobs": null, as servers without them do
        step = (
            "  - {name: s, type: features, teacher: t, top_logprobs: 4,"
            " prompt: 'Q{{ id }}: {{ q }}'}\n"
        )
        t = build(tmp_path, [{"id": i, "q": "?"} for i in range(3)], teacher("t", s.port), step)
        bodies = [r.body for r in s.records]
    assert t.rows == [] and len(t.failed) == 3
    for f in t.failed:
        assert f["error_class"] == "no_logprobs" and "returned no top-4" in f["error"]
        assert f["raw"].startswith("answer: ")  # the response itself is kept
    assert all(b["logprobs"] is True and b["top_logprobs"] == 4 for b in bodies)


def test_gguf_metadata_is_read_from_the_header(tmp_path):
    meta = gguf_metadata(embedded_gguf())
    assert meta["general.architecture"] == "llama"
    assert meta["general.organization"] == "HuggingFaceTB"
    assert meta["tokenizer.ggml.tokens"] == meta["llama.vocab_size"] == 49152
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(KdataError, match="not a GGUF file"):
        gguf_metadata(bad)
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01")  # truncated after the version
    with pytest.raises(KdataError, match="cannot read the GGUF header"):
        gguf_metadata(bad)
