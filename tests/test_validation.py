"""SFT validation: a tiny student trained on a real run's curated rows and on its baseline.

The run is real (seeds -> exact_dedup -> filter over GSM8K rows with planted duplicates and junk);
the student is a randomly initialised 2-layer Llama with SmolLM2's tokenizer, trained by trl's
SFTTrainer on CPU. Its scores are near zero: the test checks the report's shape and arithmetic,
not that curation helped.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kdata
from kdata.blocks import read_table
from kdata.cli import app
from kdata.errors import KdataError, RecipeError
from kdata.validation import (
    Pair,
    ValidationConfig,
    _baseline,
    _decontaminate,
    _holdout,
    bootstrap_ci,
    validate_run,
)

pytest.importorskip("trl")

FIXTURES = Path(__file__).parent / "fixtures"

CURATION = """\
  - type: seeds
    path: seeds.jsonl
  - type: exact_dedup
    columns: [question]
  - type: filter
    column: response
    min_words: 5
"""
RECIPE = (
    "name: sft-check\nsteps:\n"
    + CURATION
    + """\
validate:
  student: /nowhere/student.gguf   # replaced by --student tiny below
  prompt: "{{ question }}"
  response: "{{ response }}"
  eval: {path: eval.jsonl, reference: "{{ answer }}"}
  exact_match: true
  max_steps: 3
  batch_size: 4
  max_length: 192
  max_new_tokens: 12
output:
  dir: run
"""
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sft")
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k_60.jsonl").open()]
    seeds = [{"question": r["question"], "response": r["answer"]} for r in rows[:40]]
    seeds += seeds[:8]  # planted exact duplicates: exact_dedup drops them
    seeds += [{"question": f"Junk question {i}?", "response": "42"} for i in range(6)]  # too short
    (tmp / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
    evals = rows[40:46] + [{"question": seeds[0]["question"], "answer": "leaked"}]  # 1 contaminated
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (tmp / "recipe.yaml").write_text(RECIPE)
    recipe = kdata.load_recipe(tmp / "recipe.yaml")
    run = kdata.build(recipe, run_dir=tmp / "run")
    assert [s.dropped for s in run.steps] == [0, 8, 6]
    return run.dir


def test_validate_sft_trains_both_arms_and_writes_the_report(run_dir: Path) -> None:
    res = CliRunner().invoke(app, ["validate-sft", str(run_dir), "--student", "tiny"])
    assert res.exit_code == 0, res.output
    assert "rouge_l" in res.output and "exact_match" in res.output
    report = json.loads((run_dir / "validation" / "report.json").read_text())
    assert report["student"] == "tiny"
    data = report["data"]
    # 40 distinct curated rows; the baseline draws 40 of the 54 rows the seeds step made.
    assert data["curated_rows"] == data["baseline_rows"] == 40
    assert data["baseline"] == "sample of 54 rows from step 00_seeds"
    assert data["eval_items"] == 6 and data["eval_removed_as_contaminated"] == 1
    for arm in ("curated", "baseline"):
        a = report["arms"][arm]
        assert a["rows"] == 40
        assert a["train_tokens"] > 0 and a["tokens_per_second"] > 0
        m = a["metrics"]
        assert 0.0 <= m["rouge_l"] <= 1.0 and 0.0 <= m["exact_match"] <= 1.0
        assert math.isfinite(m["loss"]) and m["loss"] > 0
        assert a["mfu"] is None  # CPU: no peak to divide by
    for d in report["difference"].values():
        lo, hi = d["ci95"]
        assert lo <= d["curated_minus_baseline"] <= hi
    arms = json.loads((run_dir / "validation" / "arms.json").read_text())
    assert [e["step"] for e in arms["curated"]["log"]] == [1, 2, 3]
    assert len(arms["baseline"]["scores"]["rouge_l"]) == data["eval_items"]
    # The same seed and data give the same first loss in both arms only if the data matched;
    # the arms saw different rows, so their curves differ.
    assert arms["curated"]["log"] != arms["baseline"]["log"]
    png = (run_dir / "validation" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    section = (run_dir / "validation" / "section.md").read_text()
    assert "| rouge_l |" in section and "40 curated rows" in section
    assert "validation/loss.png" in section


def test_no_validate_section_is_a_clear_error(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    del manifest["recipe"]["validate"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(app, ["validate-sft", str(other)])
    assert res.exit_code == 1 and "no validate: section" in res.output


def test_bootstrap_interval() -> None:
    mean, lo, hi = bootstrap_ci([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert (mean, lo, hi) == (0.5, 0.5, 0.5)  # constant differences: no spread
    a = [float(i % 2) for i in range(200)]
    mean, lo, hi = bootstrap_ci(a, [0.0] * 200)
    assert mean == 0.5 and 0.4 < lo < 0.5 < hi < 0.6


def test_decontamination_and_equal_size_baseline() -> None:
    q = "Tom has seven red apples and buys nine more apples at the market on Sunday morning"
    train = [Pair(q + " then eats two.", "x")]
    items = [Pair(q + ". How many now?", "14"), Pair("A different question entirely", "1")]
    kept, removed = _decontaminate(items, train)
    assert removed == 1 and kept == items[1:]
    pool = [Pair(str(i), str(i)) for i in range(10)]
    assert len(_baseline(pool, 4, "sample", 0)) == 4
    assert _baseline(pool, 4, "first", 0) == pool[:4]
    with pytest.raises(KdataError, match="fewer than the 11 curated rows"):
        _baseline(pool, 11, "sample", 0)


def test_holdout_takes_whole_prompts() -> None:
    pool = [Pair(f"q{i % 5}", f"a{i}") for i in range(15)]  # 5 prompts, 3 samples each
    items, held = _holdout(pool, 2, seed=0)
    assert len(items) == 2 and {it.prompt for it in items} == held
    assert held < {p.prompt for p in pool}
    assert _holdout(pool, 2, seed=0) == (items, held)  # seeded: the same split every time
    with pytest.raises(KdataError, match="nothing to train on"):
        _holdout(pool, 5, seed=0)


# DPO and the judge: the same kind of run, with a preferences step whose candidates and judges are
# scripted on the loopback OpenAI stand-in (a fake of the chat-completions protocol).
DPO_RECIPE = (
    "name: dpo-check\nteachers:\n{teachers}\nsteps:\n"
    + CURATION
    + """\
  - type: preferences
    name: prefs
    teachers: [cand]
    n: 2
    prompt: "{{{{ question }}}}"
    judge: {{teacher: j, retries: 0}}
validate:
  student: tiny
  prompt: "{{{{ question }}}}"
  response: "{{{{ response }}}}"
  eval: {{path: eval.jsonl, reference: "{{{{ answer }}}}"}}
  max_steps: 2
  batch_size: 4
  max_length: 192
  max_new_tokens: 12
  learning_rate: 0.01   # large: two steps must move a random student's greedy answers
  dpo: {{max_steps: 2, learning_rate: 0.01}}
  judge: {{teacher: j, retries: 0}}
"""
)
SHRUG = "I am not sure."
UNJUDGEABLE = 2  # the eval item whose comparisons the judge answers with prose


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """(run dir, stand-in, eval rows): the stand-in stays up for the validation's judge."""
    from openai_standin import Config, StandIn, last_user_message

    tmp = tmp_path_factory.mktemp("dpo")
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k_60.jsonl").open()]
    seeds = [{"question": r["question"], "response": r["answer"]} for r in rows[:12]]
    answers = {r["question"]: r["answer"] for r in rows}
    evals = rows[40:46]

    def reply(body: dict) -> str:
        text = last_user_message(body)
        if "[Response A]" in text:  # validation's judge: the longer answer wins, in any order
            if evals[UNJUDGEABLE]["question"] in text:
                return "Both answers are fine."
            a = _between(text, "[Response A]\n", "\n\n[Response B]")
            b = _between(text, "[Response B]\n", "\n\nDo not let")
            winner = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
            return json.dumps({"reasoning": "longer", "winner": winner})
        if "[Response]" in text:  # the preferences judge: a worked answer beats a shrug
            score = 2 if SHRUG in text else 9
            return json.dumps({"reasoning": "worked or not", "score": score})
        # a candidate: sample 0 (seed 0) answers, sample 1 shrugs
        return answers[text] if body["seed"] == 0 else SHRUG

    standin = StandIn(Config(reply=reply)).start()
    teachers = "".join(
        f"  {n}:\n    model: openai/{n}\n    api_base: {standin.base_url}\n"
        "    api_key: ${KDATA_TEST_KEY}\n    max_retries: 0\n"
        "    params: {temperature: 0, seed: 0}\n"
        for n in ("cand", "j")
    )
    (tmp / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (tmp / "recipe.yaml").write_text(DPO_RECIPE.format(teachers=teachers.rstrip("\n")))
    mp = pytest.MonkeyPatch()
    mp.setenv("KDATA_TEST_KEY", "sk-validation-test")
    try:
        run = kdata.build(kdata.load_recipe(tmp / "recipe.yaml"), run_dir=tmp / "run")
        yield run.dir, standin, evals
    finally:
        standin.stop()
        mp.undo()


def test_dpo_arm_and_judge_win_rates(dpo_run) -> None:
    run_dir, standin, evals = dpo_run
    prefs = read_table(run_dir / "steps" / "prefs").to_pylist()
    assert len(prefs) == 12 and all(p["rejected"][0]["content"] == SHRUG for p in prefs)
    standin.clear()
    res = CliRunner().invoke(app, ["validate-sft", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "dpo - curated" in res.output and "judge win rate, dpo vs curated" in res.output
    report = json.loads((run_dir / "validation" / "report.json").read_text())

    assert set(report["arms"]) == {"curated", "baseline", "dpo"}
    assert report["arms"]["dpo"]["rows"] == 12
    assert report["data"]["preference_pairs"] == "12 pairs from step prefs"
    arms = json.loads((run_dir / "validation" / "arms.json").read_text())
    assert [e["step"] for e in arms["dpo"]["log"]] == [1, 2]
    assert all(e["reward_accuracy"] is not None for e in arms["dpo"]["log"])
    # DPO moved the SFT student: its reference losses are not the curated arm's
    assert arms["dpo"]["scores"]["loss"] != arms["curated"]["scores"]["loss"]
    assert set(report["dpo_difference"]) == set(report["difference"]) == {"rouge_l", "loss"}
    d = report["dpo_difference"]["loss"]
    dpo_loss, sft_loss = arms["dpo"]["scores"]["loss"], arms["curated"]["scores"]["loss"]
    mean = sum(x - y for x, y in zip(dpo_loss, sft_loss, strict=True)) / len(dpo_loss)
    assert d["dpo_minus_sft"] == pytest.approx(mean) and d["ci95"][0] <= mean <= d["ci95"][1]

    # The judge's verdicts, recomputed from the answers: the longer answer wins in both orders;
    # identical answers are a tie without asking; the unjudgeable item fails as invalid_output.
    judge = report["judge"]
    assert judge["teacher"] == "j" and judge["rubric"] == "helpfulness"
    asked = 0
    for (a, b), name in (
        (("curated", "baseline"), "curated_vs_baseline"),
        (("dpo", "curated"), "dpo_vs_curated"),
    ):
        scores, identical = [], 0
        for i, (x, y) in enumerate(zip(arms[a]["answers"], arms[b]["answers"], strict=True)):
            if x.strip() == y.strip():
                identical += 1
                scores.append(0.5)
                continue
            asked += 2
            if i != UNJUDGEABLE:
                scores.append(1.0 if len(x) > len(y) else 0.0 if len(x) < len(y) else 0.5)
        c = judge["comparisons"][name]
        assert c["judged"] == len(scores) and c["identical_answers"] == identical
        assert (c["wins"], c["ties"], c["losses"]) == (
            scores.count(1.0),
            scores.count(0.5),
            scores.count(0.0),
        )
        assert c["win_rate"] == pytest.approx(sum(scores) / len(scores))
        assert c["ci95"][0] <= c["win_rate"] <= c["ci95"][1]
        unjudged = (
            arms[a]["answers"][UNJUDGEABLE].strip() != arms[b]["answers"][UNJUDGEABLE].strip()
        )
        assert c["failed"] == ({"invalid_output": 1} if unjudged else {})
    assert (
        asked > 0 and standin.count() == asked
    )  # only the judge was asked: no build request was repeated

    section = (run_dir / "validation" / "section.md").read_text()
    assert "DPOTrainer for 2 steps" in section and "| dpo vs curated |" in section
    assert "| curated vs baseline |" in section

    # A rerun judges from the run's cache: the stand-in is not asked again
    standin.clear()
    again = validate_run(run_dir)
    assert standin.count() == 0 and again["judge"] == judge


def test_dpo_without_preference_pairs_is_a_clear_error(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = ValidationConfig.model_validate(
        {**manifest["recipe"]["validate"], "dpo": {"max_steps": 1}},
        context={"base_dir": Path(manifest["base_dir"])},
    )
    with pytest.raises(KdataError, match="no preferences step"):
        validate_run(run_dir, config, Path(manifest["base_dir"]), student="tiny")


def test_validate_judge_must_name_a_teacher() -> None:
    text = RECIPE.replace(
        "  max_new_tokens: 12\n", "  max_new_tokens: 12\n  judge: {teacher: gpt}\n"
    )
    with pytest.raises(RecipeError, match="validate.judge: unknown teacher 'gpt'"):
        kdata.recipe_from_yaml(text)


def test_holdout_prompts_leave_the_preference_pairs_too(dpo_run) -> None:
    run_dir, _, _ = dpo_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = ValidationConfig.model_validate(
        {**manifest["recipe"]["validate"], "eval": {"holdout": 2}, "judge": None},
        context={"base_dir": Path(manifest["base_dir"])},
    )
    report = validate_run(run_dir, config, Path(manifest["base_dir"]))
    # 12 questions: 2 held out for eval, so 10 SFT rows per arm and 10 preference pairs
    assert report["data"]["eval_items"] == 2
    assert report["data"]["curated_rows"] == report["data"]["baseline_rows"] == 10
    assert report["arms"]["dpo"]["rows"] == 10 and "judge" not in report


def test_conversations_train_on_their_last_assistant_turn(tmp_path: Path) -> None:
    from kdata.validation import _conversations

    def chat(i: int) -> list[dict]:
        return [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": f"Hello {i}"},
            {"role": "assistant", "content": f"Hi {i}", "reasoning_content": "a greeting"},
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}.", "reasoning_content": None},
        ]

    rows = [{"topic": f"sum {i}", "messages": chat(i)} for i in range(24)]
    rows += [{"messages": [{"role": "user", "content": "no answer"}]}, {"messages": None}]
    pairs, skipped = _conversations(rows, "messages")
    assert skipped == 2 and len(pairs) == 24
    assert pairs[3].prompt == "What is 3 + 3?" and pairs[3].response == "It is 6."
    assert [m["role"] for m in pairs[3].chat()] == ["system", "user", "assistant", "user"]
    assert "reasoning_content" not in pairs[3].chat()[2]
    # End to end: a run whose rows are conversations, validated on them with a held-out eval.
    seeds = rows[:24] + rows[:6]  # planted duplicates, which exact_dedup drops
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seeds))
    (tmp_path / "recipe.yaml").write_text(
        "name: chats\nsteps:\n  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: exact_dedup, columns: [topic]}\n"
        "validate:\n  messages: messages\n  eval: {holdout: 4}\n  max_steps: 2\n"
        "  batch_size: 4\n  max_length: 128\n  max_new_tokens: 4\n"
    )
    run = kdata.build(kdata.load_recipe(tmp_path / "recipe.yaml"), run_dir=tmp_path / "run")
    report = validate_run(run.dir, student="tiny")
    # 4 prompts held out of the 30 seed rows; the curated arm keeps the other 20 distinct ones.
    assert report["data"]["curated_rows"] == 20 and report["data"]["eval_items"] == 4
    assert report["arms"]["curated"]["train_tokens"] > 0
