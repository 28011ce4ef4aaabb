"""Reasoning traces: whole responses in the cache, `<output>_reasoning` columns, `think_tags`,
and caches written before the whole response was kept."""

from __future__ import annotations

import json
import sqlite3

import pytest
from scripted import KEY_VAR, build, last_user_message, qid, teacher

from kdata.teachers import response

SEEDS = [{"id": i, "question": f"What is {i} + {i}?"} for i in range(3)]
STEP = "  - {name: s, type: label, teacher: t, prompt: 'Q{{ id }}: {{ question }}'}\n"


def trace(body: dict) -> str:
    i = qid(body)
    return f"I add {i} and {i}, which gives {2 * i}."


def entries(tmp_path) -> list[dict]:
    with sqlite3.connect(tmp_path / "run" / "cache.sqlite") as db:
        return [json.loads(r) for (r,) in db.execute("SELECT response FROM responses")]


@pytest.mark.parametrize("provider", ["openai", "deepseek"])
def test_reasoning_content_becomes_a_column_and_its_tokens_are_counted(tmp_path, standin, provider):
    standin.config.reply = lambda body: str(2 * qid(body))
    standin.config.reasoning = trace
    teachers = (
        f"  t:\n    model: {provider}/reasoner\n    api_base: http://127.0.0.1:{standin.port}/v1\n"
        f"    api_key: ${{{KEY_VAR}}}\n    max_retries: 0\n    params: {{temperature: 0}}\n"
    )
    t = build(tmp_path, SEEDS, teachers, STEP)
    assert [
        (r["response"], r["response_reasoning"]) for r in sorted(t.rows, key=lambda r: r["id"])
    ] == [(str(2 * i), f"I add {i} and {i}, which gives {2 * i}.") for i in range(3)]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["ledger"]["t"]["reasoning_tokens"] == 3 * standin.config.reasoning_tokens
    # The cache holds the whole response, usage details included, not only the text.
    (first, *_) = entries(tmp_path)
    message = first["response"]["choices"][0]["message"]
    assert message["reasoning_content"].startswith("I add")
    assert first["response"]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8


def test_inline_think_tags_through_litellm_end_in_the_reasoning_column(tmp_path, standin):
    # litellm itself splits a leading <think>...</think> off an OpenAI-compatible answer.
    standin.config.reply = lambda body: f"<think>{trace(body)}</think>\n{2 * qid(body)}"
    t = build(tmp_path, SEEDS, teacher("t", standin.port), STEP)
    rows = sorted(t.rows, key=lambda r: r["id"])
    assert [r["response"] for r in rows] == ["0", "2", "4"]
    assert rows[2]["response_reasoning"] == "I add 2 and 2, which gives 4."


def test_think_tags_split_what_no_one_split_before():
    # A stored answer with its reasoning inline (a local model, a server without a parser).
    raw = {
        "model": "m",
        "choices": [
            {
                "message": {"role": "assistant", "content": "<think>\n2 and 2\n</think>\n\n4"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9},
    }
    entry = {"format": 2, "response": raw, "cost_usd": 0.0}
    plain = response.read(entry)
    assert (plain.text, plain.reasoning) == ("<think>\n2 and 2\n</think>\n\n4", None)
    split = response.read(entry, think_tags=True)
    assert (split.text, split.reasoning) == ("4", "2 and 2")
    assert (split.prompt_tokens, split.completion_tokens) == (5, 9)


def test_a_cache_of_the_old_format_is_read_as_it_is(tmp_path, standin):
    standin.config.reply = lambda body: f"answer {qid(body)}"
    build(tmp_path, SEEDS, teacher("t", standin.port), STEP)
    # Rewrite every entry as kdata wrote them before it kept whole responses.
    with sqlite3.connect(tmp_path / "run" / "cache.sqlite") as db:
        for key, resp in db.execute("SELECT key, response FROM responses").fetchall():
            r = json.loads(resp)["response"]
            old = {
                "text": "old " + r["choices"][0]["message"]["content"],
                "finish_reason": "stop",
                "usage": {k: r["usage"][k] for k in ("prompt_tokens", "completion_tokens")},
                "cost_usd": 0.0,
                "logprobs": None,
                "response_model": r["model"],
            }
            db.execute("UPDATE responses SET response=? WHERE key=?", (json.dumps(old), key))
    sent = standin.count()
    # think_tags reruns the step; its requests are unchanged, so every answer is stored.
    tagged = teacher("t", standin.port).replace(
        "    max_retries", "    think_tags: true\n    max_retries"
    )
    t = build(tmp_path, SEEDS, tagged, STEP)
    assert standin.count() == sent
    # The step ran again on the stored entries, read in their old format.
    assert sorted(r["response"] for r in t.rows) == ["old answer 0", "old answer 1", "old answer 2"]
    assert all(last_user_message(r.body).startswith("Q") for r in standin.records)
