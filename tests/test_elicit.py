"""`label` with chain of thought and verification, and `consensus`: scripted and real teachers."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from scripted import build, last_user_message, qid, tables, teacher

import kdata
from kdata.answers import answers_match, extract_answer
from kdata.steps.base import row_id

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "recipes" / "data" / "gsm8k_200.jsonl"


# Six problems with GSM8K-style solutions (the reference is the last number) and one without.
SEEDS = [
    {"id": i, "question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\nSo {2 * i}."}
    for i in range(6)
] + [{"id": 6, "question": "What is nothing?", "answer": "no number here"}]


def shown(i: int, value: int) -> str:
    """How the scripted teacher writes an answer: problem 5 in dollars ($10.00 matches 10)."""
    return f"${value}.00" if i == 5 else str(value)


def cot_reply(body: dict) -> str:
    """Sample s of problem i: wrong when (i + s) % 3 == 0; no final answer for (4, 1)."""
    i, s = qid(body), body["seed"]
    if (i, s) == (4, 1):
        return f"I think it is {2 * i}."
    answer = 2 * i + 1 if (i + s) % 3 == 0 else 2 * i
    return f"Add {i} and {i}.\nFinal answer: {shown(i, answer)}"


def sample_of(row: dict) -> int:
    """Which sample of its parent row a row of step ``s`` is (its id is made from it)."""
    p = row["_kdata"]
    return next(s for s in range(3) if row_id(p["parent_ids"][0], "s", str(s)) == p["id"])


def test_cot_verify_drops_exactly_the_wrong_samples(tmp_path, standin):
    standin.config.reply = cot_reply
    step = (
        "  - {name: s, type: label, teacher: t, prompt: 'Q{{ id }}: {{ question }}', cot: true,"
        " n: 3, verify: {reference: answer, extract_reference: true}}\n"
    )
    t = build(tmp_path, SEEDS, teacher("t", standin.port), step)

    want_wrong = {(i, s) for i in range(6) for s in range(3) if (i + s) % 3 == 0} - {(4, 1)}
    assert t.stats["expected"] == 6 * 3 + 1  # six rows x three samples, one row unverifiable
    assert t.stats["drop_reasons"] == {"wrong_answer": len(want_wrong)}
    # The row without a reference failed before any request was made for it.
    assert [json.loads(f["row"])["id"] for f in t.failed if f["error_class"] == "reference"] == [6]
    assert all("Q6:" not in last_user_message(r.body) for r in standin.records)
    assert len(standin.records) == 18 and len({r.body_hash for r in standin.records}) == 18
    # (4, 1) states no final answer: a parse failure with the raw text kept.
    (parse,) = [f for f in t.failed if f["error_class"] == "parse"]
    assert json.loads(parse["row"])["id"] == 4 and parse["raw"] == "I think it is 8."

    dropped_samples = set()
    for d in t.dropped:
        row, detail = json.loads(d["row"]), json.loads(d["detail"])
        i = row["id"]
        dropped_samples.add((i, sample_of(row)))
        assert detail["answer"] == shown(i, 2 * i + 1) and detail["reference"] == str(2 * i)
        assert detail["rationale"] == f"Add {row['id']} and {row['id']}."
        assert d["row_id"] == row["_kdata"]["id"]
    assert dropped_samples == want_wrong
    everything = {(i, s) for i in range(6) for s in range(3)}
    assert {(r["id"], sample_of(r)) for r in t.rows} == everything - want_wrong - {(4, 1)}
    for r in t.rows:
        assert answers_match(r["response_answer"], r["response_reference"])
        assert r["response_reference"] == str(2 * r["id"])
        assert r["response_rationale"] == f"Add {r['id']} and {r['id']}."
        assert r["response"].endswith(f"Final answer: {r['response_answer']}")
        assert r["_kdata"]["teacher"] == "t" and r["_kdata"]["parent_ids"]
    assert {r["response_answer"] for r in t.rows if r["id"] == 5} == {"$10.00"}


def test_verify_with_a_pattern_and_no_cot(tmp_path, standin):
    # Without cot the final answer is extract_answer's: a marker, else the last number.
    replies = {0: "The answer is B.", 1: "The answer is E.", 2: "Options 1 and 2", 3: "None"}
    standin.config.reply = lambda body: replies[qid(body)]
    seeds = [{"id": i, "question": "Pick A-D"} for i in range(4)]
    step = (
        "  - {name: s, type: label, teacher: t, prompt: 'Q{{ id }}: {{ question }}',"
        " verify: {pattern: '[A-D]'}}\n"
    )
    t = build(tmp_path, seeds, teacher("t", standin.port), step)
    assert [(r["id"], r["response_answer"], r["response"]) for r in t.rows] == [
        (0, "B", "The answer is B.")
    ]
    assert "response_reference" not in t.rows[0]
    assert t.ids("dropped") == [1, 2]  # "E", and "2" (the last number)
    assert {json.loads(d["detail"])["answer"] for d in t.dropped} == {"E", "2"}
    assert [(f["error_class"], f["raw"]) for f in t.failed] == [("parse", "None")]


# HumanEval's shape: a prompt, tests that define check(candidate), and the entry point.
CODE_SEEDS = [
    {
        "id": i,
        "prompt": f"Q{i}: write add{i}(a, b) returning a + b",
        "test": (
            "def check(candidate):\n    assert candidate(2, 3) == 5\n"
            "    assert candidate(-1, 1) == 0\n"
        ),
        "entry_point": f"add{i}",
    }
    for i in range(4)
]
CODE_REPLIES = {
    0: "Here it is:\n```python\ndef add0(a, b):\n    return a + b\n```\nIt adds.",
    1: "```python\ndef add1(a, b):\n    return a - b\n```",  # wrong
    2: "def add2(a, b):\n    return b + a",  # right, not fenced
    3: "```py\ndef add3(a, b):\n    while True:\n        pass\n```",  # never returns
}


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (CI installs it)")
def test_verify_with_tests_runs_the_code_in_the_sandbox(tmp_path, standin):
    standin.config.reply = lambda body: CODE_REPLIES[qid(body)]
    step = (
        "  - {name: s, type: label, teacher: t, prompt: '{{ prompt }}',"
        " verify: {tests: test, entry_point: entry_point, timeout_s: 3}}\n"
    )
    t = build(tmp_path, CODE_SEEDS, teacher("t", standin.port), step)
    assert [(r["id"], r["response_code"]) for r in t.rows] == [
        (0, "def add0(a, b):\n    return a + b"),
        (2, "def add2(a, b):\n    return b + a"),
    ]
    assert t.stats["drop_reasons"] == {"tests_failed": 2} and t.failed == []
    ended = {json.loads(d["row"])["id"]: json.loads(d["detail"]) for d in t.dropped}
    assert ended[1]["ended"] == "failed" and "AssertionError" in ended[1]["output"]
    assert ended[3]["ended"] in {"timeout", "cpu_limit"}


MATH_SEEDS = [
    {"id": 0, "question": "Half of one?", "answer": "0.5"},
    {"id": 1, "question": "The set of roots of x^2 - 3x + 2?", "answer": "\\{1, 2\\}"},
    {"id": 2, "question": "Ten percent, as a number of percent?", "answer": "10\\%"},
    {"id": 3, "question": "Two plus two?", "answer": "4"},
    {"id": 4, "question": "One third?", "answer": "\\frac{1}{3}"},
]
MATH_REPLIES = {
    0: "Half of 1 is $\\boxed{\\frac{1}{2}}$.",  # a fraction for a decimal
    1: "Factor: (x-1)(x-2), so the roots are $\\boxed{\\{2, 1\\}}$.",  # a set, reordered
    2: "The answer is $\\boxed{10}$.",  # the percent sign stripped
    3: "It is $\\boxed{5}$.",  # wrong
    4: "About $\\boxed{0.3}$.",  # close is not equal
}


def test_verify_math_compares_answers_as_mathematics(tmp_path, standin):
    pytest.importorskip("math_verify")
    standin.config.reply = lambda body: MATH_REPLIES[qid(body)]
    step = (
        "  - {name: s, type: label, teacher: t, prompt: 'Q{{ id }}: {{ question }}',"
        " verify: {reference: answer, math: true}}\n"
    )
    t = build(tmp_path, MATH_SEEDS, teacher("t", standin.port), step)
    assert sorted(r["id"] for r in t.rows) == [0, 1, 2] and t.failed == []
    wrong = {json.loads(d["row"])["id"]: json.loads(d["detail"]) for d in t.dropped}
    assert set(wrong) == {3, 4} and wrong[3]["answer"] == "5" and not wrong[3]["timed_out"]
    # Plain comparison would have kept neither the fraction nor the set.
    assert not answers_match(extract_answer(MATH_REPLIES[0]), "0.5")


def test_a_math_check_out_of_time_drops_the_sample_and_the_next_check_runs():
    pytest.importorskip("math_verify")
    from kdata import mathcheck

    # sympy takes seconds over a 400-term sum (math-verify's own limit is 5 s per parse).
    slow = "$\\boxed{" + "+".join(f"x^{{{i}}}" for i in range(400)) + "}$"
    assert mathcheck.equivalent(slow, "2", timeout_s=0.5) == (None, None)
    # The stuck worker was replaced: the next check answers.
    assert mathcheck.equivalent("$\\boxed{2}$", "2", timeout_s=60) == (True, "2")


@pytest.mark.parametrize(
    ("verify", "message"),
    [
        ("{}", "either reference (a column), pattern (a regex) or tests"),
        ("{reference: a, pattern: x}", "either reference (a column), pattern"),
        ("{entry_point: e, pattern: x}", "entry_point needs tests"),
        ("{pattern: '[a-'}", "not a valid regular expression"),
        ("{extract_reference: true, pattern: x}", "extract_reference needs reference"),
        ("{pattern: x, math: true}", "math needs reference"),
    ],
)
def test_bad_verify_is_a_recipe_error_naming_the_line(tmp_path, verify, message):
    text = (
        "name: t\nteachers:\n  t: {model: local/smollm2-135m-instruct}\nsteps:\n"
        f"  - type: label\n    teacher: t\n    prompt: hi\n    verify: {verify}\n"
    )
    with pytest.raises(kdata.RecipeError) as info:
        kdata.recipe_from_yaml(text)
    assert message in str(info.value) and info.value.step == "steps[0] (label)"
    assert info.value.line == 8


def test_cot_labels_gsm8k_with_the_embedded_teacher(tmp_path):
    seeds = [json.loads(line) for line in GSM8K.read_text().splitlines()[:1]]
    text = f"""\
name: cot
teachers:
  smol:
    model: local/smollm2-135m-instruct
    params: {{temperature: 0.7, max_tokens: 96, seed: 1}}
steps:
  - {{type: seeds, path: {GSM8K}, limit: 1}}
  - name: s
    type: label
    teacher: smol
    prompt: "{{{{ question }}}}"
    cot: true
    n: 2
    verify: {{reference: answer, extract_reference: true}}
"""
    run = kdata.build(kdata.recipe_from_yaml(text), run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "s")
    assert t.stats["expected"] == 2 and t.stats["requests"] == 2
    assert set(t.stats["drop_reasons"]) <= {"wrong_answer"}
    assert set(t.stats["failure_classes"]) <= {"parse"}
    refs = {s["question"]: extract_answer(s["answer"]) for s in seeds}
    for r in t.rows:  # kept rows are right (a 135M model rarely is)
        assert answers_match(r["response_answer"], refs[r["question"]])
        assert r["response"].strip().startswith(r["response_rationale"])
    for d in t.dropped:
        detail = json.loads(d["detail"])
        assert detail["reference"] == refs[json.loads(d["row"])["question"]]
        assert not answers_match(detail["answer"], detail["reference"])
        assert detail["rationale"] is not None
    for f in t.failed:
        assert f["raw"] and "final answer" in f["error"]
    hashes = [json.loads(d["row"])["_kdata"]["request_hash"] for d in t.dropped]
    hashes += [r["_kdata"]["request_hash"] for r in t.rows]
    assert len(set(hashes)) == len(hashes)


# ----------------------------------------------------------------------------- consensus


def consensus_reply(body: dict) -> str:
    """Answers of teachers a, b, c (the request's model) to question i."""
    i, who = qid(body), body["model"]
    script = {
        0: {"a": "7", "b": "7", "c": "7"},  # unanimous
        1: {"a": "7", "b": "7.0", "c": "8"},  # 2 of 3, numerically equal
        2: {"a": "1", "b": "2", "c": "3"},  # no majority
        3: {"a": "5", "b": "6", "c": None},  # a tie, one without answer
        4: {"a": None, "b": None, "c": None},  # nobody answers
        5: {"a": None, "b": "Paris.", "c": "paris"},  # strings, normalised
    }[i]
    answer = script[who]
    return f"{who} reasons.\nFinal answer: {answer}" if answer else f"{who} has no idea"


def test_consensus_keeps_the_majority_and_drops_the_rest(tmp_path, standin):
    standin.config.reply = consensus_reply
    teachers = "".join(teacher(n, standin.port) for n in "abc")
    step = "  - {name: s, type: consensus, teachers: [a, b, c], prompt: 'Q{{ id }}: {{ q }}'}\n"
    seeds = [{"id": i, "q": "?"} for i in range(6)]
    t = build(tmp_path, seeds, teachers, step)

    got = {r["id"]: r for r in t.rows}
    assert sorted(got) == [0, 1, 5]
    assert got[0]["response_agreement"] == 1.0 and got[0]["response_teachers"] == ["a", "b", "c"]
    assert got[1]["response_agreement"] == pytest.approx(2 / 3)
    assert got[1]["response_teachers"] == ["a", "b"]
    assert got[5]["response_teachers"] == ["b", "c"] and got[5]["response_answer"] == "Paris"
    for r in t.rows:  # the kept response is the first agreeing teacher's
        first = r["response_teachers"][0]
        assert r["_kdata"]["teacher"] == first and r["response_rationale"] == f"{first} reasons."
    assert t.ids("dropped") == [2, 3]
    assert {d["reason"] for d in t.dropped} == {"no_consensus"}
    detail = {json.loads(d["row"])["id"]: json.loads(d["detail"]) for d in t.dropped}
    assert detail[3] == {"answers": {"a": "5", "b": "6", "c": None}}
    assert [(f["error_class"], json.loads(f["row"])["id"]) for f in t.failed] == [("no_answer", 4)]
    assert "[c] c has no idea" in t.failed[0]["raw"]
    assert len(standin.records) == 18  # three teachers per row


def test_consensus_fails_a_row_when_a_teacher_call_fails(tmp_path, standin):
    standin.config.reply = lambda body: "Final answer: 1"
    standin.config.decide = lambda body, attempt: "400" if body["model"] == "b" else None
    teachers = "".join(teacher(n, standin.port) for n in "ab")
    step = "  - {name: s, type: consensus, teachers: [a, b], prompt: 'Q{{ id }}:'}\n"
    t = build(tmp_path, [{"id": 0}], teachers, step)
    assert t.rows == [] and [f["error_class"] for f in t.failed] == ["bad_request"]


def test_consensus_of_two_embedded_teachers(tmp_path):
    text = f"""\
name: c
teachers:
  cold: {{model: local/smollm2-135m-instruct, params: {{temperature: 0, max_tokens: 48}}}}
  warm: {{model: local/smollm2-135m-instruct, params: {{temperature: 1, max_tokens: 48, seed: 2}}}}
steps:
  - {{type: seeds, path: {GSM8K}, limit: 1}}
  - {{name: s, type: consensus, teachers: [cold, warm], prompt: "{{{{ question }}}}"}}
"""
    recipe = kdata.recipe_from_yaml(text)
    s = kdata.plan(recipe).steps[1]
    assert (s.step, s.type, s.rows, s.calls, s.teachers) == (
        "s",
        "consensus",
        1,
        2,
        ["cold", "warm"],
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "s")
    assert t.stats["expected"] == 1 and t.stats["requests"] == 2
    assert set(t.stats["drop_reasons"]) <= {"no_consensus"}
    assert set(t.stats["failure_classes"]) <= {"no_answer"}
    for r in t.rows:
        assert r["response_agreement"] == 1.0 and r["response_teachers"] == ["cold", "warm"]


# ----------------------------------------------------------------------------- gsm8k_cot recipe


def test_gsm8k_recipe_plans_its_limit_and_every_problem_has_a_reference(monkeypatch):
    monkeypatch.delenv("KDATA_GSM8K_LIMIT", raising=False)
    recipe = kdata.load_recipe(ROOT / "recipes" / "gsm8k_cot.yaml")
    plan = kdata.plan(recipe).steps[:2]  # problems, then the CoT labels (curation may follow)
    assert [(p.rows, p.calls) for p in plan] == [(10, 0), (40, 40)]
    monkeypatch.setenv("KDATA_GSM8K_LIMIT", "100")
    recipe = kdata.load_recipe(ROOT / "recipes" / "gsm8k_cot.yaml")
    plan = kdata.plan(recipe).steps[:2]
    assert [(p.rows, p.calls) for p in plan] == [(100, 0), (400, 400)]
    label = recipe.steps[1]
    problems = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    assert len(problems) == 200
    for p in problems:  # the reference is the last number of the worked solution
        assert label.verify.reference_of(p) == re.findall(r"\$?[\d,.]*\d", p["answer"])[-1]


@pytest.mark.slow
def test_gsm8k_recipe_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("KDATA_GSM8K_LIMIT", "3")
    run = kdata.build(kdata.load_recipe(ROOT / "recipes" / "gsm8k_cot.yaml"), run_dir=tmp_path)
    cot = run.steps[1]
    assert (cot.rows_in, cot.expected, cot.requests) == (3, 12, 12)
    assert set(cot.drop_reasons) <= {"wrong_answer"} and set(cot.failure_classes) <= {"parse"}
    for r in run.rows():
        assert answers_match(r["response_answer"], r["response_reference"])


PERSON = (
    "{type: object, properties: {name: {type: string}, age: {type: integer, minimum: 0}},"
    " required: [name, age]}"
)


def test_schema_replies_become_columns_and_invalid_ones_are_asked_again(tmp_path, standin):
    def reply(body: dict) -> str:
        i, attempt = qid(body), body["seed"]  # seed 0 + the attempt's sample index
        if i == 1 and attempt == 0:
            return '{"name": "Bo", "age": "nine"}'  # wrong type, then right on the retry
        if i == 2:
            return "Sure! Here is the person: Ada, 36."  # never JSON
        return f'```json\n{{"name": "P{i}", "age": {30 + i}}}\n```'

    standin.config.reply = reply
    step = (
        f"  - {{name: s, type: label, teacher: t, prompt: 'Q{{{{ id }}}}: a person',"
        f" retries: 1, schema: {PERSON}}}\n"
    )
    seeds = [{"id": i} for i in range(3)]
    guided = teacher("t", standin.port).replace(
        "    max_retries", "    structured_output: true\n    max_retries"
    )
    t = build(tmp_path, seeds, guided, step)
    got = {r["id"]: (r["name"], r["age"]) for r in t.rows}
    assert got == {0: ("P0", 30), 1: ("P1", 31)}
    (bad,) = t.failed
    assert bad["error_class"] == "invalid_output" and bad["attempts"] == 2
    assert bad["raw"] == "Sure! Here is the person: Ada, 36." and "not JSON" in bad["error"]
    # Row 0 was asked once; rows 1 and 2 twice, each attempt its own request.
    assert len(standin.records) == 5 and len({r.body_hash for r in standin.records}) == 5
    # structured_output: every request carried the schema for the server to decode by.
    sent = [r.body["response_format"]["json_schema"]["schema"] for r in standin.records]
    assert all(s["required"] == ["name", "age"] for s in sent)


def test_schema_on_the_embedded_teacher_is_a_grammar(tmp_path):
    step = (
        "  - {name: s, type: label, teacher: smol, prompt: 'Describe {{ who }} as JSON.',"
        f" retries: 0, schema: {PERSON}}}\n"
    )
    smol = (
        "  smol:\n    model: local/smollm2-135m-instruct\n    params: {max_tokens: 48, seed: 0}\n"
    )
    t = build(tmp_path, [{"id": 0, "who": "a retired teacher named Ana"}], smol, step)
    (row,) = t.rows  # llama.cpp's grammar makes the reply valid JSON of the schema
    assert isinstance(row["name"], str) and isinstance(row["age"], int) and row["age"] >= 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("schema: {type: string}", "must describe an object"),
        ("schema: {type: object, properties: {a: {type: nope}}}", "not a valid JSON schema"),
        ("cot: true, schema: {type: object, properties: {}}", "does not go with cot"),
        ("schema: {path: missing.json}", "cannot read schema file"),
    ],
)
def test_bad_schema_is_a_recipe_error(fields, message):
    text = (
        "name: t\nteachers:\n  t: {model: local/smollm2-135m-instruct}\nsteps:\n"
        f"  - {{type: label, teacher: t, prompt: hi, {fields}}}\n"
    )
    with pytest.raises(kdata.RecipeError, match=message):
        kdata.recipe_from_yaml(text)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (CI installs it)")
def test_the_code_verified_recipe_runs_humaneval_tests(tmp_path, standin, monkeypatch):
    """recipes/code_verified.yaml against the stand-in: HumanEval's canonical solutions pass,
    a wrong one fails, and a solution without its imports passes thanks to ``setup``."""
    root = Path(__file__).resolve().parents[1]
    problems = [json.loads(line) for line in (root / "recipes/data/humaneval.jsonl").open()][:3]

    def reply(body: dict) -> str:
        p = next(p for p in problems if f"def {p['entry_point']}(" in last_user_message(body))
        i = problems.index(p)
        stub = p["prompt"][p["prompt"].index("def ") :]  # no imports: setup brings them
        body_ = p["canonical_solution"] if i != 1 else "    return None\n"
        return f"```python\n{stub}{body_}```"

    standin.config.reply = reply
    text = (root / "recipes/code_verified.yaml").read_text()
    text = text.replace(
        "    model: local/smollm2-135m-instruct\n",
        f"    model: openai/coder\n    api_base: http://127.0.0.1:{standin.port}/v1\n"
        "    api_key: ${KDATA_TEST_KEY}\n",
    )
    monkeypatch.setenv("KDATA_HUMANEVAL_LIMIT", "3")
    run = kdata.build(kdata.recipe_from_yaml(text, root / "recipes"), run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "solutions")
    assert sorted(r["task_id"] for r in t.rows) == ["HumanEval/0"] * 2 + ["HumanEval/2"] * 2
    assert t.stats["drop_reasons"] == {"tests_failed": 2}
    assert all("AssertionError" in json.loads(d["detail"])["output"] for d in t.dropped)
    assert problems[0]["prompt"].startswith("from typing import List")  # what setup supplied


def test_a_pydantic_model_is_a_schema_in_python():
    from pydantic import BaseModel

    from kdata.steps.elicit import LabelStep
    from kdata.steps.replies import schema_object

    class Person(BaseModel):
        name: str
        age: int

    step = LabelStep(teacher="t", prompt="Describe {{ who }}.", schema=Person)
    assert step.schema_ == Person.model_json_schema()
    assert schema_object('{"name": "Ada", "age": 36}', step.schema_) == {"name": "Ada", "age": 36}
    with pytest.raises(ValueError, match="age"):
        schema_object('{"name": "Ada"}', step.schema_)
