"""Data-parallel sweeps and DiffRate search under torchrun (gloo, 2 CPU processes), and the
speed probe's figures over ranks (threads standing in for the ranks, with a fake clock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from conftest import tiny_vit
from fixtures.imagenet import foolbox_images, image_folder, save_safetensors

import tokcomp
from tokcomp.bench import parse_variant
from tokcomp.cli import main
from tokcomp.harness import imagenet, sweep, timing
from tokcomp.harness.distributed import World
from tokcomp.harness.imagenet import ClassificationTask

TESTS = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS.parent}:{TESTS}"}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=7).eval()
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    return save_safetensors(model, path, timm_model="test_vit", model_kwargs={"num_classes": 7})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return image_folder(root, foolbox_images(), lambda label: f"c{label % 7}")


def _sweep_args(checkpoint: Path, folder: Path, output: Path, extra: list[str]) -> list[str]:
    args = ["eval", "imagenet", "--checkpoint", str(checkpoint), "--data", str(folder)]
    return [*args, "--batch-size", "4", "--output", str(output), "--threads", "1", *extra]


def _rows(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]


def _torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*TORCHRUN, "-m", "tokcomp", *args], env=ENV, text=True, **kwargs)


@pytest.mark.parametrize("limit", ["1", "19", "20"])  # 1: rank 1 has no images
def test_two_processes_count_exactly_what_one_process_counts(checkpoint, folder, tmp_path, limit):
    extra = ["--limit", limit, "--variant", "tome:r=4", "--methods", "evit", "--budgets", "0.6"]
    assert main(_sweep_args(checkpoint, folder, tmp_path / "one", extra)) == 0
    two = _torchrun(_sweep_args(checkpoint, folder, tmp_path / "two", extra))
    assert two.wait(timeout=600) == 0
    one_rows, two_rows = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["world_size"] for r in two_rows] == [2, 2, 2]
    for a, b in zip(one_rows, two_rows, strict=True):
        assert b["samples"] == a["samples"] == int(limit)
        assert (b["top1"], b["top5"]) == (a["top1"], a["top5"])


def test_a_rank_other_than_0_prints_and_writes_no_table(
    checkpoint, folder, tmp_path, monkeypatch, capsys
):
    """Every rank evaluates its shard; rank 0 alone writes the table, CSV and plot (two ranks
    wrote the same files at once)."""

    def report(*args, **kwargs):
        raise AssertionError("rank 1 wrote the report")

    monkeypatch.setattr(imagenet, "start_run", lambda args: (World(rank=1, size=2), CPU))
    monkeypatch.setattr(imagenet, "evaluate_sweep", lambda *args, **kwargs: [])
    monkeypatch.setattr(imagenet, "report", report)
    extra = ["--methods", "tome", "--budgets", "0.6"]
    assert main(_sweep_args(checkpoint, folder, tmp_path / "out", extra)) == 0
    assert capsys.readouterr().out == ""


def test_search_steps_leave_identical_rates_and_weights_on_both_ranks_micro_batched_or_not(
    tmp_path,
):
    worker = subprocess.run(
        [*TORCHRUN, str(TESTS / "distributed_search_worker.py"), str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key, value in rank0["rates"].items():
        assert torch.equal(value, rank1["rates"][key]), key
        assert torch.equal(rank0["micro_batch_rates"][key], rank1["micro_batch_rates"][key]), key
        torch.testing.assert_close(rank0["micro_batch_rates"][key], value, rtol=1e-4, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in rank0["rates"].items() if k.endswith("logits"))
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key


def _children(parent: int) -> list[int]:
    """Process ids whose parent is `parent` (torchrun's agent starts the ranks this way)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:
            continue
        ppid = next((line.split()[1] for line in lines if line.startswith("PPid:")), "0")
        if int(ppid) == parent:
            found.append(int(status.parent.name))
    return sorted(found)


def test_a_killed_rank_fails_the_launch_clearly_and_a_rerun_resumes(checkpoint, folder, tmp_path):
    output = tmp_path / "out"
    extra = ["--methods", "tome,random,evit,pitome", "--budgets", "0.9,0.7,0.5"]
    args = _sweep_args(checkpoint, folder, output, extra)
    launch = _torchrun(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (output / "results.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.5)
    assert (output / "results.jsonl").is_file(), "the first point never finished"
    os.kill(_children(launch.pid)[-1], signal.SIGKILL)
    _, stderr = launch.communicate(timeout=300)
    assert launch.returncode != 0
    assert "FAILED" in stderr or "ChildFailedError" in stderr
    finished = {row["key"]: row["finished"] for row in _rows(output)}
    assert 1 <= len(finished) < 13
    rerun = _torchrun(args, stdout=subprocess.DEVNULL)
    assert rerun.wait(timeout=900) == 0
    rows = _rows(output)
    assert len(rows) == 13
    for row in rows:  # the points finished before the kill were not evaluated again
        if row["key"] in finished:
            assert row["finished"] == finished[row["key"]]


class Exchange:
    """All-gathers between threads that stand in for the ranks of one world."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=10)
        self.slots: list[object] = [None] * size

    def gather(self, rank: int, value: object) -> list[object]:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # every rank has read before any writes again
        return values


@dataclass(frozen=True)
class ThreadWorld(World):
    """A rank whose collectives go through an `Exchange` instead of a process group."""

    exchange: Exchange | None = None

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        return self._combine(values, sum)

    def max(self, values: dict[str, float]) -> dict[str, float]:
        return self._combine(values, max)

    def broadcast(self, value):
        return self.exchange.gather(self.rank, value)[0]

    def _combine(self, values, combine):
        gathered = self.exchange.gather(self.rank, values)
        return {name: combine(ranks[name] for ranks in gathered) for name in values}


class ThreadClock:
    """A clock per thread that advances only when a forward says how long it took."""

    def __init__(self) -> None:
        self.local = threading.local()

    def now(self, device: torch.device) -> float:
        return getattr(self.local, "seconds", 0.0)

    def spend(self, seconds: float) -> None:
        self.local.seconds = getattr(self.local, "seconds", 0.0) + seconds


class PerImageTask(ClassificationTask):
    """Classification whose forward "takes" one second per image times the MACs ratio."""

    def __init__(self, dataset, clock: ThreadClock) -> None:
        super().__init__(dataset, 4, 0, CPU)
        self.clock = clock

    def forward(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        cost = tokcomp.config_of(model).macs_ratio if tokcomp.is_patched(model) else 1.0
        self.clock.spend(len(inputs) * cost)
        return model(inputs)


@pytest.mark.parametrize("samples", [1, 3])
def test_the_speed_probe_counts_each_ranks_first_batch_over_the_slowest_rank(monkeypatch, samples):
    """Fewer samples than the batch size: the two ranks' first batches differ (2 and 1
    images), or one rank has none at all (its shard is empty)."""
    clock = ThreadClock()
    monkeypatch.setattr(timing, "now", clock.now)
    images = [(torch.randn(3, 32, 32), 0) for _ in range(samples)]
    exchange = Exchange(2)
    models = [tiny_vit(), tiny_vit()]
    points = [sweep.Point(""), sweep.Point.of(parse_variant("tome:r=2"))]

    def rank(index: int) -> list[dict[str, float]]:
        world = ThreadWorld(rank=index, size=2, exchange=exchange)
        evaluation = sweep.TaskEvaluation(PerImageTask(world.shard(images), clock), CPU, world)
        model, figures = models[index], []
        for point in points:
            with sweep.applied(model, point):
                figures.append(sweep.probe_speed(model, point, model, evaluation))
        return figures

    with ThreadPoolExecutor(2) as pool:
        ranks = list(pool.map(rank, [0, 1]))
    first_batches = [len(range(r, samples, 2)) for r in (0, 1)]  # the whole shard: under 4
    for index, point in enumerate(points):
        with sweep.applied(tiny_vit(), point) as model:
            cost = tokcomp.config_of(model).macs_ratio if point.method else 1.0
        expected = sum(first_batches) / (max(first_batches) * cost)
        for figures in ranks:
            assert figures[index]["images_per_s"] == pytest.approx(expected, rel=1e-12)
            assert figures[index]["speedup"] == pytest.approx(1 / cost, rel=1e-12)
