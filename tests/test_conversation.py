"""`conversation`: self-chat and re-answering, scripted on the loopback stand-in and end to end
on the embedded teacher."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_standin import HANG
from scripted import build, last_user_message, tables, teacher

import kdata
from kdata.steps.base import PROVENANCE

ROOT = Path(__file__).resolve().parents[1]
TOPICS = [{"id": i, "topic": f"topic {i}"} for i in range(3)]


def chat_reply(body: dict) -> str:
    """The simulator writes 'ask N about <topic>' (N: the user turns so far); the assistant
    answers 'answer to <the last user turn>'."""
    text = last_user_message(body)
    if text.startswith("Write the first message") or "PERSON:" in text:
        topic = re.search(r"topic \d", text).group(0)
        return f"ask {text.count('PERSON:')} about {topic}"
    return f"answer to {text}"


def test_self_chat_alternates_teachers_for_the_turns_asked(tmp_path, standin):
    standin.config.reply = chat_reply
    teachers = teacher("sim", standin.port) + teacher("bot", standin.port)
    step = (
        "  - {name: s, type: conversation, user: sim, assistant: bot, prompt: '{{ topic }}',"
        " system: 'Be brief.', turns: 3}\n"
    )
    t = build(tmp_path, TOPICS, teachers, step)
    assert t.failed == [] and t.dropped == [] and len(t.rows) == 3
    row = next(r for r in t.rows if r["id"] == 1)
    assert row["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ask 0 about topic 1"},
        {"role": "assistant", "content": "answer to ask 0 about topic 1"},
        {"role": "user", "content": "ask 1 about topic 1"},
        {"role": "assistant", "content": "answer to ask 1 about topic 1"},
        {"role": "user", "content": "ask 2 about topic 1"},
        {"role": "assistant", "content": "answer to ask 2 about topic 1"},
    ]
    assert row["messages_turns"] == 3
    # The assistant saw the whole history, its system prompt first; the simulator the transcript.
    bot = [r.body for r in standin.records if r.body["model"] == "bot"]
    assert len(bot) == 9 and all(b["messages"][0]["content"] == "Be brief." for b in bot)
    assert max(len(b["messages"]) for b in bot) == 6
    # 6 requests per conversation; the row's tokens are all of them (12 completion tokens each).
    assert len(standin.records) == 18
    assert row[PROVENANCE]["completion_tokens"] == 6 * 12


def test_a_stop_rule_ends_the_conversation_early(tmp_path, standin):
    standin.config.reply = lambda b: (
        "thanks, bye" if "PERSON:" in last_user_message(b) else chat_reply(b)
    )
    teachers = teacher("sim", standin.port) + teacher("bot", standin.port)
    step = (
        "  - {name: s, type: conversation, user: sim, assistant: bot, prompt: '{{ topic }}',"
        " turns: 4, stop: '(?i)\\bbye\\b'}\n"
    )
    t = build(tmp_path, TOPICS[:1], teachers, step)
    (row,) = t.rows
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages_turns"] == 1


def test_a_killed_conversation_resumes_and_pays_only_for_the_missing_turns(tmp_path, standin):
    teachers = teacher("sim", standin.port) + teacher("bot", standin.port)
    (tmp_path / "seeds.jsonl").write_text(json.dumps(TOPICS[0]) + "\n")
    (tmp_path / "r.yaml").write_text(
        f"name: t\nteachers:\n{teachers}steps:\n  - {{type: seeds, path: seeds.jsonl}}\n"
        "  - {name: s, type: conversation, user: sim, assistant: bot, prompt: '{{ topic }}',"
        " turns: 4}\n"
    )
    # Two turns (four requests) are answered, then the server hangs and the build is killed.
    standin.config.reply = chat_reply
    standin.config.decide = lambda body, attempt: HANG if standin.count() > 4 else None
    code = "import kdata; kdata.build(kdata.load_recipe('r.yaml'), run_dir='run')"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 120
    while standin.count() < 5 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    served = {r.body_hash for r in standin.records if r.kind is None}
    assert len(served) == 4

    standin.clear()
    standin.config.decide = None
    run = kdata.build(kdata.load_recipe(tmp_path / "r.yaml"), run_dir=tmp_path / "run")
    (row,) = tables(run.dir / "steps" / "s").rows
    assert row["messages_turns"] == 4
    # Turns 1-2 came from the cache: only turns 3-4 (two user, two assistant requests) were sent.
    sent = [r.body_hash for r in standin.records]
    assert len(sent) == 4 and not set(sent) & served


def test_re_answering_keeps_the_user_turns_and_answers_each_afresh(tmp_path, standin):
    standin.config.reply = lambda b: f"new answer to {last_user_message(b)}"
    given = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "old 1"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "old 2"},
    ]
    seeds = [{"id": 0, "conv": given}, {"id": 1, "conv": []}]
    step = "  - {name: s, type: conversation, assistant: bot, regenerate: conv}\n"
    t = build(tmp_path, seeds, teacher("bot", standin.port), step)
    (row,) = t.rows
    assert row["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "new answer to hi"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "new answer to and then?"},
    ]
    # The second answer was asked with the new first answer in its history, not the old one.
    second = standin.records[-1].body["messages"]
    assert [m["content"] for m in second] == ["hi", "new answer to hi", "and then?"]
    (bad,) = t.failed
    assert bad["error_class"] == "input" and "no conversation in column 'conv'" in bad["error"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("assistant: t", "either prompt"),
        ("assistant: t, prompt: x, regenerate: c", "either prompt"),
        ("assistant: t, prompt: x", "self-chat needs user"),
        (
            "assistant: t, user: t, prompt: x, stop: '('",
            "field 'stop': not a valid regular expression",
        ),
    ],
)
def test_bad_conversation_is_a_recipe_error(fields, message):
    text = (
        "name: t\nteachers:\n  t: {model: local/smollm2-135m-instruct}\nsteps:\n"
        f"  - {{type: conversation, {fields}}}\n"
    )
    with pytest.raises(kdata.RecipeError, match=message):
        kdata.recipe_from_yaml(text)


def test_the_ultrachat_recipe_on_the_embedded_teacher(tmp_path):
    recipe = kdata.load_recipe(ROOT / "recipes" / "ultrachat.yaml")
    recipe.steps[0].limit = 1
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / recipe.step_names()[1])
    assert len(t.rows) + len(t.failed) == 1
    for row in t.rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "system" and roles[1:] == ["user", "assistant"] * (len(roles) // 2)
        assert 1 <= row["messages_turns"] <= 2
        assert all(m["content"].strip() for m in row["messages"])
    assert [f["error_class"] for f in t.failed] in ([], ["parse"])  # an empty turn, if any
