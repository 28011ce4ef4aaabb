"""Progress and summaries for builds: rows per step, calls in flight, tokens, dollars, ETA.

On a terminal, rich bars (`RichReporter`); anywhere else (a file, a CI log, ``nohup``), plain
lines (`PlainReporter`): `reporter` picks.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TextIO

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

PLAIN_EVERY_S = 15.0  # seconds between plain progress lines; KDATA_PROGRESS_EVERY overrides it


def reporter(console: Console) -> RichReporter | PlainReporter:
    """Live bars when ``console`` is a terminal, plain periodic lines to its file otherwise."""
    if console.is_terminal:
        return RichReporter(console)
    try:
        every = float(os.environ.get("KDATA_PROGRESS_EVERY", PLAIN_EVERY_S))
    except ValueError:
        every = PLAIN_EVERY_S
    return PlainReporter(console.file, every=max(every, 0.1))


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

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]note:[/yellow] {text}", highlight=False)


class PlainReporter:
    """Plain lines: when a step starts and ends, and every ``every`` seconds while one runs.

    A line while a step runs: ``[kdata 12:00:15] 01_label: 120/500 rows, 32 in flight,
    48,210 tok, $0.0912, 15s``. A thread of its own writes them, so a step whose rows take long
    still shows that the build is alive.
    """

    def __init__(self, stream: TextIO, every: float = PLAIN_EVERY_S) -> None:
        self.stream, self.every = stream, every
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="kdata-progress", daemon=True)
        self._step: str | None = None
        self._total: int | None = None
        self._done, self._in_flight, self._tokens, self._cost = 0, 0, 0, 0.0
        self._t0 = time.monotonic()

    def __enter__(self) -> PlainReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def step_started(self, name: str, type: str, total: int | None) -> None:
        self._step, self._total, self._done, self._t0 = name, total, 0, time.monotonic()
        self._write(f"{name} ({type}): started")

    def set_total(self, total: int) -> None:
        self._total = total

    def advance(self, n: int, in_flight: int, tokens: int, cost_usd: float) -> None:
        self._done += n
        self._in_flight, self._tokens, self._cost = in_flight, tokens, cost_usd

    def step_finished(self, stats: StepStats) -> None:
        self._step = None
        note = "reused" if stats.reused else f"{stats.seconds:.1f}s"
        self._write(
            f"{stats.name}: done, {stats.rows_out} rows out, {stats.dropped} dropped, "
            f"{stats.failed} failed, {stats.requests} requests, ${stats.cost_usd:.4f}, {note}"
        )

    def note(self, text: str) -> None:
        self._write(f"note: {text}")

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            step = self._step
            if step is not None:
                total = "?" if self._total is None else self._total
                self._write(
                    f"{step}: {self._done}/{total} rows, {self._in_flight} in flight, "
                    f"{self._tokens:,} tok, ${self._cost:.4f}, {time.monotonic() - self._t0:.0f}s"
                )

    def _write(self, text: str) -> None:
        with self._lock:
            print(f"[kdata {time.strftime('%H:%M:%S')}] {text}", file=self.stream, flush=True)


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
