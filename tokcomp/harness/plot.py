"""The picture of a sweep: accuracy against MACs and against the speed-up (or a task's own
axes), one curve per method (a method's saved configs, e.g. searched ones, a curve of their
own), each starting from the unpruned model."""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

#: A panel's x axis: the row key and its label.
Axis = tuple[str, str]
#: The default panels: GMACs and the speed-up (each point timed interleaved with the unpruned
#: model, so a machine's changing load does not bend the curves).
AXES: tuple[Axis, ...] = (
    ("gmacs", "GMACs per image"),
    ("speedup", "speed-up over unpruned (interleaved timing)"),
)


def plot_sweep(
    rows: Sequence[dict[str, Any]],
    metric: str,
    path: Path,
    title: str,
    axes: Sequence[Axis] = AXES,
    unit: str | None = "%",
) -> None:
    """Save `sweep_figure` as a PNG."""
    sweep_figure(rows, metric, title, axes, unit).savefig(path, dpi=120)


def sweep_figure(
    rows: Sequence[dict[str, Any]],
    metric: str,
    title: str,
    axes: Sequence[Axis] = AXES,
    unit: str | None = "%",
) -> Figure:
    """`metric` (in `unit`) against each of `axes` (a panel each; by default GMACs and the
    speed-up): a curve per series (`series`) from the unpruned model (`rows[0]`, a star)
    through its points in order of x."""
    base, points = rows[0], rows[1:]
    figure = Figure(figsize=(5.5 * len(axes), 4.5), layout="constrained")
    figure.suptitle(title)
    panels = figure.subplots(1, len(axes), squeeze=False)[0]
    for panel, (x, x_label) in zip(panels, axes, strict=True):
        for name in dict.fromkeys(map(series, points)):
            curve = sorted([base, *(r for r in points if series(r) == name)], key=itemgetter(x))
            panel.plot([r[x] for r in curve], [r[metric] for r in curve], "o-", label=name)
        panel.plot(base[x], base[metric], "k*", markersize=14, label="unpruned", zorder=3)
        panel.set_xlabel(x_label)
        panel.set_ylabel(f"{metric} ({unit})" if unit else metric)
        panel.grid(alpha=0.3)
        panel.legend()
    return figure


def series(row: dict[str, Any]) -> str:
    """The curve a row belongs to: its method, or "<method> (config)" for a saved config's
    row (a searched schedule is not the method's default knob, so it gets its own curve)."""
    return f"{row['method']} (config)" if row.get("config") else row["method"]
