"""The request cache when its file is damaged, emptied or deleted: a real SQLite file, real builds.

A build that finds fewer responses than earlier builds stored stops before sending anything and
says how many it kept; the next build goes on from there. A build whose cache file vanishes
writes every response back and stops.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest
from conftest import write_jsonl
from scripted import Config, StandIn, qid, teachers_yaml

import kdata

N_ROWS = 60


def _recipe(folder: Path, port: int, output: str = "a", concurrency: int = 16) -> kdata.Recipe:
    text = (
        "name: cached\n"
        + teachers_yaml(port, "t").replace(
            "    max_retries: 0", f"    max_retries: 0\n    max_concurrency: {concurrency}"
        )
        + "steps:\n  - {type: seeds, path: seeds.jsonl}\n"
        + "  - {type: label, name: answer, teacher: t, prompt: '{{ q }}', "
        + f"output: {output}}}\n"
    )
    return kdata.recipe_from_yaml(text, folder)


def _seeds(folder: Path) -> None:
    seeds = [{"id": i, "q": f"Q{i}: what is {i}?"} for i in range(N_ROWS)]
    write_jsonl(folder / "seeds.jsonl", seeds)


def _stored(path: Path) -> set[int]:
    """Seed ids whose responses a cache file holds."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT json_extract(response, '$.response.choices[0].message.content') FROM responses"
        ).fetchall()
    finally:
        db.close()
    return {int(text.split()[1]) for (text,) in rows}


def _reply(body: dict) -> str:
    return f"answer {qid(body)} " + "x" * 600  # long enough for the table to span many pages


def _flip_middle_page(path: Path) -> None:
    """Invert the header of a b-tree page in the middle of the file."""
    page = 4096
    data = bytearray(path.read_bytes())
    start = page * (len(data) // page // 2)
    data[start : start + 12] = bytes(b ^ 0xFF for b in data[start : start + 12])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_cache_is_set_aside_and_what_is_readable_kept(tmp_path, damage):
    _seeds(tmp_path)
    run_dir, cache = tmp_path / "run", tmp_path / "run" / "cache.sqlite"
    with StandIn(Config(reply=_reply)) as standin:
        kdata.build(_recipe(tmp_path, standin.port), run_dir=run_dir)
        assert standin.count() == N_ROWS
        if damage == "truncated":
            with cache.open("r+b") as fh:
                fh.truncate(cache.stat().st_size // 2)
        else:
            _flip_middle_page(cache)
        standin.clear()
        # A changed output column runs the step again: every answer should come from the cache.
        with pytest.raises(kdata.KdataError) as exc:
            kdata.build(_recipe(tmp_path, standin.port, output="b"), run_dir=run_dir)
        assert standin.count() == 0  # nothing was bought before the user was told

        kept = _stored(cache)
        aside = [p for p in run_dir.iterdir() if p.name.startswith("cache.sqlite.damaged-")]
        assert len(aside) == 1 and aside[0].stat().st_size > 0
        assert 0 < len(kept) < N_ROWS
        message = str(exc.value)
        assert f"{cache} is damaged (" in message
        assert f"moved to {aside[0].name}" in message
        assert f"the {len(kept)} responses still readable in it were copied" in message
        assert f"of the {N_ROWS} that earlier builds of this run directory stored" in message
        assert "running the same command again requests them again, and pays for them" in message

        # Told once, the next build goes on: it buys exactly the responses that were lost.
        run = kdata.build(_recipe(tmp_path, standin.port, output="b"), run_dir=run_dir)
        assert run.status == "complete" and len(run.rows()) == N_ROWS
        assert sorted(qid(r.body) for r in standin.records) == sorted(set(range(N_ROWS)) - kept)


def test_an_emptied_cache_is_not_taken_for_a_new_one(tmp_path):
    _seeds(tmp_path)
    run_dir, cache = tmp_path / "run", tmp_path / "run" / "cache.sqlite"
    with StandIn(Config(reply=_reply)) as standin:
        kdata.build(_recipe(tmp_path, standin.port), run_dir=run_dir)
        cache.write_bytes(b"")
        standin.clear()
        with pytest.raises(kdata.KdataError) as exc:
            kdata.build(_recipe(tmp_path, standin.port, output="b"), run_dir=run_dir)
        assert standin.count() == 0
        assert str(exc.value).startswith(
            f"{cache} holds 0 responses, of the {N_ROWS} that earlier builds of this run "
            "directory stored. To keep the responses missing, restore cache.sqlite from a backup"
        )
        run = kdata.build(_recipe(tmp_path, standin.port, output="b"), run_dir=run_dir)
        assert run.status == "complete" and standin.count() == N_ROWS


def test_a_cache_deleted_during_the_build_is_written_back_and_the_build_stops(tmp_path):
    _seeds(tmp_path)
    run_dir, cache = tmp_path / "run", tmp_path / "run" / "cache.sqlite"
    deleted_at, arrivals = 10, itertools.count(1)

    def reply(body: dict) -> str:
        if next(arrivals) == deleted_at:  # requests come one at a time (max_concurrency 1)
            cache.unlink()
        return _reply(body)

    with StandIn(Config(reply=reply)) as standin:
        with pytest.raises(kdata.KdataError) as exc:
            kdata.build(_recipe(tmp_path, standin.port, concurrency=1), run_dir=run_dir)
        answered = {qid(r.body) for r in standin.records if r.status == 200}
        assert len(answered) == deleted_at  # the build sent nothing after it noticed
        assert str(exc.value) == (
            f"{cache} vanished during the build (deleted or replaced); the {deleted_at} "
            f"responses it held, every one received until now, were written back to {cache}; "
            "run the same command to resume"
        )
        assert _stored(cache) == answered
        assert not list(run_dir.glob("cache.sqlite.rescue*"))

        standin.clear()
        run = kdata.build(_recipe(tmp_path, standin.port), run_dir=run_dir)
        assert run.status == "complete" and len(run.rows()) == N_ROWS
        assert {qid(r.body) for r in standin.records} == set(range(N_ROWS)) - answered


def test_absorb_copies_what_a_store_adds_and_deletes_it(tmp_path):
    from kdata.teachers.cache import RequestCache

    main, worker = RequestCache(tmp_path / "cache.sqlite"), RequestCache(tmp_path / "w.sqlite")
    main.put("a", "t", "m", {}, {"text": "main's"}, 1.0)
    worker.put("a", "t", "m", {}, {"text": "worker's"}, 1.0)  # the same request, paid twice
    worker.put("b", "t", "m", {}, {"text": "new"}, 2.0)
    worker.close()
    assert main.absorb(tmp_path / "w.sqlite") == 1
    assert main.get("a") == {"text": "main's"} and main.get("b") == {"text": "new"}
    assert main.total_cost() == 3.0
    assert not list(tmp_path.glob("w.sqlite*"))
    main.close()
