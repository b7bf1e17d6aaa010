"""The picture of a sweep: accuracy against MACs and against throughput (or a task's own
axes), one curve per method, each starting from the unpruned model."""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

#: A panel's x axis: the row key and its label.
Axis = tuple[str, str]
#: The default panels: GMACs and throughput.
AXES: tuple[Axis, ...] = (("gmacs", "GMACs per image"), ("images_per_s", "images / s"))


def plot_sweep(
    rows: Sequence[dict[str, Any]],
    metric: str,
    path: Path,
    title: str,
    axes: Sequence[Axis] = AXES,
    ylabel: str | None = None,
) -> None:
    """Save a PNG of `metric` (percent, unless `ylabel` says otherwise) against each of
    `axes` (a panel each; by default GMACs and images/s); `rows[0]` is the unpruned model."""
    base, points = rows[0], rows[1:]
    figure = Figure(figsize=(5.5 * len(axes), 4.5), layout="constrained")
    figure.suptitle(title)
    panels = figure.subplots(1, len(axes), squeeze=False)[0]
    for panel, (x, x_label) in zip(panels, axes, strict=True):
        for method in dict.fromkeys(row["method"] for row in points):
            curve = sorted([base, *(r for r in points if r["method"] == method)], key=itemgetter(x))
            panel.plot([r[x] for r in curve], [r[metric] for r in curve], "o-", label=method)
        panel.plot(base[x], base[metric], "k*", markersize=14, label="unpruned", zorder=3)
        panel.set_xlabel(x_label)
        panel.set_ylabel(ylabel or f"{metric} (%)")
        panel.grid(alpha=0.3)
        panel.legend()
    figure.savefig(path, dpi=120)
