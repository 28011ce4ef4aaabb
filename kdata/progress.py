"""Rich progress and summaries for builds: rows per step, calls in flight, tokens, dollars, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from kdata.runner import Run, StepStats


class RichReporter:
    """Draws a progress bar per step, with the teacher pool's live figures beside it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[live]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def step_started(self, name: str, type: str, total: int | None) -> None:
        self.task = self.progress.add_task(f"{name}", total=total, live="")

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def advance(self, n: int, in_flight: int, tokens: int, cost_usd: float) -> None:
        live = f"in flight {in_flight} · {tokens:,} tok · ${cost_usd:.4f}"
        self.progress.update(self.task, advance=n, live=live)

    def step_finished(self, stats: StepStats) -> None:
        note = "reused" if stats.reused else f"{stats.seconds:.1f}s"
        self.progress.update(
            self.task,
            total=stats.expected,
            completed=stats.expected,
            live=f"{stats.rows_out} rows · {note}",
        )


def summary_table(run: Run) -> Table:
    """Rows in/out/dropped/failed per step, calls, cache hits and cost."""
    t = Table(title=f"kdata run: {run.dir} ({run.status})")
    for col in ("step", "in", "out", "dropped", "failed", "requests", "cache hits", "cost $", ""):
        t.add_column(col, justify="left" if col in ("step", "") else "right")
    for s in run.steps:
        why = ", ".join(f"{k}: {v}" for k, v in {**s.failure_classes, **s.drop_reasons}.items())
        t.add_row(
            f"{s.name}",
            str(s.rows_in),
            str(s.rows_out),
            str(s.dropped),
            str(s.failed),
            str(s.requests),
            str(s.cache_hits),
            f"{s.cost_usd:.4f}",
            ("reused " if s.reused else "") + why,
        )
    return t
