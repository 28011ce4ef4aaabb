"""The wheel: built from a copy of the repository, installed into a folder, it renders a card."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

from conftest import ROOT

import kdata


def source_copy(tmp_path: Path) -> Path:
    """What a build of the package reads, copied to ``tmp_path/src`` (building in the checkout
    would leave build/ there)."""
    src = tmp_path / "src"
    src.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("kdata", "hub_cards"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    return src


def test_an_installed_wheel_ships_every_module_and_renders_a_card(tmp_path: Path) -> None:
    src = source_copy(tmp_path)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), src],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("kdata-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kdata").rglob("*.py")}
    assert modules <= names, f"the wheel lacks {sorted(modules - names)}"
    assert "kdata/hub_cards/default.md" in names
    assert {p.name for p in (ROOT / "kdata" / "prompts").glob("*.jinja")} <= {
        Path(n).name for n in names if n.startswith("kdata/prompts/")
    }
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    (tmp_path / "seeds.jsonl").write_text('{"q": "What is 2 + 2?"}\n', encoding="utf-8")
    recipe = kdata.recipe_from_yaml(
        "name: w\nsteps:\n  - {type: seeds, path: seeds.jsonl}\n"
        "publish: {description: Packaging check., license: apache-2.0}\n",
        base_dir=tmp_path,
    )
    run = kdata.build(recipe, run_dir=tmp_path / "run")
    script = textwrap.dedent(
        f"""
        import kdata
        from kdata.publish import write_folder
        from kdata.publish.config import shipped_templates
        print(kdata.__file__)
        print(shipped_templates().joinpath("default.md"))
        write_folder({str(run.dir)!r}, {str(tmp_path / "out")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert out[0] == str(site / "kdata" / "__init__.py")  # the installed copy, not the checkout
    assert Path(out[1]) == site / "kdata" / "hub_cards" / "default.md"
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "license: apache-2.0" in card
    assert "Packaging check." in card
    shipped = (ROOT / "hub_cards" / "default.md").read_text(encoding="utf-8")
    heading = next(line for line in shipped.splitlines() if line.startswith("## "))
    assert heading in card  # rendered from the shipped template


def test_an_editable_install_maps_the_top_level_hub_cards(tmp_path: Path) -> None:
    src = source_copy(tmp_path)
    prefix = tmp_path / "prefix"
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
        # --ignore-installed: without it pip uninstalls this environment's kdata first
        + ["--no-deps", "--no-build-isolation", "--ignore-installed", "--prefix", str(prefix)]
        + ["-e", str(src)],
        check=True,
    )
    (site,) = prefix.glob("lib/python*/site-packages")
    script = textwrap.dedent(
        f"""
        import site
        site.addsitedir({str(site)!r})  # its finder first, then the test's packages
        site.addsitedir({sysconfig.get_paths()["purelib"]!r})
        from importlib.resources import files
        print(files("kdata.hub_cards").joinpath("default.md"))
        """
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", script],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert Path(out.stdout.strip()) == src / "hub_cards" / "default.md"
