"""curate: topic trees and grounded document QA on a scripted teacher, then a real embedded run."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from scripted import build_scripted, last_user_message, step_tables

import kdata
from kdata.errors import KdataError
from kdata.steps.curate import CurateStep, chunk_spans, locate, parse_pairs
from kdata.steps.replies import ParseError

DOC = """# The water cycle

Water evaporates from oceans, lakes and rivers when the sun heats it. The vapour rises and cools.

Cooling vapour condenses into tiny droplets that form clouds. When the droplets grow heavy, they
fall back to the ground as rain, snow or hail.

Rain that soaks into the soil becomes groundwater. Rivers carry the rest back to the sea, and the
cycle begins again.
"""


def topic_reply(body: dict) -> str:
    text = last_user_message(body)
    topic = re.search(r'"([^"]+)"', text).group(1)
    if text.startswith("List"):
        if topic == "broken":
            return "Sorry, I cannot list subtopics."
        # three items where two were asked for, one repeated: the first two distinct are used
        return f"1. {topic} history\n2. {topic} HISTORY\n3. {topic} tools\n4. {topic} people"
    return f"1. What is {topic}?\n2. Why does {topic} matter?\n3. Who studies {topic}?"


def test_topic_tree_breadth_depth_and_counts(tmp_path: Path) -> None:
    steps = (
        "  - type: curate\n"
        "    name: cur\n"
        "    teacher: t\n"
        "    topics: [astronomy, broken]\n"
        "    depth: 2\n"
        "    breadth: 2\n"
        "    per_prompt: 2\n"
    )
    run, standin, recipe = build_scripted(tmp_path, topic_reply, steps)
    stats, rows, drops, failed = step_tables(run, "cur")
    # astronomy: 1 + 2 subtopic requests, 4 leaves; "broken" fails at its first expansion
    assert len(standin.records) == 1 + 1 + 2 + 4
    assert [f["error_class"] for f in failed] == ["parse"]
    assert failed[0]["raw"] == "Sorry, I cannot list subtopics."
    leaves = {tuple(r["topic_path"]) for r in rows}
    assert leaves == {
        ("astronomy", "astronomy history", "astronomy history history"),
        ("astronomy", "astronomy history", "astronomy history tools"),
        ("astronomy", "astronomy tools", "astronomy tools history"),
        ("astronomy", "astronomy tools", "astronomy tools tools"),
    }
    assert len(rows) == 4 * 2 and all(r["topic"] == r["topic_path"][-1] for r in rows)
    assert rows[0]["instruction"] == f"What is {rows[0]['topic']}?"
    # the third question of each leaf is past per_prompt: dropped, counted
    assert [d["reason"] for d in drops] == ["over_count"] * 4
    assert stats["expected"] == 8 + 4 + 1
    s = kdata.plan(recipe).steps[0]
    assert (s.step, s.type, s.rows, s.calls, s.teachers) == (
        "cur",
        "curate",
        2 * 4 * 2,
        2 * (1 + 2) + 2 * 4,
        ["t"],
    )


def first_words(text: str) -> str:
    return " ".join(text.split()[:6])


def grounded_reply(body: dict) -> str:
    """Two pairs per chunk: one quoting the chunk (case and spacing changed), one inventing."""
    chunk = last_user_message(body).split('"""\n', 1)[1].split('\n"""', 1)[0]
    messy = "  ".join(first_words(chunk).lower().split())
    return (
        f"Question: How does the text begin?\nAnswer: {messy}\nQuote: \u201c{messy}\u201d\n"
        "\nQuestion: Where is Atlantis?\nAnswer: Under the sea.\nQuote: Atlantis lies under it."
    )


def test_documents_are_chunked_and_quotes_verified(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "water.md").write_text(DOC, encoding="utf-8")
    steps = (
        "  - {type: seeds, path: seeds.jsonl}\n"
        "  - type: curate\n"
        "    name: cur\n"
        "    teacher: t\n"
        "    documents: [docs/*.md]\n"
        "    chunk_chars: 180\n"
        "    overlap_chars: 40\n"
        "    per_prompt: 2\n"
    )
    run, standin, recipe = build_scripted(
        tmp_path, grounded_reply, steps, seeds=[{"instruction": "hi"}]
    )
    stats, rows, drops, failed = step_tables(run, "cur")
    spans = chunk_spans(DOC, 180, 40)
    assert len(spans) > 2 and len(standin.records) == len(spans)
    assert kdata.plan(recipe).steps[1].calls == len(spans)
    assert rows[0]["instruction"] == "hi"  # the row in passes through, first
    made = rows[1:]
    assert len(made) == len(spans) and failed == []
    for r in made:
        assert r["source"] == "docs/water.md"
        assert DOC[r["chunk_start"] : r["chunk_end"]] == r["chunk"]
        # the stored quote is the source's own text, at the stored offsets
        assert DOC[r["quote_start"] : r["quote_end"]] == r["quote"]
        assert r["quote"] in r["chunk"]
        assert " ".join(r["quote"].split()) == first_words(r["chunk"]).rstrip(".")
    assert {d["reason"] for d in drops} == {"quote_not_in_chunk"} and len(drops) == len(spans)
    assert drops[0]["detail"] == {"quote": "Atlantis lies under it."}
    assert stats["expected"] == 1 + 2 * len(spans)


def test_document_column_keeps_columns_and_parents(tmp_path: Path) -> None:
    seeds = [{"title": "water", "text": DOC}, {"title": "empty", "text": None}]
    steps = (
        "  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: curate, name: cur, teacher: t, document_column: text, chunk_chars: 4000}\n"
    )
    run, _, _ = build_scripted(tmp_path, grounded_reply, steps, seeds=seeds)
    stats, rows, drops, failed = step_tables(run, "cur")
    parent = step_tables(run, "00_seeds")[1][0]
    assert len(rows) == 1 and rows[0]["title"] == "water" and "text" not in rows[0]
    assert rows[0]["_kdata"]["parent_ids"] == [parent["_kdata"]["id"]]
    assert rows[0]["source"] == parent["_kdata"]["id"]
    assert (rows[0]["chunk_start"], rows[0]["chunk_end"]) == (0, len(DOC))
    assert [f["error_class"] for f in failed] == ["missing_column"]
    assert stats["expected"] == 1 + 2


def test_chunk_spans_cover_text_within_size() -> None:
    rng = random.Random(0)
    words = ["alpha", "be", "gamma\n", "delta", "\n\n", "epsilonic", "z"]
    for _ in range(50):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 400)))
        size, overlap = rng.randint(100, 300), rng.randint(0, 49)
        spans = chunk_spans(text, size, overlap)
        covered = set()
        for s, e in spans:
            assert 0 <= s < e <= len(text) and e - s <= size
            covered.update(range(s, e))
        assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
        assert all(b[0] > a[0] for a, b in zip(spans, spans[1:], strict=False))


def test_locate_and_parse_pairs() -> None:
    chunk = "The vapour rises and cools.\nCooling vapour condenses."
    assert locate('"the vapour RISES and\n cools."', chunk) == (0, 26)
    assert locate("vapour condenses into rain", chunk) is None
    assert locate('""', chunk) is None
    assert parse_pairs("Intro\nQuestion: a?\nAnswer: b\nQuote: c") == [("a?", "b", "c")]
    with pytest.raises(ParseError, match="out of order"):
        parse_pairs("Question: a?\nQuote: c\nAnswer: b")
    with pytest.raises(ParseError, match="incomplete"):
        parse_pairs("Question: a?\nAnswer: b\nQuestion: d?\nAnswer: e\nQuote: f")
    with pytest.raises(ParseError, match="no 'Question:'"):
        parse_pairs("Here is a summary of the text.")


def test_one_source_only(tmp_path: Path) -> None:
    with pytest.raises(KdataError, match="'none/\\*.md' matches no file"):
        CurateStep(teacher="t", documents=["none/*.md"]).files(tmp_path)
    with pytest.raises(ValueError, match="exactly one source"):
        CurateStep(teacher="t", topics=["a"], documents=["x.md"])
    with pytest.raises(ValueError, match="depth do not apply"):
        CurateStep(teacher="t", documents=["x.md"], depth=2)
    with pytest.raises(ValueError, match="under half"):
        CurateStep(teacher="t", document_column="text", chunk_chars=200, overlap_chars=100)


def test_curate_on_the_embedded_teacher(tmp_path: Path) -> None:
    (tmp_path / "water.md").write_text(DOC, encoding="utf-8")
    recipe = kdata.recipe_from_yaml(
        """
name: curate-real
teachers:
  smol:
    model: local/smollm2-135m-instruct
    params: {temperature: 0.7, max_tokens: 64, seed: 0}
steps:
  - {type: curate, name: topics, teacher: smol, topics: [volcanoes], depth: 1, breadth: 2,
     per_prompt: 2}
  - {type: curate, name: docs, teacher: smol, documents: [water.md], per_prompt: 2}
""",
        base_dir=tmp_path,
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    stats, rows, drops, failed = step_tables(run, "topics")
    assert stats["requests"] <= 3
    for r in rows:
        assert r["topic_path"][0] == "volcanoes" and r["instruction"].strip()
    stats, rows, drops, failed = step_tables(run, "docs")
    assert stats["requests"] == 1  # the document is one chunk
    made = [r for r in rows if r.get("source") == "water.md"]
    for r in made:
        assert DOC[r["quote_start"] : r["quote_end"]] == r["quote"]
    for f in failed:
        assert f["error_class"] == "parse" and f["raw"]
