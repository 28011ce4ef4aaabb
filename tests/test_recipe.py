"""Recipe loading: good recipes load, bad ones fail with file, line, step, field and a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

import kdata
from kdata import RecipeError, load_recipe, recipe_from_yaml

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
teachers:
  smol:
    model: local/smollm2-135m-instruct
    params: {temperature: 0.7, max_tokens: 32}
  gpt:
    model: openai/gpt-4o-mini
    api_base: ${KDATA_T_BASE:-}
    api_key: ${KDATA_T_KEY}
steps:
  - type: seeds
    path: seeds.jsonl
    limit: 2
  - type: label
    teacher: {mix: {smol: 0.5, gpt: 0.5}, fallbacks: [smol]}
    prompt: "{{ instruction }}"
output:
  dir: runs/t
budget_usd: 5.0
"""


def load_text(tmp_path: Path, text: str) -> kdata.Recipe:
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return load_recipe(p)


def error_of(tmp_path: Path, text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_text(tmp_path, text)
    return info.value


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    recipe.check_runtime()
    assert recipe.steps


def test_good_recipe_loads_with_defaults_and_mix(tmp_path: Path) -> None:
    r = load_text(tmp_path, GOOD)
    assert r.teachers["gpt"].api_base is None  # ${VAR:-} with VAR unset
    assert r.teachers["gpt"].api_key == "${KDATA_T_KEY}"  # a reference, never the value
    assert r.steps[1].teacher.mix == {"smol": 0.5, "gpt": 0.5}
    assert r.step_names() == ["00_seeds", "01_label"]
    assert r.base_dir == tmp_path


def test_env_interpolation_uses_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDATA_T_BASE", "http://127.0.0.1:9/v1")
    assert load_text(tmp_path, GOOD).teachers["gpt"].api_base == "http://127.0.0.1:9/v1"


def test_unknown_step_type_names_line_step_and_suggests(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace("type: label", "type: lable"))
    assert e.line == 14 and e.step == "steps[1] (lable)" and e.field == "type"
    assert "did you mean 'label'" in str(e) and str(e).startswith(f"{tmp_path}/recipe.yaml:14")


def test_unknown_key_in_step_suggests_the_right_one(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace("prompt:", "promt:"))
    assert (e.line, e.step, e.field) == (16, "steps[1] (label)", "promt")
    assert "did you mean 'prompt'" in str(e)


def test_unknown_key_in_teacher_params(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace("{temperature:", "{temprature:"))
    assert e.line == 5 and e.field == "teachers.smol.params.temprature"
    assert "did you mean 'temperature'" in str(e)


def test_unknown_teacher_reference(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace("fallbacks: [smol]", "fallbacks: [smoll]"))
    assert e.line == 15 and e.step == "steps[1] (label)"
    assert "unknown teacher 'smoll'" in str(e) and "did you mean 'smol'" in str(e)


def test_missing_env_var_is_named(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace("${KDATA_T_BASE:-}", "${KDATA_T_NOPE}"))
    assert e.line == 8 and "KDATA_T_NOPE is not set" in str(e)


def test_missing_api_key_only_matters_when_the_teacher_is_used(tmp_path, monkeypatch) -> None:
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "hi"}\n', encoding="utf-8")
    r = load_text(tmp_path, GOOD)
    with pytest.raises(RecipeError, match="KDATA_T_KEY is not set") as info:
        r.check_runtime()
    assert info.value.line == 9
    unused = load_text(
        tmp_path, GOOD.replace("{mix: {smol: 0.5, gpt: 0.5}, fallbacks: [smol]}", "smol")
    )
    unused.check_runtime()  # gpt is defined but no step calls it


def test_literal_api_key_is_refused(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace("${KDATA_T_KEY}", "sk-live-123"))
    assert e.line == 9 and "must name an environment variable" in str(e)
    assert "sk-live-123" not in str(e)


def test_unpriced_model_is_refused_under_a_budget(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KDATA_T_KEY", "x")
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "hi"}\n', encoding="utf-8")
    load_text(tmp_path, GOOD).check_runtime()  # gpt-4o-mini is in litellm's price table
    odd = load_text(tmp_path, GOOD.replace("openai/gpt-4o-mini", "openai/my-own-model"))
    with pytest.raises(RecipeError, match="no price for model 'openai/my-own-model'"):
        odd.check_runtime()
    priced = GOOD.replace("openai/gpt-4o-mini", "openai/my-own-model").replace(
        "    api_key:", "    cost_per_1k_tokens: {input: 0.001, output: 0.002}\n    api_key:"
    )
    load_text(tmp_path, priced).check_runtime()


def test_python_object_tag_is_refused_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    e = error_of(
        tmp_path,
        GOOD.replace(
            "path: seeds.jsonl", f'path: !!python/object/apply:os.system ["touch {marker}"]'
        ),
    )
    assert e.line == 12 and "tags are refused" in str(e)
    assert not marker.exists()


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace("    limit: 2", "   limit: 2"))
    assert e.line == 13 and "invalid YAML" in str(e)


def test_bad_template_is_caught_at_load(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace('"{{ instruction }}"', '"{{ instruction "'))
    assert e.line == 16 and e.field == "prompt" and "template does not compile" in str(e)


def test_same_recipe_in_python_and_yaml(tmp_path: Path) -> None:
    from kdata import LabelStep, Recipe, SeedsStep, Teacher

    py = Recipe(
        name="t",
        teachers={"smol": Teacher(model="local/smollm2-135m-instruct")},
        steps=[SeedsStep(path="seeds.jsonl"), LabelStep(teacher="smol", prompt="{{ q }}")],
    )
    yml = recipe_from_yaml(
        "name: t\nteachers: {smol: {model: local/smollm2-135m-instruct}}\n"
        "steps:\n  - {type: seeds, path: seeds.jsonl}\n  - {type: label, teacher: smol, "
        "prompt: '{{ q }}'}\n"
    )
    assert py.model_dump() == yml.model_dump()


def test_template_from_a_file_next_to_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "ask.jinja").write_text("Answer briefly: {{ instruction }}\n")
    text = GOOD.replace('prompt: "{{ instruction }}"', "prompt: {path: prompts/ask.jinja}")
    r = load_text(tmp_path, text)
    assert r.steps[1].prompt == "Answer briefly: {{ instruction }}\n"
    assert r.steps[1].render(r.steps[1].prompt, {"instruction": "hi"}) == "Answer briefly: hi"


def test_missing_template_file_names_the_field(tmp_path: Path) -> None:
    text = GOOD.replace('prompt: "{{ instruction }}"', "prompt: {path: prompts/nope.jinja}")
    with pytest.raises(RecipeError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert "nope.jinja" in msg and "prompt" in msg and "steps[1]" in msg
    assert e.value.line == GOOD.splitlines().index('    prompt: "{{ instruction }}"') + 1


def _alias_bomb(use: str) -> str:
    """Nine anchors, each a list of nine aliases to the one before (9**9 nodes once expanded)."""
    lines = ["name: bomb", "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(lines) + "\n" + use


BOMB_USES = {
    "limit": "steps:\n  - type: seeds\n    path: s.jsonl\n    limit: *a8\n",
    "extra_body": (
        "teachers:\n  t:\n    model: local/smollm2-135m-instruct\n"
        "    params:\n      extra_body: {x: *a8}\n"
        "steps:\n  - {type: seeds, path: s.jsonl}\n"
    ),
}


@pytest.mark.parametrize("use", BOMB_USES, ids=list(BOMB_USES))
def test_alias_bomb_is_refused_at_once_with_file_and_line(tmp_path: Path, use: str) -> None:
    import subprocess
    import sys

    p = tmp_path / "bomb.yaml"
    p.write_text(_alias_bomb(BOMB_USES[use]), encoding="utf-8")
    # The timeout only keeps a regression from hanging the suite; the refusal takes milliseconds.
    res = subprocess.run(
        [sys.executable, "-m", "kdata.cli", "validate", str(p)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2, res.stderr
    err = " ".join(res.stderr.split())
    assert f"{p}:" in err and "aliases" in err
    e = error_of(tmp_path, _alias_bomb(BOMB_USES[use]))
    assert e.line is not None and 2 <= e.line <= 10  # an anchor's line: where it blows up


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    e = error_of(tmp_path, GOOD.replace("[smol]}", "&f [smol, *f]}"))
    assert e.line == 15 and "refers to a node that contains it" in str(e)


def test_a_few_aliases_still_work(tmp_path: Path) -> None:
    text = GOOD.replace("params: {temperature", "params: &p {temperature").replace(
        "    api_key: ${KDATA_T_KEY}", "    api_key: ${KDATA_T_KEY}\n    params: *p"
    )
    r = load_text(tmp_path, text)
    assert r.teachers["gpt"].params == r.teachers["smol"].params
    assert r.teachers["gpt"].params.max_tokens == 32


def test_recipe_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    from kdata.recipe import MAX_RECIPE_BYTES

    text = GOOD + "# padding\n" * (MAX_RECIPE_BYTES // 10)
    e = error_of(tmp_path, text)
    assert e.path == str(tmp_path / "recipe.yaml") and e.line is None
    assert "larger than 1 MiB" in str(e)
    with pytest.raises(RecipeError, match="larger than 1 MiB"):
        recipe_from_yaml(text)


def test_recipe_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "recipe.yaml"
    p.write_bytes(GOOD.replace("name: t", "name: caf\xe9").encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        load_recipe(p)
    assert info.value.line == 1 and "UTF-8" in str(info.value)
