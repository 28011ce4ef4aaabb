"""`self_consistency` and `self_refine`: scripted teachers for the logic, SmolLM2 for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripted import build, last_user_message, qid, tables, teacher

import kdata

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "recipes" / "data" / "gsm8k_200.jsonl"
PROMPT = "'Q{{ id }}: {{ q }}'"


# ------------------------------------------------------------------------- self_consistency

# The final answer of sample s (seed s) of question i; None: the sample states none.
VOTES = {
    0: ["7", "7", "8", "7", "9"],  # 7 wins, 3 of 5
    1: ["3", "4", "4", "3", None],  # a 2-2 tie: 3 was sampled first
    2: [None] * 5,  # no answer at all
    3: ["$1,000", "999", "1000", "1000.00", "12"],  # numerically equal answers group
}


def vote_reply(body: dict) -> str:
    i, s = qid(body), body["seed"]
    answer = VOTES[i][s]
    return f"Reasoning {s}.\nFinal answer: {answer}" if answer else f"Sample {s} rambles on"


def test_self_consistency_votes_and_keeps_a_sample_that_reached_the_majority(tmp_path, standin):
    standin.config.reply = vote_reply
    step = (
        f"  - {{name: s, type: self_consistency, teacher: t, n: 5, prompt: {PROMPT},"
        " messages_column: chat}\n"
    )
    t = build(tmp_path, [{"id": i, "q": "?"} for i in VOTES], teacher("t", standin.port), step)

    got = {r["id"]: r for r in t.rows}
    assert sorted(got) == [0, 1, 3] and t.dropped == []
    assert (got[0]["response_answer"], got[0]["response_agreement"]) == ("7", 0.6)
    assert got[0]["response_rationale"] == "Reasoning 0."
    assert (got[1]["response_answer"], got[1]["response_agreement"]) == ("3", 0.4)
    assert got[1]["response_rationale"] == "Reasoning 0."
    assert (got[3]["response_answer"], got[3]["response_agreement"]) == ("$1,000", 0.6)
    for r in t.rows:
        assert r["response"] == f"{r['response_rationale']}\nFinal answer: {r['response_answer']}"
        assert r["_kdata"]["parent_ids"] and r["_kdata"]["teacher"] == "t"
        # The chat messages end with the kept sample's response.
        assert [m["role"] for m in r["chat"]] == ["user", "assistant"]
        assert r["chat"][1]["content"] == r["response"]
    (f,) = t.failed
    assert f["error_class"] == "no_answer" and json.loads(f["row"])["id"] == 2
    assert json.loads(f["raw"]) == [f"Sample {s} rambles on" for s in range(5)]
    # five distinct requests per row, the same prompt each time
    assert len(standin.records) == 20 and len({r.body_hash for r in standin.records}) == 20
    assert t.stats["expected"] == 4


def test_self_consistency_stops_at_the_budget_and_resumes_without_paying_twice(tmp_path, standin):
    standin.config.reply = vote_reply
    teachers = teacher("t", standin.port).replace(
        "    max_retries: 0\n",
        "    max_retries: 0\n    cost_per_1k_tokens: {input: 1, output: 1}\n",
    )
    step = f"  - {{name: s, type: self_consistency, teacher: t, n: 5, prompt: {PROMPT}}}\n"
    seeds = [{"id": i % 4, "q": f"v{i}"} for i in range(12)]
    with pytest.raises(kdata.BudgetExceeded):
        _build_with_budget(tmp_path, seeds, teachers, step, 0.5)
    paid = {r.body_hash for r in standin.records if r.status == 200}
    assert 0 < len(paid) < 60
    standin.clear()
    t = _build_with_budget(tmp_path, seeds, teachers, step, 100)
    assert not {r.body_hash for r in standin.records} & paid
    assert len(standin.records) == 60 - len(paid)
    assert t.stats["expected"] == 12 and len(t.rows) == 9 and len(t.failed) == 3


def _build_with_budget(tmp_path, seeds, teachers, step, budget):
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seeds))
    text = (
        f"name: t\nbudget_usd: {budget}\nteachers:\n"
        + teachers.replace("seed: 0", "seed: 0, max_tokens: 20")
        + f"steps:\n  - {{type: seeds, path: seeds.jsonl}}\n{step}"
    )
    run = kdata.build(kdata.recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run")
    return tables(run.dir / "steps" / "s")


def test_self_consistency_with_the_embedded_teacher(tmp_path):
    text = f"""\
name: sc
teachers:
  smol:
    model: local/smollm2-135m-instruct
    params: {{temperature: 0.8, max_tokens: 64, seed: 3}}
steps:
  - {{type: seeds, path: {GSM8K}, limit: 1}}
  - {{name: s, type: self_consistency, teacher: smol, n: 2, prompt: "{{{{ question }}}}"}}
"""
    recipe = kdata.recipe_from_yaml(text)
    assert [(p.rows, p.calls) for p in kdata.plan(recipe).steps] == [(1, 0), (1, 2)]
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "s")
    assert t.stats["expected"] == 1 and t.stats["requests"] == 2 and t.dropped == []
    assert set(t.stats["failure_classes"]) <= {"no_answer"}
    for r in t.rows:
        assert r["response_agreement"] in (0.5, 1.0)
        assert r["response_answer"] and r["response"].strip().startswith(r["response_rationale"])
    for f in t.failed:
        assert len(json.loads(f["raw"])) == 2


# ------------------------------------------------------------------------------ self_refine

CRITIQUE_MARK = "VERDICT: DONE"  # only critique prompts say this
REFINE_MARK = "Feedback on it:"  # only refine prompts say this

# What the critic says in round r of question i (the last entry repeats).
CRITIQUES = {
    0: ["Looks right.\nVERDICT: DONE"],
    1: ["Too short.\nVERDICT: REVISE", "Still short.\nVERDICT: REVISE", "Good.\nVERDICT: DONE"],
    2: ["Wrong.\nVERDICT: REVISE"],  # never satisfied: stops after `rounds`
    3: ["No verdict here, just prose."],
    4: ["Fine.\n**Verdict: done**"],  # emphasis and case are tolerated
    5: ["VERDICT: DONE\nThanks for asking!"],  # the verdict is not on the last line
}


def refine_reply(body: dict) -> str:
    text, i = last_user_message(body), qid(body)
    if CRITIQUE_MARK in text:
        said = CRITIQUES[i]
        return said[min(body["seed"], len(said) - 1)]  # seed = the round
    if REFINE_MARK in text:
        return "the same revision" if i == 2 else f"revision {body['seed'] + 1}"
    return "first answer"


def test_self_refine_stops_at_the_marker_or_after_the_rounds(tmp_path, standin):
    standin.config.reply = refine_reply
    step = f"  - {{name: s, type: self_refine, teacher: t, rounds: 3, prompt: {PROMPT}}}\n"
    t = build(tmp_path, [{"id": i, "q": "?"} for i in CRITIQUES], teacher("t", standin.port), step)

    got = {r["id"]: r for r in t.rows}
    assert sorted(got) == [0, 1, 2, 4]
    assert (got[0]["response"], got[0]["response_rounds_used"]) == ("first answer", 1)
    assert got[0]["response_rounds"] == [
        {"answer": "first answer", "critique": "Looks right.", "done": True}
    ]
    assert (got[1]["response"], got[1]["response_rounds_used"]) == ("revision 2", 3)
    assert [x["answer"] for x in got[1]["response_rounds"]] == [
        "first answer",
        "revision 1",
        "revision 2",
    ]
    assert [x["done"] for x in got[1]["response_rounds"]] == [False, False, True]
    # Never done: three critiques, three revisions, the last one not critiqued.
    assert (got[2]["response"], got[2]["response_rounds_used"]) == ("the same revision", 3)
    assert not any(x["done"] for x in got[2]["response_rounds"])
    assert got[4]["response_rounds"][0]["done"] and got[4]["response_rounds"][0]["critique"] == (
        "Fine."
    )
    assert {json.loads(f["row"])["id"]: f["raw"] for f in t.failed} == {
        3: CRITIQUES[3][0],
        5: CRITIQUES[5][0],
    }
    assert {f["error_class"] for f in t.failed} == {"parse"}

    # Requests: 1 answer + critiques + revisions per row, each a distinct request, even when
    # question 2's revision repeats itself (its critiques differ by round).
    per_row = {0: 2, 1: 6, 2: 7, 3: 2, 4: 2, 5: 2}
    sent = [qid(r.body) for r in standin.records]
    assert {i: sent.count(i) for i in per_row} == per_row
    assert len({r.body_hash for r in standin.records}) == len(standin.records)
    # The reviser sees the critique without its verdict line, and the draft it revises.
    refine = [r.body for r in standin.records if REFINE_MARK in last_user_message(r.body)]
    first = next(b for b in refine if qid(b) == 1 and b["seed"] == 0)
    assert "Too short." in last_user_message(first) and "VERDICT" not in last_user_message(first)
    assert "first answer" in last_user_message(first)


def test_self_refine_from_an_existing_answer_column(tmp_path, standin):
    standin.config.reply = refine_reply
    step = (
        f"  - {{name: s, type: self_refine, teacher: t, rounds: 2, input: draft,"
        f" output: improved, prompt: {PROMPT}}}\n"
    )
    seeds = [{"id": 1, "q": "?", "draft": "my draft"}, {"id": 0, "q": "?", "draft": ""}]
    t = build(tmp_path, seeds, teacher("t", standin.port), step)
    (r,) = t.rows
    assert r["improved"] == "revision 2" and r["draft"] == "my draft"
    assert r["improved_rounds"][0]["answer"] == "my draft" and r["improved_rounds_used"] == 2
    assert [f["error_class"] for f in t.failed] == ["input"]
    # no request asked for a first answer; row 0 (no draft) asked nothing
    assert all(
        CRITIQUE_MARK in last_user_message(b) or REFINE_MARK in last_user_message(b)
        for b in (rec.body for rec in standin.records)
    )
    assert len(standin.records) == 4  # critique, revise, critique, revise


def test_self_refine_with_the_embedded_teacher(tmp_path):
    text = f"""\
name: sr
teachers:
  smol: {{model: local/smollm2-135m-instruct, params: {{temperature: 0, max_tokens: 40}}}}
steps:
  - {{type: seeds, path: {ROOT / "recipes/data/seed_tasks.jsonl"}, limit: 1}}
  - {{name: s, type: self_refine, teacher: smol, rounds: 2, prompt: "{{{{ instruction }}}}"}}
"""
    recipe = kdata.recipe_from_yaml(text)
    assert kdata.plan(recipe).steps[1].calls == 1 + 2 * 2
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    t = tables(run.dir / "steps" / "s")
    assert t.stats["expected"] == 1 and 2 <= t.stats["requests"] <= 5
    assert set(t.stats["failure_classes"]) <= {"parse"}
    for r in t.rows:
        assert 1 <= r["response_rounds_used"] == len(r["response_rounds"]) <= 2
        assert r["response"]
    for f in t.failed:  # a 135M model seldom ends with a verdict line: its critique is kept
        assert f["raw"] and "VERDICT" in f["error"]


def test_a_template_error_fails_the_row_and_progress_counts_rows(tmp_path, standin):
    import asyncio

    from kdata.recipe import Teacher
    from kdata.steps.base import StepContext, provenance
    from kdata.steps.self_knowledge import SelfRefineStep
    from kdata.teachers.cache import RequestCache
    from kdata.teachers.pool import TeacherPool

    standin.config.reply = refine_reply
    step = SelfRefineStep(
        teacher="t",
        prompt="Q{{ id }}: {{ q }}",
        critique_prompt="{{ task }} {{ draft }} {{ rubric }} VERDICT: DONE",  # rubric: 1 row only
    )
    base = f"http://127.0.0.1:{standin.port}/v1"
    cfg = Teacher(
        model="openai/t",
        api_base=base,
        api_key="${KDATA_TEST_KEY}",
        params={"seed": 0},
        max_retries=0,
        timeout=10,
    )
    pool = TeacherPool({"t": cfg}, RequestCache(tmp_path / "c.sqlite"))
    rows = [{"id": i, "q": "?", **({"rubric": "be right"} if i == 0 else {})} for i in range(3)]
    rows = [{**r, "_kdata": provenance(f"r{r['id']}", [], "seeds")} for r in rows]
    totals, advances = [], []
    ctx = StepContext("s", tmp_path, pool, set_total=totals.append, advance=advances.append)

    async def run():
        try:
            return await step.run(rows, ctx)
        finally:
            await pool.aclose()  # the fast path's HTTP session

    out = asyncio.run(run())
    assert totals == [3] and sum(advances) == 3
    assert [r["id"] for r in out.rows] == [0] and out.expected == 3
    assert {f["row_id"] for f in out.failed} == {"r1", "r2"}
    assert {f["error_class"] for f in out.failed} == {"template"}
    assert all("rubric" in f["error"] for f in out.failed)
