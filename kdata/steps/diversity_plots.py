"""The diversity report's plots (matplotlib, Agg, no pyplot): PNGs in the run directory."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

_DPI = 100


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _save(fig, run_dir: Path, out: Path, name: str) -> str:
    fig.savefig(run_dir / out / name, dpi=_DPI)
    return (out / name).as_posix()


def plot_projection(run_dir: Path, out: Path, emb: np.ndarray, kept: np.ndarray, column: str):
    centred = emb.astype(np.float64) - emb.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = _figure()
    for mask, label, colour in ((kept, "kept", "tab:blue"), (~kept, "dropped", "tab:red")):
        ax.scatter(
            xy[mask, 0], xy[mask, 1], s=8, alpha=0.6, c=colour, label=f"{label} ({mask.sum()})"
        )
    ax.set(title=f"'{column}' embeddings of the generated rows (PCA)", xlabel="PC 1", ylabel="PC 2")
    ax.legend()
    return _save(fig, run_dir, out, "projection.png")


def plot_lengths(
    run_dir: Path, out: Path, before: np.ndarray, after: np.ndarray, column: str | None
) -> str:
    fig, ax = _figure()
    b, a = before[before >= 0], after[after >= 0]
    if len(b) or len(a):
        bins = np.histogram_bin_edges(np.concatenate([b, a]), bins=40)
        ax.hist(b, bins=bins, alpha=0.5, label=f"generated ({len(b)})", color="tab:gray")
        ax.hist(a, bins=bins, alpha=0.6, label=f"final ({len(a)})", color="tab:blue")
        ax.legend()
    ax.set(title=f"length of '{column}'", xlabel="characters", ylabel="rows")
    return _save(fig, run_dir, out, "lengths.png")


def plot_waterfall(
    run_dir: Path, out: Path, generated: int, waterfall: list[dict], final: int
) -> str:
    fig, ax = _figure(max(6.4, 1.1 * (len(waterfall) + 2)), 4.2)
    names = ["generated", *(w["step"] for w in waterfall), "final"]
    ax.bar(0, generated, color="tab:gray")
    ax.bar(len(names) - 1, final, color="tab:blue")
    colours: dict[str, Any] = {}
    palette = iter(["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive"])
    for x, w in enumerate(waterfall, start=1):
        ax.bar(x, w["rows_out"], color="tab:blue", alpha=0.35)
        bottom = w["rows_out"]
        removed = Counter(w["dropped"])
        if w["failed"]:
            removed["failed"] = w["failed"]
        for reason, count in sorted(removed.items()):
            if reason not in colours:
                colours[reason] = next(palette, "tab:cyan")
                label = reason
            else:
                label = None
            ax.bar(x, count, bottom=bottom, color=colours[reason], label=label)
            bottom += count
        if w["rows_out"] > w["rows_in"]:  # a step that makes rows (n samples per row, say)
            ax.bar(
                x, w["rows_out"] - w["rows_in"], bottom=w["rows_in"], color="tab:green", alpha=0.5
            )
        ax.annotate(str(w["rows_out"]), (x, w["rows_out"]), ha="center", va="bottom", fontsize=8)
    ax.annotate(str(generated), (0, generated), ha="center", va="bottom", fontsize=8)
    ax.annotate(str(final), (len(names) - 1, final), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(title="rows through curation (coloured: removed, by reason)", ylabel="rows")
    if colours:
        ax.legend(fontsize=8)
    return _save(fig, run_dir, out, "waterfall.png")
