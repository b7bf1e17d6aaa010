"""Sweep results: a JSON-lines store appended point by point (what lets a run resume), and
the report of one run (its rows against the unpruned one) as a table, CSV and plot."""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokcomp.bench import UNTRUSTED_NOTE
from tokcomp.errors import StateError, UsageError
from tokcomp.files import written_whole
from tokcomp.harness.fingerprint import Fingerprint
from tokcomp.harness.plot import AXES, Axis, plot_sweep
from tokcomp.harness.timing import Speedup

RESULTS = "results.jsonl"
#: Set by the Makefile's sweeps to the make command that passes --fresh (`make demo-vit
#: FRESH=1`): a make target's user cannot add --fresh to the command it runs.
RERUN_VARIABLE = "TOKCOMP_FRESH_RERUN"


def fresh_fix() -> str:
    """How a refusal of saved results says to go on."""
    make_rerun = os.environ.get(RERUN_VARIABLE)
    if make_rerun:
        return f"rerun with {make_rerun} to set them aside and start again"
    return "rerun with --fresh to set them aside and start again, or give another --output"


class ResultStore:
    """The finished points of one output folder, by key: one JSON object a line, each
    appended (and flushed) as soon as its point finishes. Every row carries the fingerprint
    of the inputs it was measured on, and a store holding rows of other inputs is refused,
    so rows of different inputs never share a table."""

    def __init__(self, folder: str | Path | None, fingerprint: Fingerprint) -> None:
        """The store of `folder` (None: rows kept in memory only), for `fingerprint`'s inputs."""
        self.fingerprint = fingerprint
        self.path = None if folder is None else results_path(Path(folder))
        rows = self._read()
        for row in rows:
            fingerprint.check(
                row.get("fingerprint"), f"the results in {self.path} were made", fresh_fix()
            )
        self._rows = {row["key"]: row for row in rows}

    def get(self, key: str) -> dict[str, Any] | None:
        """The saved row of `key`, if that point has finished before."""
        return self._rows.get(key)

    def rows(self) -> list[dict[str, Any]]:
        """Every saved row, in the order they finished."""
        return list(self._rows.values())

    def add(self, row: dict[str, Any]) -> None:
        """Save a finished point, stamped with the store's fingerprint."""
        row = {**row, "fingerprint": self.fingerprint.as_json()}
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        self._rows[row["key"]] = row

    def _read(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            self._end_last_line(text, lines)
        return [self._row(number, line) for number, line in enumerate(lines, 1)]

    def _row(self, number: int, line: str) -> dict[str, Any]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            row, problem = None, f"not JSON: {err}"
        else:
            problem = "not an object with a 'key'"
        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
            raise StateError(
                f"{self.path}:{number} is not a results row ({problem}); delete that line "
                "(its point is then evaluated again)"
            )
        return row

    def _end_last_line(self, text: str, lines: list[str]) -> None:
        """A last line without its line break: a whole row (an editor that ends files without
        one) gets the break, so appends stay valid; half a row (a run killed while writing)
        is cut off the file and from `lines`."""
        try:
            whole = isinstance(json.loads(lines[-1]), dict)
        except json.JSONDecodeError:
            whole = False
        if whole:
            with self.path.open("a") as handle:
                handle.write("\n")
            return
        warnings.warn(f"{self.path}: dropping an unfinished last line", stacklevel=3)
        os.truncate(self.path, len(text[: text.rfind("\n") + 1].encode()))
        lines.pop()


def results_path(folder: Path) -> Path:
    """The results file of an output folder, the folder created if need be."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(
            f"--output {folder} is a file; results go in a folder: give a folder path "
            "(it is created if missing)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    return folder / RESULTS


def set_aside(folder: Path, name: str = RESULTS) -> Path | None:
    """Rename the file or folder `name` of `folder` (if any; by default the results) to
    <stem>.<time><suffix> (results.<time>.jsonl), out of the way of a fresh run; returns its
    new path."""
    path = results_path(folder).with_name(name)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved, copies = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while moved.exists():
        moved, copies = path.with_name(f"{path.stem}.{stamp}-{copies}{path.suffix}"), copies + 1
    path.rename(moved)
    return moved


def with_baseline(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The rows with `delta_<metric>` (points) against the first (unpruned) row, and their
    speed-up (`speedup`, `speedup_spread`, `trusted`: see `speedup_of`)."""
    base = rows[0]
    rows = [{**row, f"delta_{metric}": row[metric] - base[metric]} for row in rows]
    for row in rows:
        speedup = speedup_of(row, rows[0])
        row.update(speedup=speedup.ratio, speedup_spread=speedup.spread, trusted=speedup.trusted)
    return rows


def speedup_of(row: dict[str, Any], base: dict[str, Any]) -> Speedup:
    """A row's speed-up: its own, timed interleaved with the unpruned model (task sweeps),
    else (an evaluation without a speed probe: lmms-eval's) its throughput over the unpruned
    row's, of unknown spread, so flagged (the unpruned row itself: 1.00x)."""
    if "speedup" in row:
        return Speedup(row["speedup"], row["speedup_spread"])
    spread = 0.0 if row is base else math.nan
    return Speedup(row["images_per_s"] / base["images_per_s"], spread)


@dataclass(frozen=True)
class Column:
    """A task's own figure in the table (after the common columns) and the CSV: the row key,
    its table header and its format spec."""

    key: str
    header: str
    spec: str = ".1f"

    def width(self) -> int:
        """Characters the column takes in the table."""
        return max(len(self.header), 8) + 2


def format_table(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    columns: Sequence[Column] = (),
    rate: str = "img/s",
) -> str:
    """Rows from `with_baseline` as a fixed-width text table, `columns` last; `rate` heads the
    throughput column (`images_per_s`: the task's samples per second)."""
    width = max([len(row["label"]) for row in rows] + [7]) + 2
    header = (
        f"{'method':<12}{'options':<{width}}{'GMACs':>8}{'MACs':>7}{'sel %':>7}"
        + "".join(f"{name:>{_width(name)}}" for name in metrics)
        + f"{'Δ' + metrics[0]:>{_width(metrics[0]) + 1}}"
        + f"{rate:>10}{'speed-up':>10}{'spread %':>9}{'peak MB':>9}"
        + "".join(f"{c.header:>{c.width()}}" for c in columns)
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['method']:<12}{row['label']:<{width}}{row['gmacs']:>8.3f}"
            f"{row['macs_ratio']:>7.3f}{100 * row['selection_share']:>7.1f}"
            + "".join(f"{row[name]:>{_width(name)}.2f}" for name in metrics)
            + f"{row['delta_' + metrics[0]]:>+{_width(metrics[0]) + 1}.2f}"
            + f"{row['images_per_s']:>10.1f}"
            f"{row['speedup']:>9.2f}{'x' if row['trusted'] else '?'}"
            f"{100 * row['speedup_spread']:>9.1f}{row['peak_memory_mb']:>9.1f}"
            + "".join(f"{row[c.key]:>{c.width()}{c.spec}}" for c in columns)
        )
    if not all(row["trusted"] for row in rows):
        lines.append(UNTRUSTED_NOTE)
    return "\n".join(lines)


def _width(metric: str) -> int:
    """Characters a metric's column takes in the table."""
    return max(8, len(metric) + 2)


def write_csv(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    path: Path,
    columns: Sequence[Column] = (),
) -> None:
    """Rows from `with_baseline` as CSV (UTF-8), one line per point (`columns` before the
    schedule)."""
    columns = [
        "method",
        "label",
        "gmacs",
        "macs_ratio",
        "selection_share",
        *metrics,
        f"delta_{metrics[0]}",
        "images_per_s",
        "speedup",
        "speedup_spread",
        "trusted",
        "peak_memory_mb",
        *(column.key for column in columns),
        "samples",
        "schedule",
    ]
    # UTF-8 whatever the locale: labels hold option text and config file names
    with written_whole(path) as partial, partial.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def report(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    folder: Path,
    title: str,
    columns: Sequence[Column] = (),
    axes: Sequence[Axis] = AXES,
    unit: str | None = "%",
    rate: str = "img/s",
) -> str:
    """Write results.csv and results.png (titled `title`; the headline metric, in `unit`,
    against each of `axes`) for one run's rows (unpruned first) in `folder`; return the table
    to print. `columns`: the task's own figures, after the common ones; `rate`: the header of
    the throughput column."""
    rows = with_baseline(rows, metrics[0])
    write_csv(rows, metrics, folder / "results.csv", columns)
    plot_sweep(rows, metrics[0], folder / "results.png", title, axes, unit)
    return format_table(rows, metrics, columns, rate)
