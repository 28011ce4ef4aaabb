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
    assert res.stdout.startswith("3 runs/py/data/train-00000-of-00001.parquet")


@pytest.mark.parametrize("cmd", ["validate", "build", "inspect"])
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
    ]
    run_plan = kdata.plan(r)
    assert run_plan[0]["rows"] == 175


def test_every_step_type_is_documented() -> None:
    from kdata.recipe import STEP_TYPES

    missing = [t for t in STEP_TYPES if f"type: {t}" not in README]
    assert not missing, missing


def test_elicitation_snippets_validate() -> None:
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
