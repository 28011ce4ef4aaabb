"""The Hub-layout folder of a finished run: exactly what `kdata push` uploads.

::

    README.md                               the dataset card
    data/<split>-00000-of-00001.parquet     the final rows (more shards past 500 MB)
    kdata/recipe.yaml                       the recipe the run was built from
    kdata/stats.json                        per-step stats, teachers' totals, versions
    diversity/...                           report.json and plots, when the run has them
    validation/...                          report.json and loss.png, when the run has them

``datasets.load_dataset(folder)`` loads it (the card's ``configs`` name the data files) and
``DatasetCard.load(folder / "README.md")`` parses it. Its content depends on the run alone (no
timestamps, no local paths), so writing it twice gives the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from kdata.errors import KdataError
from kdata.publish.card import card_context, published_recipe, render_card
from kdata.publish.config import PublishConfig

MARKER = "kdata/stats.json"  # a folder holding this was written here, and may be replaced
MANAGED = ("data/", "kdata/", "diversity/", "validation/")  # what a push may delete when stale


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a complete run.

    Raises:
        KdataError: no manifest, or a build that did not finish.
    """
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise KdataError(f"{run_dir} is not a kdata run directory (no manifest.json)") from None
    if manifest.get("status") != "complete":
        raise KdataError(
            f"the build in {run_dir} is not complete (status: {manifest.get('status')}); "
            "run `kdata build` to finish it before publishing"
        )
    return manifest


def publish_config(manifest: dict) -> PublishConfig:
    """The recipe's ``publish:`` section as recorded in the manifest (defaults if it had none)."""
    return PublishConfig.model_validate(manifest["recipe"].get("publish") or {})


def write_folder(
    run_dir: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    cfg: PublishConfig | None = None,
    repo_id: str | None = None,
) -> list[str]:
    """Write the Hub-layout folder of a finished run to ``dest``, replacing an earlier one.

    Args:
        run_dir: a run directory whose build is complete.
        dest: the folder to write; if it exists it must be empty or an earlier such folder.
        cfg: the publish settings (default: the recipe's, from the manifest).
        repo_id: the repository the card names (default: ``cfg.repo_id``).

    Returns:
        The folder's files, as sorted POSIX paths relative to it.

    Raises:
        KdataError: an unfinished run, a bad card template, or a ``dest`` holding other files.
    """
    run_dir, dest = Path(run_dir), Path(dest)
    manifest = read_manifest(run_dir)
    cfg = cfg or publish_config(manifest)
    if dest.exists() and any(dest.iterdir()) and not (dest / MARKER).exists():
        raise KdataError(
            f"{dest} exists and is not a folder kdata wrote; choose another publish dir "
            "or remove it"
        )
    base_dir = Path(manifest.get("base_dir") or Path(manifest.get("recipe_path") or ".").parent)
    template = cfg.template_text(base_dir)
    tmp = dest.with_name(dest.name + ".kdata-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "kdata").mkdir(parents=True)
        shards, rows, columns = _write_shards(run_dir, tmp / "data", cfg.split)
        recipe = published_recipe(manifest)
        recipe_text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
        (tmp / "kdata" / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        _write_stats(run_dir, manifest, tmp / MARKER, rows)
        plots, loss = _copy_reports(run_dir, tmp)
        context = card_context(
            run_dir,
            manifest,
            cfg,
            repo_id=repo_id,
            data_files=shards,
            rows=rows,
            columns=columns,
            diversity_plots=plots,
            validation_plot=loss,
        )
        card = render_card(context, template, cfg, rows)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())


def _write_shards(run_dir: Path, folder: Path, split: str) -> tuple[list[Path], int, dict]:
    """Copy the run's shards into ``folder`` under the split's name."""
    import pyarrow.parquet as pq

    from kdata.blocks import dataset_files

    shards = dataset_files(run_dir)
    if not shards:
        raise KdataError(f"{run_dir} has no final dataset in data/; run kdata build first")
    folder.mkdir(parents=True)
    paths, n = [], len(shards)
    for k, shard in enumerate(shards):
        paths.append(folder / f"{split}-{k:05d}-of-{n:05d}.parquet")
        shutil.copyfile(shard, paths[-1])
    rows = sum(pq.read_metadata(p).num_rows for p in shards)
    columns = {f.name: str(f.type) for f in pq.read_schema(shards[0])}
    return paths, rows, columns


def _write_stats(run_dir: Path, manifest: dict, path: Path, rows: int) -> None:
    steps = []
    for m in manifest["steps"]:
        try:
            stats = json.loads((run_dir / "steps" / m["name"] / "stats.json").read_text("utf-8"))
        except (OSError, ValueError):
            stats = m.get("stats")
        steps.append({"name": m["name"], "type": m["type"], "stats": stats})
    stats = {
        "recipe": manifest["recipe"]["name"],
        "kdata_version": manifest.get("kdata_version"),
        "versions": manifest.get("versions"),
        "rows": rows,
        "steps": steps,
        "teachers": manifest.get("teachers"),
        "cost_usd_total": manifest.get("cost_usd_total"),
    }
    path.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_reports(run_dir: Path, tmp: Path) -> tuple[dict[str, str], str | None]:
    """Copy the diversity and validation reports and plots that the run has.

    Returns:
        The diversity plots copied (name -> path in the folder) and the validation loss plot.
    """
    root = run_dir.resolve()

    def copy(rel: str) -> bool:
        src = (run_dir / rel).resolve()
        if not src.is_file() or not src.is_relative_to(root):
            return False
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / rel)
        return True

    plots: dict[str, str] = {}
    if copy("diversity/report.json"):
        report = json.loads((run_dir / "diversity" / "report.json").read_text("utf-8"))
        for name, rel in sorted((report.get("plots") or {}).items()):
            if isinstance(rel, str) and copy(rel):
                plots[name] = rel
    copy("validation/report.json")
    return plots, "validation/loss.png" if copy("validation/loss.png") else None
