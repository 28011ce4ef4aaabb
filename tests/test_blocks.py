"""Blocks: the same rows, order and ids whatever ``block_rows``; resume by block after kill -9."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_standin import body_hash, last_user_message
from scripted import teachers_yaml

import kdata
from kdata.blocks import block_id, parts, read_dropped, read_table
from kdata.steps.dedup import MinHashDedupStep

REPO = Path(__file__).resolve().parent.parent
KINDS = ("rows", "dropped", "failed")


def seeds(n: int) -> list[dict]:
    """Short instructions with exact repeats, near-duplicates and nulls."""
    out = []
    for i in range(n):
        text = f"Explain how step {i % 17} of recipe {i % 11} works in detail please"
        if i % 9 == 4:
            text = text.upper() + "  "  # an exact duplicate once normalised
        elif i % 7 == 3:
            text = text.replace("in detail", "in great detail")  # a near-duplicate, longer
        out.append({"id": i, "text": text if i % 23 != 5 else None})
    return out


def write_seeds(folder: Path, rows: list[dict], bad_line: bool = True) -> None:
    lines = [json.dumps(r) for r in rows]
    if bad_line:
        lines.insert(len(lines) // 2, "not json")
    (folder / "seeds.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


CURATION = """\
  - {type: seeds, path: seeds.jsonl}
  - {type: exact_dedup, columns: [text]}
  - {type: minhash_dedup, columns: [text], keep: longest, threshold: 0.6, floor: 0.5}
  - {type: filter, column: text, min_words: 5, max_chars: 200}
"""


def step_tables(run: kdata.Run) -> dict[str, dict[str, list[dict]]]:
    return {
        s.name: {k: read_table(run.dir / "steps" / s.name, k).to_pylist() for k in KINDS}
        for s in run.steps
    }


def build(folder: Path, steps: str, block_rows: int, name: str) -> kdata.Run:
    text = f"name: t\nexecution: {{block_rows: {block_rows}}}\nsteps:\n{steps}"
    return kdata.build(kdata.recipe_from_yaml(text, folder), run_dir=folder / name)


# The global steps written over blocks besides the dedup ones: semantic_dedup and diversity.
GLOBAL = """\
  - {type: semantic_dedup, columns: [text], keep: longest, threshold: 0.99, floor: 0.97}
  - {type: diversity, name: mid, column: text}
"""


def test_curation_gives_the_same_tables_with_blocks_of_seven(tmp_path: Path) -> None:
    write_seeds(tmp_path, seeds(200))
    steps = CURATION + GLOBAL
    small, large = build(tmp_path, steps, 7, "small"), build(tmp_path, steps, 100_000, "one")
    blocks = -(-small.steps[2].rows_in // 7)  # the rows exact_dedup kept, 7 a block
    assert blocks > 20 and len(parts(small.dir / "steps" / "02_minhash_dedup")) == blocks
    assert len(parts(large.dir / "steps" / "02_minhash_dedup")) == 1
    final = small.rows()
    assert final == large.rows()  # same rows, same order, same ids
    assert len({r["_kdata"]["id"] for r in final}) == len(final)
    stats = [(s.rows_in, s.rows_out, s.dropped, s.failed) for s in small.steps]
    assert stats == [(s.rows_in, s.rows_out, s.dropped, s.failed) for s in large.steps]
    assert small.steps[0].failed == 1 and small.steps[1].failed == 9  # a bad line, 9 nulls
    assert small.steps[1].dropped > 0 and small.steps[2].dropped > 0
    assert step_tables(small) == step_tables(large)
    # each block accounts for its rows, and the blocks of a step for the step's
    folder = small.dir / "steps" / "02_minhash_dedup"
    counts = [json.loads(p.read_text()) for p in sorted((folder / "blocks").glob("*.json"))]
    assert all(c["expected"] == c["rows"] + c["dropped"] + c["failed"] for c in counts)
    assert sum(c["rows_in"] for c in counts) == small.steps[2].rows_in
    assert [c["start"] for c in counts] == [7 * i for i in range(len(counts))]
    assert small.steps[4].dropped > 0 and small.steps[4].rows_out > 0  # semantic_dedup
    assert small.steps[5].rows_in == small.steps[5].rows_out  # diversity passes rows on
    assert not (small.dir / "tmp").exists()  # the steps' block files are removed
    for report in ("diversity/mid/report.json", "diversity/report.json"):
        got, want = (json.loads((r.dir / report).read_text()) for r in (small, large))
        assert got["after"]["rows"] > 0 and got == want


def test_teacher_steps_give_the_same_rows_with_blocks_of_three(tmp_path: Path, standin) -> None:
    def reply(body: dict) -> str:  # the second sample of every row gives one repeated answer
        return (
            "the same answer" if body.get("seed") == 1 else f"answer to {last_user_message(body)}"
        )

    standin.config.reply = reply
    write_seeds(tmp_path, [{"id": i, "q": f"question {i}"} for i in range(20)], bad_line=False)
    steps = (
        teachers_yaml(standin.port, "t")
        + "steps:\n"
        + """\
  - {type: seeds, path: seeds.jsonl}
  - {type: label, teacher: t, prompt: "{{ q }}", n: 2}
  - {type: exact_dedup, columns: [response]}
  - {type: filter, column: response, min_words: 3}
"""
    )
    runs = []
    for br in (3, 1000):
        text = f"name: t\nexecution: {{block_rows: {br}}}\n{steps}"
        runs.append(kdata.build(kdata.recipe_from_yaml(text, tmp_path), run_dir=tmp_path / str(br)))
    small, large = runs
    assert small.rows() == large.rows()
    assert len(small.rows()) == 21  # 20 first samples and the first repeated answer
    assert step_tables(small) == step_tables(large)
    assert small.steps[1].requests == 40 and large.steps[1].requests == 40


def test_resume_after_kill_9_skips_finished_blocks(tmp_path: Path, standin) -> None:
    n_rows, block_rows = 60, 5
    standin.config.latency = 0.05
    (tmp_path / "seeds.jsonl").write_text(
        "".join(json.dumps({"id": i, "q": f"what is {i} plus {i}?"}) + "\n" for i in range(n_rows))
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: resume\nexecution: {{block_rows: {block_rows}}}\nteachers:\n  t:\n"
        f"    model: openai/m\n    api_base: http://127.0.0.1:{standin.port}/v1\n"
        "    api_key: ${KDATA_TEST_KEY}\n    max_concurrency: 4\n"
        "steps:\n  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: label, name: answer, teacher: t, prompt: '{{ q }}'}\n"
    )
    run_dir = tmp_path / "run"
    folder = run_dir / "steps" / "answer"
    proc = cli(recipe, run_dir)
    deadline = time.monotonic() + 60
    while len(list((folder / "blocks").glob("*.json"))) < 4:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build finished too few blocks"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    finished = sorted(p.stem for p in (folder / "blocks").glob("*.json"))
    assert 4 <= len(finished) < n_rows // block_rows
    assert not (folder / "stats.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for k in KINDS for p in parts(folder, k)}
    mtimes.update({p: p.stat().st_mtime_ns for p in (folder / "blocks").glob("*.json")})
    stored = set(cached_bodies(run_dir))
    boundary = len(standin.records)

    proc = cli(recipe, run_dir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    for p, t in mtimes.items():  # the finished blocks were not written again
        assert p.stat().st_mtime_ns == t, p
    sent_again = {r.body_hash for r in standin.records[boundary:]}
    assert not sent_again & stored  # nothing stored is requested again
    ids = [r["id"] for r in kdata.Run(run_dir, "complete", [], {}).rows()]
    assert sorted(ids) == list(range(n_rows))  # every row once
    assert ids == list(range(n_rows))  # in order
    stats = json.loads((folder / "stats.json").read_text())
    assert stats["rows_in"] == n_rows and stats["expected"] == stats["rows_out"] == n_rows
    assert [block_id(i) for i in range(len(finished))] == finished


def test_mixed_types_name_the_step_and_block(tmp_path: Path, monkeypatch) -> None:
    from kdata.steps import sources

    rows = [{"id": i, "x": i} for i in range(9)] + [{"id": 9, "x": "ten"}]
    write_seeds(tmp_path, rows, bad_line=False)
    steps = "  - {type: seeds, path: seeds.jsonl}\n"
    # The recipe check compares the types of the first records only; past them, the block does.
    monkeypatch.setattr(sources, "_CHECKED", 5)
    with pytest.raises(kdata.KdataError, match=r"step 00_seeds, block 000001: cannot store"):
        build(tmp_path, steps, 5, "mixed_in_block")
    with pytest.raises(kdata.KdataError, match=r"step 00_seeds: blocks type a column differently"):
        build(tmp_path, steps, 9, "mixed_across_blocks")  # each block is fine on its own


def cached_bodies(run_dir: Path) -> list[str]:
    """The stand-in's body hashes of the requests stored in the run's cache."""
    db = sqlite3.connect(run_dir / "cache.sqlite")
    try:
        requests = [json.loads(r) for (r,) in db.execute("SELECT request FROM responses")]
    finally:
        db.close()
    return [body_hash({"model": "m", "messages": r["messages"], **r["params"]}) for r in requests]


def cli(recipe: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdata.cli", "build", str(recipe), "-o", str(run_dir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_minhash_resumes_at_its_first_unfinished_block(tmp_path: Path, monkeypatch) -> None:
    write_seeds(tmp_path, seeds(120), bad_line=False)
    whole = build(tmp_path, CURATION, 10, "run")
    folder = whole.dir / "steps" / "02_minhash_dedup"
    assert not (whole.dir / "tmp").exists()  # its signature files are removed, and tmp/ too
    counts = sorted((folder / "blocks").glob("*.json"))
    for p in counts[len(counts) // 2 :]:  # as a kill in the middle of marking leaves it
        p.unlink()
    (folder / "stats.json").unlink()
    kept = {p: p.stat().st_mtime_ns for k in KINDS for p in parts(folder, k)}
    kept = {p: t for p, t in kept.items() if (folder / "blocks" / f"{p.stem}.json").exists()}

    def no_signing(*args):  # the neighbours were stored: nothing is signed again
        raise AssertionError("signatures computed again")

    monkeypatch.setattr(MinHashDedupStep, "_sign", no_signing)
    again = build(tmp_path, CURATION, 10, "run")
    assert [s.reused for s in again.steps] == [True, True, False, True]  # filter: same input
    assert len(kept) == 3 * (len(counts) // 2) and len(counts) > 4
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert len(list((folder / "blocks").glob("*.json"))) == len(counts)
    monkeypatch.undo()
    assert again.rows() == build(tmp_path, CURATION, 10, "fresh").rows()


@pytest.mark.slow  # two CLI builds and a third in-process; run with -m slow
def test_kill_9_while_minhash_marks_then_rerun(tmp_path: Path) -> None:
    write_seeds(tmp_path, seeds(600), bad_line=False)
    steps = "  - {type: seeds, path: seeds.jsonl}\n  - {type: minhash_dedup, columns: [text]}\n"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: t\nexecution: {{block_rows: 5}}\nsteps:\n{steps}")
    run_dir = tmp_path / "run"
    folder = run_dir / "steps" / "01_minhash_dedup"
    proc = cli(recipe, run_dir)
    deadline = time.monotonic() + 120
    while len(list((folder / "blocks").glob("*.json"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build marked too few blocks"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    finished = sorted((folder / "blocks").glob("*.json"))
    assert 3 <= len(finished) < 120 and not (folder / "stats.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    mtimes.update({p: p.stat().st_mtime_ns for k in KINDS for p in parts(folder, k)})
    mtimes = {p: t for p, t in mtimes.items() if (folder / "blocks" / f"{p.stem}.json").exists()}

    proc = cli(recipe, run_dir)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # not marked again
    assert not (run_dir / "tmp").exists() or not any((run_dir / "tmp").iterdir())
    again = kdata.Run(run_dir, "complete", [], {}).rows()
    ids = [r["_kdata"]["id"] for r in again]
    assert len(set(ids)) == len(ids)  # every row exactly once
    assert again == build(tmp_path, steps, 5, "fresh").rows()  # and as a build without a kill


def test_the_final_dataset_is_sharded_in_the_hub_layout(tmp_path: Path, monkeypatch) -> None:
    import datasets

    import kdata.blocks

    write_seeds(tmp_path, seeds(120), bad_line=False)
    monkeypatch.setattr(kdata.blocks, "MAX_SHARD_BYTES", 1)  # a shard per part
    run = build(tmp_path, CURATION, 50, "run")
    names = [p.name for p in run.dataset_files]
    assert len(names) == len(parts(run.dir / "steps" / "03_filter")) == 3
    assert names == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    ds = datasets.load_dataset("parquet", data_dir=str(run.dataset_path), split="train")
    assert ds.to_list() == run.rows() and len(ds) == run.steps[-1].rows_out
    monkeypatch.undo()
    again = build(tmp_path, CURATION, 50, "run")  # one shard now: the stale ones go
    assert [p.name for p in again.dataset_files] == ["train-00000-of-00001.parquet"]
    assert again.rows() == run.rows()


def test_a_block_that_cannot_be_written_names_it_and_the_rerun_continues(tmp_path: Path) -> None:
    write_seeds(tmp_path, seeds(60), bad_line=False)
    steps = "  - {type: seeds, path: seeds.jsonl}\n  - {type: filter, column: text, min_words: 5}\n"
    folder = tmp_path / "run" / "steps" / "01_filter"
    (folder / "rows" / f"{block_id(2)}.parquet").mkdir(parents=True)  # os.replace onto it fails
    with pytest.raises(kdata.KdataError, match=r"step 01_filter, block 000002: cannot write"):
        build(tmp_path, steps, 10, "run")
    written = {p: p.stat().st_mtime_ns for p in (folder / "blocks").glob("*.json")}
    assert sorted(p.stem for p in written) == [block_id(0), block_id(1)]  # no block after it
    (folder / "rows" / f"{block_id(2)}.parquet").rmdir()  # the disk is writable again
    run = build(tmp_path, steps, 10, "run")
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())
    assert run.rows() == build(tmp_path, steps, 10, "fresh").rows()
    assert len(list((folder / "blocks").glob("*.json"))) == 6


def test_a_row_of_a_megabyte_goes_through_blocks_unchanged(tmp_path: Path) -> None:
    big = "Explain " + "word " * 200_000  # about 1 MB
    write_seeds(tmp_path, [*seeds(20), {"id": 20, "text": big}], bad_line=False)
    run = build(tmp_path, CURATION, 3, "run")
    folder = run.dir / "steps" / "03_filter"  # its max_chars drops the row: it is too long
    stored = read_table(folder, "dropped").to_pylist()
    assert [d["row"] for d in stored if d["reason"] == "too_long"] == [None]  # no copy kept
    joined = [json.loads(d["row"]) for d in read_dropped(folder) if d["reason"] == "too_long"]
    assert [(r["id"], r["text"]) for r in joined] == [(20, big)]


# The expansion and synthesis steps over blocks: one recipe through every step kind they have
# (evol_instruct and curate over a column: map; magpie and curate from topics: source;
# self_instruct: global), on a scripted stand-in.
EXPANSION = """\
  - {type: seeds, path: seeds.jsonl}
  - {type: evol_instruct, name: evol, teacher: t, rounds: 2, min_answer_words: 3}
  - {type: curate, name: qa, teacher: t, document_column: text, chunk_chars: 100,
     overlap_chars: 20, per_prompt: 2}
  - {type: magpie, name: mp, teacher: t, rows: 9, pre_query: "<|user|>", end_of_turn: "</s>"}
  - {type: self_instruct, name: si, teacher: t, target: 8, prompts_per_round: 2,
     new_per_prompt: 5, max_rounds: 3, human_per_prompt: 2, machine_per_prompt: 1}
  - {type: curate, name: topics, teacher: t, topics: [tea, broken, rivers], depth: 1,
     breadth: 2, per_prompt: 3}
"""
WORDS = [
    "river",
    "mountain",
    "recipe",
    "poem",
    "budget",
    "garden",
    "planet",
    "violin",
    "sentence",
    "history",
    "bridge",
    "winter",
    "market",
    "engine",
    "theorem",
    "novel",
    "harbour",
    "forest",
    "algebra",
    "castle",
    "desert",
    "orchestra",
    "pigment",
    "tractor",
    "glacier",
    "lantern",
    "meadow",
    "compass",
    "volcano",
]


def expansion_reply(body: dict) -> str:
    """Answers for every request of EXPANSION, decided by the request alone."""
    if "prompt" in body:  # magpie writes an instruction; some repeat, one is empty
        return ["Name a bird.", "name a  BIRD.", "", "Sum 2 and 3.", "Name a tree."][
            body["seed"] % 5
        ] + ("" if body["seed"] < 5 else f" ({body['seed'] % 3})")
    text = last_user_message(body)
    if "Given prompt:" in text:  # evol_instruct rewrites
        parent = text.split("Given prompt:\n", 1)[1].strip()
        if "cat" in parent:
            return "Rewritten prompt: " + parent
        return parent + " Give one " + WORDS[len(parent) % len(WORDS)] + " example."
    if text.startswith("Come up with a series"):  # self_instruct proposes
        start = int(re.search(r"continuing from (\d+)", text).group(1))
        rng = random.Random(body["seed"])
        items = [" ".join(rng.sample(WORDS, 6)).capitalize() + "." for _ in range(5)]
        items[body["seed"] % 5] = "Draw a map of " + items[0]
        return "".join(f"{start + i}. {item}\n" for i, item in enumerate(items))
    if text.startswith("Can the following task"):
        return ("Yes", "No", "Maybe")[len(text) % 3]  # Maybe: a parse failure
    if text.startswith("Given the classification task"):
        return "Class label: yes\nInput: one\nClass label: no\nInput: two"
    if text.startswith("List"):
        return "Sorry." if '"broken"' in text else "1. leaves\n2. LEAVES\n3. water\n4. heat"
    if text.startswith("Write"):
        return "1. What is it?\n2. Why?\n3. Who?\n4. When?"
    if text.startswith("Read the text below"):
        chunk = text.split('"""\n', 1)[1].split('\n"""', 1)[0]
        if "broken" in chunk:
            return "I cannot."
        quote = " ".join(chunk.split()[:4])
        return (
            f"Question: How does it begin?\nAnswer: {quote}\nQuote: {quote}\n"
            "Question: Where?\nAnswer: Nowhere.\nQuote: not in the text"
        )
    return "A long enough answer of several words." if "Q3:" not in text else "I'm sorry, no."


def expansion_seeds(n: int) -> list[dict]:
    out = []
    for i in range(n):
        doc = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(30 + i % 4 * 10))
        out.append(
            {
                "id": i,
                "instruction": None
                if i % 6 == 5
                else f"Q{i}: describe a {WORDS[i]} briefly" + (" like a cat" if i % 5 == 1 else ""),
                "text": None if i % 7 == 3 else doc + (" broken" if i % 8 == 2 else ""),
            }
        )
    return out


def build_expansion(folder: Path, port: int, block_rows: int, name: str) -> kdata.Run:
    text = (
        f"name: t\nexecution: {{block_rows: {block_rows}}}\n"
        + teachers_yaml(port, "t")
        + "steps:\n"
        + EXPANSION
    )
    return kdata.build(kdata.recipe_from_yaml(text, folder), run_dir=folder / name)


def test_expansion_steps_give_the_same_tables_with_blocks_of_seven(tmp_path, standin) -> None:
    standin.config.reply = expansion_reply
    standin.config.decide = lambda body, attempt: "400" if body.get("seed") == 7 else None
    write_seeds(tmp_path, expansion_seeds(20), bad_line=False)
    small = build_expansion(tmp_path, standin.port, 7, "small")
    sent = len(standin.records)
    large = build_expansion(tmp_path, standin.port, 100_000, "one")
    assert step_tables(small) == step_tables(large)  # same rows, drops, failures, in order
    assert small.rows() == large.rows()
    stats = [(s.rows_in, s.rows_out, s.dropped, s.failed, s.requests) for s in small.steps]
    assert stats == [(s.rows_in, s.rows_out, s.dropped, s.failed, s.requests) for s in large.steps]
    assert sent == sum(s.requests for s in small.steps) == len(standin.records) - sent
    for s in small.steps[1:]:  # each step made rows, drops and failures
        assert s.rows_out and s.dropped and s.failed, s
    # every step wrote several blocks: a map step 7 rows in each, the others 7 rows out at most
    for s in small.steps[1:]:
        counts = [
            json.loads(p.read_text())
            for p in sorted((small.dir / "steps" / s.name / "blocks").glob("*.json"))
        ]
        size = "rows_in" if s.name in ("evol", "qa") else "rows"
        assert len(counts) > 2 and all(c[size] <= 7 for c in counts), s.name
    # evol_instruct: each row's rounds in order, rows in the order of the rows in
    evol = step_tables(small)["evol"]["rows"]
    order = [(r["id"], r["evol_round"]) for r in evol]
    assert order == sorted(order) and {n for _, n in order} == {1, 2}


def test_expansion_steps_resume_from_their_finished_blocks(tmp_path, standin) -> None:
    standin.config.reply = expansion_reply
    write_seeds(tmp_path, expansion_seeds(20), bad_line=False)
    run = build_expansion(tmp_path, standin.port, 7, "run")
    kept = {}
    for s in run.steps[1:]:  # as a kill in the middle of each step leaves it
        folder = run.dir / "steps" / s.name
        counts = sorted((folder / "blocks").glob("*.json"))
        for p in counts[len(counts) // 2 :]:
            p.unlink()
        (folder / "stats.json").unlink()
        kept.update({p: p.stat().st_mtime_ns for p in counts[: len(counts) // 2]})
    boundary = len(standin.records)
    again = build_expansion(tmp_path, standin.port, 7, "run")
    assert len(standin.records) == boundary  # every response came from the cache
    assert [s.reused for s in again.steps] == [True] + [False] * 5
    assert kept and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert step_tables(again) == step_tables(run) and again.rows() == run.rows()
