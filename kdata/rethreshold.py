"""`rethreshold`: re-cut a finished run's dedup step or score filter at another threshold.

The run's recipe (from ``manifest.json``) is built again in the same run directory with the one
threshold changed, by the normal runner and with no teacher request:

- the steps before the re-cut one are unchanged, so they are reused as they are;
- a ``minhash_dedup`` or ``semantic_dedup`` step finds its stored neighbours (every pair at least
  ``floor`` similar, with what clustering needs, see `kdata.steps.dedup`) and clusters them at the
  new threshold, hashing and embedding nothing; a ``filter`` re-reads the scores in its input rows;
- the steps after it run again on the new rows; teacher steps are served from ``cache.sqlite``
  only, and a row whose response was never fetched fails with error class ``not_cached`` (a later
  ``kdata build`` of a recipe with that threshold fetches it).

So the new final dataset is the one a fresh build at the new threshold would make, wherever the
teacher responses it needs are stored. The manifest then records the recipe with the new threshold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdata.blocks import read_table
from kdata.errors import KdataError
from kdata.recipe import Recipe
from kdata.runner import Reporter, Run, build, fingerprints
from kdata.steps.base import StepContext
from kdata.steps.clusters import comparable, text_digest
from kdata.steps.dedup import MinHashDedupStep
from kdata.steps.filters import FilterStep
from kdata.steps.semantic import SemanticDedupStep


def rethreshold(
    run_dir: str | os.PathLike, step: str, threshold: float, *, reporter: Reporter | None = None
) -> Run:
    """Re-cut step ``step`` of the run in ``run_dir`` at ``threshold`` and rebuild what follows.

    Args:
        run_dir: a run directory whose build finished the step.
        step: the step's name (``NN_type`` or its ``name``): a ``minhash_dedup`` or
            ``semantic_dedup`` step (its ``threshold``) or a ``filter`` with ``min_score`` (its
            ``value``).
        threshold: the new threshold; for dedup steps at least the step's ``floor``.
        reporter: progress receiver (the CLI passes a rich one).

    Returns:
        The rebuilt run.

    Raises:
        KdataError: see `recut_recipe`.
    """
    recipe = recut_recipe(run_dir, step, threshold)
    return build(recipe, run_dir=run_dir, reporter=reporter, cache_only=True)


def recut_recipe(run_dir: str | os.PathLike, step: str, threshold: float) -> Recipe:
    """The run's recipe with ``step`` at ``threshold``, once the run can be re-cut there.

    Raises:
        KdataError: no such run or step, a step with nothing stored to re-cut, a threshold
            below the floor, or a step whose stored result no longer matches the run's recipe.
    """
    run_dir = Path(run_dir)
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise KdataError(f"{run_dir} is not a kdata run directory (no manifest.json)") from None
    recipe = Recipe.model_validate(manifest["recipe"])
    recipe._base_dir = Path(manifest.get("base_dir", "."))
    recipe._source_path = manifest.get("recipe_path")
    names = recipe.step_names()
    if step not in names:
        raise KdataError(f"no step '{step}' in {run_dir}; its steps: {', '.join(names)}")
    i = names.index(step)
    old = recipe.steps[i]
    if isinstance(old, MinHashDedupStep | SemanticDedupStep):
        if threshold < old.floor:
            raise KdataError(
                f"threshold {threshold} is below {step}'s floor {old.floor}: pairs less similar "
                f"than {old.floor} were not stored; set floor (and threshold) to {threshold} in "
                "the recipe and run kdata build, which finds them again"
            )
        update = {"threshold": threshold}
    elif isinstance(old, FilterStep) and old.min_score is not None:
        update = {"min_score": {"column": old.min_score.column, "value": threshold}}
    else:
        raise KdataError(
            f"step '{step}' ({old.type}) stores no similarities or scores to re-cut; rethreshold "
            "re-cuts minhash_dedup and semantic_dedup steps, and filter steps with min_score"
        )
    new = type(old).model_validate({**old.model_dump(exclude_unset=True), **update})
    folder = run_dir / "steps" / step
    try:
        done = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        done = {}
    if done.get("fingerprint") != fingerprints(recipe)[i]:
        raise KdataError(
            f"step '{step}' has no finished result in {run_dir} for the recipe recorded there "
            "(it did not run, or its inputs changed since); run kdata build first"
        )
    if isinstance(old, MinHashDedupStep | SemanticDedupStep):
        rows = read_table(run_dir / "steps" / names[i - 1]).to_pylist()
        texts = comparable(rows, old.columns, old.keep, old.score_column)[1]
        ctx = StepContext(name=step, base_dir=recipe.base_dir, pool=None, run_dir=run_dir)
        if not old.store_path([text_digest(t) for t in texts], ctx).exists():
            raise KdataError(
                f"step '{step}' has no stored neighbours in {run_dir / 'neighbours'} (the run was "
                "made by an older kdata, or they were deleted); run kdata build to find them"
            )
    steps = [*recipe.steps[:i], new, *recipe.steps[i + 1 :]]
    return recipe.model_copy(update={"steps": steps})
