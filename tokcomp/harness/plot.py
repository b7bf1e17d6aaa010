"""The picture of a sweep: accuracy against MACs and against the speed-up (or a task's own
axes), one curve per method and setting of its options other than the budget (a method's
saved configs, e.g. searched ones, a curve of their own), each starting from the unpruned
model."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tokcomp.files import written_whole
from tokcomp.methods import method_class

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
    """Save `sweep_figure` as a PNG, written whole."""
    with written_whole(path) as partial:
        sweep_figure(rows, metric, title, axes, unit).savefig(partial, dpi=120, format="png")


def sweep_figure(
    rows: Sequence[dict[str, Any]],
    metric: str,
    title: str,
    axes: Sequence[Axis] = AXES,
    unit: str | None = "%",
) -> Figure:
    """`metric` (in `unit`) against each of `axes` (a panel each; by default GMACs and the
    speed-up): a curve per series (`series_names`) from the unpruned model (`rows[0]`, a
    star) through its points in order of x; a speed-up too noisy to trust (the table's "?")
    is a hollow marker."""
    base, points = rows[0], rows[1:]
    names = series_names(points)
    figure = Figure(figsize=(5.5 * len(axes), 4.5), layout="constrained")
    figure.suptitle(title)
    panels = figure.subplots(1, len(axes), squeeze=False)[0]
    for panel, (x, x_label) in zip(panels, axes, strict=True):
        for name in dict.fromkeys(names):
            members = (row for row, its in zip(points, names, strict=True) if its == name)
            curve = sorted([base, *members], key=lambda row, x=x: _along(row[x]))
            (line,) = panel.plot(
                [r[x] for r in curve], [r[metric] for r in curve], "o-", label=name
            )
            if x == "speedup":
                _hollow_untrusted(panel, curve[1:], metric, line.get_color())
        panel.plot(base[x], base[metric], "k*", markersize=14, label="unpruned", zorder=3)
        untrusted = x == "speedup" and not all(row.get("trusted", True) for row in points)
        panel.set_xlabel(f"{x_label}\nhollow: too noisy to trust" if untrusted else x_label)
        panel.set_ylabel(f"{metric} ({unit})" if unit else metric)
        panel.grid(alpha=0.3)
        panel.legend()
    return figure


def _hollow_untrusted(panel: Any, rows: Sequence[dict[str, Any]], metric: str, color: str) -> None:
    """Redraw the speed-ups of `rows` that are too noisy to trust as hollow markers."""
    untrusted = [row for row in rows if not row.get("trusted", True)]
    if untrusted:
        xs, ys = [row["speedup"] for row in untrusted], [row[metric] for row in untrusted]
        panel.plot(xs, ys, "o", color=color, markerfacecolor="white", label="_untrusted")


def _along(x: float) -> tuple[bool, float]:
    """A point's place along a panel's x axis: in order of x, a point without one (NaN: e.g.
    a speed-up no round could time) last, where it cannot put the others out of order."""
    return (math.isnan(x), x)


def series_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The curve of each row: its method followed by the options that set its curve apart
    from the method's other rows ("dycoke positions=keep"), or "<method> (config)" for a
    saved config's row (a searched schedule is not the method's default knob, so it gets its
    own curve)."""
    differing = _differing_options(rows)
    return [_series(row, differing.get(row["method"], [])) for row in rows]


def _series(row: dict[str, Any], differing: Sequence[str]) -> str:
    if row.get("config"):
        return f"{row['method']} (config)"
    options = _fixed_options(row)
    shown = (f"{name}={_shown(options[name])}" for name in differing if name in options)
    return " ".join([row["method"], *shown])


def _differing_options(rows: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per method, the fixed options (`_fixed_options`) whose values differ between its rows
    (saved configs aside; an option a row does not list has its default)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if not row.get("config"):
            by_method.setdefault(row["method"], []).append(_fixed_options(row))
    return {
        method: sorted(
            {name for a in options for name in a if any(b.get(name) != a[name] for b in options)}
        )
        for method, options in by_method.items()
    }


def _fixed_options(row: dict[str, Any]) -> dict[str, Any]:
    """The options a method's row ran with (its resolved ones, which name what differs from
    the defaults), but its budget: the option that moves a point along its curve; and on a
    VLM the method merging inside its vision tower, if any, as `tower` ("tome:r=22")."""
    budget = method_class(row["method"]).budget
    options = {k: v for k, v in row.get("resolved_options", {}).items() if k != budget}
    tower = row.get("tower")
    if tower:
        settings = ",".join(f"{k}={_shown(v)}" for k, v in sorted(tower["options"].items()))
        options["tower"] = f"{tower['method']}:{settings}" if settings else tower["method"]
    return options


def _shown(value: Any) -> str:
    """An option's value as a variant writes it (text bare, the rest compact JSON), one
    spelling for equal values (a whole float as its int: margin=1 and margin=1.0 are one
    setting, so one curve)."""
    if isinstance(value, str):
        return value
    return json.dumps(_one_spelling(value), separators=(",", ":"))


def _one_spelling(value: Any) -> Any:
    """`value` with every whole float an int (lists, tuples and dicts searched)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list | tuple):
        return [_one_spelling(item) for item in value]
    if isinstance(value, dict):
        return {key: _one_spelling(item) for key, item in value.items()}
    return value
