"""self_instruct and evol_instruct: the logic on a scripted teacher, then a real embedded run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SEED_TASKS
from scripted import build_scripted, last_user_message, step_tables

import kdata
from kdata.answers import rouge_l
from kdata.steps.evol import EvolInstructStep, copied_from_prompt
from kdata.steps.expand import SelfInstructStep
from kdata.steps.novelty import NoveltyIndex

SEEDS = [json.loads(line) for line in SEED_TASKS.read_text(encoding="utf-8").splitlines()]
SENTIMENT = "Classify the sentiment of this movie review as positive or negative."
HAIKU = "Write a haiku about the first snow of winter in a quiet mountain town."
GEARS = "Explain how the gears of a bicycle make climbing steep hills easier."
RECIPE = "Suggest a vegetarian dinner recipe that takes under twenty minutes to cook."
RIDDLE = "Invent a riddle whose answer is an everyday kitchen utensil."
DRAW = "Draw a picture of a sunset over the ocean with three sailing boats."


def near_copy(text: str) -> str:
    """A seed instruction with its last word changed: ROUGE-L well above 0.7 to the seed."""
    words = text.split()
    return " ".join(words[:-1] + ["please"])


# Generation request k (its sample index, seen as `seed`) -> the numbered list the teacher returns.
LISTS = {
    0: [near_copy(SEEDS[0]["instruction"]), SENTIMENT, HAIKU, HAIKU.upper()],
    1: [SENTIMENT, GEARS],
    2: [RECIPE, "Be nice."],
    3: [DRAW, RIDDLE],
}


def scripted_self_instruct(body: dict) -> str:
    text = last_user_message(body)
    if text.startswith("Come up with a series"):
        start = int(re.search(r"continuing from (\d+)", text).group(1))
        items = LISTS.get(body["seed"], [])
        return "Here are new tasks:\n" + "".join(
            f"{start + i}. {item}\n" for i, item in enumerate(items)
        )
    if text.startswith("Can the following task"):
        return "Yes." if "sentiment" in text else "No"
    if text.startswith("Given the classification task"):
        return (
            "Class label: positive\nInput: What a wonderful film.\n"
            "Class label: negative\nInput: A dull, tedious mess."
        )
    if "haiku" in text:
        return "Output: Snow on quiet roofs\nthe town holds its breath\nwinter's first white page"
    return "Example 1\nInput: a first input\nOutput: its output\n\nExample 2\nInput: x\nOutput: y"


def self_instruct_steps(**fields) -> str:
    extra = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    return (
        "  - {type: seeds, path: seeds.jsonl}\n"
        "  - type: self_instruct\n"
        "    name: si\n"
        "    teacher: t\n"
        "    prompts_per_round: 2\n"
        "    new_per_prompt: 4\n" + extra
    )


def examples_shown(prompt: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", prompt.split("\n\nWrite ")[0], flags=re.M)


def test_self_instruct_novelty_filter_mixing_and_instances(tmp_path: Path) -> None:
    seeds = SEEDS[:8]
    run, standin, _ = build_scripted(
        tmp_path, scripted_self_instruct, self_instruct_steps(target=5), seeds=seeds
    )
    stats, rows, drops, failed = step_tables(run, "si")
    assert failed == []
    kept = [r["instruction"] for r in rows]
    assert sorted(kept) == sorted([SENTIMENT, HAIKU, GEARS, RECIPE, RIDDLE])
    reasons = {d["row"]["instruction"]: (d["reason"], d["detail"]) for d in drops}
    # the near copy of a seed names that seed, with the score rouge_l gives
    copy = near_copy(SEEDS[0]["instruction"])
    reason, detail = reasons[copy]
    assert reason == "too_similar" and detail["most_similar"] == SEEDS[0]["instruction"]
    assert detail["rouge_l"] == pytest.approx(rouge_l(copy, SEEDS[0]["instruction"]))
    assert detail["rouge_l"] >= 0.7 and detail["threshold"] == 0.7
    # a duplicate within a reply and a repeat from another prompt of the same round
    assert reasons[HAIKU.upper()][0] == "too_similar"
    assert reasons[HAIKU.upper()][1]["most_similar"] == HAIKU
    assert [d["detail"]["rouge_l"] for d in drops if d["row"]["instruction"] == SENTIMENT] == [1.0]
    assert reasons["Be nice."] == ("bad_length", {"words": 2, "bounds": [3, 150]})
    assert reasons[DRAW][0] == "unsuitable"
    assert stats["expected"] == sum(len(v) for v in LISTS.values()) == 10
    # kept instructions are pairwise below the threshold, and below it to every seed
    pool = kept + [s["instruction"] for s in seeds]
    for a in kept:
        assert all(rouge_l(a, b) < 0.7 for b in pool if b is not a)
    # classification tasks are written output first, the others input first
    by_text = {r["instruction"]: r for r in rows}
    assert by_text[SENTIMENT]["is_classification"] is True
    assert by_text[SENTIMENT]["instances"] == [
        {"input": "What a wonderful film.", "output": "positive"},
        {"input": "A dull, tedious mess.", "output": "negative"},
    ]
    assert by_text[HAIKU]["is_classification"] is False
    assert by_text[HAIKU]["instances"][0]["input"] == ""
    assert by_text[GEARS]["instances"][1] == {"input": "x", "output": "y"}
    prompts = [last_user_message(r.body) for r in standin.records]
    output_first = [p for p in prompts if p.startswith("Given the classification task")]
    assert len(output_first) == 1 and SENTIMENT in output_first[0]
    # round 1 shows 8 seeds per prompt; round 2 shows 2 machine instructions and 6 seeds
    generation = sorted(
        (r.body for r in standin.records if "Come up with a series" in last_user_message(r.body)),
        key=lambda b: b["seed"],
    )
    assert [b["seed"] for b in generation] == [0, 1, 2, 3]
    seed_texts = {s["instruction"].replace("\n", " ") for s in seeds}
    for body in generation:
        shown = examples_shown(last_user_message(body))
        machine = [t for t in shown if t not in seed_texts]
        assert len(shown) == 8
        assert len(machine) == (0 if body["seed"] < 2 else 2)
        assert set(machine) <= {SENTIMENT, HAIKU, GEARS}
    # a machine row's parents are the pool rows its prompt showed
    assert all(len(r["_kdata"]["parent_ids"]) == 8 for r in rows)


def test_self_instruct_stops_after_patience_rounds_of_nothing_new(tmp_path: Path) -> None:
    def reply(body: dict) -> str:
        text = last_user_message(body)
        if text.startswith("Come up with a series"):
            if body["seed"] % 2:
                return "I am unable to think of new tasks."  # not a list: a parse failure
            return f"9. {GEARS}\n10. {RECIPE}"
        return "No" if text.startswith("Can the") else "Output: fine"

    run, standin, _ = build_scripted(
        tmp_path, reply, self_instruct_steps(target=50, patience=2), seeds=SEEDS[:8]
    )
    stats, rows, drops, failed = step_tables(run, "si")
    generation = [
        r for r in standin.records if "Come up with a series" in last_user_message(r.body)
    ]
    # round 1 keeps two; rounds 2 and 3 keep none: patience 2 stops there
    assert len(generation) == 3 * 2
    assert sorted(r["instruction"] for r in rows) == sorted([GEARS, RECIPE])
    assert [d["reason"] for d in drops] == ["too_similar"] * 4
    assert [(f["error_class"], f["raw"]) for f in failed] == [
        ("parse", "I am unable to think of new tasks.")
    ] * 3
    assert stats["expected"] == 2 + 4 + 3


def test_self_instruct_target_and_rerun_from_cache(tmp_path: Path) -> None:
    steps = self_instruct_steps(target=2)
    run, standin, _ = build_scripted(
        tmp_path, scripted_self_instruct, steps, seeds=SEEDS[:8], latency=(0.0, 0.05)
    )
    _, rows, drops, _ = step_tables(run, "si")
    assert sorted(r["instruction"] for r in rows) == sorted([SENTIMENT, HAIKU])
    # once the target is met, the rest of the round's proposals are dropped, not kept
    late = [d["row"]["instruction"] for d in drops if d["reason"] == "target_reached"]
    assert late == [HAIKU.upper(), SENTIMENT, GEARS]
    # run the step again in the same run directory: every request comes from the cache
    (run.dir / "steps" / "si" / "stats.json").unlink()

    def refuse(body: dict) -> str:
        raise AssertionError("a rerun must not call the teacher")

    again, standin2, _ = build_scripted(tmp_path, refuse, steps, run_dir=run.dir)
    assert standin2.count() == 0
    assert step_tables(again, "si")[1] == rows


def test_self_instruct_resumes_after_the_budget_stops_it(tmp_path: Path) -> None:
    bodies: list[str] = []

    def reply(body: dict) -> str:
        bodies.append(json.dumps(body, sort_keys=True))
        return scripted_self_instruct(body)

    steps = self_instruct_steps(target=5)
    with pytest.raises(kdata.BudgetExceeded):
        build_scripted(tmp_path, reply, steps, seeds=SEEDS[:8], budget_usd=1.5)
    stopped = len(bodies)
    run, _, _ = build_scripted(tmp_path, reply, steps, run_dir=tmp_path / "run")
    assert 0 < stopped < len(bodies)
    assert len(set(bodies)) == len(bodies)  # nothing asked, so nothing paid, twice
    (tmp_path / "clean").mkdir()
    clean, _, _ = build_scripted(tmp_path / "clean", scripted_self_instruct, steps, seeds=SEEDS[:8])
    assert step_tables(run, "si")[1:] == step_tables(clean, "si")[1:]


def test_candidate_rules_and_plan() -> None:
    step = SelfInstructStep(teacher="t", target=10, prompts_per_round=3, max_rounds=4)
    assert step.plan(175, Path(".")) == (10, 4 * 3 + 2 * 10)
    pool = NoveltyIndex()
    pool.add(SEEDS[0]["instruction"])
    kept: list[dict] = []
    prov = {"id": "g", "parent_ids": [], "finish_reason": "length"}
    reply = {"_kdata": prov, "items": [GEARS, RECIPE]}
    verdicts = list(step._judge_candidates(reply, pool, kept))
    assert verdicts[0] is None and [k["instruction"] for k in kept] == [GEARS]
    assert verdicts[1]["reason"] == "truncated"  # the last item of a reply cut at max_tokens
    with pytest.raises(ValueError, match="at least 1"):
        SelfInstructStep(teacher="t", target=1, human_per_prompt=0, machine_per_prompt=0)


# ---------------------------------------------------------------- evol_instruct


EVOL_SEEDS = [
    {"id": "same", "instruction": "Name three rivers in Europe."},
    {"id": "copy", "instruction": "Describe a cat."},
    {"id": "refuse", "instruction": "Write a poem about rain."},
    {"id": "short", "instruction": "Is the sky blue?"},
    {"id": "good", "instruction": "Explain photosynthesis."},
]
LONG_ANSWER = "Here is a thorough answer that covers the question in enough words to pass."


def scripted_evol(body: dict) -> str:
    text = last_user_message(body)
    if "Given prompt:" in text:
        parent = text.split("Given prompt:\n", 1)[1].strip()
        if parent == "Name three rivers in Europe.":
            return "name three rivers in Europe"  # equal once normalised
        if parent == "Describe a cat.":
            return "Rewritten prompt: Describe a cat in detail, with its habits."
        return parent + " Use two examples, and answer in a numbered list of steps."
    if "poem about rain" in text:
        return "I'm sorry, but I cannot help with that request."
    if "sky blue" in text:
        return "Yes."
    return LONG_ANSWER


def test_evol_instruct_elimination_and_rounds(tmp_path: Path) -> None:
    steps = (
        "  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: evol_instruct, name: evol, teacher: t, rounds: 2, seed: 3}\n"
    )
    run, standin, recipe = build_scripted(tmp_path, scripted_evol, steps, seeds=EVOL_SEEDS)
    stats, rows, drops, failed = step_tables(run, "evol")
    assert failed == []
    by_seed = {d["row"]["id"]: d for d in drops}
    assert by_seed["same"]["reason"] == "no_new_information"
    assert by_seed["same"]["detail"]["rouge_l"] == 1.0
    assert by_seed["copy"]["reason"] == "copies_prompt"
    assert by_seed["copy"]["detail"]["copied"] == "rewritten prompt"
    assert by_seed["refuse"]["reason"] == "refusal"
    assert by_seed["short"]["reason"] == "too_short"
    assert by_seed["short"]["detail"] == {"words": 1, "threshold": 10}
    # the surviving lineage evolves twice; eliminated lineages stop at round 1
    assert [(r["id"], r["evol_round"]) for r in rows] == [("good", 1), ("good", 2)]
    assert rows[1]["instruction"].startswith(rows[0]["instruction"])
    assert rows[1]["_kdata"]["parent_ids"] == [rows[0]["_kdata"]["id"]]
    assert all(r["response"] == LONG_ANSWER for r in rows)
    assert stats["expected"] == 5 + 1
    # the operation is the seeded choice, and its own prompt was sent
    step = recipe.steps[1]
    seeds_rows = step_tables(run, "00_seeds")[1]
    root = next(r["_kdata"]["id"] for r in seeds_rows if r["id"] == "good")
    sent = [last_user_message(r.body) for r in standin.records]
    for r in rows:
        op = step.operation(root, r["evol_round"])
        assert r["evol_operation"] == op
        method = step.template(op).split("Given prompt:")[0]
        assert any(p.startswith(method) for p in sent)


def test_evol_operations_are_seeded_and_cover_all() -> None:
    step = EvolInstructStep(teacher="t")
    chosen = [step.operation(f"row{i}", 1) for i in range(200)]
    assert set(chosen) == set(step.operations)
    assert chosen == [step.operation(f"row{i}", 1) for i in range(200)]
    other = EvolInstructStep(teacher="t", seed=1)
    assert chosen != [other.operation(f"row{i}", 1) for i in range(200)]
    with pytest.raises(ValueError, match="not in 'operations'"):
        EvolInstructStep(teacher="t", operations=["deepen"], templates={"breadth": "{{ x }}"})


def test_copied_from_prompt() -> None:
    prompt = "Rewrite the prompt below so that it is harder to handle.\nGiven prompt:\nSort a list."
    assert copied_from_prompt("Sort a list so that it is harder to handle.", prompt, "Sort a list.")
    assert copied_from_prompt("Sort a list of names by length.", prompt, "Sort a list.") is None
    assert copied_from_prompt("The Given Prompt asks to sort", prompt, "Sort.") == "given prompt"


# ---------------------------------------------------------------- real teacher


def test_self_instruct_and_evol_on_the_embedded_teacher(tmp_path: Path) -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    recipe = kdata.recipe_from_yaml(
        f"""
name: expand-real
teachers:
  smol:
    model: local/smollm2-135m-instruct
    params: {{temperature: 0.7, max_tokens: 64, seed: 0}}
steps:
  - {{type: seeds, path: {SEED_TASKS}, limit: 20}}
  - type: self_instruct
    name: si
    teacher: smol
    target: 2
    prompts_per_round: 1
    new_per_prompt: 3
    max_rounds: 1
  - {{type: seeds, path: {SEED_TASKS}, limit: 1}}
  - {{type: evol_instruct, name: evol, teacher: smol, rounds: 1, min_answer_words: 3}}
""",
        base_dir=tmp_path,
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    si_stats, rows, drops, failed = step_tables(run, "si")
    assert si_stats["requests"] <= 1 + 2 * 2
    for r in rows:
        assert r["instruction"].strip() and r["instances"]
        assert isinstance(r["is_classification"], bool)
        assert r["_kdata"]["model"] == "local/smollm2-135m-instruct"
    # no kept instruction at or above 0.7 to any other of the pool, by rouge-score's ROUGE-L;
    # and each too_similar drop carries the score rouge-score gives
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    seeds = [json.loads(line)["instruction"] for line in SEED_TASKS.read_text().splitlines()[:20]]
    kept = [r["instruction"] for r in rows]
    for a in kept:
        for b in seeds + [k for k in kept if k != a]:
            assert scorer.score(b, a)["rougeL"].fmeasure < 0.7, (a, b)
    for d in drops:
        if d["reason"] == "too_similar":
            ref, cand = d["detail"]["most_similar"], d["row"]["instruction"]
            score = scorer.score(ref, cand)["rougeL"].fmeasure
            assert score == pytest.approx(d["detail"]["rouge_l"], abs=1e-6) and score >= 0.7
    # evolutions of the kept instructions and one seed task (the second seeds step adds it)
    evol_stats, evolved, evol_drops, evol_failed = step_tables(run, "evol")
    assert evol_stats["expected"] == len(rows) + 1
    assert evol_stats["requests"] <= 2 * (len(rows) + 1)
    for r in evolved:
        assert r["evol_round"] == 1 and r["response"].strip() and r["evol_operation"]


@pytest.mark.slow
def test_expand_recipe_builds(tmp_path: Path) -> None:
    run = kdata.build(kdata.load_recipe(SEED_TASKS.parents[1] / "expand.yaml"), run_dir=tmp_path)
    names = [s.name for s in run.steps]
    assert names == ["00_seeds", "01_evol_instruct", "02_judge", "03_filter"]
    evol = step_tables(run, "01_evol_instruct")[0]
    assert evol["expected"] >= 5
