"""lmms-eval benchmarks under a sweep of compression settings (`tokcomp eval lmms`): each point
(the unpruned model first, then every method at every budget, variants, configs) runs
lmms-eval's evaluation of the tasks on tokcomp's lmms-eval model (tokcomp.harness.lmms_model)
around one loaded VLM, and its row holds lmms-eval's scores (task/metric) next to the
method, its options, the visual tokens per image the language model kept, MACs per image
(the method's own work included) and the timings of `tokcomp eval vqa`. Rows are saved as
points finish (a rerun resumes; rows of other inputs are refused), with each point's
lmms-eval results file in lmms/, and plotted: each task's first metric against visual tokens
and time to first token. The table's throughput column, doc/s (`images_per_s` in the CSV),
and its speed-up count the documents (each with any number of images, or none) over the time
the model spent generating (lmms-eval's own work excluded; `seconds`: the whole run).

Needs lmms-eval (`pip install 'tokcomp[lmms]'`; `make lmms` builds .venv-lmms). Tasks whose
data is on the Hugging Face hub need it cached or the hub reachable; local tasks (a YAML with
`dataset_path: json` and local data files, as eval/lmms_tasks/easyvqa) run offline.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokcomp.errors import UsageError
from tokcomp.files import write_text_whole
from tokcomp.harness import hub
from tokcomp.harness.arguments import existing_folder, names, positive_int
from tokcomp.harness.fingerprint import Fingerprint, folder_digest
from tokcomp.harness.plot import plot_sweep
from tokcomp.harness.results import ResultStore, fresh_fix, report, set_aside
from tokcomp.harness.sweep import (
    Point,
    SweepRun,
    evaluate_sweep,
    point_key,
    start_run,
)
from tokcomp.harness.vqa import (
    AXES,
    COLUMNS,
    DEFAULT_MODEL,
    add_visual_sweep_arguments,
    load_vlm,
    model_identity,
    visual_points,
)

#: The repository's local lmms-eval tasks (the offline easy-VQA task).
DEFAULT_TASKS = Path(__file__).resolve().parents[2] / "eval" / "lmms_tasks"
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: The folder of <output> holding lmms-eval's results (and samples) per point key.
OUTPUTS = "lmms"
#: Where a task's metrics come from in lmms-eval's results: 'metric,filter' keys.
_STDERR = "_stderr"
#: The header of the throughput column: lmms-eval documents answered (any number of images).
RATE = "doc/s"


def lmms_eval_version() -> str:
    """The installed lmms-eval's version, or one line saying how to install it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmms_eval")
    except PackageNotFoundError:
        raise UsageError(
            "lmms-eval is not installed here: pip install 'tokcomp[lmms]' (make lmms builds "
            ".venv-lmms with it beside the pinned stack; run .venv-lmms/bin/tokcomp)"
        ) from None


# -- tasks ------------------------------------------------------------------------------------
def task_manager(include_paths: Sequence[Path]) -> Any:
    """lmms-eval's task index: its own tasks and those under `include_paths`."""
    from lmms_eval.tasks import TaskManager

    paths = [str(path) for path in include_paths]
    return TaskManager("WARNING", include_path=paths, model_name="tokcomp")


def resolve_tasks(manager: Any, requested: Sequence[str]) -> list[str]:
    """The task names lmms-eval knows for `requested` (wildcards expanded), each checked to
    be available: its data local, cached, or on a reachable hub."""
    found = manager.match_tasks(list(requested))
    missing = [name for name in requested if "*" not in name and name not in found]
    if missing or not found:
        raise UsageError(
            f"unknown lmms-eval task(s) {missing or list(requested)}: python -m lmms_eval "
            "--tasks list lists them; a local task's folder goes in --include-path DIR"
        )
    for name in found:
        for leaf, dataset in _datasets(manager, name):
            if hub.is_repo_id(dataset) and not Path(dataset).exists():
                local = "define a local task (dataset_path: json, see eval/lmms_tasks/easyvqa)"
                hub.require(dataset, "dataset", local + " and pass --include-path", f"task {leaf}")
    return found


def _datasets(manager: Any, name: str) -> Iterable[tuple[str, str]]:
    """(task, dataset_path) of every task that `name` (a task, group or tag) runs."""
    for leaf, _, config in _leaves(manager, name):
        yield leaf, str(config.get("dataset_path", ""))


def _leaves(manager: Any, name: str) -> Iterable[tuple[str, Path, dict[str, Any]]]:
    """(task, YAML path, config) of every task that `name` (a task, group or tag) runs: a
    tag lists its tasks in lmms-eval's index, a group in its YAML (`task:`; names, or inline
    groups and tasks)."""
    from lmms_eval.utils import load_yaml_config

    entry = manager.task_index[name]
    if entry["type"] == "tag":
        for member in entry["task"]:
            yield from _members(manager, member)
        return
    if entry["yaml_path"] == -1:
        return
    config = load_yaml_config(entry["yaml_path"], mode="simple")
    if entry["type"] == "group":
        yield from _members(manager, config.get("task", []))
    else:
        yield name, Path(entry["yaml_path"]), config


def _members(manager: Any, members: Any) -> Iterable[tuple[str, Path, dict[str, Any]]]:
    """`_leaves` of a group's `task:` entry: a name, an inline group or task, or a list."""
    if isinstance(members, list):
        for member in members:
            yield from _members(manager, member)
    elif isinstance(members, str):
        if members in manager.task_index:
            yield from _leaves(manager, members)
    elif isinstance(members, dict):
        if "group" in members:
            yield from _members(manager, members.get("task", []))
        elif members.get("task") in manager.task_index:
            for leaf, path, config in _leaves(manager, members["task"]):
                yield leaf, path, {**config, **members}


def task_files(manager: Any, tasks: Sequence[str]) -> dict[str, str]:
    """Each task's folder (YAML, functions, local data) by content, for the fingerprint: of a
    group, its own and each of its tasks'; of a tag, each of its tasks'."""
    folders = {}
    for name in tasks:
        yaml_path = manager.task_index[name]["yaml_path"]
        if yaml_path != -1:
            folders[name] = folder_digest(Path(yaml_path).parent)
        for leaf, path, _ in _leaves(manager, name):
            if leaf not in folders:  # a plain task is its own leaf: its folder is read once
                folders[leaf] = folder_digest(path.parent)
    return folders


# -- one point --------------------------------------------------------------------------------
def task_scores(results: dict[str, Any]) -> dict[str, float]:
    """lmms-eval's numeric scores as 'task/metric' (with '/filter' unless it is 'none')."""
    scores = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, kind = key.partition(",")
            if kind and _STDERR not in metric and isinstance(value, int | float):
                scores["/".join([task, metric] + ([kind] if kind != "none" else []))] = value
    return scores


def headlines(results: dict[str, Any], scores: dict[str, float]) -> list[str]:
    """Each task's headline, a key of `scores` (task_scores): its first metric under the first
    filter it was scored with; where that metric is no number (a submission file), the task's
    first numeric score."""
    found = []
    for task, config in results["configs"].items():
        own = [key for key in scores if key.split("/")[0] == task]
        first = (config.get("metric_list") or [{}])[0].get("metric")
        named = [key for key in own if key.split("/")[1] == first]
        found += (named or own)[:1]
    return found


class LMMSEvaluation:
    """Evaluates a patched model on lmms-eval's tasks (tokcomp's lmms-eval model around it),
    saving each point's lmms-eval results under `output`/lmms."""

    def __init__(
        self,
        processor: Any,
        args: argparse.Namespace,
        manager: Any,
        tasks: Sequence[str],
        run: SweepRun,
    ) -> None:
        self.processor, self.args, self.manager, self.tasks = processor, args, manager, tasks
        self.fingerprint, self.output = run.fingerprint, run.output

    def __call__(self, model: nn.Module, point: Point, desc: str) -> dict[str, Any]:
        """The figures of one point: lmms-eval's scores, then visual tokens, timings."""
        from lmms_eval.evaluator import simple_evaluate

        from tokcomp.harness.lmms_model import HFVLM, Tally

        print(desc, flush=True)
        device, size = str(self.args.device), self.args.batch_size
        lm = HFVLM(model, self.processor, device, size)
        start = time.perf_counter()
        results = simple_evaluate(
            model=lm,
            tasks=list(self.tasks),
            limit=self.args.limit,
            batch_size=size,
            device=device,
            task_manager=self.manager,
            log_samples=self.args.log_samples,
            verbosity="WARNING",
        )
        seconds = time.perf_counter() - start
        samples = sum(counts["effective"] for counts in results["n-samples"].values())
        self._save(results, point_key(self.fingerprint, point))
        total = Tally()
        for tally in lm.tallies.values():
            total.add(tally)
        per_task = {
            f"{task}/{name}": value
            for task, tally in lm.tallies.items()
            for name, value in tally.figures().items()
        }
        scores = task_scores(results)
        return {
            **scores,
            "headlines": headlines(results, scores),
            **total.figures(),
            **per_task,
            "samples": samples,
            "seconds": seconds,
            "images_per_s": samples / (total.generate_s or seconds),
            "peak_memory_mb": (lm.peak_bytes or 0) / 2**20,
        }

    def _save(self, results: dict[str, Any], key: str) -> None:
        """lmms-eval's results of a point as lmms/<key>.json; with --log-samples its
        per-question outputs as lmms/<key>.<task>.jsonl."""
        folder = self.output / OUTPUTS
        samples = results.pop("samples", None) or {}
        write_text_whole(folder / f"{key}.json", json.dumps(results, indent=1, default=str))
        for task, rows in samples.items():
            lines = "".join(json.dumps(row, default=str) + "\n" for row in rows)
            write_text_whole(folder / f"{key}.{task}.jsonl", lines)


# -- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokcomp eval lmms`."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help="local Hugging Face VLM folder or hub id (e.g. llava-hf/llava-1.5-7b-hf); "
        "default: the offline easy-VQA LLaVA, eval/models/vlm-easyvqa",
    )
    model.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: the checkpoint's")
    tasks = parser.add_argument_group("lmms-eval")
    tasks.add_argument(
        "--tasks", type=names, required=True, help="lmms-eval tasks, e.g. vqav2_val,gqa,mme,pope"
    )
    tasks.add_argument(
        "--include-path",
        action="append",
        type=existing_folder,
        default=[DEFAULT_TASKS],
        help="folder of local task YAMLs (repeatable; eval/lmms_tasks always included)",
    )
    tasks.add_argument("--limit", type=positive_int, help="the first N documents of each task")
    tasks.add_argument("--batch-size", type=positive_int, default=16)
    tasks.add_argument(
        "--log-samples",
        action="store_true",
        help="save lmms-eval's per-question outputs of each point in <output>/lmms/",
    )
    # no speed probe: its speed figures time lmms-eval's own generation
    add_visual_sweep_arguments(parser, speed_probe=False)
    parser.set_defaults(run=run)


def refuse_points_without_samples(sweep: SweepRun, points: Sequence[Point]) -> None:
    """Under --log-samples, refuse this sweep's saved points that lack per-question samples
    (resuming skips them, so theirs would never be written); --fresh sets them aside."""
    if sweep.fresh:
        return
    store = ResultStore(sweep.output, sweep.fingerprint)
    unlogged = []
    for point in points:
        row = store.get(point_key(sweep.fingerprint, point))
        if row is not None and not any((sweep.output / OUTPUTS).glob(f"{row['key']}.*.jsonl")):
            unlogged.append(f"{row['method']} {point.label}".strip())
    if unlogged:
        raise UsageError(
            f"--log-samples: the points {', '.join(unlogged)} are saved in {store.path} "
            f"without per-question samples, and a rerun does not evaluate them again: {fresh_fix()}"
        )


def run(args: argparse.Namespace) -> None:
    """Evaluate the sweep the arguments describe on lmms-eval's tasks, print its table,
    save its results."""
    version = lmms_eval_version()
    from tokcomp.harness.lmms_model import refuse_unsupported  # imports lmms-eval

    points = visual_points(args)
    world, device = start_run(args)
    if world.size > 1:
        raise UsageError("tokcomp eval lmms runs in one process: launch it without torchrun")
    manager = task_manager(args.include_path)
    tasks = resolve_tasks(manager, args.tasks)
    model, processor = load_vlm(args.model, args.dtype)
    refuse_unsupported(model, args.model)
    name = f"{Path(args.model).name}-lmms-{'+'.join(tasks)}"
    output = args.output or Path("results") / name
    print(f"model {args.model}; lmms-eval {version} tasks {tasks}, limit {args.limit}")
    print(f"{len(points)} points on {device}, batch {args.batch_size}; results in {output}")
    fingerprint = Fingerprint.of(
        task="lmms",
        model=Path(args.model).name,
        weights=model_identity(args.model, model),
        dtype=args.dtype,
        lmms_eval=version,
        tasks=tasks,
        task_files=task_files(manager, tasks),
        limit=args.limit,
        device=device.type,
    )
    sweep = SweepRun(output, fingerprint, device, args.fresh)
    if args.log_samples:
        refuse_points_without_samples(sweep, points)
    if args.fresh and world.is_main:  # lmms-eval's files of the rows --fresh sets aside
        moved = set_aside(output, OUTPUTS)
        if moved is not None:
            print(f"--fresh: earlier lmms-eval outputs set aside in {moved}")
    evaluation = LMMSEvaluation(processor, args, manager, tasks, sweep)
    settings = dict(device=str(device), threads=torch.get_num_threads(), batch_size=args.batch_size)
    rows = evaluate_sweep(model, points, evaluation, sweep, settings, world)
    print(write_report(rows, output, name))


def write_report(rows: list[dict[str, Any]], output: Path, title: str) -> str:
    """The table (every task's headline metric), CSV and plots: results.png for the first
    task's headline, results.<task>.png for each other task's."""
    metrics = rows[0]["headlines"]
    table = report(rows, metrics, output, title, COLUMNS, AXES, unit=None, rate=RATE)
    for metric in metrics[1:]:
        path = output / f"results.{metric.split('/')[0]}.png"
        plot_sweep(rows, metric, path, title, AXES, unit=None)
    return table
