"""The ``kdata`` command: build, validate, inspect, rethreshold, push, validate-sft."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdata.errors import BudgetExceeded, KdataError, RecipeError, RunLocked
from kdata.storage import local_copy

app = typer.Typer(
    name="kdata",
    help="Build curated knowledge-distillation datasets from teacher LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)

RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)]


def _load(recipe: Path):
    from kdata.recipe import load_recipe

    try:
        return load_recipe(recipe)
    except KdataError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def validate(recipe: RecipeArg) -> None:
    """Check a recipe without calling any teacher or writing anything."""
    r = _load(recipe)
    try:
        r.check_runtime()
    except KdataError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    out.print(
        f"[green]ok[/green] {recipe}: {len(r.steps)} steps, "
        f"teachers {', '.join(r.used_teachers()) or '(none)'}"
    )


def _with_execution(r, executor: str | None, address: str | None):
    """The recipe with ``--executor`` and ``--address`` in its ``execution`` section."""
    from pydantic import ValidationError

    from kdata.recipe import Execution

    fields = r.execution.model_dump()
    fields.update({k: v for k, v in (("executor", executor), ("address", address)) if v})
    if address and not executor:
        fields["executor"] = "ray"
    try:
        r.execution = Execution(**fields)
    except ValidationError as e:
        err.print(f"[red]error:[/red] --executor: {e.errors()[0]['msg']}", highlight=False)
        raise typer.Exit(2) from None
    return r


def _print_plan(p, title: str) -> None:
    """The dry run's table: per step rows, calls, tokens and dollars; then totals and notes."""
    t = Table(title=title)
    heads = ("step", "type", "rows (at most)", "teacher calls (cached)", "prompt tokens")
    for col in (*heads, "completion tokens", "USD online", "USD batch", "teachers"):
        t.add_column(col, justify="left" if col in ("step", "type", "teachers") else "right")

    def span(a: float, b: float, money: bool = False) -> str:
        f = (lambda x: f"{x:,.4f}") if money else (lambda x: f"{x:,.0f}")
        return f(a) if f(a) == f(b) else f"{f(a)} - {f(b)}"

    for s in p.steps:
        t.add_row(
            s.step + (" *" if s.bound else ""),
            s.type,
            f"{s.rows:,}",
            f"{s.calls:,} ({s.cached:,})" if s.teachers else "",
            span(s.prompt_tokens_expected, s.prompt_tokens_worst) if s.teachers else "",
            span(s.completion_tokens_expected, s.completion_tokens_worst) if s.teachers else "",
            span(s.usd_expected, s.usd_worst, True) if s.teachers else "",
            span(s.batch_usd_expected, s.batch_usd_worst, True) if s.teachers else "",
            ", ".join(s.teachers),
        )
    out.print(t)
    cached = sum(s.cached for s in p.steps)
    lines = [
        f"{p.calls} teacher calls at most, {cached} of them answered by the run's cache "
        "(responses already in the run's cache are not sent again)",
        f"USD: expected {p.usd_expected:.4f}, at most {p.usd_worst:.4f} online; "
        f"expected {p.usd_expected / 2:.4f}, at most {p.usd_worst / 2:.4f} through a batch API",
        "ranges: expected - worst case (completions at max_tokens)",
    ]
    if any(s.bound for s in p.steps):
        lines.append(
            "* bounds: calls not rendered from rows known before the run (rows teachers make, "
            "later turns or rounds) are counted at their fan-out's most"
        )
    if p.unpriced:
        lines.append(f"no known price, counted as free: {', '.join(p.unpriced)}")
    for line in lines + p.notes:
        out.print(line, soft_wrap=True, highlight=False)


@app.command()
def build(
    recipe: RecipeArg,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan: calls, tokens and dollars; send and write nothing."
        ),
    ] = False,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Run directory, a path or a URL (overrides output.dir)."
        ),
    ] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor", help="local or ray (overrides execution.executor).", show_default=False
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster to join (overrides execution.address).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a recipe; rerunning resumes where the last run stopped."""
    from kdata.progress import reporter, summary_table
    from kdata.runner import build as run_build

    r = _load(recipe)
    if executor is not None or address is not None:
        r = _with_execution(r, executor, address)
    if dry_run:
        from kdata.planning import plan

        try:
            p = plan(r, run_dir=output)
        except KdataError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2) from None
        _print_plan(p, f"plan: {recipe} -> {output or r.run_dir}")
        return
    try:
        with reporter(err) as progress:
            run = run_build(r, run_dir=output, reporter=progress)
    except BudgetExceeded as e:
        run = getattr(e, "run", None)
        if run is not None:
            out.print(summary_table(run))
        err.print(
            f"[yellow]stopped:[/yellow] {e}. Every response received is stored; "
            "raise budget_usd and run the same command to resume.",
            highlight=False,
        )
        raise typer.Exit(3) from None
    except KeyboardInterrupt:
        err.print(
            "[yellow]interrupted:[/yellow] every response received is stored; "
            "run the same command to resume."
        )
        raise typer.Exit(130) from None
    except RunLocked as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(4) from None
    except KdataError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2 if isinstance(e, RecipeError) else 1) from None
    out.print(summary_table(run))
    total_failed = sum(s.failed for s in run.steps)
    where = f"{run.url}/data (stage: {run.dataset_path})" if run.url else run.dataset_path
    out.print(
        f"dataset: {where} ({run.steps[-1].rows_out} rows); "
        f"spent ${run.cost_usd_total:.4f} in all"
        + (f"; {total_failed} failed (see steps/*/failed/)" if total_failed else ""),
        soft_wrap=True,
    )
    if r.validation is not None:
        out.print(f"this recipe has a validate: section: kdata validate-sft {run.dir}")


@app.command()
def rethreshold(
    run_dir: Annotated[
        str, typer.Argument(help="A run directory, a path or a URL.", show_default=False)
    ],
    step: Annotated[
        str,
        typer.Option(
            help="The step to re-cut: minhash_dedup, semantic_dedup, or filter with min_score.",
            show_default=False,
        ),
    ],
    threshold: Annotated[
        float,
        typer.Option(
            help="The new threshold (for a filter, the min_score value).", show_default=False
        ),
    ],
) -> None:
    """Re-cut a dedup step or score filter from what the run stored, and rebuild the steps after
    it; no teacher request, no hashing or embedding."""
    from kdata.progress import reporter, summary_table
    from kdata.rethreshold import recut_recipe
    from kdata.runner import build as run_build

    try:
        recipe = recut_recipe(local_copy(run_dir)[0], step, threshold)
    except KdataError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    try:
        with reporter(err) as progress:
            run = run_build(recipe, run_dir=run_dir, reporter=progress, cache_only=True)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: run the same command to finish the re-cut.")
        raise typer.Exit(130) from None
    except RunLocked as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(4) from None
    except KdataError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    out.print(summary_table(run))
    out.print(
        f"dataset: {run.dataset_path} ({run.steps[-1].rows_out} rows), {step} at {threshold}",
        soft_wrap=True,
    )
    missing = sum(s.failure_classes.get("not_cached", 0) for s in run.steps)
    if missing:
        out.print(
            f"[yellow]{missing} rows failed as not_cached[/yellow]: their teacher responses were "
            f"never fetched; set this threshold in the recipe and run kdata build to fetch them"
        )


@app.command()
def inspect(
    where: Annotated[
        str, typer.Argument(help="A run directory, a path or a URL.", show_default=False)
    ],
    rows: Annotated[int, typer.Option("--rows", "-n", help="Sample rows to show.")] = 3,
    dropped: Annotated[
        str | None,
        typer.Option("--dropped", help="Show this step's dropped rows, with reason and detail."),
    ] = None,
) -> None:
    """Show a run's stats and sample rows."""
    from kdata.blocks import dataset_files
    from kdata.progress import summary_table
    from kdata.runner import Run, StepStats

    try:
        run_dir = local_copy(where)[0]
    except KdataError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        err.print(f"[red]error:[/red] {run_dir} is not a kdata run directory (no manifest.json)")
        raise typer.Exit(2) from None
    steps = [StepStats(**m["stats"]) for m in manifest["steps"] if m.get("stats")]
    run = Run(
        dir=run_dir,
        status=manifest.get("status", "?"),
        steps=steps,
        ledger=manifest.get("ledger", {}),
        cost_usd_total=manifest.get("cost_usd_total", 0),
    )
    out.print(summary_table(run))
    for name, tot in manifest.get("teachers", {}).items():
        out.print(
            f"teacher {name}: {tot['responses']} responses stored, "
            f"{tot['prompt_tokens']}+{tot['completion_tokens']} tokens, ${tot['cost_usd']:.4f}"
        )
    for name, led in run.ledger.items():
        if led["failures"]:
            out.print(f"teacher {name}, last build: failures {led['failures']}")
    shards = dataset_files(run_dir)
    if shards and rows > 0:
        import pyarrow.parquet as pq

        n = sum(pq.read_metadata(p).num_rows for p in shards)
        first = pq.ParquetFile(shards[0])
        columns = ", ".join(first.schema_arrow.names)
        out.print(
            f"dataset: {run_dir / 'data'} ({n} rows in {len(shards)} shards; columns: {columns})"
        )
        sample = next(first.iter_batches(batch_size=rows), None)
        for row in sample.to_pylist() if sample is not None else []:
            row.pop("_kdata", None)
            out.print_json(json.dumps(row, default=str, ensure_ascii=False))
    if dropped is not None:
        from kdata.blocks import read_dropped

        if not (run_dir / "steps" / dropped / "stats.json").exists():
            err.print(f"[red]error:[/red] no finished step '{dropped}' in {run_dir}")
            raise typer.Exit(2)
        records = read_dropped(run_dir / "steps" / dropped)  # rows joined from the step's input
        out.print(f"step {dropped}: {len(records)} dropped")
        for d in records[:rows]:
            row = json.loads(d["row"]) if d["row"] else {}
            row.pop("_kdata", None)
            detail = json.loads(d["detail"] or "{}")
            out.print_json(json.dumps({"reason": d["reason"], "detail": detail, "row": row}))


@app.command("validate-sft")
def validate_sft(
    where: Annotated[
        str, typer.Argument(help="A run directory, a path or a URL.", show_default=False)
    ],
    student: Annotated[
        str | None, typer.Option("--student", help="Another student than validate.student.")
    ] = None,
) -> None:
    """Train the recipe's student on the curated rows and on an uncurated baseline; compare.

    Uses the validate: section of the recipe recorded in the run. Writes RUN_DIR/validation/.
    """
    try:
        from kdata.validation import validate_run

        run_dir, remote = local_copy(where)
        report = validate_run(run_dir, student=student)
        if remote is not None:
            remote.sync("validation")
    except KdataError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    except ImportError as e:
        err.print(f"[red]error:[/red] {e}; SFT validation needs: pip install 'kdata[sft]'")
        raise typer.Exit(1) from None
    tables = [("curated", "baseline", "difference", "curated_minus_baseline")]
    if "dpo_difference" in report:
        tables.append(("dpo", "curated", "dpo_difference", "dpo_minus_sft"))
    arms = report["arms"]
    for a, b, section, key in tables:
        table = Table("metric", a, b, f"{a} - {b} (95% CI)", "better")
        for metric, d in report[section].items():
            lo, hi = d["ci95"]
            table.add_row(
                metric,
                f"{arms[a]['metrics'][metric]:.4f}",
                f"{arms[b]['metrics'][metric]:.4f}",
                f"{d[key]:+.4f} ({lo:+.4f}, {hi:+.4f})",
                d["better"],
            )
        out.print(table)
    for name, c in report.get("judge", {}).get("comparisons", {}).items():
        rate = (
            f"{c['win_rate']:.3f} ({c['ci95'][0]:.3f}, {c['ci95'][1]:.3f})"
            if c["judged"]
            else "n/a"
        )
        out.print(
            f"judge win rate, {name.replace('_vs_', ' vs ')}: {rate} over {c['judged']} items"
            + (f"; not judged: {c['failed']}" if c["failed"] else "")
        )
    out.print(f"report: {run_dir / 'validation' / 'report.json'} ({report['device']})")


@app.command()
def push(
    where: Annotated[
        str, typer.Argument(help="A finished run directory, a path or a URL.", show_default=False)
    ],
    repo: Annotated[
        str | None, typer.Option("--repo", help="USER/NAME (default: publish.repo_id).")
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository private.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write RUN_DIR/hub, the folder to push; send nothing.")
    ] = False,
) -> None:
    """Publish a run to the Hugging Face Hub as one commit (none when nothing changed)."""
    from kdata.publish import push as run_push

    try:
        res = run_push(local_copy(where)[0], repo_id=repo, private=private or None, dry_run=dry_run)
    except KdataError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    if dry_run:
        out.print(
            f"would push {len(res.files)} files to {res.repo_id}, written to {res.folder}:",
            soft_wrap=True,
            highlight=False,
        )
        for f in res.files:
            size = (res.folder / f).stat().st_size
            out.print(f"  {f} ({size:,} bytes)", soft_wrap=True, highlight=False)
    elif res.commit:
        out.print(
            f"pushed {res.repo_id}: commit {res.commit[:12]} "
            f"({len(res.uploaded)} files updated, {len(res.deleted)} removed) {res.url}",
            soft_wrap=True,
            highlight=False,
        )
    else:
        out.print(
            f"{res.repo_id} already holds this run (head {res.head[:12]}): no commit made",
            soft_wrap=True,
        )


if __name__ == "__main__":  # pragma: no cover
    app()
