"""Timings that survive a busy machine: interleaved rounds, paired speed-ups with their spread
and the flag for an untrusted one, and a sweep whose points keep their speed-ups while the
machine gets busier (a fake clock stands in for the load: no test times anything real)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vit

import tokcomp
from tokcomp.bench import BenchRow, format_table
from tokcomp.harness import sweep, timing
from tokcomp.harness.fingerprint import Fingerprint
from tokcomp.harness.imagenet import ClassificationTask
from tokcomp.harness.results import ResultStore, with_baseline
from tokcomp.harness.results import format_table as sweep_table
from tokcomp.harness.timing import Contender, Speedup, interleaved

CPU = torch.device("cpu")


class FakeClock:
    """A clock that advances only when a forward says how long it took."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def now(self, device: torch.device) -> float:
        return self.seconds

    def spend(self, seconds: float) -> None:
        self.seconds += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing, "now", fake.now)
    return fake


def test_rounds_alternate_their_order_and_prepare_before_each_timed_call(clock):
    calls = []

    def contender(name: str, cost: float) -> Contender:
        return Contender(
            lambda: (calls.append(name), clock.spend(cost)), lambda: calls.append(f"prep {name}")
        )

    times = interleaved([contender("a", 1.0), contender("b", 2.0)], repeats=2, device=CPU)
    assert times == [[1.0, 1.0], [2.0, 2.0]]  # the warm-up round is not counted
    assert calls == [
        *("prep a", "a", "prep b", "b"),  # warm-up
        *("prep b", "b", "prep a", "a"),  # reversed
        *("prep a", "a", "prep b", "b"),
    ]


def test_paired_speedups_cancel_a_load_that_changes_between_rounds():
    load = [1.0, 3.0, 1.5, 5.0, 2.0]  # the machine's load in each round
    baseline = [2.0 * x for x in load]
    variant = [1.0 * x for x in load]
    speedup = Speedup.paired(baseline, variant)
    assert (speedup.ratio, speedup.spread, speedup.trusted) == (2.0, 0.0, True)
    # the ratio of medians would read 2.0 only by luck; per-round ratios are exact
    noisy = Speedup.paired([2.0, 2.0, 2.0, 2.0], [1.0, 1.6, 1.0, 1.6])
    assert noisy.ratio == pytest.approx(1.625)
    assert noisy.spread > timing.TRUSTED_SPREAD and not noisy.trusted
    single = Speedup.paired([3.0], [1.5])
    assert single.ratio == 2.0 and not single.trusted  # one round shows no spread


def test_rounds_the_clock_read_as_zero_are_left_out():
    assert Speedup.paired([2.0, 0.0, 2.0, 2.0], [1.0, 1.0, 0.0, 1.0]).ratio == 2.0
    unread = Speedup.paired([0.0, 1.0], [1.0, 0.0])
    assert math.isnan(unread.ratio) and not unread.trusted


class LoadedTask(ClassificationTask):
    """Classification of one batch of random images whose forward "takes" the model's MACs
    ratio times a load that doubles every second call: between the rounds of a probe (two
    calls each; the pass before it makes two calls too, as does each point's)."""

    def __init__(self, clock: FakeClock) -> None:
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(4) % 10
        super().__init__(list(zip(images, labels, strict=True)), 4, 0, CPU)
        self.clock, self.calls = clock, 0

    def forward(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        patched = tokcomp.is_patched(model)
        cost = tokcomp.config_of(model).macs_ratio if patched else 1.0
        self.clock.spend(cost * 2.0 ** (self.calls // 2))
        self.calls += 1
        return model(inputs)


def test_a_sweep_keeps_each_points_speedup_while_the_machine_gets_busier(clock):
    task = LoadedTask(clock)
    points = sweep.sweep_points(["tome", "random"], [0.8, 0.6])
    store = ResultStore(None, Fingerprint.of())
    model = tiny_vit()
    plans = sweep.plan_points(model, points)
    rows = sweep.run_sweep(model, plans, sweep.task_evaluation(task, CPU), store)
    assert rows[0]["speedup"] == 1.0 and rows[0]["speedup_spread"] == 0.0
    for row in rows[1:]:  # the load grew 2**6 between points, and within each point
        assert row["speedup"] == pytest.approx(1 / row["macs_ratio"], rel=1e-9)
        assert row["speedup_spread"] == pytest.approx(0.0, abs=1e-9)
    table = sweep_table(with_baseline(rows, "top1"), ("top1", "top5"))
    assert "?" not in table and f"{1 / rows[1]['macs_ratio']:.2f}x" in table


def _row(label: str, speedup: float, spread: float) -> BenchRow:
    return BenchRow(label, None, {}, 1.0, 1.0, 0.0, 10.0, speedup, spread, 100.0)


def test_a_wide_spread_is_flagged_in_the_tables():
    rows = [_row("unpruned", 1.0, 0.0), _row("calm", 1.5, 0.05), _row("noisy", 2.4, 0.4)]
    table = format_table(rows)
    assert "1.50x" in table and "2.40?" in table and "too noisy to trust" in table
    assert "too noisy" not in format_table(rows[:2])


def test_rows_without_a_speed_probe_get_a_flagged_throughput_ratio():
    """lmms-eval's evaluation has no interleaved probe: its rows' speed-up is their
    throughput over the unpruned row's, flagged as of unknown spread."""
    rows = [
        {"method": "unpruned", "vqa": 80.0, "images_per_s": 10.0},
        {"method": "zoo", "vqa": 79.0, "images_per_s": 25.0},
    ]
    base, zoo = with_baseline(rows, "vqa")
    assert zoo["speedup"] == 2.5 and not zoo["trusted"] and base["trusted"]
    assert zoo["delta_vqa"] == -1.0
