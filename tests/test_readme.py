"""The README's commands and snippets work as written."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import kdata

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_install_lines_name_real_extras_and_the_ci_runs_the_readme_test_command() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    bash = blocks("bash")
    for extra in re.findall(r"\.\[(\w+)\]", "\n".join(bash)):
        assert extra in extras
    test_cmd = next(line for line in bash if "pytest" in line).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    # CI runs the README's test command after the README's install steps.
    for part in test_cmd.split(" && ")[2:]:
        assert part in ci, part
    quickstart = next(line for line in bash if "kdata build" in line)
    assert quickstart.strip().endswith("kdata build recipes/quickstart.yaml")


def test_every_kdata_command_in_the_readme_exists() -> None:
    from kdata.cli import app

    known = {c.name or c.callback.__name__ for c in app.registered_commands}
    used = set(re.findall(r"`kdata (\w[\w-]*)", README)) | set(
        re.findall(r"\bkdata (\w+) ", "\n".join(blocks("bash")))
    )
    assert used and used <= known, used - known


def test_recipe_reference_and_teacher_snippets_validate() -> None:
    reference = next(b for b in blocks("yaml") if b.startswith("name: quickstart"))
    recipe = kdata.recipe_from_yaml(reference, base_dir=ROOT / "recipes")
    assert [s.type for s in recipe.steps] == ["seeds", "label"]
    teachers = next(b for b in blocks("yaml") if b.startswith("teachers:"))
    steps = "steps:\n  - {type: seeds, path: data/seed_tasks.jsonl}\n"
    r = kdata.recipe_from_yaml("name: t\n" + teachers + steps, base_dir=ROOT / "recipes")
    assert set(r.teachers) == {"gpt", "claude", "qwen", "llama", "smol"}


def test_python_api_snippet_runs(tmp_path: Path) -> None:
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    code = next(b for b in blocks("python") if "kdata.build" in b)
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("3 runs/py/data")
    assert (tmp_path / "runs/py/data/train-00000-of-00001.parquet").is_file()


@pytest.mark.parametrize(
    "cmd", ["validate", "build", "inspect", "push", "rethreshold", "validate-sft"]
)
def test_cli_help(cmd: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "kdata.cli", cmd, "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "Usage" in res.stdout


def test_curation_snippet_validates() -> None:
    steps = next(b for b in blocks("yaml") if b.startswith("steps:"))
    r = kdata.recipe_from_yaml("name: t\n" + steps, base_dir=ROOT / "recipes")
    assert [s.type for s in r.steps] == [
        "seeds",
        "exact_dedup",
        "minhash_dedup",
        "semantic_dedup",
        "filter",
        "decontaminate",
        "diversity",
    ]
    run_plan = kdata.plan(r)
    assert run_plan.steps[0].rows == 175


def test_validate_snippet_validates() -> None:
    section = next(b for b in blocks("yaml") if b.startswith("validate:"))
    r = kdata.recipe_from_yaml(
        "name: t\nsteps:\n  - {type: seeds, path: data/seed_tasks.jsonl}\n" + section,
        base_dir=ROOT / "recipes",
    )
    assert r.validation.student == "local/smollm2-135m-instruct"
    assert r.validation.response.endswith("{{ response_answer }}")
    assert r.validation.eval.path == "data/gsm8k_eval_100.jsonl"


def test_dpo_and_judge_snippet_validates() -> None:
    section = next(b for b in blocks("yaml") if b.startswith("validate:") and "dpo:" in b)
    teachers = "teachers:\n  gpt:\n    model: openai/gpt-4o-mini\n    api_key: ${OPENAI_API_KEY}\n"
    steps = (
        "steps:\n  - {type: seeds, path: data/seed_tasks.jsonl}\n"
        "  - {type: preferences, name: prefs, teachers: [gpt], n: 2, judge: {teacher: gpt}}\n"
    )
    r = kdata.recipe_from_yaml("name: t\n" + teachers + steps + section, base_dir=ROOT / "recipes")
    assert r.validation.dpo.step == "prefs" and r.validation.dpo.max_steps == 50
    assert r.validation.judge.teacher == "gpt" and r.validation.eval.holdout == 50


def test_publish_snippet_validates() -> None:
    snippet = next(b for b in blocks("yaml") if b.startswith("publish:"))
    text = "name: t\nsteps: [{type: seeds, path: data/seed_tasks.jsonl}]\n" + snippet
    recipe = kdata.recipe_from_yaml(text, base_dir=ROOT / "recipes")
    recipe.check_runtime()  # the template it names is a shipped one
    assert recipe.publish.repo_id == "alice/seed-answers" and recipe.publish.license == "apache-2.0"


ELICITATION = (
    "label",
    "consensus",
    "self_consistency",
    "self_refine",
    "conversation",
    "magpie",
    "features",
)


@pytest.mark.parametrize("step_type", ELICITATION)
def test_elicitation_snippets_validate(tmp_path: Path, step_type: str) -> None:
    snippet = next(b for b in blocks("yaml") if b.startswith(f"# {step_type}\n"))
    teachers = "".join(
        f"  {t}: {{model: local/smollm2-135m-instruct}}\n"
        for t in ("smol", "gpt", "claude", "qwen")
    )
    for name in re.findall(r"path: (\S+\.jinja)", snippet):  # the templates a user would write
        (tmp_path / name).write_text("{{ question }}")
    r = kdata.recipe_from_yaml(f"name: t\nteachers:\n{teachers}" + snippet, base_dir=tmp_path)
    (step,) = r.steps
    assert step.type == step_type
    for field in ("cot_prompt", "answer_prompt", "critique_prompt", "refine_prompt", "user_prompt"):
        if f"{field}: {{path:" in snippet:
            assert getattr(step, field) == "{{ question }}"  # read from the file


def test_code_verification_snippet_validates() -> None:
    snippet = next(b for b in blocks("yaml") if b.startswith("# label (code)\n"))
    teachers = "  smol: {model: local/smollm2-135m-instruct}\n"
    (step,) = kdata.recipe_from_yaml(f"name: t\nteachers:\n{teachers}" + snippet).steps
    assert (step.verify.tests, step.verify.entry_point) == ("test", "entry_point")
    assert step.verify.setup == "prompt"


def test_trace_filter_lines_of_the_curation_snippet_validate() -> None:
    snippet = next(b for b in blocks("yaml") if b.startswith("steps:") and "language_mixing" in b)
    names = ("max_reasoning_tokens", "language_mixing", "answer_agreement")
    found = re.findall(rf"# ((?:{'|'.join(names)}): .*?)(?:   #|$)", snippet, flags=re.M)
    assert len(found) == 3, found
    fields = "".join(f"    {line.strip()}\n" for line in found)
    step = "steps:\n  - type: filter\n    column: response\n" + fields
    (f,) = kdata.recipe_from_yaml("name: t\n" + step).steps
    assert f.max_reasoning_tokens == 4096 and f.answer_agreement
    assert f.language_mixing.scripts == ["latin"] and f.language_mixing.max_share == 0.02


def test_reasoning_teachers_snippet_validates() -> None:
    snippet = next(b for b in blocks("yaml") if b.startswith("teachers:\n  r1:"))
    steps = "steps:\n  - {type: label, teacher: o4, prompt: hi}\n"
    r = kdata.recipe_from_yaml("name: t\n" + snippet + steps)
    assert r.teachers["qwq"].think_tags and r.teachers["o4"].params.reasoning_effort == "high"


def test_fast_path_snippet_validates() -> None:
    from kdata.teachers.openai_http import endpoint
    from kdata.teachers.pool import _litellm

    snippet = next(b for b in blocks("yaml") if b.startswith("teachers:\n  vllm:"))
    steps = "steps:\n  - {type: label, teacher: vllm, prompt: hi}\n"
    r = kdata.recipe_from_yaml("name: t\n" + snippet + steps)
    fast = endpoint(r.teachers["vllm"], _litellm())
    assert fast.url == "http://localhost:8000/v1/chat/completions" and fast.model == "Qwen/Qwen3-8B"
    assert endpoint(r.teachers["via_litellm"], _litellm()) is None


def test_schema_snippet_validates() -> None:
    snippet = next(b for b in blocks("yaml") if b.startswith("# label (schema)\n"))
    teachers = "  smol: {model: local/smollm2-135m-instruct}\n"
    (step,) = kdata.recipe_from_yaml(f"name: t\nteachers:\n{teachers}" + snippet).steps
    assert step.schema_["required"] == ["name", "age"] and step.retries == 2


def test_every_step_type_is_documented() -> None:
    from kdata.recipe import STEP_TYPES

    missing = [t for t in STEP_TYPES if f"type: {t}" not in README]
    assert not missing, missing


def test_expansion_and_feedback_snippets_validate() -> None:
    teachers = (
        "teachers:\n"
        "  smol: {model: local/smollm2-135m-instruct}\n"
        "  student: {model: local/smollm2-135m-instruct}\n"
    )
    mine = {"self_instruct", "evol_instruct", "curate", "judge", "preferences"}
    seen = set()
    for block in blocks("yaml"):
        if block.startswith("steps:") and any(f"type: {t}" in block for t in mine):
            r = kdata.recipe_from_yaml("name: t\n" + teachers + block, base_dir=ROOT / "recipes")
            seen |= {s.type for s in r.steps}
    assert mine <= seen


def test_ray_execution_snippet_validates() -> None:
    section = next(b for b in blocks("yaml") if b.startswith("execution:\n  executor: ray"))
    steps = "steps:\n  - {type: seeds, path: data/seed_tasks.jsonl}\n"
    r = kdata.recipe_from_yaml("name: t\n" + steps + section, base_dir=ROOT / "recipes")
    assert (r.execution.executor, r.execution.address, r.execution.workers) == ("ray", None, 2)
