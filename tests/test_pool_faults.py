"""TeacherPool under faults, through `kdata.build` and the CLI, against a loopback stand-in.

The stand-in (tests/openai_standin.py) speaks the OpenAI chat-completions contract and injects
faults decided from each request's body hash and attempt number, so every run meets the same
faults. These tests check what the pool promises: retries only what retrying can fix, honours
Retry-After, loses no row, never spends past the budget, resumes after ``kill -9`` without
paying twice, and never writes an API key anywhere. Every test runs twice: on the fast path
(kdata's own HTTP client, ``client: auto``) and through litellm (``client: litellm``).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import kdata
import kdata.teachers.retries as retries
from kdata import recipe_from_yaml
from kdata.blocks import read_table

sys.path.insert(0, str(Path(__file__).parent))
from openai_standin import (  # noqa: E402
    BAD_REQUEST,
    CONTEXT_WINDOW,
    HANG,
    RATE_LIMIT,
    RESET,
    SERVER_ERROR,
    UNAUTHORIZED,
    Config,
    body_hash,
    count_prompt_tokens,
    expected_answer,
    last_user_message,
)

REPO = Path(__file__).resolve().parent.parent
MODEL = "standin-model"
STEP = "answer"
PROMPT = "Question {{ id }}: {{ question }}"
CLOCK_SLACK_S = 0.005
CLIENT = "auto"  # set for each test by the `client` fixture


@pytest.fixture(autouse=True, params=["auto", "litellm"])
def client(request, monkeypatch):
    """The path every teacher of the test takes: kdata's HTTP client (auto) or litellm."""
    monkeypatch.setattr(sys.modules[__name__], "CLIENT", request.param)
    server = request.getfixturevalue("standin") if "standin" in request.fixturenames else None
    yield request.param
    if server is not None:  # every request really took that path
        agents = {r.user_agent for r in server.records}
        assert agents and (agents == {"kdata"}) == (request.param == "auto"), agents


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    monkeypatch.setenv("KDATA_TEST_KEY", "sk-test-" + uuid.uuid4().hex)
    monkeypatch.setattr(retries, "BACKOFF_BASE_S", 0.05)


def write_seeds(folder: Path, n: int) -> Path:
    path = folder / "seeds.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": i, "question": f"what is {i} times {i + 7}?"}) + "\n")
    return path


def recipe_yaml(
    port: int,
    *,
    timeout: float = 1.0,
    max_retries: int = 2,
    max_concurrency: int = 32,
    max_tokens: int = 64,
    price: tuple[float, float] | None = None,
    budget_usd: float | None = None,
) -> str:
    lines = [
        "name: faults",
        "report: {diversity: false}",  # the pool is under test, not the report
        "teachers:",
        "  t:",
        f"    model: openai/{MODEL}",
        f"    api_base: http://127.0.0.1:{port}/v1",
        "    api_key: ${KDATA_TEST_KEY}",
        f"    timeout: {timeout}",
        f"    max_retries: {max_retries}",
        f"    max_concurrency: {max_concurrency}",
        f"    client: {CLIENT}",
        f"    params: {{temperature: 0.0, max_tokens: {max_tokens}}}",
    ]
    if price is not None:
        lines.append(f"    cost_per_1k_tokens: {{input: {price[0]}, output: {price[1]}}}")
    lines += [
        "steps:",
        "  - type: seeds",
        "    path: seeds.jsonl",
        "  - type: label",
        f"    name: {STEP}",
        "    teacher: t",
        f'    prompt: "{PROMPT}"',
        "    output: response",
    ]
    if budget_usd is not None:
        lines.append(f"budget_usd: {budget_usd}")
    return "\n".join(lines) + "\n"


def seed_id(body: dict) -> int:
    """The seed row a request was made for (the prompt starts with 'Question <id>:')."""
    return int(last_user_message(body).split(":", 1)[0].removeprefix("Question "))


def server_hash(request: dict) -> str:
    """The stand-in's body hash of a request as kdata stores it in cache.sqlite."""
    return body_hash({"model": MODEL, "messages": request["messages"], **request["params"]})


def cached_requests(run_dir: Path) -> dict[str, dict]:
    """cache.sqlite ``responses``: kdata's request key -> the stored request, response and cost."""
    db = sqlite3.connect(run_dir / "cache.sqlite")
    try:
        rows = db.execute("SELECT key, request, response, cost_usd FROM responses").fetchall()
    finally:
        db.close()
    return {
        k: {"request": json.loads(req), "response": json.loads(resp), "cost_usd": cost}
        for k, req, resp, cost in rows
    }


def read_step(run_dir: Path) -> tuple[dict, list[dict], list[dict]]:
    folder = run_dir / "steps" / STEP
    stats = json.loads((folder / "stats.json").read_text())
    rows = read_table(folder).to_pylist()
    failed = read_table(folder, "failed").to_pylist()
    return stats, rows, failed


def cli(recipe: Path, run_dir: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdata.cli", "build", str(recipe), "-o", str(run_dir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


# ---------------------------------------------------------------------------------------------


def test_transient_faults_are_retried_and_no_row_is_lost(tmp_path, standin):
    n_rows, max_retries = 150, 2
    cfg = standin.config
    cfg.fault_rate = 0.3  # of first attempts
    cfg.fault_kinds = {RATE_LIMIT: 2, SERVER_ERROR: 1, RESET: 1, HANG: 1}
    cfg.retry_after_s = 0.2
    cfg.latency = (0.0, 0.02)
    # A few rows fault on every attempt, one per kind, so that some end up failed.
    doom = {0: RATE_LIMIT, 30: SERVER_ERROR, 60: RESET, 90: HANG, 120: RATE_LIMIT}
    first_only = Config(fault_rate=cfg.fault_rate, fault_kinds=cfg.fault_kinds)

    def decide(body: dict, attempt: int) -> str | None:
        i = seed_id(body)
        return doom[i] if i in doom else first_only.kind_for(body, body_hash(body), attempt)

    cfg.decide = decide
    write_seeds(tmp_path, n_rows)
    # Hangs last until the client's timeout. An answered request must never time out, even when
    # a busy machine starves this process: 3 s is 150 times the stand-in's latency.
    recipe = recipe_from_yaml(
        recipe_yaml(standin.port, timeout=3.0, max_retries=max_retries), tmp_path
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")

    assert run.status == "complete"
    stats, rows, failed = read_step(run.dir)
    assert stats["rows_in"] == n_rows
    assert stats["rows_in"] == stats["rows_out"] + stats["failed"] + stats["dropped"]
    assert stats["dropped"] == 0

    by_hash = standin.by_hash()
    firsts = [recs[0] for recs in by_hash.values()]
    assert len(by_hash) == n_rows  # one distinct request per row
    kinds_first = Counter(r.kind for r in firsts)
    assert 0.2 * n_rows <= n_rows - kinds_first[None] <= 0.4 * n_rows, kinds_first
    assert {RATE_LIMIT, SERVER_ERROR, RESET, HANG} <= set(kinds_first)

    # Per body hash: at most 1 + max_retries attempts, and an answer iff the last one was a 200.
    doomed = {}
    for h, recs in by_hash.items():
        assert len(recs) <= 1 + max_retries, (h, [r.kind for r in recs])
        assert all(r.kind is not None for r in recs[:-1])  # nothing after a success
        if recs[-1].kind is not None:
            assert len(recs) == 1 + max_retries
            doomed[seed_id(recs[-1].body)] = recs[-1].kind
    assert doomed == doom

    # Every seed row is in the dataset (with the stand-in's answer) or failed, once.
    final = run.rows()
    ids_ok = [r["id"] for r in final]
    ids_failed = [json.loads(f["row"])["id"] for f in failed]
    assert sorted(ids_ok + ids_failed) == list(range(n_rows))
    assert set(ids_failed) == set(doomed)
    for r in final:
        assert r["response"] == expected_answer(f"Question {r['id']}: {r['question']}")
    expected_class = {
        RATE_LIMIT: {"rate_limit"},
        SERVER_ERROR: {"server_error"},
        RESET: {"connection_error"},
        HANG: {"timeout"},
    }
    for f in failed:
        kind = doomed[json.loads(f["row"])["id"]]
        assert f["error_class"] in expected_class[kind], (kind, f["error_class"], f["error"])
        assert f["attempts"] == 1 + max_retries

    # Retry-After: the next attempt of a body hash comes no earlier than R after the 429.
    waits = []
    for recs in by_hash.values():
        for prev, nxt in zip(recs, recs[1:], strict=False):
            if prev.status == 429:
                assert prev.retry_after == 0.2
                waits.append(nxt.arrival - prev.answered_at)
                assert nxt.arrival >= prev.answered_at + prev.retry_after - CLOCK_SLACK_S, (
                    nxt.arrival - prev.answered_at
                )
    assert waits, "no 429 was followed by a retry"

    # The cache holds exactly the answered requests, and their bodies hash as the server saw.
    answered = {h for h, recs in by_hash.items() if recs[-1].status == 200}
    assert {server_hash(c["request"]) for c in cached_requests(run.dir).values()} == answered
    ledger = run.ledger["t"]
    assert ledger["requests"] == standin.count()
    assert ledger["responses"] == len(answered)


def test_permanent_errors_are_sent_once_and_classified(tmp_path, standin):
    n_rows = 30
    kinds = [BAD_REQUEST, CONTEXT_WINDOW]
    standin.config.decide = lambda body, attempt: kinds[seed_id(body) % 2]
    write_seeds(tmp_path, n_rows)
    recipe = recipe_from_yaml(recipe_yaml(standin.port, max_retries=5), tmp_path)
    run = kdata.build(recipe, run_dir=tmp_path / "run")

    counts = standin.counts()
    assert len(counts) == n_rows
    assert set(counts.values()) == {1}  # no retry by kdata, no hidden retry by litellm/openai
    stats, rows, failed = read_step(run.dir)
    assert rows == [] and stats["rows_out"] == 0 and stats["failed"] == n_rows
    want = {BAD_REQUEST: "bad_request", CONTEXT_WINDOW: "context_window"}
    got = {json.loads(f["row"])["id"]: f for f in failed}
    assert sorted(got) == list(range(n_rows))
    for i, f in got.items():
        assert f["error_class"] == want[kinds[i % 2]], f
        assert f["attempts"] == 1
    assert run.ledger["t"]["requests"] == n_rows
    assert cached_requests(run.dir) == {}


def test_auth_failure_stops_calling_the_teacher_and_the_mix_falls_back(tmp_path, standin):
    n_rows, concurrency = 30, 2
    standin.config.decide = lambda body, attempt: UNAUTHORIZED if body["model"] == "bad" else None
    write_seeds(tmp_path, n_rows)
    text = recipe_yaml(standin.port, max_concurrency=concurrency)
    bad = text.replace(
        "teachers:\n  t:",
        f"teachers:\n  bad:\n    model: openai/bad\n"
        f"    api_base: http://127.0.0.1:{standin.port}/v1\n"
        f"    api_key: ${{KDATA_TEST_KEY}}\n    max_concurrency: {concurrency}\n"
        f"    client: {CLIENT}\n  t:",
    )
    bad = bad.replace("    teacher: t\n", "    teacher: {mix: {bad: 1}, fallbacks: [t]}\n")
    run = kdata.build(recipe_from_yaml(bad, tmp_path), run_dir=tmp_path / "run")

    sent_to_bad = [r for r in standin.records if r.body["model"] == "bad"]
    assert 1 <= len(sent_to_bad) <= concurrency  # after the first 401, nothing more is sent
    assert run.ledger["bad"]["requests"] == len(sent_to_bad)
    assert run.ledger["bad"]["failures"] == {"auth": len(sent_to_bad)}
    stats, rows, failed = read_step(run.dir)
    assert failed == [] and stats["rows_out"] == n_rows
    assert {r["_kdata"]["teacher"] for r in rows} == {"t"}  # every row answered by the fallback
    assert all(r["response"] == expected_answer(PROMPT_OF(r)) for r in rows)

    # Without a fallback every row fails with its class, and the teacher still gets few calls.
    standin.clear()
    alone = bad.replace("{mix: {bad: 1}, fallbacks: [t]}", "bad")
    run = kdata.build(recipe_from_yaml(alone, tmp_path), run_dir=tmp_path / "run2")
    assert len(standin.records) <= concurrency
    stats, rows, failed = read_step(run.dir)
    assert rows == [] and len(failed) == n_rows and {f["error_class"] for f in failed} == {"auth"}
    assert sum("not sent" in f["error"] for f in failed) >= n_rows - concurrency


def PROMPT_OF(row: dict) -> str:  # noqa: N802
    return f"Question {row['id']}: {row['question']}"


def test_budget_stops_before_overspending_and_resumes(tmp_path, standin):
    n_rows = 40
    price = (1.0, 2.0)  # USD per 1k prompt / completion tokens
    budget = 0.5
    standin.config.latency = 0.01
    write_seeds(tmp_path, n_rows)
    run_dir = tmp_path / "run"
    # A client timeout would send an answered request again and the server would count it twice:
    # 10 s, so that a starved machine does not time out 10 ms answers.
    text = recipe_yaml(standin.port, max_tokens=20, max_concurrency=4, price=price, timeout=10.0)

    with pytest.raises(kdata.BudgetExceeded) as exc:
        kdata.build(recipe_from_yaml(text + f"budget_usd: {budget}\n", tmp_path), run_dir=run_dir)
    assert exc.value.run.status == "budget_exceeded"

    def server_cost(recs) -> float:
        cost = 0.0
        for r in recs:
            if r.status == 200:
                c_tok = min(standin.config.completion_tokens, r.body["max_tokens"])
                cost += (count_prompt_tokens(r.body) * price[0] + c_tok * price[1]) / 1000
        return cost

    first = standin.records
    assert standin.max_in_flight <= 4  # the teacher's max_concurrency
    answered = {r.body_hash for r in first if r.status == 200}
    assert 0 < len(answered) < n_rows
    stored = cached_requests(run_dir)
    cache_cost = sum(c["cost_usd"] for c in stored.values())
    assert cache_cost <= budget
    assert server_cost(first) <= budget
    assert cache_cost == pytest.approx(server_cost(first))
    assert {server_hash(c["request"]) for c in stored.values()} == answered
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "budget_exceeded"
    assert manifest["cost_usd_total"] <= budget

    standin.clear()
    run = kdata.build(recipe_from_yaml(text + "budget_usd: 100\n", tmp_path), run_dir=run_dir)
    assert run.status == "complete"
    assert sorted(r["id"] for r in run.rows()) == list(range(n_rows))
    again = {r.body_hash for r in standin.records}
    assert not again & answered  # nothing already stored is paid for twice
    assert len(again) == n_rows - len(answered)
    assert run.cost_usd_total == pytest.approx(server_cost(first) + server_cost(standin.records))


def test_kill_9_then_resume_pays_nothing_twice(tmp_path, standin):
    n_rows, concurrency = 240, 8
    standin.config.latency = (0.05, 0.15)  # ~3 s of requests at this concurrency
    write_seeds(tmp_path, n_rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(standin.port, max_concurrency=concurrency))
    run_dir = tmp_path / "run"

    proc = cli(recipe, run_dir)
    deadline = time.monotonic() + 40
    while standin.count() < n_rows // 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the CLI sent too few requests"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = standin.records
    boundary = len(before)

    stored = {server_hash(c["request"]) for c in cached_requests(run_dir).values()}
    answered_before = {r.body_hash for r in before if r.status == 200}
    assert stored and stored <= answered_before
    assert len(stored) < n_rows

    proc = cli(recipe, run_dir)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    after = standin.records[boundary:]
    sent_again = {r.body_hash for r in after}

    ids = [
        r["id"] for r in pq.read_table(run_dir / "data/train-00000-of-00001.parquet").to_pylist()
    ]
    assert len(ids) == n_rows and sorted(ids) == list(range(n_rows))
    assert not sent_again & stored  # nothing stored before the kill is requested again
    # What was answered but not yet stored when the process died was in flight: a few at most.
    lost = answered_before - stored
    assert lost <= sent_again
    assert len(lost) <= concurrency
    seen = {r.body_hash for r in standin.records}
    assert len(seen) == n_rows
    assert sent_again == seen - stored  # the rerun asks for exactly what was not stored


def test_a_connection_reset_is_a_connection_error_and_is_retried(tmp_path, standin):
    standin.config.always = RESET
    write_seeds(tmp_path, 3)
    run = kdata.build(
        recipe_from_yaml(recipe_yaml(standin.port, max_retries=1), tmp_path),
        run_dir=tmp_path / "run",
    )
    stats, rows, failed = read_step(run.dir)
    assert rows == [] and len(failed) == 3
    assert {(f["error_class"], f["attempts"]) for f in failed} == {("connection_error", 2)}
    assert set(standin.counts().values()) == {2}
    assert run.ledger["t"]["failures"] == {"connection_error": 6}


def test_ctrl_c_exits_130_with_one_line_and_keeps_what_was_received(tmp_path, standin):
    # Many short requests in flight, so that Ctrl+C lands while litellm is starting some of them.
    n_rows, concurrency = 3000, 64
    standin.config.latency = (0.0, 0.01)
    write_seeds(tmp_path, n_rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_yaml(standin.port, max_concurrency=concurrency, timeout=30))
    run_dir = tmp_path / "run"

    proc = cli(recipe, run_dir, text=True)
    deadline = time.monotonic() + 90
    while standin.count() < 300:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the CLI sent too few requests"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 130, err
    said = [line for line in err.splitlines() if line and not line.startswith("[kdata ")]
    assert said == [
        "interrupted: every response received is stored; run the same command to resume."
    ]
    stored = {server_hash(c["request"]) for c in cached_requests(run_dir).values()}
    answered = {r.body_hash for r in standin.records if r.status == 200}
    assert stored and stored <= answered
    assert len(answered - stored) <= concurrency  # in flight when the build stopped
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "lock").exists()


def test_api_key_is_written_nowhere(tmp_path, standin, monkeypatch):
    sentinel = "kdata-sentinel-" + uuid.uuid4().hex
    monkeypatch.setenv("KDATA_TEST_KEY", sentinel)
    cfg = standin.config
    cfg.echo_auth = True  # the 401 message carries the Authorization header it received
    cfg.decide = lambda body, attempt: UNAUTHORIZED if body["model"] == "bad" else None
    n_rows = 20
    write_seeds(tmp_path, n_rows)
    bad_teacher = (
        "  bad:\n    model: openai/bad\n"
        f"    api_base: http://127.0.0.1:{standin.port}/v1\n"
        "    api_key: ${KDATA_TEST_KEY}\n"
        f"    client: {CLIENT}\n"
    )
    text = recipe_yaml(standin.port).replace("teachers:\n", "teachers:\n" + bad_teacher)
    text = text.replace("    teacher: t\n", "    teacher: {mix: {bad: 1, t: 1}}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    run_dir = tmp_path / "run"

    proc = cli(recipe, run_dir)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]

    auths = {r.authorization for r in standin.records}
    assert auths == {f"Bearer {sentinel}"}  # the key was really sent, and echoed back
    stats, rows, failed = read_step(run_dir)
    assert rows and failed and len(rows) + len(failed) == n_rows  # the mix routed both ways
    assert {r["_kdata"]["teacher"] for r in rows} == {"t"}
    assert all(f["error_class"] == "auth" and "***" in f["error"] for f in failed)

    needle = sentinel.encode()
    assert needle not in out and needle not in err
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "cache.sqlite" for p in files)
    assert any(p.suffix == ".parquet" for p in files)
    for p in files:
        assert needle not in p.read_bytes(), p


@pytest.mark.parametrize("header", ["soon", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_unparsable_or_past_retry_after_falls_back_to_backoff(tmp_path, standin, header):
    standin.config.decide = lambda body, attempt: RATE_LIMIT if attempt == 0 else None
    standin.config.retry_after_header = header
    write_seeds(tmp_path, 4)
    recipe = recipe_from_yaml(recipe_yaml(standin.port, max_retries=2), tmp_path)
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    assert sorted(r["id"] for r in run.rows()) == [0, 1, 2, 3]
    assert set(standin.counts().values()) == {2}


def test_a_retry_after_beyond_the_ceiling_fails_the_row_at_once(tmp_path, standin):
    standin.config.decide = lambda body, attempt: RATE_LIMIT
    standin.config.retry_after_header = str(int(retries.MAX_RETRY_AFTER_S) * 12)
    write_seeds(tmp_path, 3)
    run = kdata.build(
        recipe_from_yaml(recipe_yaml(standin.port, max_retries=5), tmp_path),
        run_dir=tmp_path / "run",
    )
    stats, rows, failed = read_step(run.dir)
    assert rows == [] and len(failed) == 3
    assert set(standin.counts().values()) == {1}  # not retried: the wait asked for is too long
    assert all(
        f["error_class"] == "rate_limit" and "retry after 3600s" in f["error"] for f in failed
    )


def test_rpm_limit_spaces_requests(tmp_path, standin):
    # rpm 600 = 10 requests/s from a bucket one second deep that starts full: t seconds after the
    # build starts, at most 10 + 10 t requests can have been let go. A request reaches the server
    # after it was let go (later still on a busy machine, which only delays arrivals), so the
    # k-th arrival is no earlier than (k - 10) * 0.1 s after the start.
    n_rows = 25
    # litellm's first call in a process blocks the loop for a while: warm it up first, so that a
    # limiter letting every request go at once would show (all in well under the 1.5 s allowed).
    warm = tmp_path / "warm"
    warm.mkdir()
    write_seeds(warm, 1)
    kdata.build(recipe_from_yaml(recipe_yaml(standin.port), warm), run_dir=warm / "run")
    standin.clear()
    write_seeds(tmp_path, n_rows)
    text = recipe_yaml(standin.port).replace("    max_retries:", "    rpm: 600\n    max_retries:")
    start = time.monotonic()  # the stand-in stamps arrivals with the same clock
    kdata.build(recipe_from_yaml(text, tmp_path), run_dir=tmp_path / "run")
    arrivals = sorted(r.arrival - start for r in standin.records)
    assert len(arrivals) == n_rows
    for k, t in enumerate(arrivals, start=1):
        assert t >= (k - 10) * 0.1 - CLOCK_SLACK_S, (k, arrivals)
