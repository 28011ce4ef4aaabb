"""Batch teachers (``batch: true``) through `kdata.build` and the CLI, against a loopback stand-in
of OpenAI's Batch API and Anthropic's Message Batches (tests/batch_standin.py).

What they check: the rows are those an online build makes, each request submitted once; a build
killed after submitting resumes polling the same batches; a batch's unanswered requests follow
``batch_fallback`` or fail with their class; batch prices are half, in the ledger and the budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

import kdata
import kdata.teachers.batch as batch_mod
import kdata.teachers.retries as retries
from kdata import recipe_from_yaml
from kdata.blocks import read_table
from kdata.errors import BudgetExceeded, KdataError, RecipeError
from kdata.teachers import response

sys.path.insert(0, str(Path(__file__).parent))
from batch_standin import BatchStandIn, Config  # noqa: E402
from openai_standin import count_prompt_tokens, expected_answer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEP = "answer"
PRICE = (2.0, 8.0)  # USD per 1k prompt and completion tokens, online
MAX_TOKENS = 16


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("KDATA_TEST_KEY", "sk-test-" + uuid.uuid4().hex)
    monkeypatch.setattr(retries, "BACKOFF_BASE_S", 0.02)
    monkeypatch.setattr(batch_mod, "COLLECT_S", 0.05)


@pytest.fixture
def standin():
    with BatchStandIn(Config(api_key=os.environ["KDATA_TEST_KEY"])) as s:
        yield s


def write_seeds(folder: Path, n: int) -> None:
    with (folder / "seeds.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": i, "question": f"what is {i} times {i + 7}?"}) + "\n")


def recipe_yaml(
    standin: BatchStandIn,
    *,
    anthropic: bool = False,
    fallback: str = "online",
    block_rows: int = 10,
    budget_usd: float | None = None,
    max_retries: int = 2,
) -> str:
    model, base = (
        ("anthropic/claude-standin", standin.anthropic_base)
        if anthropic
        else ("openai/standin-model", standin.openai_base)
    )
    text = f"""name: batch
teachers:
  t:
    model: {model}
    api_base: {base}
    api_key: ${{KDATA_TEST_KEY}}
    batch: true
    batch_fallback: {fallback}
    batch_poll_s: 0.02
    max_retries: {max_retries}
    cost_per_1k_tokens: {{input: {PRICE[0]}, output: {PRICE[1]}}}
    params: {{temperature: 0.0, max_tokens: {MAX_TOKENS}}}
steps:
  - type: seeds
    path: seeds.jsonl
  - type: label
    name: {STEP}
    teacher: t
    prompt: "Question {{{{ id }}}}: {{{{ question }}}}"
    output: response
execution: {{block_rows: {block_rows}}}
report: {{diversity: false}}
"""
    return text + (f"budget_usd: {budget_usd}\n" if budget_usd is not None else "")


def prompt(i: int) -> str:
    return f"Question {i}: what is {i} times {i + 7}?"


def online_cost(i: int, anthropic: bool = False) -> float:
    """What the stand-in's answer to row ``i`` costs at online prices."""
    messages = [{"role": "user", "content": prompt(i)}]
    if anthropic:  # Anthropic's request carries the content as blocks
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt(i)}]}]
    p = count_prompt_tokens({"messages": messages})
    return (p * PRICE[0] + min(12, MAX_TOKENS) * PRICE[1]) / 1000


def read_step(run_dir: Path) -> tuple[list[dict], list[dict]]:
    folder = run_dir / "steps" / STEP
    return read_table(folder).to_pylist(), read_table(folder, "failed").to_pylist()


def journal(run_dir: Path) -> list[dict]:
    path = run_dir / "batches" / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def cli(recipe: Path, run_dir: Path | str) -> subprocess.Popen:
    """``kdata build`` in a process of its own (to be killed)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kdata.cli", "build", str(recipe), "-o", str(run_dir)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def check_rows(rows: list[dict], n: int) -> None:
    assert sorted(r["id"] for r in rows) == list(range(n))  # every row, once
    for r in rows:
        assert r["response"] == expected_answer(prompt(r["id"]))


# ---------------------------------------------------------------------------------------------


def test_openai_batches_answer_every_row_once_at_half_price(tmp_path, standin):
    n = 25
    write_seeds(tmp_path, n)
    run = kdata.build(recipe_from_yaml(recipe_yaml(standin), tmp_path), run_dir=tmp_path / "run")
    rows, failed = read_step(run.dir)
    check_rows(rows, n)
    assert failed == [] and standin.online == []
    ids = standin.custom_ids()
    assert len(ids) == n == len(set(ids))  # each request in exactly one batch
    assert len(standin.creates) == 3  # one per block of 10 rows
    for r in rows:
        assert r["_kdata"]["cost_usd"] == pytest.approx(online_cost(r["id"]) / 2)
    assert run.ledger["t"]["cost_usd"] == pytest.approx(sum(online_cost(i) for i in range(n)) / 2)
    events = Counter(e["event"] for e in journal(run.dir))
    assert events == {"uploaded": 3, "submitted": 3, "ended": 3}
    # Stored as an online call stores: the same reader finds the text and the usage.
    db = run.dir / "cache.sqlite"
    import sqlite3

    stored = [
        json.loads(x) for (x,) in sqlite3.connect(db).execute("SELECT response FROM responses")
    ]
    assert all(s["format"] == 2 and response.read(s).completion_tokens == 12 for s in stored)
    key = os.environ["KDATA_TEST_KEY"].encode()
    assert not any(key in p.read_bytes() for p in run.dir.rglob("*") if p.is_file())

    again = kdata.build(recipe_from_yaml(recipe_yaml(standin), tmp_path), run_dir=tmp_path / "r2")
    assert len(standin.creates) == 6  # a new run directory (its own cache) sends them again
    (tmp_path / "run" / "steps" / STEP / "stats.json").unlink()
    kdata.build(recipe_from_yaml(recipe_yaml(standin), tmp_path), run_dir=tmp_path / "run")
    assert len(standin.creates) == 6  # the same one answers from its cache
    assert again.status == "complete"


def test_anthropic_message_batches_answer_every_row(tmp_path, standin):
    n = 12
    write_seeds(tmp_path, n)
    run = kdata.build(
        recipe_from_yaml(recipe_yaml(standin, anthropic=True), tmp_path), run_dir=tmp_path / "run"
    )
    rows, failed = read_step(run.dir)
    check_rows(rows, n)
    assert failed == []
    assert [b.kind for b in standin.creates] == ["anthropic", "anthropic"]
    first = standin.creates[0].requests[0]["params"]
    assert first["model"] == "claude-standin" and first["max_tokens"] == MAX_TOKENS
    for r in rows:
        assert r["_kdata"]["cost_usd"] == pytest.approx(online_cost(r["id"], True) / 2)


@pytest.mark.parametrize("at_url", [False, True], ids=["path", "url"])
def test_kill_9_after_submit_resumes_the_same_batches(tmp_path, standin, monkeypatch, at_url):
    """At a URL the journal goes there as it is written: the build is resumed on another
    machine (a fresh stage), which has only the URL."""
    n = 30
    standin.config.complete_after_s = 2.0
    write_seeds(tmp_path, n)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(standin))
    folder = tmp_path / "run"  # the run directory, or the URL's folder
    where = f"file://{folder}" if at_url else folder
    monkeypatch.setenv("KDATA_STAGE", str(tmp_path / "machine-a"))
    proc = cli(recipe, where)
    deadline = time.monotonic() + 60
    while sum(e["event"] == "submitted" for e in journal(folder)) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build submitted no batch"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    submitted = {e["batch_id"] for e in journal(folder) if e["event"] == "submitted"}
    assert len(submitted) >= 2 and not any(b.ended for b in standin.creates)

    monkeypatch.setenv("KDATA_STAGE", str(tmp_path / "machine-b"))
    kdata.build(recipe_from_yaml(recipe.read_text(), tmp_path), run_dir=where)
    rows, failed = read_step(folder)
    check_rows(rows, n)
    assert failed == []
    ids = standin.custom_ids()
    assert len(ids) == n == len(set(ids))  # no request submitted twice
    assert len(standin.creates) == 3  # those resumed, and the third block's if it was not sent
    assert submitted <= {b.id for b in standin.creates}


def test_the_blocks_batches_run_side_by_side(tmp_path, standin):
    # A batch may take hours: a step's blocks must not wait for one another's batches.
    n, blocks = 40, 8
    standin.config.complete_after_s = 1.0
    write_seeds(tmp_path, n)
    recipe = recipe_from_yaml(recipe_yaml(standin, block_rows=n // blocks), tmp_path)
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    check_rows(read_step(run.dir)[0], n)
    assert len(standin.creates) == blocks
    last_created = max(b.created for b in standin.creates)
    assert all(b.ended_at > last_created for b in standin.creates)  # all in flight at once


def test_the_batch_calls_wait_as_long_as_retry_after_says(tmp_path, standin):
    standin.config.throttled, standin.config.retry_after_s = 2, 0.5
    write_seeds(tmp_path, 5)
    run = kdata.build(recipe_from_yaml(recipe_yaml(standin), tmp_path), run_dir=tmp_path / "run")
    check_rows(read_step(run.dir)[0], 5)
    assert standin.state.requests[:3] == [("POST", "/v1/files")] * 3  # refused twice, then taken
    first, second, third = standin.state.arrivals[:3]
    assert second - first >= 0.5 - 0.05 and third - second >= 0.5 - 0.05  # not the 0.02 s backoff


def test_kill_9_between_create_and_its_answer_does_not_submit_twice(tmp_path, standin):
    # The build dies after the provider made the batch, before the build heard its id: the
    # journal holds the uploaded file only, and the rerun finds the batch made from it.
    n = 8
    standin.config.answer_create_after_s = 10.0
    write_seeds(tmp_path, n)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(standin, block_rows=100))
    run_dir = tmp_path / "run"
    proc = cli(recipe, run_dir)
    deadline = time.monotonic() + 60
    while not standin.creates:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build created no batch"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert [e["event"] for e in journal(run_dir)] == ["uploaded"]

    standin.config.answer_create_after_s = 0.0
    run = kdata.build(recipe_from_yaml(recipe.read_text(), tmp_path), run_dir=run_dir)
    check_rows(read_step(run.dir)[0], n)
    assert len(standin.creates) == 1
    assert [e["batch_id"] for e in journal(run_dir) if e["event"] == "submitted"] == [
        standin.creates[0].id
    ]


def test_a_create_whose_answer_was_lost_is_not_submitted_twice(tmp_path, standin):
    n = 6
    standin.config.lost_creates = 1  # kdata retries the create: it finds the batch made
    write_seeds(tmp_path, n)
    run = kdata.build(recipe_from_yaml(recipe_yaml(standin), tmp_path), run_dir=tmp_path / "run")
    check_rows(read_step(run.dir)[0], n)
    assert len(standin.creates) == 1
    assert [e["batch_id"] for e in journal(run.dir) if e["event"] == "submitted"] == [
        standin.creates[0].id
    ]


def test_a_batch_that_cannot_be_read_stops_the_build_and_the_next_one_reads_it(tmp_path, standin):
    n = 6
    write_seeds(tmp_path, n)
    text = recipe_yaml(standin)
    key = standin.config.api_key
    standin.config.after_create = lambda cfg: setattr(cfg, "api_key", "revoked")  # 401s now
    with pytest.raises(KdataError, match="was submitted, but reading it failed: auth"):
        kdata.build(recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run")
    assert len(standin.creates) == 1
    assert not list((tmp_path / "run" / "steps" / STEP / "blocks").glob("*.json"))  # no row
    standin.config.api_key, standin.config.after_create = key, None
    run = kdata.build(recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run")
    check_rows(read_step(run.dir)[0], n)
    assert len(standin.creates) == 1  # polled again, not sent again


def test_an_expired_batch_falls_back_online(tmp_path, standin):
    n = 10
    standin.config.expire = lambda ordinal: ordinal == 0
    standin.config.expire_answered = 0.4
    write_seeds(tmp_path, n)
    run = kdata.build(recipe_from_yaml(recipe_yaml(standin), tmp_path), run_dir=tmp_path / "run")
    rows, failed = read_step(run.dir)
    check_rows(rows, n)
    assert failed == [] and len(standin.creates) == 1
    assert len(standin.online) == 6  # the expired ones, at online prices
    online = {int(b["messages"][-1]["content"].split(":")[0].split()[1]) for b in standin.online}
    for r in rows:
        full = online_cost(r["id"])
        assert r["_kdata"]["cost_usd"] == pytest.approx(full if r["id"] in online else full / 2)
    assert run.ledger["t"]["failures"] == {"batch_expired": 6}


def test_an_expired_batch_without_fallback_fails_its_rows_with_the_class(tmp_path, standin):
    n = 10
    standin.config.expire = lambda ordinal: True
    standin.config.expire_answered = 0.3
    write_seeds(tmp_path, n)
    run = kdata.build(
        recipe_from_yaml(recipe_yaml(standin, fallback="none"), tmp_path), run_dir=tmp_path / "run"
    )
    rows, failed = read_step(run.dir)
    assert len(rows) == 3 and len(failed) == 7 and standin.online == []
    assert {f["error_class"] for f in failed} == {"batch_expired"}
    assert all(r["response"] is not None for r in rows)
    stats = run.steps[-1]
    assert stats.rows_out + stats.failed == n and stats.failure_classes == {"batch_expired": 7}


def test_partial_errors_retry_in_a_new_batch_and_refusals_fail(tmp_path, standin):
    n, seen = 12, Counter()

    def error(custom_id: str, body: dict) -> int | None:
        i = int(body["messages"][-1]["content"].split(":")[0].split()[1])
        seen[custom_id] += 1
        if i % 4 == 1:
            return 400  # refused: not retried
        if i % 4 == 2 and seen[custom_id] == 1:
            return 500  # a server error, the first time only
        return None

    standin.config.error = error
    write_seeds(tmp_path, n)
    run = kdata.build(
        recipe_from_yaml(recipe_yaml(standin, fallback="batch", block_rows=100), tmp_path),
        run_dir=tmp_path / "run",
    )
    rows, failed = read_step(run.dir)
    assert sorted(r["id"] for r in rows) == [i for i in range(n) if i % 4 != 1]
    assert {f["error_class"] for f in failed} == {"bad_request"} and len(failed) == 3
    assert len(standin.creates) == 2 and len(standin.creates[1].requests) == 3  # the 500s
    assert standin.online == []


def test_anthropic_expired_requests_go_into_a_new_batch_and_errors_fail(tmp_path, standin):
    n = 8
    standin.config.expire = lambda ordinal: ordinal == 0
    refused = prompt(0)  # answered errored / invalid_request_error: not retried
    standin.config.error = lambda cid, body: 400 if refused in json.dumps(body) else None
    write_seeds(tmp_path, n)
    run = kdata.build(
        recipe_from_yaml(recipe_yaml(standin, anthropic=True, fallback="batch"), tmp_path),
        run_dir=tmp_path / "run",
    )
    rows, failed = read_step(run.dir)
    assert sorted(r["id"] for r in rows) == list(range(1, n))
    assert [(f["error_class"], f["attempts"]) for f in failed] == [("bad_request", 1)]
    first, second = standin.creates
    expired = {r["custom_id"] for r in first.requests[n // 2 :]}
    assert {r["custom_id"] for r in second.requests} == expired


def test_a_failed_then_a_cancelled_batch_are_sent_again_as_the_teacher_says(tmp_path, standin):
    n = 6
    standin.config.fail = lambda ordinal: ordinal == 0  # validation fails
    standin.config.cancel = lambda ordinal: ordinal == 1  # its owner cancels it
    write_seeds(tmp_path, n)
    run = kdata.build(
        recipe_from_yaml(recipe_yaml(standin, fallback="batch", max_retries=2), tmp_path),
        run_dir=tmp_path / "run",
    )
    rows, failed = read_step(run.dir)
    check_rows(rows, n)
    assert failed == [] and len(standin.creates) == 3 and standin.online == []
    assert run.ledger["t"]["failures"] == {"batch_failed": n, "batch_cancelled": n}
    ended = [e["status"] for e in journal(run.dir) if e["event"] == "ended"]
    assert ended == ["failed", "cancelled", "completed"]

    standin.config.fail = lambda ordinal: True  # with max_retries 1: a failure with its class
    run = kdata.build(
        recipe_from_yaml(recipe_yaml(standin, fallback="batch", max_retries=1), tmp_path),
        run_dir=tmp_path / "run2",
    )
    rows, failed = read_step(run.dir)
    assert rows == [] and len(failed) == n
    assert {(f["error_class"], f["attempts"]) for f in failed} == {("batch_failed", 2)}
    assert "invalid: validation failed" in failed[0]["error"]  # the batch's own errors


def test_the_budget_reserves_batch_prices_before_submitting(tmp_path, standin):
    n = 20
    write_seeds(tmp_path, n)
    worst = [  # what the pool reserves for a request online: prompt bytes, max_tokens
        ((len(prompt(i).encode()) + 16) * PRICE[0] + MAX_TOKENS * PRICE[1]) / 1000 for i in range(n)
    ]
    budget = round(sum(online_cost(i) for i in range(n)) / 2 * 0.7, 6)  # 70% of what all cost
    text = recipe_yaml(standin, block_rows=100, budget_usd=budget)
    with pytest.raises(BudgetExceeded) as exc:
        kdata.build(recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run")
    assert exc.value.run.cost_usd_total <= budget
    first = standin.creates[0].requests
    # Each batch held what fitted in the budget at batch prices: more than online ones allow.
    fits_online = max(k for k in range(n + 1) if sum(sorted(worst)[:k]) <= budget)
    assert fits_online < len(first) and sum(sorted(worst)[: len(first)]) * 0.5 <= budget
    sent = standin.custom_ids()
    assert len(sent) == len(set(sent)) < n

    text = recipe_yaml(standin, block_rows=100, budget_usd=round(sum(worst), 6))
    run = kdata.build(recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run")
    assert run.status == "complete" and len(run.rows()) == n
    again = standin.custom_ids()
    assert len(again) == n == len(set(again))  # the rest only: the first came from the cache
    assert run.cost_usd_total == pytest.approx(sum(online_cost(i) for i in range(n)) / 2)


def test_an_anthropic_schema_goes_as_litellm_sends_it_online():
    from kdata.teachers.batch_api import Anthropic

    schema = {"type": "object", "properties": {"score": {"type": "integer"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    messages = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "2+2=4?"}]
    body = Anthropic("http://127.0.0.1:9/v1", "k", "claude-standin", 5.0).params(
        messages, {"response_format": rf, "max_tokens": 32}
    )
    assert body["tools"][0]["input_schema"] == schema and "json_mode" not in body
    assert body["system"][0]["text"] == "Judge." and body["max_tokens"] == 32
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_the_readme_snippet_loads(tmp_path):
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    snippet = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "batch: true" in b)
    text = snippet + "steps:\n  - {type: seeds, path: seeds.jsonl}\n"
    recipe = recipe_from_yaml("name: b\n" + text, tmp_path)
    gpt = recipe.teachers["gpt"]
    assert gpt.batch and gpt.batch_fallback == "online" and gpt.batch_poll_s == 30
    assert recipe.execution.block_rows == 50_000


def test_batch_needs_an_openai_or_anthropic_model(tmp_path):
    write_seeds(tmp_path, 1)
    text = "name: b\nteachers:\n  t: {model: local/smollm2-135m-instruct, batch: true}\n"
    text += "steps:\n  - {type: seeds, path: seeds.jsonl}\n"
    text += "  - {type: label, teacher: t, prompt: '{{ question }}', output: r}\n"
    with pytest.raises(RecipeError, match="batch: true needs an OpenAI or Anthropic model"):
        kdata.build(recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run")
