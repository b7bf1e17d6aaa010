"""Evaluate one model under many compression settings in one run, the unpruned model first,
resuming where an interrupted run stopped. Task-independent: a task says how to batch,
run and score; this module applies each point, times it and records the results."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from tokcomp import apply, backend, config_of, is_patched, macs, remove
from tokcomp.bench import Variant, compiled, parse_variant, peak_memory, timed
from tokcomp.errors import UsageError, interruption_says
from tokcomp.harness.arguments import config_file, device, fractions, names, positive_int
from tokcomp.harness.distributed import SINGLE, World
from tokcomp.harness.fingerprint import Fingerprint, file_digest
from tokcomp.harness.results import ResultStore, fresh_fix, set_aside
from tokcomp.harness.timing import Contender, Speedup, interleaved

UNPRUNED = "unpruned"


class Task(Protocol):
    """What a sweep evaluates: batches already on the device, a forward, per-batch scores.

    By default `score` returns each metric summed over the batch's samples and the sweep
    reports it as a percentage of all samples. A task that reports more (its own timings,
    counts) also has `tallies`, the names `score` returns (summed over batches and ranks),
    and `summarize(totals)`, which turns those totals (plus "samples") into the reported
    figures, every metric among them (see `report_figures`). A task whose outputs are not
    the model's forward has `module(model)`, the module whose forward gives them (what the
    sweep runs and compiles; see `task_module`).
    """

    #: Reported accuracy figures (percent); the first is the headline (its change vs the
    #: unpruned model is reported and plotted).
    metrics: tuple[str, ...]

    def batches(self) -> Iterator[tuple[Any, Sequence[Any]]]:
        """(inputs, targets) pairs, inputs on the device."""
        ...

    def __len__(self) -> int:
        """Number of batches."""
        ...

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """The model's outputs for one batch."""
        ...

    def score(self, outputs: Any, targets: Sequence[Any]) -> dict[str, float]:
        """Each metric (or each of the task's tallies) summed over the batch's samples."""
        ...


def tallies(task: Task) -> tuple[str, ...]:
    """The names a task's `score` returns: its `tallies`, else its metrics."""
    return tuple(getattr(task, "tallies", task.metrics))


def task_module(task: Task, model: nn.Module) -> nn.Module:
    """The module whose forward gives the task's outputs for `model`: the task's
    `module(model)` where it has one (e.g. a feature extractor), else `model` itself."""
    module = getattr(task, "module", None)
    return model if module is None else module(model)


def report_figures(task: Task, totals: Mapping[str, float]) -> dict[str, float]:
    """A task's reported figures from its totals over every batch and rank ("samples"
    included): its own `summarize`, else each metric as a percentage of the samples."""
    summarize = getattr(task, "summarize", None)
    if summarize is not None:
        return summarize(totals)
    return {name: 100.0 * totals[name] / totals["samples"] for name in task.metrics}


@dataclass(frozen=True)
class Point:
    """One setting of a sweep: the unpruned model (no method, no config), a method with
    its options, or a saved config file. `label` shows the setting without the method name
    (options, or the config's file name)."""

    label: str
    method: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    config: Path | None = None

    @classmethod
    def of(cls, variant: Variant) -> Point:
        """The point of a `tokcomp.bench.parse_variant` result."""
        label = variant.label.removeprefix(variant.method).strip()
        return cls(label, variant.method, variant.options)

    def identity(self) -> dict[str, Any]:
        """What makes this point's results reusable (a config file counts by where it is,
        however the path was written, and by its content)."""
        if self.config is not None:
            return {"config": str(self.config.resolve()), "config_sha256": file_digest(self.config)}
        return {"method": self.method, "options": dict(self.options)}

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Patch `model` in place for this point (the unpruned point leaves it alone)."""
        if self.config is not None:
            return apply(model, self.config)
        if self.method is None:
            return model
        return apply(model, self.method, **self.options)


def macs_budget(method: str, budget: float) -> str:
    """A budget as a target fraction of the unpruned MACs, as a variant ('tome:target_macs=0.9')."""
    return f"{method}:target_macs={budget}"


def sweep_points(
    methods: Sequence[str] = (),
    budgets: Sequence[float] = (),
    variants: Sequence[Variant] = (),
    configs: Sequence[Path] = (),
    budget: Callable[[str, float], str] = macs_budget,
) -> list[Point]:
    """The unpruned point, then every method at every budget (by default a target fraction of
    the unpruned MACs; `budget` turns a method and a budget into a variant), then the
    variants, then the config files; a point given twice counts once."""
    if bool(methods) != bool(budgets):
        raise ValueError(
            "--methods and --budgets go together (e.g. --methods tome --budgets 0.9,0.75); "
            "for a method's own knobs use --variant tome:r=13"
        )
    budgeted = [parse_variant(budget(m, b)) for m in methods for b in budgets]
    points = [Point("")] + [Point.of(v) for v in [*budgeted, *variants]]
    points += [Point(path.name, config=path) for path in configs]
    unique: dict[str, Point] = {}
    for point in points:
        unique.setdefault(json.dumps(point.identity(), sort_keys=True, default=str), point)
    return list(unique.values())


def point_key(fingerprint: Fingerprint, point: Point) -> str:
    """The results key of `point` evaluated on the inputs `fingerprint` describes."""
    text = json.dumps({**fingerprint.as_json(), **point.identity()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def resolve(model: nn.Module, point: Point, frames: int | None = None) -> dict[str, Any]:
    """What `point` does to `model` (see `compression`). Applying and removing it here checks
    every point before any is evaluated."""
    with applied(model, point):
        return compression(model, frames)


def compression(model: nn.Module, frames: int | None = None) -> dict[str, Any]:
    """What the model's compression is now: method, resolved options, the method merging inside
    a VLM's vision tower beside it (`tokcomp.Config.tower`; None: none), schedule, MACs per
    image or, with `frames`, per reference video of that many frames (a VLM's) (GMACs, the
    method's own work included; the ratio to the unpruned model; the share that is the
    method's own work)."""
    if not is_patched(model):
        return {
            "method": UNPRUNED,
            "resolved_options": {},
            "tower": None,
            "schedule": None,
            "gmacs": macs(model, frames) / 1e9,
            "macs_ratio": 1.0,
            "selection_share": 0.0,
        }
    config = config_of(model, frames)
    return {
        "method": config.method,
        "resolved_options": config.options,
        "tower": config.tower,
        "schedule": config.schedule,
        "gmacs": config.macs / 1e9,
        "macs_ratio": config.macs_ratio,
        "selection_share": config.selection_share,
    }


@contextlib.contextmanager
def applied(model: nn.Module, point: Point) -> Iterator[nn.Module]:
    """`model` patched for `point` inside the block, restored after it."""
    point.apply_to(model)
    try:
        yield model
    finally:
        if is_patched(model):
            remove(model)


def measure(
    model: nn.Module,
    task: Task,
    device: torch.device,
    desc: str,
    world: World = SINGLE,
    eager: nn.Module | None = None,
) -> dict[str, float]:
    """Scores (percent; or the task's own figures, see `report_figures`) and peak memory (the
    largest rank's) of `model` on the task's batches (this rank's shard; counts are summed
    over the ranks), and the pass's own time. The first batch is run once untimed, under the
    peak-memory probe, as warm-up (on `eager` when `model` is its compiled form: compiled code
    escapes the probe); then every batch is timed (forward only): `pass_seconds` is the
    slowest rank's sum. Speed-ups come from `probe_speed`, not from this pass (a shared
    machine's load changes between points)."""
    sums = dict.fromkeys(tallies(task), 0.0)
    samples, seconds, peak = 0, 0.0, 0
    batches = tqdm(task.batches(), desc, total=len(task), unit="batch", disable=not world.is_main)
    # `with` closes the bar, ending its line, before an interruption's message is printed
    with batches, torch.inference_mode():
        for inputs, targets in batches:
            forward = functools.partial(task.forward, model, inputs)
            if not samples:
                peak = peak_memory(functools.partial(task.forward, eager or model, inputs), device)
                if eager is not None:
                    forward()  # the compiled model's warm-up: it compiles
            outputs, elapsed = timed(forward, device)
            seconds += elapsed
            for name, value in task.score(outputs, targets).items():
                sums[name] += value
            samples += len(targets)
    totals = world.sum({**sums, "samples": samples})
    slowest = world.max({"seconds": seconds, "peak": peak})
    if not totals["samples"]:
        raise ValueError("the evaluation data is empty")
    return {
        **report_figures(task, totals),
        "samples": int(totals["samples"]),
        "pass_seconds": slowest["seconds"],
        "peak_memory_mb": slowest["peak"] / 2**20,
        "world_size": world.size,
    }


@dataclass(frozen=True)
class SpeedProbe:
    """How each point's speed is measured: `repeats` interleaved rounds (after one warm-up
    round) of the point and the unpruned model on the task's first batch, both compiled
    (torch.compile, inductor) or both eager."""

    repeats: int = 5
    compile: bool = False


#: Evaluates a model patched for a point: (model, point, progress description) -> figures.
Evaluation = Callable[[nn.Module, Point, str], dict[str, Any]]


@dataclass
class TaskEvaluation:
    """The evaluation that measures a task on a device (`measure`), then races the point
    against the unpruned model (`probe_speed`); with `probe.compile` both run compiled, the
    unpruned one as a compiled copy made at the first point."""

    task: Task
    device: torch.device
    world: World = SINGLE
    probe: SpeedProbe = SpeedProbe()
    baseline: nn.Module | None = None

    def __call__(self, model: nn.Module, point: Point, desc: str) -> dict[str, Any]:
        """Scores of `model` (patched for `point`) on every batch, then its speed probe."""
        module = task_module(self.task, model)
        timed_module = self.timed(model, module)
        eager = None if timed_module is module else module
        figures = measure(timed_module, self.task, self.device, desc, self.world, eager)
        return {**figures, **probe_speed(model, point, timed_module, self)}

    def timed(self, model: nn.Module, module: nn.Module) -> nn.Module:
        """What the point is evaluated and timed as: the task's `module` of `model`, or that
        compiled afresh (every point's patch is new), after the unpruned copy's is compiled
        once."""
        if not self.probe.compile:
            return module
        if self.baseline is None:
            self.baseline = compiled(task_module(self.task, unpatched_copy(model)))
        torch._dynamo.reset()
        return compiled(module)


def unpatched_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without tokcomp's patch."""
    duplicate = copy.deepcopy(model)
    return remove(duplicate) if is_patched(duplicate) else duplicate


def probe_speed(
    model: nn.Module, point: Point, timed_model: nn.Module, on: TaskEvaluation
) -> dict[str, float]:
    """Throughput of `point` (`timed_model`: the task's module of `model` patched for it,
    compiled or not) and its speed-up over the unpruned model, timed in alternating rounds on
    the task's first batch so that the machine's load hits both alike: images_per_s (every
    rank's first batch over the slowest rank's median round), speedup (median of the
    per-round ratios) and speedup_spread (their interquartile range over the median; rank
    0's). A rank whose shard is empty (fewer samples than ranks) times nothing."""
    batch = next(iter(on.task.batches()), None)
    seconds, images, speedup = 0.0, 0, Speedup(1.0, 0.0)
    if batch is not None:
        inputs, targets = batch
        seconds, speedup = _race(model, point, timed_model, on, inputs)
        images = len(targets)
    speedup = on.world.broadcast(speedup)  # rank 0 always has a batch
    slowest = on.world.max({"seconds": seconds})["seconds"]
    images = on.world.sum({"images": images})["images"]
    return {
        "images_per_s": images / slowest if slowest > 0 else math.inf,  # a clock too coarse
        "speedup": speedup.ratio,
        "speedup_spread": speedup.spread,
    }


def _race(
    model: nn.Module, point: Point, timed_model: nn.Module, on: TaskEvaluation, inputs: Any
) -> tuple[float, Speedup]:
    """The point's median round on `inputs` and its speed-up over the unpruned model (1.0 for
    the unpruned point itself)."""
    variant = Contender(functools.partial(on.task.forward, timed_model, inputs))
    unpruned = point.method is None and point.config is None
    contenders = [variant]
    if not unpruned:
        contenders = [_unpruned(model, inputs, on), _patching(variant, model, point, on.probe)]
    with torch.inference_mode():
        times = interleaved(contenders, on.probe.repeats, on.device)
    speedup = Speedup(1.0, 0.0) if unpruned else Speedup.paired(times[0], times[1])
    return statistics.median(times[-1]), speedup


def _patching(variant: Contender, model: nn.Module, point: Point, probe: SpeedProbe) -> Contender:
    """`variant` with `point` applied again before each call where the unpruned model's call
    removed it (eager probes)."""
    if probe.compile:
        return variant
    return Contender(variant.forward, lambda: is_patched(model) or point.apply_to(model))


def _unpruned(model: nn.Module, inputs: Any, on: TaskEvaluation) -> Contender:
    """The unpruned contender: the compiled baseline, or `model` with its patch removed
    before each call."""
    if on.baseline is not None:
        return Contender(functools.partial(on.task.forward, on.baseline, inputs))
    forward = functools.partial(on.task.forward, task_module(on.task, model), inputs)
    return Contender(forward, lambda: is_patched(model) and remove(model))


def plan_points(
    model: nn.Module, points: Sequence[Point], frames: int | None = None
) -> list[tuple[Point, dict[str, Any]]]:
    """Each point with what it resolves to on `model` (`resolve`; `frames`: MACs per
    reference video of that many frames, a VLM on videos, not per image): a point that
    cannot run is refused here, before any work."""
    return [(point, resolve(model, point, frames)) for point in points]


def run_sweep(
    model: nn.Module,
    plans: Sequence[tuple[Point, dict[str, Any]]],
    evaluation: Evaluation,
    store: ResultStore,
    settings: Mapping[str, Any] | None = None,
    world: World = SINGLE,
) -> list[dict[str, Any]]:
    """Evaluate every planned point (`plan_points`) whose results `store` lacks, appending
    each as it finishes; return the rows of all points, in order. The store's fingerprint
    (the model, data and options that decide the numbers) is part of each point's key;
    `settings` (batch size, threads...) is recorded, and must be those of the saved rows
    (`check_measured_alike`). Under torchrun every rank evaluates its shard of every point;
    rank 0's store decides which points are finished and alone writes. A saved row is
    measured again when its options now resolve otherwise."""
    settings = {**(settings or {}), **measured_on((settings or {}).get("device", "cpu"))}
    check_measured_alike(store, settings, world)
    rows = []
    for index, (point, plan) in enumerate(plans, 1):
        key = point_key(store.fingerprint, point)
        row = world.broadcast(store.get(key))
        if row is None or not same_compression(row, plan):
            desc = f"[{index}/{len(plans)}] {plan['method']} {point.label}".strip()
            with applied(model, point):
                figures = evaluation(model, point, desc)
            row = {
                "key": key,
                "label": point.label,
                **point.identity(),
                **plan,
                **figures,
                **(settings or {}),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if world.is_main:
                store.add(row)
        rows.append(row)
    return rows


def same_compression(row: Mapping[str, Any], plan: Mapping[str, Any]) -> bool:
    """Whether a saved row was measured with the options and schedule `plan` resolves to now
    (a method's defaults, or a model's own, may have changed since)."""
    fields = ("resolved_options", "schedule")
    saved = {name: row.get(name) for name in fields}
    return saved == json.loads(json.dumps({name: plan[name] for name in fields}, default=str))


def measured_on(device: str) -> dict[str, str]:
    """What else a row's speed depends on: torch's version, the route tokcomp's ops take on
    `device` (compiled kernels or the PyTorch reference) and the processor or GPU."""
    chosen = torch.device(device)
    return {"torch": torch.__version__, "ops": backend(chosen), "processor": processor(chosen)}


def processor(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name (its architecture where unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def check_measured_alike(
    store: ResultStore, settings: Mapping[str, Any] | None, world: World
) -> None:
    """Refuse to add to saved rows measured at another batch size, thread count, number of
    processes or of speed-probe rounds, or on another torch, ops route or processor: their
    images/s and memory belong to those (and random's draws to the batching; their speed-ups'
    spread to the rounds), so one table would mix them, and a rerun asking for more rounds
    would get the saved speed-ups back."""
    run = _measured_at(settings or {}, world.size)
    recorded_later = {"speed_repeats": run["speed repeats"], **_machine_of(run)}
    for row in store.rows():
        # rows record these; a row without a world size was measured by one process, one
        # without speed repeats or the machine before tokcomp recorded them (taken as this
        # run's)
        saved = _measured_at({**recorded_later, **row}, row.get("world_size", 1))
        differing = [name for name in run if saved[name] != run[name]]
        if differing:
            raise UsageError(
                f"the results in {store.path} were measured at "
                f"{_described(saved, differing)}, this run at {_described(run, differing)}: "
                f"pass the same settings to add to them, or {fresh_fix()}"
            )


def _measured_at(settings: Mapping[str, Any], processes: int) -> dict[str, Any]:
    return {
        "batch size": settings.get("batch_size"),
        "threads": settings.get("threads"),
        "processes": processes,
        "speed repeats": settings.get("speed_repeats"),
        **{name: settings.get(name) for name in MACHINE},
    }


#: The settings `measured_on` records.
MACHINE = ("torch", "ops", "processor")


def _machine_of(measured: Mapping[str, Any]) -> dict[str, Any]:
    return {name: measured[name] for name in MACHINE}


def _described(measured: Mapping[str, Any], names: Sequence[str]) -> str:
    return ", ".join(f"{name} {measured[name]}" for name in names)


def evaluate_sweep(
    model: nn.Module,
    points: Sequence[Point],
    evaluation: Evaluation,
    run: SweepRun,
    settings: Mapping[str, Any] | None = None,
    world: World = SINGLE,
    frames: int | None = None,
) -> list[dict[str, Any]]:
    """`run_sweep` of `points` (planned first: see `plan_points`, `frames` there) with results
    in the run's output folder (rank 0 writes; saved rows of other inputs are refused, on
    every rank); an interrupt ends the run saying that the same command resumes. Returns the
    rows to report: this run's points, then every other point saved for the same inputs."""
    plans = plan_points(model, points, frames)
    store = world.from_main(functools.partial(_main_store, run))
    resumes = f"finished points are saved in {run.output}; the same command resumes"
    with interruption_says(resumes):
        rows = run_sweep(model, plans, evaluation, store, settings, world)
    done = {row["key"] for row in rows}
    others, superseded = earlier_points(store.rows(), done)
    if superseded and world.is_main:
        names = ", ".join(sorted({Path(row["config"]).name for row in superseded}))
        print(f"left out of the table: {len(superseded)} saved rows of {names} as it was before")
    return rows + others


def earlier_points(
    saved: Sequence[dict[str, Any]], done: set[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The saved rows of points other than this run's, and apart those of a config file whose
    content has changed since, whether this run evaluated it or not (they stay saved, out of
    the table: they would show under its name what it no longer holds)."""
    others, superseded = [], []
    for row in saved:
        if row["key"] in done:
            continue
        (superseded if _config_edited_since(row) else others).append(row)
    return others, superseded


def _config_edited_since(row: Mapping[str, Any]) -> bool:
    """Whether the config file a saved row measured now holds other content (a deleted file's
    row stays: nothing newer stands under its name)."""
    path = Path(row["config"]) if row.get("config") else None
    return path is not None and path.is_file() and file_digest(path) != row.get("config_sha256")


def task_evaluation(
    task: Task, device: torch.device, world: World = SINGLE, probe: SpeedProbe = SpeedProbe()
) -> Evaluation:
    """The evaluation that measures `task` on `device`, then probes the point's speed (see
    `TaskEvaluation`)."""
    return TaskEvaluation(task, device, world, probe)


@dataclass(frozen=True)
class SweepRun:
    """Where a sweep's results go and what they are measured on: the output folder, the
    fingerprint of the inputs, the device, and whether to set earlier results aside."""

    output: Path
    fingerprint: Fingerprint
    device: torch.device
    fresh: bool = False


def _main_store(run: SweepRun) -> ResultStore:
    """The run's store, its earlier results set aside first under --fresh (rank 0's work:
    the other ranks get a copy and never write)."""
    if run.fresh:
        moved = set_aside(run.output)
        if moved is not None:
            print(f"--fresh: earlier results set aside in {moved}")
    return ResultStore(run.output, run.fingerprint)


def start_run(args: argparse.Namespace) -> tuple[World, torch.device]:
    """Set --threads, join torchrun's process group if there is one; (world, this rank's
    device)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    world = World.from_env(args.device)
    return world, world.device(args.device)


def quiet(*_: Any) -> None:
    """print() for the ranks that do not report."""


def add_sweep_arguments(
    parser: argparse.ArgumentParser,
    budgets: str,
    methods: str = "tome,pitome",
    variant: str = "tome:r=13",
) -> argparse._ArgumentGroup:
    """The sweep options of an eval task: --methods, --budgets (`budgets` says what a budget
    means), --variant and --config; `methods` and `variant` are the help's examples. Returns
    the group, for a task's own sweep options."""
    sweep = parser.add_argument_group("sweep (the unpruned model is always evaluated first)")
    sweep.add_argument("--methods", type=names, default=[], help=f"e.g. {methods}")
    sweep.add_argument("--budgets", type=fractions, default=[], help=budgets)
    sweep.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        help=f"method:key=value,... (repeatable), e.g. {variant}",
    )
    sweep.add_argument(
        "--config", action="append", type=config_file, default=[], help="saved config (repeatable)"
    )
    return sweep


def add_run_arguments(
    parser: argparse.ArgumentParser, speed_probe: bool = True
) -> argparse._ArgumentGroup:
    """The run options of an eval task: --device, --threads, --speed-repeats (where the task
    runs a speed probe), --output and --fresh. Returns the group, for a task's own options."""
    run = parser.add_argument_group("run")
    run.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--threads", type=positive_int, help="torch.set_num_threads")
    if speed_probe:
        run.add_argument(
            "--speed-repeats",
            type=positive_int,
            default=SpeedProbe.repeats,
            help="rounds of each point's speed probe: the point and the unpruned model timed "
            "in turn on the first batch (medians; a speed-up whose spread is too wide is "
            "flagged ?)",
        )
    run.add_argument("--output", type=Path, help="results folder (default results/<model>-<data>)")
    run.add_argument(
        "--fresh",
        action="store_true",
        help="set the folder's earlier results aside (renamed, not deleted) and start again; "
        "needed when they were measured on other data, weights or options",
    )
    return run


def add_compile_argument(group: argparse._ArgumentGroup) -> None:
    """--compile: evaluate and time every point compiled."""
    group.add_argument(
        "--compile",
        action="store_true",
        help="evaluate and time every point under torch.compile (inductor), the unpruned model "
        "compiled the same way (a compiled copy of it: twice the weights in memory)",
    )
