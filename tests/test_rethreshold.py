"""`kdata rethreshold`: a re-cut run equals a fresh run at the new threshold, and costs nothing.

Real runs through `kdata.build`: seed files, the curation steps, and a label step answered by the
loopback OpenAI stand-in (counting every request it receives).
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_dedup import BASE, TEXTS, edit, jaccard
from test_semantic import BOYFRIEND, INSTRUCTIONS, PARAPHRASES
from typer.testing import CliRunner

import kdata
from kdata.blocks import read_dropped, read_table
from kdata.cli import app
from kdata.rethreshold import rethreshold
from kdata.steps.dedup import MinHashDedupStep
from kdata.steps.semantic import SemanticDedupStep

sys.path.insert(0, str(Path(__file__).parent))
from openai_standin import StandIn  # noqa: E402

# BASE with 1, 3 and 5 of its 59 words swapped (true word-3-gram Jaccard 0.9, 0.74, 0.6); the
# rows are the distinct seed texts, these three, and BASE again.
GRADED = [edit(BASE, list(range(3, 59, 59 // k))[:k]) for k in (1, 3, 5)]
MINHASH_ROWS = [{"prompt": t, "n": i} for i, t in enumerate([*TEXTS, *GRADED, BASE])]
SEMANTIC_ROWS = [
    {"prompt": t, "n": i}
    for i, t in enumerate([*INSTRUCTIONS[:30], *PARAPHRASES[6], *PARAPHRASES[34], *BOYFRIEND])
]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDATA_TEST_KEY", "sk-test-" + uuid.uuid4().hex)


def recipe(folder: Path, rows: list[dict], step: str, port: int | None = None) -> kdata.Recipe:
    """Seeds, ``step`` (YAML flow mapping), a filter, a label step if ``port``: in folder/run."""
    write_jsonl(folder / "seeds.jsonl", rows)
    text = f"name: t\noutput: {{dir: {folder / 'run'}}}\n"
    if port is not None:
        text += (
            "teachers:\n  t:\n    model: openai/standin-model\n"
            f"    api_base: http://127.0.0.1:{port}/v1\n    api_key: ${{KDATA_TEST_KEY}}\n"
        )
    text += (
        "steps:\n  - {type: seeds, path: seeds.jsonl}\n"
        f"  - {step}\n"
        "  - {type: filter, column: prompt, min_words: 4}\n"
    )
    if port is not None:
        text += "  - {type: label, teacher: t, prompt: '{{ prompt }}'}\n"
    return kdata.recipe_from_yaml(text, base_dir=folder)


def final_ids(run: kdata.Run) -> list[str]:
    return [r["_kdata"]["id"] for r in run.rows()]


def check_accounting(run: kdata.Run) -> None:
    """Every step: in = out + dropped + failed, and each step takes what the one before gave."""
    for before, s in zip([None, *run.steps], run.steps, strict=False):
        assert s.expected == s.rows_out + s.dropped + s.failed, s.name
        if before is not None:
            assert s.rows_in == before.rows_out, s.name
    assert run.steps[-1].rows_out == len(run.rows())


def spy_neighbours(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[list[str]]:
    """Record the columns of every `cls.neighbours` call (the hashing or embedding path)."""
    calls: list[list[str]] = []
    real = cls.neighbours

    def spy(self, *args, **kwargs):
        calls.append(self.columns)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "neighbours", spy)
    return calls


def test_the_graded_texts_are_what_the_tests_assume() -> None:
    assert [round(jaccard(BASE, g), 2) for g in GRADED] == [0.9, 0.74, 0.6]


def test_minhash_rethreshold_equals_a_fresh_run_and_calls_no_teacher(
    tmp_path: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = "{type: minhash_dedup, name: dedup, columns: [prompt], threshold: %s}"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    loose = kdata.build(recipe(tmp_path / "a", MINHASH_ROWS, step % 0.95, standin.port))
    strict_recipe = recipe(tmp_path / "b", MINHASH_ROWS, step % 0.5, standin.port)
    fresh = kdata.build(strict_recipe, run_dir=tmp_path / "fresh")
    assert len(final_ids(fresh)) < len(final_ids(loose))  # the thresholds make a difference
    sent = len(standin.records)
    hashed = spy_neighbours(monkeypatch, MinHashDedupStep)

    recut = rethreshold(loose.dir, "dedup", 0.5)
    assert final_ids(recut) == final_ids(fresh)
    assert len(standin.records) == sent  # every response came from the cache
    assert ["prompt"] not in hashed  # the step hashed nothing: its neighbours were stored
    check_accounting(recut)
    assert [s.reused for s in recut.steps] == [True, False, False, False]
    assert recut.steps[-1].cache_hits == len(final_ids(fresh))
    dropped = read_dropped(recut.dir / "steps/dedup")
    assert sorted(json.loads(d["row"])["n"] for d in dropped) == [35, 36, 37, 38]
    manifest = json.loads((recut.dir / "manifest.json").read_text())
    assert manifest["recipe"]["steps"][1]["threshold"] == 0.5
    report = json.loads((recut.dir / "diversity/report.json").read_text())
    assert report["after"]["rows"] == len(final_ids(fresh))  # the report follows the re-cut

    # Back up to where it was: the first build's dataset, again from the cache alone.
    assert final_ids(rethreshold(loose.dir, "dedup", 0.95)) == final_ids(loose)
    assert len(standin.records) == sent


def test_rows_a_rethreshold_keeps_but_never_sent_fail_as_not_cached_then_build_fetches_them(
    tmp_path: Path, standin: StandIn
) -> None:
    step = "{type: minhash_dedup, name: dedup, columns: [prompt], threshold: %s}"
    strict = kdata.build(recipe(tmp_path, MINHASH_ROWS, step % 0.5, standin.port))
    sent = len(standin.records)
    recut = rethreshold(strict.dir, "dedup", 0.8)
    assert len(standin.records) == sent
    label = recut.steps[-1]
    assert label.failure_classes == {"not_cached": 2}  # the 0.6 and 0.74 copies, never labelled
    check_accounting(recut)
    failed = read_table(recut.dir / "steps/03_label", "failed").to_pylist()
    assert all("sends no request" in f["error"] for f in failed)
    # A normal build with that threshold sends exactly the missing requests.
    rebuilt = kdata.build(recipe(tmp_path, MINHASH_ROWS, step % 0.8, standin.port))
    assert len(standin.records) == sent + 2
    assert rebuilt.steps[-1].failed == 0 and rebuilt.steps[-1].rows_out == label.rows_out + 2


def test_semantic_rethreshold_equals_a_fresh_run_without_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = (  # MiniLM: the similarities below are its own
        "{type: semantic_dedup, name: dedup, model: all-MiniLM-L6-v2, columns: [prompt], "
        "threshold: %s}"
    )
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = kdata.build(recipe(tmp_path / "a", SEMANTIC_ROWS, step % 0.95))
    fresh = kdata.build(recipe(tmp_path / "b", SEMANTIC_ROWS, step % 0.82), run_dir=tmp_path / "f")
    assert len(final_ids(fresh)) < len(final_ids(first))
    embedded = spy_neighbours(monkeypatch, SemanticDedupStep)
    recut = rethreshold(first.dir, "dedup", 0.82)
    assert final_ids(recut) == final_ids(fresh) and not embedded
    check_accounting(recut)
    drops = read_dropped(recut.dir / "steps/dedup")
    fresh_drops = read_dropped(fresh.dir / "steps/dedup")
    assert len(drops) == 5  # paraphrases and near misses, each at the same similarity:
    assert [(d["row_id"], d["detail"]) for d in drops] == [
        (d["row_id"], d["detail"]) for d in fresh_drops
    ]


def test_score_filter_rethreshold_equals_a_fresh_run(tmp_path: Path) -> None:
    rows = [{"prompt": t, "q": i % 10} for i, t in enumerate(TEXTS)]
    step = "{type: filter, name: judge, column: prompt, min_score: {column: q, value: %s}}"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = kdata.build(recipe(tmp_path / "a", rows, step % 7))
    fresh = kdata.build(recipe(tmp_path / "b", rows, step % 3), run_dir=tmp_path / "f")
    recut = rethreshold(first.dir, "judge", 3)
    assert final_ids(recut) == final_ids(fresh)
    assert sorted({r["q"] for r in recut.rows()}) == [3, 4, 5, 6, 7, 8, 9]
    check_accounting(recut)
    assert recut.steps[1].drop_reasons == {"low_score": 12}


def test_bad_requests_are_clear_errors(tmp_path: Path) -> None:
    rows = [{"prompt": t, "q": 1.0} for t in TEXTS[:6]]
    write_jsonl(tmp_path / "seeds.jsonl", rows)
    run = kdata.build(
        kdata.recipe_from_yaml(
            "name: t\nsteps:\n  - {type: seeds, path: seeds.jsonl}\n"
            "  - {type: exact_dedup, columns: [prompt]}\n"
            "  - {type: minhash_dedup, name: mh, columns: [prompt]}\n"
            "  - {type: filter, name: f, column: prompt, min_words: 2}\n"
            "  - {type: filter, name: g, column: prompt, min_score: {column: q, value: 0.5}}\n",
            base_dir=tmp_path,
        ),
        run_dir=tmp_path / "run",
    )
    cases = [
        ("nope", 0.6, "no step 'nope' in"),
        ("01_exact_dedup", 0.6, "step '01_exact_dedup' (exact_dedup) stores no similarities"),
        ("f", 0.6, "step 'f' (filter) stores no similarities or scores"),
        ("mh", 0.3, "threshold 0.3 is below mh's floor 0.5: pairs less similar than 0.5"),
    ]
    for step, threshold, message in cases:
        with pytest.raises(kdata.KdataError, match=re.escape(message)):
            rethreshold(run.dir, step, threshold)
    with pytest.raises(kdata.KdataError, match="is not a kdata run directory"):
        rethreshold(tmp_path, "mh", 0.6)
    for store in (run.dir / "neighbours").iterdir():
        store.unlink()
    with pytest.raises(kdata.KdataError, match="has no stored neighbours"):
        rethreshold(run.dir, "mh", 0.6)
    (run.dir / "steps/g/stats.json").unlink()
    with pytest.raises(kdata.KdataError, match="has no finished result"):
        rethreshold(run.dir, "g", 0.7)


def test_cli_rethreshold(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "seeds.jsonl", MINHASH_ROWS)
    text = (
        "name: t\nsteps:\n  - {type: seeds, path: seeds.jsonl}\n"
        "  - {type: minhash_dedup, name: dedup, columns: [prompt], threshold: 0.95}\n"
    )
    run = kdata.build(kdata.recipe_from_yaml(text, base_dir=tmp_path), run_dir=tmp_path / "run")
    cli = CliRunner()
    res = cli.invoke(app, ["rethreshold", str(run.dir), "--step", "dedup", "--threshold", "0.5"])
    assert res.exit_code == 0, res.output
    assert f"({len(MINHASH_ROWS) - 4} rows), dedup at 0.5" in res.output
    res = cli.invoke(app, ["rethreshold", str(run.dir), "--step", "dedup", "--threshold", "0.2"])
    assert res.exit_code == 2 and "below dedup's floor 0.5" in res.output


def test_a_recipe_dumped_into_the_manifest_loads_again() -> None:
    from test_readme import blocks

    steps = next(b for b in blocks("yaml") if b.startswith("steps:"))
    r = kdata.recipe_from_yaml("name: t\n" + steps)
    again = kdata.Recipe.model_validate(r.model_dump(mode="json", exclude_none=True))
    assert again.model_dump() == r.model_dump()
