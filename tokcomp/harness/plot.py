"""The picture of a sweep: accuracy against MACs and against throughput, one curve per
method, each starting from the unpruned model."""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

_AXES = (("gmacs", "GMACs per image"), ("images_per_s", "images / s"))


def plot_sweep(rows: Sequence[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Save a two-panel PNG of `metric` (percent) vs GMACs and vs images/s; `rows[0]` is the
    unpruned model."""
    base, points = rows[0], rows[1:]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    figure.suptitle(title)
    for axes, (x, x_label) in zip(figure.subplots(1, 2), _AXES, strict=True):
        for method in dict.fromkeys(row["method"] for row in points):
            curve = sorted([base, *(r for r in points if r["method"] == method)], key=itemgetter(x))
            axes.plot([r[x] for r in curve], [r[metric] for r in curve], "o-", label=method)
        axes.plot(base[x], base[metric], "k*", markersize=14, label="unpruned", zorder=3)
        axes.set_xlabel(x_label)
        axes.set_ylabel(f"{metric} (%)")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=120)
