"""Magpie: a model writes the user turn from its template's pre-query text, then answers it."""

from __future__ import annotations

import json

import pytest
from scripted import KEY_VAR, StandIn, tables

import kdata
from kdata.teachers.local import pre_query


def test_the_pre_query_text_of_the_embedded_model():
    prefix, end = pre_query("local/smollm2-135m-instruct")
    # SmolLM2's template adds its default system prompt, then opens the user turn.
    assert prefix.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prefix.endswith("<|im_end|>\n<|im_start|>user\n") and end == "<|im_end|>"
    mine, _ = pre_query("local/smollm2-135m-instruct", "You teach chemistry.")
    assert mine == "<|im_start|>system\nYou teach chemistry.<|im_end|>\n<|im_start|>user\n"


def test_magpie_on_the_embedded_teacher_and_its_rerun_from_the_cache(tmp_path):
    recipe = (
        "name: magpie\nteachers:\n  t:\n    model: local/smollm2-135m-instruct\n"
        "    params: {temperature: 0, max_tokens: 48, seed: 0}\n"
        "steps:\n  - {name: m, type: magpie, teacher: t, rows: 4, max_instruction_tokens: 40}\n"
    )
    (tmp_path / "r.yaml").write_text(recipe)
    run = kdata.build(kdata.load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "m")
    assert t.stats["expected"] == 4 and t.failed == []
    assert len(t.rows) >= 2  # temperature 1 for the instructions: they differ
    for r in t.rows:
        assert r["instruction"] and r["response"] and "<|im_" not in r["instruction"]
    texts = [r["instruction"].lower() for r in t.rows]
    assert len(set(texts)) == len(texts)
    manifest = json.loads((run.dir / "manifest.json").read_text())
    sent = manifest["ledger"]["t"]["requests"]
    assert sent == 4 + len(t.rows)  # 4 instructions, one answer per distinct one
    # A rerun is served from the cache: the same rows, no request sent.
    kdata.build(kdata.load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert manifest["ledger"].get("t", {}).get("requests", 0) == 0, manifest["ledger"]
    assert tables(run.dir / "steps" / "m").rows == t.rows


def test_magpie_through_a_servers_completions_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-test")
    said = ["Tell me a joke.", "tell me  a JOKE.", "", "What is 2 + 2?"]

    def reply(body: dict) -> str:
        if "prompt" in body:  # the instruction, written from the pre-query text
            assert body["prompt"] == "<|user|>\n" and body["stop"] == ["</s>"]
            return said[body["seed"]]  # the teacher's seed 0, plus the sample index
        return "An answer."

    with StandIn() as s:
        s.config.reply = reply
        recipe = (
            f"name: m\nteachers:\n  t:\n    model: openai/tiny\n"
            f"    api_base: http://127.0.0.1:{s.port}/v1\n    api_key: ${{{KEY_VAR}}}\n"
            "    max_retries: 0\n    params: {seed: 0}\n"
            "steps:\n  - name: m\n    type: magpie\n    teacher: t\n    rows: 4\n"
            '    pre_query: "<|user|>\\n"\n    end_of_turn: "</s>"\n'
        )
        (tmp_path / "r.yaml").write_text(recipe)
        run = kdata.build(kdata.load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "m")
    assert sorted(r["instruction"] for r in t.rows) == ["Tell me a joke.", "What is 2 + 2?"]
    assert sorted(d["reason"] for d in t.dropped) == ["duplicate", "empty"]
    (dup,) = [d for d in t.dropped if d["reason"] == "duplicate"]
    first = next(r for r in t.rows if r["instruction"] == "Tell me a joke.")
    assert json.loads(dup["detail"]) == {"duplicate_of": first["_kdata"]["id"]}
    assert all(r["response"] == "An answer." for r in t.rows)


def test_magpie_needs_a_template_it_can_read(tmp_path):
    recipe = (
        "name: m\nteachers:\n  t: {model: openai/gpt-4o-mini}\n"
        "steps:\n  - {type: magpie, teacher: t, rows: 3}\n"
    )
    with pytest.raises(kdata.RecipeError, match="give pre_query"):
        kdata.recipe_from_yaml(recipe)
