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
    # The server counted no reasoning tokens: the trace's share of the characters (26 of 27).
    assert split.reasoning_tokens == round(9 * 26 / 27)


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


TRACES = {
    0: "I add 0 and 0. The answer is 0.",  # agrees
    1: "I add 1 and 1. The answer is 3.",  # concludes one thing, answers another
    2: "Складываю 2 и 2. The answer is 4.",  # drifts into Cyrillic
    3: "I add three and three.",  # states no answer, no number: nothing to disagree with
}


def test_trace_filters_and_the_messages_column(tmp_path, standin):
    standin.config.reply = lambda body: f"The answer is {2 * qid(body)}."
    standin.config.reasoning = lambda body: TRACES[qid(body)]
    teachers = (
        f"  t:\n    model: deepseek/reasoner\n    api_base: http://127.0.0.1:{standin.port}/v1\n"
        f"    api_key: ${{{KEY_VAR}}}\n    max_retries: 0\n    params: {{temperature: 0}}\n"
    )
    steps = (
        "  - {name: a, type: label, teacher: t, system: Be brief., messages_column: messages,"
        " prompt: 'Q{{ id }}: {{ question }}'}\n"
        "  - name: s\n    type: filter\n    column: response\n    answer_agreement: true\n"
        "    language_mixing: {scripts: [latin], max_share: 0.05}\n"
        f"    max_reasoning_tokens: {standin.config.reasoning_tokens}\n"
    )
    seeds = [{"id": i, "question": f"What is {i} + {i}?"} for i in range(4)]
    t = build(tmp_path, seeds, teachers, steps)
    drops = {json.loads(d["row"])["id"]: (d["reason"], json.loads(d["detail"])) for d in t.dropped}
    assert sorted(r["id"] for r in t.rows) == [0, 3]
    assert drops[1] == ("answer_disagrees", {"trace_answer": "3", "answer": "2"})
    assert drops[2][0] == "language_mixing"
    assert drops[2][1]["where"] == "reasoning" and drops[2][1]["score"] == round(10 / 21, 4)
    # The chat messages: what was sent, then the answer with its trace in its own field.
    row = next(r for r in t.rows if r["id"] == 0)
    msgs = row["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[0]["content"] == "Be brief." and msgs[1]["content"] == "Q0: What is 0 + 0?"
    assert msgs[2]["content"] == "The answer is 0."
    assert msgs[2]["reasoning_content"] == TRACES[0]
    assert row["_kdata"]["reasoning_tokens"] == standin.config.reasoning_tokens


def _row(text: str, trace: str | None = None, reasoning_tokens: int = 0) -> dict:
    row = {"response": text, "_kdata": {"id": "r", "reasoning_tokens": reasoning_tokens}}
    if trace is not None:
        row["response_reasoning"] = trace
    return row


def test_reasoning_token_limit_and_mixing_in_the_answer():
    from kdata.steps.filters import FilterStep

    f = FilterStep(column="response", max_reasoning_tokens=100)
    assert f.check(_row("4", "short", 100)) is None
    assert f.check(_row("4", "long", 101))["reason"] == "reasoning_too_long"
    mixing = FilterStep(
        column="response", language_mixing={"scripts": ["Latin"], "max_share": 0.05}
    )
    # Digits, punctuation and spaces count for no script; accented Latin letters are Latin.
    assert mixing.check(_row("Café au lait: 4,50 €.")) is None
    drop = mixing.check(_row("The answer is 四 (four)."))
    assert drop["reason"] == "language_mixing" and json.loads(drop["detail"])["where"] == "text"
    japanese = FilterStep(
        column="response", language_mixing={"scripts": ["cjk", "hiragana"], "max_share": 0}
    )
    assert japanese.check(_row("答えは四です")) is None
    with pytest.raises(ValueError, match="max_share"):
        FilterStep(column="response", language_mixing={"scripts": ["latin"], "max_share": 1})


def test_the_r1_distill_recipe_on_a_reasoning_server(tmp_path, standin, monkeypatch):
    """recipes/r1_distill.yaml with its teacher pointed at the stand-in answering as DeepSeek's
    reasoner does: traces, math-verified answers, trace filters and messages, end to end."""
    from pathlib import Path

    import pyarrow.parquet as pq

    import kdata

    root = Path(__file__).resolve().parents[1]
    problems = [json.loads(line) for line in (root / "recipes/data/gsm8k_200.jsonl").open()][:4]
    from kdata.answers import extract_answer, parse_number

    # The reference is the last number of GSM8K's worked solution: 72, $10, $5, 42.
    answers = {p["question"]: f"{parse_number(extract_answer(p['answer'])):g}" for p in problems}

    def asked(body: dict) -> str:
        return answers[last_user_message(body)]

    # Problem 0 right, 1 wrong, 2 right but its trace concludes otherwise, 3 right as a decimal.
    def reply(body: dict) -> str:
        i = list(answers).index(last_user_message(body))
        value = asked(body) if i != 1 else "1"
        return f"So the answer is $\\boxed{{{value}}}$" if i != 3 else f"$\\boxed{{{value}.0}}$"

    def reasoning(body: dict) -> str:
        i = list(answers).index(last_user_message(body))
        return f"Let me work it out. The answer is {asked(body) if i != 2 else 999999}."

    standin.config.reply, standin.config.reasoning = reply, reasoning
    text = (root / "recipes/r1_distill.yaml").read_text()
    text = text.replace(
        "    model: local/smollm2-135m-instruct\n",
        f"    model: deepseek/deepseek-reasoner\n    api_base: http://127.0.0.1:{standin.port}/v1\n"
        f"    api_key: ${{{KEY_VAR}}}\n",
    )
    monkeypatch.setenv("KDATA_R1_LIMIT", "4")
    recipe = kdata.recipe_from_yaml(text, root / "recipes")
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    rows = pq.read_table(run.dir / "data").to_pylist()
    # n: 2 samples of problems 0 and 3 pass; their two samples are the same request text, so
    # exact_dedup keeps one of each.
    assert sorted(answers[r["question"]] for r in rows) == sorted(
        [answers[problems[0]["question"]], answers[problems[3]["question"]]]
    )
    stats = {s.name: s for s in run.steps}
    assert stats["traces"].drop_reasons == {"wrong_answer": 2}
    assert stats["trace_quality"].drop_reasons == {"answer_disagrees": 2}
    for r in rows:
        assert r["response_reasoning"].startswith("Let me work it out.")
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert r["messages"][2]["reasoning_content"] == r["response_reasoning"]
