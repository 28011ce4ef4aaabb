"""SFT validation: does the curated dataset make a better student than uncurated data?

`validate_run` trains one student twice with trl's ``SFTTrainer``, with the same seed, steps and
batch size: on the run's final (curated) rows and on a **baseline** of equal size drawn from the
rows before curation. Both students answer a held-out set, decontaminated against the training
rows, and are scored on loss of the reference answers, ROUGE-L of their greedy answers against the
references and, for verifiable answers, exact match. The difference between the arms comes with a
95% paired-bootstrap confidence interval over eval items.

It writes ``RUN_DIR/validation/``: ``report.json``, ``loss.png`` (both training-loss curves) and
``section.md`` (the dataset card's validation section).

Needs the ``sft`` extra (trl, torch, transformers, gguf).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from jinja2 import TemplateError
from pydantic import Field, model_validator

from kdata.answers import answers_match, extract_answer, rouge_l
from kdata.blocks import read_table
from kdata.errors import KdataError, TeacherError
from kdata.steps.base import _JINJA, PROVENANCE, StepContext, StrictModel, Template, gather_requests
from kdata.steps.decontaminate import ngram_hashes
from kdata.steps.feedback import InvalidOutput, PairJudge

TINY = "tiny"
# Dense bf16 peak FLOP/s by GPU name, for model FLOPs utilisation (vendor datasheet figures).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
BOOTSTRAP_SAMPLES = 2000
# What the report leaves out of the config: templates (the recipe records them).
_TEMPLATES = {"prompt": True, "response": True, "eval": True, "judge": {"pairwise_prompt"}}


class EvalSet(StrictModel):
    """The held-out items: a file the recipe names, or ``holdout`` prompts split off the baseline
    pool (removed from both arms' training rows)."""

    path: str | None = None
    holdout: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)
    prompt: Template | None = None  # default: the training prompt template
    reference: Template | None = None  # default: the training response template

    @model_validator(mode="after")
    def _one_source(self) -> EvalSet:
        if (self.path is None) == (self.holdout is None):
            raise ValueError("give exactly one of path (an eval file) or holdout (a row count)")
        return self


class DpoConfig(StrictModel):
    """``validate.dpo``: train the curated arm's student further with trl's DPOTrainer on the
    preference pairs of a ``preferences`` step (default: the recipe's last one)."""

    step: str | None = None
    max_steps: int = Field(default=50, ge=1)
    beta: float = Field(default=0.1, gt=0)
    learning_rate: float = Field(default=1e-6, gt=0)


class ValidationConfig(StrictModel):
    """The recipe's ``validate:`` section."""

    student: str = TINY
    prompt: Template = "{{ instruction }}"
    response: Template = "{{ response }}"
    messages: str | None = None  # a column of chat messages, trained on instead of the two above
    eval: EvalSet
    baseline: Literal["sample", "first"] = "sample"
    baseline_step: str | None = None
    exact_match: bool = False
    max_steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0)
    max_length: int = Field(default=512, ge=16)
    packing: bool = False
    max_new_tokens: int = Field(default=256, ge=1)
    seed: int = 0
    dpo: DpoConfig | None = None
    judge: PairJudge | None = None


@dataclass
class Pair:
    """One training or eval item: a prompt and its response (or reference answer), after the
    ``context`` turns of a conversation (a system prompt, earlier turns) when it has any."""

    prompt: str
    response: str
    context: list[dict[str, str]] = field(default_factory=list)

    def chat(self) -> list[dict[str, str]]:
        """The messages the student answers: the context, then the prompt as the user's turn."""
        return [*self.context, {"role": "user", "content": self.prompt}]


def validate_run(
    run_dir: str | Path,
    config: ValidationConfig | None = None,
    base_dir: Path | None = None,
    student: str | None = None,
) -> dict[str, Any]:
    """Train the student on both arms, evaluate, and write ``RUN_DIR/validation/``.

    ``config`` defaults to the ``validate:`` section of the recipe recorded in the run's
    manifest; ``base_dir`` (for the eval file) to the recorded recipe's folder. ``student``
    replaces the config's student (the same data checked with another model, or on a machine
    where the model lives elsewhere).

    Returns:
        The report (also written as ``validation/report.json``).
    """
    run_dir = Path(run_dir)
    manifest = _manifest(run_dir)
    if config is None or base_dir is None:
        recorded, recorded_base = _recorded_config(manifest)
        config = config or recorded
        base_dir = base_dir or recorded_base
    if student is not None:
        config = config.model_copy(update={"student": student})
    curated_rows = pq.read_table(run_dir / "data").to_pylist()
    step = config.baseline_step or _baseline_step(manifest)
    pool_rows = _generated_rows(run_dir / "steps" / step)

    if config.messages is not None:
        curated, skipped_c = _conversations(curated_rows, config.messages)
        pool, skipped_p = _conversations(pool_rows, config.messages)
    else:
        curated, skipped_c = _pairs(curated_rows, config.prompt, config.response)
        pool, skipped_p = _pairs(pool_rows, config.prompt, config.response)
    prefs, pref_step = [], None
    if config.dpo:
        prefs, pref_step = _preference_pairs(run_dir, manifest, config.dpo)
    if config.eval.holdout is not None:
        eval_items, held = _holdout(pool, config.eval.holdout, config.seed)
        curated = [p for p in curated if p.prompt not in held]
        pool = [p for p in pool if p.prompt not in held]
        prefs = [p for p in prefs if _last_user(p["prompt"]) not in held]
        eval_source = f"{config.eval.holdout} prompts held out of step {step}"
    else:
        eval_items = _eval_file(config, base_dir)
        eval_source = config.eval.path
    if not curated:
        raise KdataError(f"{run_dir}: the curated dataset has no usable rows to train on")
    if config.dpo and not prefs:
        raise KdataError(f"step {pref_step}: no preference pairs left once the eval items are out")
    baseline = _baseline(pool, len(curated), config.baseline, config.seed)
    pref_prompts = [Pair(_last_user(p["prompt"]), "") for p in prefs]
    eval_items, contaminated = _decontaminate(eval_items, curated + baseline + pref_prompts)
    if not eval_items:
        raise KdataError("no eval items left after decontamination against the training rows")

    from kdata import sft

    base_model, tokenizer = sft.load_student(config.student, config.seed)
    arms = {}
    for arm, pairs in (("curated", curated), ("baseline", baseline)):
        model = copy.deepcopy(base_model)
        arms[arm] = sft.train_and_evaluate(model, tokenizer, pairs, eval_items, config)
        arms[arm]["rows"] = len(pairs)
        if arm == "curated" and config.dpo:
            arms["dpo"] = sft.dpo_and_evaluate(model, tokenizer, prefs, eval_items, config)
            arms["dpo"]["rows"] = len(prefs)
        del model
    for arm in arms.values():
        arm["scores"] = _score(arm["answers"], eval_items, config.exact_match)
        arm["scores"]["loss"] = arm.pop("eval_losses")
    report = {
        "student": config.student,
        "student_parameters": sft.parameter_count(base_model),
        "device": sft.device_name(),
        "config": config.model_dump(mode="json", exclude=_TEMPLATES),
        "data": {
            "curated_rows": len(curated),
            "baseline_rows": len(baseline),
            "baseline": f"{config.baseline} of {len(pool)} rows from step {step}",
            "rows_without_columns": {"curated": skipped_c, "baseline_pool": skipped_p},
            "eval": eval_source,
            "eval_items": len(eval_items),
            "eval_removed_as_contaminated": contaminated,
        },
        "arms": {name: _summary(arm) for name, arm in arms.items()},
        "difference": _differences(arms["curated"]["scores"], arms["baseline"]["scores"]),
    }
    comparisons = [("curated", "baseline")]
    if config.dpo:
        report["data"]["preference_pairs"] = f"{len(prefs)} pairs from step {pref_step}"
        report["dpo_difference"] = _differences(
            arms["dpo"]["scores"], arms["curated"]["scores"], "dpo_minus_sft"
        )
        comparisons.append(("dpo", "curated"))
    if config.judge:
        answers = {name: arm["answers"] for name, arm in arms.items()}
        report["judge"] = judge_win_rates(
            run_dir, manifest, config.judge, eval_items, answers, comparisons
        )
    out = run_dir / "validation"
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    keep = ("log", "scores", "answers")
    (out / "arms.json").write_text(
        json.dumps({n: {k: a[k] for k in keep} for n, a in arms.items()}) + "\n",
        encoding="utf-8",
    )
    _plot_losses(arms, out / "loss.png")
    (out / "section.md").write_text(section_markdown(report), encoding="utf-8")
    return report


def _manifest(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdataError(f"{run_dir} is not a run directory (no manifest.json)") from None


def _recorded_config(manifest: dict) -> tuple[ValidationConfig, Path]:
    section = manifest["recipe"].get("validate")
    if section is None:
        raise KdataError("the run's recipe has no validate: section; add one and rebuild")
    base = Path(manifest.get("base_dir") or Path(manifest.get("recipe_path") or ".").parent)
    return ValidationConfig.model_validate(section, context={"base_dir": base}), base


def _baseline_step(manifest: dict) -> str:
    """The step whose output enters the first step that curates (a filter, dedup...)."""
    from kdata.recipe import STEP_TYPES

    steps = manifest["steps"]
    for i, s in enumerate(steps):
        if STEP_TYPES[s["type"]].curates:
            if i == 0:
                break
            return steps[i - 1]["name"]
    raise KdataError(
        "the recipe has no curation step after a generating step, so there is no baseline to "
        "compare with; name one with validate.baseline_step"
    )


def _generated_rows(folder: Path) -> list[dict]:
    """Everything a step made: its kept rows and the rows it dropped itself (rejection sampling
    drops generated rows, which belong to the uncurated pool)."""
    if not (folder / "stats.json").exists():
        raise KdataError(f"no rows for baseline step {folder.name} in {folder.parent}")
    rows = read_table(folder).to_pylist()
    for d in read_table(folder, "dropped").to_pylist():
        row = json.loads(d["row"]) if d["row"] is not None else {}  # None: a row of its input
        if row.get(PROVENANCE, {}).get("step") == folder.name:
            rows.append(row)
    return rows


def _preference_pairs(run_dir: Path, manifest: dict, dpo: DpoConfig) -> tuple[list[dict], str]:
    """The kept rows of the ``preferences`` step (``prompt``, ``chosen``, ``rejected`` as
    messages) and the step's name."""
    prefs = [s["name"] for s in manifest["steps"] if s["type"] == "preferences"]
    step = dpo.step or (prefs[-1] if prefs else None)
    if step is None:
        raise KdataError(
            "validate.dpo needs preference pairs, but the recipe has no preferences step"
        )
    if step not in prefs:
        raise KdataError(
            f"validate.dpo.step '{step}' is not a preferences step of the recipe "
            f"(its preferences steps: {prefs or 'none'})"
        )
    folder = run_dir / "steps" / step
    if not (folder / "stats.json").exists():
        raise KdataError(f"step {step} has no rows in {run_dir}; did the build finish?")
    rows = read_table(folder, columns=["prompt", "chosen", "rejected"]).to_pylist()
    if not rows:
        raise KdataError(f"step {step} made no preference pairs to train DPO on")
    return rows, step


def _last_user(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user").strip()


def _pairs(rows: list[dict], prompt: str, response: str) -> tuple[list[Pair], int]:
    """(pairs, rows skipped because the templates need a column they lack or render empty)."""
    p_t, r_t = _JINJA.from_string(prompt), _JINJA.from_string(response)
    out, skipped = [], 0
    for row in rows:
        ctx = {k: v for k, v in row.items() if k != PROVENANCE}
        try:
            pair = Pair(p_t.render(ctx).strip(), r_t.render(ctx).strip())
        except TemplateError:  # StrictUndefined: a missing column
            skipped += 1
            continue
        if pair.prompt and pair.response:
            out.append(pair)
        else:
            skipped += 1
    return out, skipped


def _conversations(rows: list[dict], column: str) -> tuple[list[Pair], int]:
    """One pair per row of chat messages: its last assistant turn, given the turns before it
    (role and content; a turn's reasoning trace is left out). Skipped: rows without such a
    column or without a user turn before their last assistant turn."""
    out, skipped = [], 0
    for row in rows:
        turns = [
            {"role": m.get("role"), "content": str(m.get("content") or "").strip()}
            for m in (row.get(column) or [])
            if isinstance(m, dict)
        ]
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=0)
        if last == 0 or turns[last - 1]["role"] != "user" or not turns[last]["content"]:
            skipped += 1
            continue
        out.append(Pair(turns[last - 1]["content"], turns[last]["content"], turns[: last - 1]))
    return out, skipped


def _holdout(pool: list[Pair], n: int, seed: int) -> tuple[list[Pair], set[str]]:
    prompts = sorted({p.prompt for p in pool}, key=lambda s: _key(seed, s))
    if len(prompts) <= n:
        raise KdataError(f"holdout {n} leaves nothing to train on ({len(prompts)} prompts)")
    held = set(prompts[:n])
    first: dict[str, Pair] = {}
    for p in pool:
        if p.prompt in held:
            first.setdefault(p.prompt, p)
    return [first[s] for s in prompts[:n]], held


def _eval_file(config: ValidationConfig, base_dir: Path) -> list[Pair]:
    from kdata.blocks import BadRecord
    from kdata.steps.sources import SeedsStep

    records = SeedsStep(path=config.eval.path).records(base_dir)
    rows = [r for r in records if not isinstance(r, BadRecord)][: config.eval.limit]
    items, _ = _pairs(
        rows, config.eval.prompt or config.prompt, config.eval.reference or config.response
    )
    return items


def _key(seed: int, text: str) -> str:
    return hashlib.sha1(f"{seed}\x1f{text}".encode()).hexdigest()


def _baseline(pool: list[Pair], n: int, how: str, seed: int) -> list[Pair]:
    if len(pool) < n:
        raise KdataError(
            f"the baseline pool has {len(pool)} rows, fewer than the {n} curated rows; "
            "the arms would not be of equal size"
        )
    if how == "first":
        return pool[:n]
    return random.Random(seed).sample(pool, n)


def _decontaminate(items: list[Pair], train: list[Pair], n: int = 13) -> tuple[list[Pair], int]:
    """Drop eval items whose prompt shares a word ``n``-gram with a training prompt."""
    seen: set[int] = set()
    for p in train:
        seen |= ngram_hashes(p.prompt, n)
    kept = [it for it in items if not (ngram_hashes(it.prompt, n) & seen)]
    return kept, len(items) - len(kept)


def _score(answers: list[str], items: list[Pair], exact: bool) -> dict[str, list[float]]:
    scores = {"rouge_l": [rouge_l(a, it.response) for a, it in zip(answers, items, strict=True)]}
    if exact:
        scores["exact_match"] = [
            float(answers_match(extract_answer(a), extract_answer(it.response)))
            for a, it in zip(answers, items, strict=True)
        ]
    return scores


def _summary(arm: dict) -> dict:
    out = {k: v for k, v in arm.items() if k not in ("log", "scores", "answers")}
    out["metrics"] = {k: _mean(v) for k, v in arm["scores"].items()}
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def bootstrap_ci(
    a: list[float], b: list[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of the paired differences ``a - b`` and its 95% percentile-bootstrap interval."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return _mean(diffs), means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def _differences(a: dict, b: dict, key: str = "curated_minus_baseline") -> dict:
    out = {}
    for metric in a:
        mean, lo, hi = bootstrap_ci(a[metric], b[metric])
        better = "lower" if metric == "loss" else "higher"
        out[metric] = {key: mean, "ci95": [lo, hi], "better": better}
    return out


def judge_win_rates(
    run_dir: Path,
    manifest: dict,
    judge: PairJudge,
    items: list[Pair],
    answers: dict[str, list[str]],
    comparisons: list[tuple[str, str]],
) -> dict:
    """For each comparison ``(a, b)``, how often the judge prefers arm ``a``'s answer.

    Every eval item is judged in both orders (`PairJudge.compare`): a win counts 1, a loss 0, a
    tie or a verdict that flips with the order 0.5. Identical answers are a tie without asking.
    A judgement that fails (the teacher, or no valid JSON after the retries) is left out and
    counted by its error class. Requests go through the run's cache, so a rerun costs nothing.
    """
    from tqdm.auto import tqdm

    from kdata.recipe import Recipe
    from kdata.teachers.cache import RequestCache
    from kdata.teachers.pool import TeacherPool

    recipe = Recipe.model_validate(manifest["recipe"])
    cache = RequestCache(run_dir / "cache.sqlite")
    pool = TeacherPool(recipe.teachers, cache, recipe.budget_usd)
    ctx = StepContext(name="validate", base_dir=run_dir, pool=pool)
    bar = tqdm(total=len(items) * len(comparisons), desc="judge", disable=None)

    def same(a: str, b: str, i: int) -> bool:
        return answers[a][i].strip() == answers[b][i].strip()

    async def one(a: str, b: str, i: int) -> float | str:
        """The score of ``a``'s answer to item ``i``, or the error class of a failed judgement."""
        key = f"validate:{a}:{b}:{i}"
        variables = {"instruction": items[i].prompt, "reference": items[i].response}
        try:
            if same(a, b, i):
                return 0.5
            pair = (answers[a][i], answers[b][i])
            score, _ = await judge.compare(ctx, variables, *pair, (f"{key}:ab", f"{key}:ba"))
            return score
        except TeacherError as e:
            return e.error_class
        except InvalidOutput:
            return "invalid_output"
        except TemplateError:
            return "template"
        finally:
            bar.update()

    async def run_all() -> list[list[float | str]]:
        units = [[one(a, b, i) for i in range(len(items))] for a, b in comparisons]
        try:
            return await gather_requests(gather_requests(u) for u in units)
        finally:
            await pool.aclose()

    try:
        results = asyncio.run(run_all())
    finally:
        bar.close()
        cache.close()
    out = {**judge.model_dump(mode="json", include={"teacher", "rubric"}), "comparisons": {}}
    for (a, b), outcomes in zip(comparisons, results, strict=True):
        scores = [o for o in outcomes if not isinstance(o, str)]
        summary = {
            "judged": len(scores),
            "wins": scores.count(1.0),
            "ties": scores.count(0.5),
            "losses": scores.count(0.0),
            "identical_answers": sum(same(a, b, i) for i in range(len(items))),
            "failed": dict(Counter(o for o in outcomes if isinstance(o, str))),
        }
        if scores:
            rate, lo, hi = bootstrap_ci(scores, [0.0] * len(scores))
            summary |= {"win_rate": rate, "ci95": [lo, hi]}
        out["comparisons"][f"{a}_vs_{b}"] = summary
    return out


def _plot_losses(arms: dict, path: Path) -> None:
    """The SFT arms' training losses; the DPO loss (another scale) in a panel of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [["curated", "baseline"]] + ([["dpo"]] if "dpo" in arms else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), dpi=100, squeeze=False)
    for ax, names in zip(axes[0], panels, strict=True):
        for name in names:
            log = arms[name]["log"]
            ax.plot([e["step"] for e in log], [e["loss"] for e in log], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("DPO loss" if names == ["dpo"] else "SFT training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def section_markdown(report: dict) -> str:
    """The dataset card's validation section."""
    d, arms = report["data"], report["arms"]
    lines = [
        "## Validation: does the curation make a better student?",
        "",
        f"The student `{report['student']}` ({report['student_parameters']:,} parameters) was "
        f"fine-tuned twice with trl's SFTTrainer, same seed, {report['config']['max_steps']} "
        f"steps of {report['config']['batch_size']} sequences: on the {d['curated_rows']} curated "
        f"rows, and on a baseline of {d['baseline_rows']} rows ({d['baseline']}). Both answered "
        f"{d['eval_items']} held-out items ({d['eval']}; {d['eval_removed_as_contaminated']} "
        "removed for overlapping the training rows). Intervals are 95% paired-bootstrap "
        "intervals over eval items.",
        "",
        *_metric_table(report["difference"], arms, "curated", "baseline", "curated_minus_baseline"),
    ]
    if "dpo_difference" in report:
        dpo = report["config"]["dpo"]
        lines += [
            "",
            f"The curated student was then trained with trl's DPOTrainer for {dpo['max_steps']} "
            f"steps (beta {dpo['beta']}) on {d['preference_pairs']}:",
            "",
            *_metric_table(report["dpo_difference"], arms, "dpo", "curated", "dpo_minus_sft"),
        ]
    if "judge" in report:
        lines += ["", *_judge_lines(report["judge"])]
    c = arms["curated"]
    lines += [
        "",
        f"Compute: {report['device']}; curated arm {c['train_tokens']:,} training tokens in "
        f"{c['train_seconds']:.1f} s ({c['tokens_per_second']:,.0f} tokens/s"
        + (f", MFU {c['mfu']:.1%}" if c.get("mfu") is not None else "")
        + ").",
        "",
        "![training loss](validation/loss.png)",
        "",
    ]
    return "\n".join(lines)


def _metric_table(diffs: dict, arms: dict, a: str, b: str, key: str) -> list[str]:
    lines = [
        f"| metric | {a} | {b} | {a} − {b} (95% CI) | better |",
        "| --- | --- | --- | --- | --- |",
    ]
    for metric, diff in diffs.items():
        lo, hi = diff["ci95"]
        lines.append(
            f"| {metric} | {arms[a]['metrics'][metric]:.4f} | {arms[b]['metrics'][metric]:.4f} "
            f"| {diff[key]:+.4f} ({lo:+.4f}, {hi:+.4f}) | {diff['better']} |"
        )
    return lines


def _judge_lines(judge: dict) -> list[str]:
    teacher = judge["teacher"] if isinstance(judge["teacher"], str) else "a teacher mix"
    lines = [
        f"A judge (`{teacher}`, rubric {judge['rubric']}) compared the answers pairwise, each "
        "pair in both orders; a verdict that flips with the order counts as a tie.",
        "",
        "| comparison | win rate (95% CI) | wins / ties / losses | not judged |",
        "| --- | --- | --- | --- |",
    ]
    for name, c in judge["comparisons"].items():
        rate = (
            f"{c['win_rate']:.3f} ({c['ci95'][0]:.3f}, {c['ci95'][1]:.3f})"
            if "win_rate" in c
            else "n/a"
        )
        failed = ", ".join(f"{k} {v}" for k, v in c["failed"].items()) or "0"
        lines.append(
            f"| {name.replace('_vs_', ' vs ')} | {rate} "
            f"| {c['wins']} / {c['ties']} / {c['losses']} | {failed} |"
        )
    return lines
