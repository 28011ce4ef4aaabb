"""The dry run's dollar estimate: a worst case the run never passes; nothing sent or written."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import ROOT, SEED_TASKS
from rich.console import Console
from typer.testing import CliRunner

import kdata
from kdata import cli
from kdata.planning import BATCH_DISCOUNT, _litellm

PRICED = "kdata-plan-priced"  # a model the tests put in litellm's price table


def recipe_text(base_url: str, model: str, price: str, max_tokens: int = 16) -> str:
    """Seeds -> label (2 samples) -> judge of the generated answers -> a 2-turn conversation."""
    return f"""\
name: planned
teachers:
  t:
    model: openai/{model}
    api_base: {base_url}
    api_key: ${{KDATA_TEST_KEY}}
    max_retries: 0
    params: {{temperature: 0, max_tokens: {max_tokens}}}
{price}
steps:
  - {{type: seeds, path: seeds.jsonl}}
  - {{type: label, name: label, teacher: t, n: 2, prompt: "{{{{ instruction }}}}"}}
  - {{type: judge, name: judge, teacher: t}}
  - {{type: conversation, name: chat, assistant: t, user: t, turns: 2,
     prompt: "{{{{ response }}}}"}}
report: {{diversity: false}}
"""


@pytest.fixture
def standin(standin):
    """The stand-in answering every request with a valid verdict (text for the other steps),
    each one its own: no two rows share a later request."""
    count = itertools.count()

    def reply(body: dict) -> str:
        return json.dumps({"reasoning": f"reply {next(count)}", "score": 4})

    standin.config.reply = reply
    return standin


@pytest.fixture
def seeds5(tmp_path: Path) -> Path:
    lines = SEED_TASKS.read_text(encoding="utf-8").splitlines()[:5]
    (tmp_path / "seeds.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


@pytest.fixture
def priced_in_litellm():
    """``openai/kdata-plan-priced`` in litellm's price table for the test, then removed."""
    litellm = _litellm()
    key = f"openai/{PRICED}"
    litellm.register_model(
        {
            key: {
                "input_cost_per_token": 2e-6,
                "output_cost_per_token": 8e-6,
                "litellm_provider": "openai",
                "mode": "chat",
            }
        }
    )
    yield
    litellm.model_cost.pop(key, None)


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("where", ["recipe", "litellm"])
def test_the_worst_case_covers_what_the_run_spends_and_a_rerun_costs_nothing(
    seeds5: Path, standin, where: str, request: pytest.FixtureRequest
) -> None:
    if where == "litellm":
        request.getfixturevalue("priced_in_litellm")
        text = recipe_text(standin.base_url, PRICED, "")
    else:
        text = recipe_text(
            standin.base_url, "standin", "    cost_per_1k_tokens: {input: 3, output: 9}"
        )
    recipe = kdata.recipe_from_yaml(text, base_dir=seeds5)
    run_dir = seeds5 / "run"
    plan = kdata.plan(recipe, run_dir=run_dir)
    assert not run_dir.exists() and standin.records == []  # nothing written, nothing sent
    label, judge, chat = plan.steps[1:]
    assert [s.calls for s in plan.steps] == [0, 10, 10 * 3, 10 * 4]  # judge: up to 2 retries
    assert not label.bound and judge.bound and chat.bound  # label's prompts are the seeds'
    assert label.completion_tokens_worst == 10 * 16 and plan.unpriced == []
    assert 0 < plan.usd_expected <= plan.usd_worst
    assert label.batch_usd_worst == pytest.approx(label.usd_worst * BATCH_DISCOUNT)

    run = kdata.build(recipe, run_dir=run_dir)
    spent = {s.name: s.cost_usd for s in run.steps}
    assert run.cost_usd_total > 0 and len(standin.records) == sum(s.requests for s in run.steps)
    for s in plan.steps:
        assert spent[s.step] <= s.usd_worst + 1e-12, (s.step, spent[s.step], s.usd_worst)
    assert run.cost_usd_total <= plan.usd_worst
    assert [s.requests for s in run.steps] == [0, 10, 10, 40]  # every judge valid at once

    again = kdata.plan(recipe, run_dir=run_dir)  # every response is stored now
    before = listing(run_dir)
    assert [s.cached for s in again.steps[1:]] == [10, 10, 40]  # all rendered from stored rows
    assert again.usd_worst == 0 and not any(s.bound for s in again.steps[1:3])
    assert listing(run_dir) == before  # the cache was only read


def test_expected_completions_come_from_the_cache(seeds5: Path, standin) -> None:
    price = "    cost_per_1k_tokens: {input: 1, output: 1}"
    first = kdata.recipe_from_yaml(recipe_text(standin.base_url, "standin", price), base_dir=seeds5)
    kdata.build(first, run_dir=seeds5 / "run")  # the stand-in answers 12 completion tokens
    bigger = recipe_text(standin.base_url, "standin", price, max_tokens=64)  # new requests
    plan = kdata.plan(kdata.recipe_from_yaml(bigger, base_dir=seeds5), run_dir=seeds5 / "run")
    label = plan.steps[1]
    assert label.cached == 0 and label.completion_tokens_worst == 10 * 64
    assert label.completion_tokens_expected == 10 * 12  # the mean of the stored responses


def test_unpriced_teachers_are_named_and_the_cli_prints_the_range(
    seeds5: Path, standin, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = seeds5 / "r.yaml"
    recipe.write_text(recipe_text(standin.base_url, "no-such-price", ""), encoding="utf-8")
    plan = kdata.plan(kdata.load_recipe(recipe))
    assert plan.unpriced == ["t"] and plan.usd_worst == 0
    budgeted = recipe_text(
        standin.base_url, "standin", "    cost_per_1k_tokens: {input: 3, output: 9}"
    )
    tight = kdata.plan(kdata.recipe_from_yaml(budgeted + "budget_usd: 1.0\n", base_dir=seeds5))
    assert any("budget_usd 1.0" in n and "below the worst case" in n for n in tight.notes)
    priced = recipe_text(
        standin.base_url, "standin", "    cost_per_1k_tokens: {input: 3, output: 9}"
    )
    recipe.write_text(priced, encoding="utf-8")
    monkeypatch.setattr(cli, "out", Console(width=250))  # the table unwrapped
    res = CliRunner().invoke(cli.app, ["build", str(recipe), "--dry-run", "-o", str(seeds5 / "o")])
    assert res.exit_code == 0, res.output
    worst = kdata.plan(kdata.load_recipe(recipe)).usd_worst
    assert "80 teacher calls at most, 0 of them answered by the run's cache" in res.output
    assert f"at most {worst:.4f} online" in res.output
    assert f"at most {worst / 2:.4f} through a batch API" in res.output
    assert "* bounds:" in res.output and "judge *" in res.output
    assert not (seeds5 / "o").exists() and standin.records == []


def test_plan_from_a_running_loop_is_the_same_plan() -> None:
    import asyncio

    recipe = kdata.load_recipe(ROOT / "recipes" / "quickstart.yaml")

    async def in_a_notebook() -> kdata.Plan:
        return kdata.plan(recipe)

    inside, outside = asyncio.run(in_a_notebook()), kdata.plan(recipe)
    assert inside == outside and outside.calls == 20 and outside.unpriced == []
