"""The filter and decontaminate steps drop what they should, say why, and keep the rest."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_jsonl

import kdata
from kdata.blocks import read_dropped, read_table
from kdata.steps.base import StepContext, StepOutput, provenance
from kdata.steps.decontaminate import DecontaminateStep
from kdata.steps.filters import FilterStep, repetition
from kdata.steps.semantic import MINILM, SemanticDedupStep

MOVIE = (
    'I would recommend the movie "The Shawshank Redemption" because it is an excellent movie '
    "that is both moving and inspiring."
)
GAMES = (
    "Werewolf, Charades, Pictionary, Balderdash, Two Truths and a Lie, and Uno all work well for "
    "a group: they need few props and everyone can join in."
)
LONG = (
    "Lose weight, exercise more, eat healthier, quit smoking, drink less alcohol, spend less "
    "money, save more money, get out of debt, take a trip, volunteer more, spend more time with "
    "family, learn a new language, read one book every month, sleep eight hours a night, cook at "
    "home more often, walk ten thousand steps a day, call an old friend each week, start a "
    "garden, and finally finish the novel you began writing years ago."
)
ECHO = "The chill is in the air. " * 4


def run_steps(tmp_path: Path, rows: list[dict], step: str) -> kdata.Run:
    """Build seeds (the rows) then one step named `f` given as a YAML flow mapping."""
    write_jsonl(tmp_path / "seeds.jsonl", rows)
    recipe = kdata.recipe_from_yaml(
        f"name: t\nsteps:\n  - {{type: seeds, path: seeds.jsonl}}\n  - {step}\n",
        base_dir=tmp_path,
    )
    return kdata.build(recipe, run_dir=tmp_path / "run")


def side_table(run: kdata.Run, kind: str) -> dict[str, dict]:
    """``dropped`` or ``failed`` records of step `f`, by the row's ``key``, detail decoded."""
    out = {}
    for rec in (
        read_dropped(run.dir / "steps" / "f")
        if kind == "dropped"
        else read_table(run.dir / "steps" / "f", kind).to_pylist()
    ):
        if rec.get("detail"):
            rec["detail"] = json.loads(rec["detail"])
        out[json.loads(rec["row"])["key"]] = rec
    return out


def accounting(run: kdata.Run) -> dict:
    stats = json.loads((run.dir / "steps" / "f" / "stats.json").read_text())
    assert stats["expected"] == stats["rows_out"] + stats["dropped"] + stats["failed"]
    assert stats["expected"] == stats["rows_in"]
    return stats


def direct(step: FilterStep | DecontaminateStep, rows: list[dict], tmp_path: Path) -> StepOutput:
    return asyncio.run(step.run(rows, StepContext(name="f", base_dir=tmp_path, pool=None)))


def made_row(i: int, finish_reason: str | None = None, **columns) -> dict:
    prov = provenance(f"row{i}", [], "label")
    prov["finish_reason"] = finish_reason
    return {**columns, "_kdata": prov}


# --- filter -----------------------------------------------------------------------------------

FILTER = (
    "{name: f, type: filter, column: response, drop_empty: true, min_chars: 12, max_words: 60, "
    r"refusal: true, refusal_patterns: ['\bcannot browse the (web|internet)'], "
    "max_repetition: 0.3, min_score: {column: score, value: 7}}"
)


def test_each_check_drops_with_its_reason_and_score(tmp_path: Path) -> None:
    rows = [
        {"key": "good", "response": MOVIE, "score": 8},
        {"key": "good2", "response": GAMES, "score": 7},
        {"key": "has_ai", "response": "The lab has an AI model that writes captions.", "score": 9},
        {"key": "idiom", "response": "I can't help but laugh at this old joke.", "score": 9},
        {"key": "empty", "response": "  \n ", "score": 9},
        {"key": "short", "response": "Uno.", "score": 9},
        {"key": "long", "response": LONG, "score": 9},
        {
            "key": "refusal",
            "response": "I'm sorry, but I can't help with that request.",
            "score": 9,
        },
        {"key": "ai", "response": "As an AI language model, I have no favourite film.", "score": 9},
        {"key": "own", "response": "Sadly I cannot browse the internet, try IMDb.", "score": 9},
        {"key": "echo", "response": ECHO, "score": 9},
        {"key": "low", "response": MOVIE, "score": 4},
        {"key": "no_score", "response": GAMES},
        {"key": "no_text", "score": 9},
        # Several checks fail: the first in the documented order is the reason.
        {"key": "empty_low", "response": "", "score": 1},
        {"key": "short_refusal", "response": "I'm sorry.", "score": 1},
    ]
    run = run_steps(tmp_path, rows, FILTER)
    assert sorted(r["key"] for r in run.rows()) == ["good", "good2", "has_ai", "idiom"]
    drops = side_table(run, "dropped")
    reasons = {k: d["reason"] for k, d in drops.items()}
    assert reasons == {
        "empty": "empty",
        "short": "too_short",
        "long": "too_long",
        "refusal": "refusal",
        "ai": "refusal",
        "own": "refusal",
        "echo": "repetition",
        "low": "low_score",
        "empty_low": "empty",
        "short_refusal": "too_short",
    }
    detail = {k: d["detail"] for k, d in drops.items()}
    assert detail["short"] == {"score": 4, "threshold": 12, "bound": "min_chars"}
    assert detail["long"] == {"score": len(LONG.split()), "threshold": 60, "bound": "max_words"}
    assert detail["refusal"]["match"] == "i'm sorry"  # built-ins match the lowercased text
    assert detail["ai"]["match"] == "as an ai language model"
    assert detail["own"]["pattern"] == r"\bcannot browse the (web|internet)"
    assert detail["echo"]["score"] == pytest.approx(16 / 22)  # 22 trigrams, 6 distinct
    assert detail["echo"]["threshold"] == 0.3 and detail["echo"]["ngram"] == 3
    assert detail["low"] == {"score": 4, "threshold": 7.0, "column": "score"}
    fails = side_table(run, "failed")
    assert {k: f["error_class"] for k, f in fails.items()} == {
        "no_score": "missing_score",
        "no_text": "missing_column",
    }
    assert "column 'response' is missing" in fails["no_text"]["error"]
    stats = accounting(run)
    assert stats["drop_reasons"]["refusal"] == 3
    assert stats["failure_classes"] == {"missing_score": 1, "missing_column": 1}


def test_direct_run_uses_finish_reason_and_rejects_non_numbers(tmp_path: Path) -> None:
    step = FilterStep(column="response", drop_truncated=True, min_score={"column": "s", "value": 5})
    rows = [
        made_row(0, "stop", response=MOVIE, s=6.5),
        made_row(1, "length", response="The Shawshank Redemption is a", s=9),
        made_row(2, "stop", response=MOVIE, s="eight"),
        made_row(3, "stop", response=MOVIE, s=True),
        made_row(4, "stop", response=MOVIE, s=float("nan")),
        made_row(5, "stop", response=["not", "text"], s=9),
    ]
    out = direct(step, rows, tmp_path)
    assert [r["_kdata"]["id"] for r in out.rows] == ["row0"]
    assert [(d["row_id"], d["reason"]) for d in out.dropped] == [("row1", "truncated")]
    assert json.loads(out.dropped[0]["detail"]) == {"finish_reason": "length"}
    assert [(f["row_id"], f["error_class"]) for f in out.failed] == [
        ("row2", "bad_score"),
        ("row3", "bad_score"),
        ("row4", "missing_score"),
        ("row5", "not_text"),
    ]
    assert "'eight', not a number" in out.failed[0]["error"]
    assert out.expected == len(out.rows) + len(out.dropped) + len(out.failed)


def test_repetition_ratio() -> None:
    assert repetition("a b c a b c a b c") == pytest.approx(4 / 7)
    assert repetition("The cat sat on the mat.") == 0.0
    assert repetition("Yes, yes, YES!", n=1) == pytest.approx(2 / 3)
    assert repetition("too short", n=3) == 0.0


@pytest.mark.parametrize(
    ("step", "field", "words"),
    [
        (
            "refusal_patterns: ['ok', '(unclosed']",
            "refusal_patterns",
            "'(unclosed' does not compile",
        ),
        ("min_score: {colum: judge, value: 7}", "min_score.colum", "did you mean 'column'"),
        ("min_chars: 50, max_chars: 10", None, "min_chars (50) is above max_chars (10)"),
        ("drop_empty: false", None, "needs at least one check"),
        ("drop_empty: true, repetition_ngram: 2", None, "only used with max_repetition"),
        ("max_repetition: 1.5", "max_repetition", "less than 1"),
    ],
)
def test_bad_filter_config_is_a_recipe_error(step: str, field: str | None, words: str) -> None:
    text = "name: t\nsteps:\n  - {type: seeds, path: s.jsonl}\n"
    text += f"  - {{type: filter, column: r, {step}}}\n"
    with pytest.raises(kdata.RecipeError) as info:
        kdata.recipe_from_yaml(text)
    assert info.value.field == field
    assert info.value.step == "steps[1] (filter)"
    assert words in str(info.value)


# --- decontaminate ----------------------------------------------------------------------------

Q1 = (
    "A bakery makes 240 muffins every morning and sells them in boxes of six. On Saturday it sold "
    "all but 18 muffins. How many full boxes of muffins did the bakery sell on Saturday?"
)
Q2 = (
    "Tom reads 12 pages of his history book on weekdays and twice as many pages on each day of "
    "the weekend. How many pages does he read in two full weeks?"
)
Q3 = "What is 15 percent of 80?"  # shorter than 13 words: matches where its words run in a row
BENCH = [
    {"id": "gsm-0001", "question": Q1, "answer": "37"},
    {"id": "gsm-0002", "question": Q2, "answer": "216"},
    {"id": "gsm-0003", "question": Q3, "answer": "12"},
]
MMLU = [
    {"question": "Which planet in the solar system has the shortest orbital period of them all?"},
    {"question": "Which gas makes up most of the atmosphere of the Earth at sea level today?"},
]


def every_fifth_word_changed(text: str) -> str:
    return " ".join("zebra" if i % 5 == 4 else w for i, w in enumerate(text.split()))


DECON = (
    "{name: f, type: decontaminate, columns: [instruction, response], benchmarks: ["
    "{name: gsm8k_test, path: bench/gsm.jsonl, columns: [question], id_column: id}, "
    "{name: mmlu, path: bench/mmlu.csv, columns: [question]}]}"
)


def write_benchmarks(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    write_jsonl(tmp_path / "bench" / "gsm.jsonl", BENCH)
    pd.DataFrame(MMLU).to_csv(tmp_path / "bench" / "mmlu.csv", index=False)


def test_planted_items_are_caught_and_near_misses_kept(tmp_path: Path) -> None:
    write_benchmarks(tmp_path)
    near = every_fifth_word_changed(Q1)
    rows = [
        {"key": "planted", "instruction": f"Solve this for me: {Q1.upper()} Show each step."},
        {"key": "near_miss", "instruction": f"Solve this for me: {near} Show each step."},
        {"key": "in_response", "instruction": "Write a word problem.", "response": f"Try: {Q2}"},
        {"key": "short_equal", "instruction": "What is 15 percent of 80", "response": "12."},
        {"key": "short_inside", "instruction": f"{Q3} Show your work, then check the answer."},
        {"key": "mmlu", "instruction": f"Quiz time! {MMLU[1]['question']}", "response": "N2"},
        {
            "key": "clean",
            "instruction": "Make a grocery list for a healthy meal.",
            "response": None,
        },
        {"key": "clean2", "instruction": "Suggest some games for a group.", "response": GAMES},
    ]
    run = run_steps(tmp_path, rows, DECON)
    assert sorted(r["key"] for r in run.rows()) == ["clean", "clean2", "near_miss"]
    drops = {k: d["detail"] for k, d in side_table(run, "dropped").items()}
    q1_grams = len(Q1.split()) - 12
    assert drops == {
        "planted": {"benchmark": "gsm8k_test", "item_id": "gsm-0001", "overlap": q1_grams},
        "in_response": {
            "benchmark": "gsm8k_test",
            "item_id": "gsm-0002",
            "overlap": len(Q2.split()) - 12,
        },
        "short_equal": {"benchmark": "gsm8k_test", "item_id": "gsm-0003", "overlap": 1},
        "short_inside": {"benchmark": "gsm8k_test", "item_id": "gsm-0003", "overlap": 1},
        "mmlu": {"benchmark": "mmlu", "item_id": 1, "overlap": 3},  # no id_column: position
    }
    assert {d["reason"] for d in side_table(run, "dropped").values()} == {"contaminated"}
    assert accounting(run)["drop_reasons"] == {"contaminated": 5}


SHORT = "Name three primary colours and one colour they make."  # 9 words, under ngram: 13


def test_an_item_shorter_than_ngram_matches_where_its_words_run_contiguously(
    tmp_path: Path,
) -> None:
    path = write_jsonl(tmp_path / "bench.jsonl", [{"question": SHORT}, {"question": Q3}])
    step = DecontaminateStep(
        columns=["q"], benchmarks=[{"name": "b", "path": path.name, "columns": ["question"]}]
    )
    rows = [
        made_row(0, q=f"My teacher asked: '{SHORT.upper()}' Please explain it to a child."),
        made_row(1, q=f"{SHORT[:-1]}, then mix them."),  # longer than the item, still inside
        made_row(2, q="Name three primary colours, and then one colour that they make."),
        made_row(3, q="What is 15 percent of 800? And of 80?"),  # "of 800 and of 80": no run
        made_row(4, q="What is 15 percent of 80?"),
    ]
    out = direct(step, rows, tmp_path)
    assert [r["_kdata"]["id"] for r in out.rows] == ["row2", "row3"]
    hits = {d["row_id"]: json.loads(d["detail"]) for d in out.dropped}
    assert hits == {
        "row0": {"benchmark": "b", "item_id": 0, "overlap": 1},
        "row1": {"benchmark": "b", "item_id": 0, "overlap": 1},
        "row4": {"benchmark": "b", "item_id": 1, "overlap": 1},
    }


def test_min_overlap_counts_shared_ngrams_unless_the_item_is_whole(tmp_path: Path) -> None:
    write_benchmarks(tmp_path)
    words = Q1.split()  # 33 words: 21 13-grams
    rows = [
        {"key": "four", "instruction": "Hint: " + " ".join(words[:16]), "response": "37"},
        {"key": "five", "instruction": "Hint: " + " ".join(words[:17]), "response": "37"},
        {"key": "whole_q", "instruction": f"{MMLU[0]['question']} Answer in one word."},
        {"key": "no_text", "instruction": None, "response": None},
    ]
    step = DECON.replace("type: decontaminate,", "type: decontaminate, min_overlap: 5,")
    run = run_steps(tmp_path, rows, step)
    assert [r["key"] for r in run.rows()] == ["four", "no_text"]
    drops = {k: d["detail"]["overlap"] for k, d in side_table(run, "dropped").items()}
    assert drops == {"five": 5, "whole_q": 2}  # the MMLU item has only 2 13-grams, both shared


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_benchmark_formats(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"bench.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, BENCH)
    elif fmt == "json":
        path.write_text(json.dumps({"test": BENCH}))
    elif fmt == "csv":
        pd.DataFrame(BENCH).to_csv(path, index=False)
    else:
        pd.DataFrame(BENCH).to_parquet(path)
    step = DecontaminateStep(
        columns=["q"],
        benchmarks=[{"name": "b", "path": path.name, "columns": ["question"], "id_column": "id"}],
    )
    rows = [made_row(0, q=f"Here: {Q2}"), made_row(1, q=MOVIE)]
    out = direct(step, rows, tmp_path)
    assert [r["_kdata"]["id"] for r in out.rows] == ["row1"]
    assert json.loads(out.dropped[0]["detail"])["item_id"] == "gsm-0002"


def test_editing_a_benchmark_reruns_the_step(tmp_path: Path) -> None:
    write_benchmarks(tmp_path)
    rows = [{"key": "games", "instruction": "Suggest some games for a group.", "response": GAMES}]
    assert not run_steps(tmp_path, rows, DECON).steps[1].reused
    assert run_steps(tmp_path, rows, DECON).steps[1].reused
    write_jsonl(tmp_path / "bench" / "gsm.jsonl", [*BENCH, {"id": "new", "question": GAMES}])
    again = run_steps(tmp_path, rows, DECON)
    assert not again.steps[1].reused and again.steps[1].drop_reasons == {"contaminated": 1}


def test_decontaminate_errors(tmp_path: Path) -> None:
    write_benchmarks(tmp_path)
    rows = [{"key": "a", "instruction": "Suggest some games for a group.", "response": GAMES}]
    with pytest.raises(kdata.KdataError, match="no row has column 'prompt'"):
        run_steps(tmp_path, rows, DECON.replace("[instruction, response]", "[prompt]"))
    with pytest.raises(kdata.KdataError, match="'gsm8k_test' has no column 'qestion'"):
        run_steps(
            tmp_path, rows, DECON.replace("columns: [question], id", "columns: [qestion], id")
        )
    with pytest.raises(kdata.KdataError, match="no such file"):
        run_steps(tmp_path, rows, DECON.replace("mmlu.csv", "mmlu_missing.csv"))
    step = DecontaminateStep(
        columns=["q"],
        benchmarks=[{"name": "b", "path": "bench/gsm.jsonl", "columns": ["question"]}],
    )
    out = direct(step, [made_row(0, q=42)], tmp_path)
    assert out.failed[0]["error_class"] == "not_text"
    with pytest.raises(kdata.RecipeError, match="used twice: b"):
        kdata.recipe_from_yaml(
            "name: t\nsteps:\n  - type: decontaminate\n    columns: [q]\n    benchmarks:\n"
            "      - {name: b, path: x.jsonl, columns: [q]}\n"
            "      - {name: b, path: y.jsonl, columns: [q]}\n"
        )


# Q1 and Q2 rewritten in other words, with the same numbers: no 13-gram in common.
PARA1 = (
    "Every morning a bakery bakes 240 muffins, packing them six to a box. Apart from 18 muffins, "
    "all of them were sold on Saturday. How many complete boxes were sold that day?"
)
PARA2 = (
    "On weekdays Tom gets through 12 pages of his history textbook, and on Saturdays and Sundays "
    "he reads double that. Over two whole weeks, how many pages does he read?"
)
SEMANTIC = DECON.replace("type: decontaminate,", "type: decontaminate, method: semantic,")


def test_semantic_decontamination_catches_paraphrases_that_share_no_ngram(
    tmp_path: Path,
) -> None:
    write_benchmarks(tmp_path)
    rows = [
        {"key": "para1", "instruction": PARA1, "response": "37 boxes."},
        {"key": "para2", "instruction": "Write a word problem.", "response": PARA2},
        {"key": "same_theme", "instruction": "Tom reads a novel of 300 pages at 20 pages a day."},
        {"key": "clean", "instruction": "Make a grocery list for a healthy meal."},
        {"key": "no_text", "instruction": None, "response": None},
    ]
    assert sorted(r["key"] for r in run_steps(tmp_path, rows, DECON).rows()) == sorted(
        r["key"] for r in rows
    )  # n-grams miss every paraphrase
    run = run_steps(tmp_path, rows, SEMANTIC)
    assert [r["key"] for r in run.rows()] == ["same_theme", "clean", "no_text"]
    drops = {k: d["detail"] for k, d in side_table(run, "dropped").items()}
    assert {k: (d["benchmark"], d["item_id"]) for k, d in drops.items()} == {
        "para1": ("gsm8k_test", "gsm-0001"),
        "para2": ("gsm8k_test", "gsm-0002"),
    }
    # the reported similarity is the cosine of the two texts' embeddings
    emb = SemanticDedupStep(columns=["q"], model=MINILM).embed([PARA1, Q1, PARA2, Q2])
    assert drops["para1"]["similarity"] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-4)
    assert drops["para2"]["similarity"] == pytest.approx(float(emb[2] @ emb[3]), abs=1e-4)
    assert min(d["similarity"] for d in drops.values()) >= 0.9
    assert accounting(run)["drop_reasons"] == {"contaminated": 2}
    strict = SEMANTIC.replace("method: semantic,", "method: semantic, threshold: 0.99,")
    assert len(run_steps(tmp_path, rows, strict).rows()) == len(rows)


@pytest.mark.parametrize(
    "extra, words",
    [
        ("threshold: 0.8", "threshold is not used by method: ngram"),
        ("method: semantic, ngram: 8", "ngram is not used by method: semantic"),
    ],
)
def test_decontaminate_fields_of_the_other_method_are_refused(extra: str, words: str) -> None:
    with pytest.raises(kdata.RecipeError, match=words):
        kdata.recipe_from_yaml(
            "name: t\nsteps:\n  - {type: decontaminate, columns: [q], "
            f"benchmarks: [{{name: b, path: x.jsonl, columns: [q]}}], {extra}}}\n"
        )


def test_a_block_judged_on_its_table_as_on_its_rows() -> None:
    from kdata.blocks import Block, to_table

    texts = ["", "  ", "ok", "one two three four", "I'm sorry, but I can't help with that."]
    texts += ["the cat the cat the cat the cat", "x" * 80, "A fine answer of five words."]
    rows = [
        {"text": t, "n": i, "_kdata": provenance(f"r{i}", [], "seeds")} for i, t in enumerate(texts)
    ]
    block = Block(0, 0, to_table(rows))
    step = FilterStep(
        column="text", drop_empty=True, min_words=2, max_chars=60, refusal=True,
        refusal_patterns=["fine"], max_repetition=0.3,
    )  # fmt: skip
    fast = step.run_table(block)
    slow = asyncio.run(step.run(block.rows(), StepContext(name="f", base_dir=Path("."), pool=None)))
    assert fast.rows.to_pylist() == slow.rows and fast.dropped == slow.dropped
    assert fast.expected == slow.expected == len(texts) and fast.failed == slow.failed == []
    assert {d["reason"] for d in slow.dropped} == {
        "empty", "too_short", "too_long", "refusal", "repetition"
    }  # fmt: skip
    # a check that needs more of the row, or a column with nulls: the rows' own path
    assert FilterStep(column="text", drop_truncated=True).run_table(block) is None
    nulls = Block(0, 0, to_table([*rows, {"text": None, "_kdata": provenance("z", [], "s")}]))
    assert step.run_table(nulls) is None
