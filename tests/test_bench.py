"""The benchmark harness: rows, ratios against the unpruned run, and the memory tracker; the
video benchmark script (eval/bench_vlm_video.py) in its tiny mode."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import tiny_vit
from fixtures import eval_script

import tokcomp
from tokcomp import bench
from tokcomp.bench import (
    BenchSettings,
    Variant,
    benchmark,
    format_table,
    input_size_of,
    peak_memory,
    rows_to_json,
)
from tokcomp.harness.timing import Speedup
from tokcomp.methods.dycoke import merged_kept

METHODS = tokcomp.methods("vlm")


def test_peak_memory_counts_live_tensors_created_during_the_call():
    def forward():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float32)  # 2000 bytes, a still alive
        del a
        c = torch.empty(250, dtype=torch.float64)  # 2000 bytes, a freed
        return b, c

    assert peak_memory(forward) == 6000


def test_benchmark_refuses_a_compressed_model_as_its_baseline():
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=4)
    with pytest.raises(ValueError, match=r"benchmark the unpruned model \(tokcomp.remove"):
        benchmark(model, [Variant("tome r=2", "tome", {"r": 2})], BenchSettings(batch_size=2))


def test_benchmark_reports_each_variant_against_the_unpruned_model():
    settings = BenchSettings(batch_size=2, warmup=1, repeats=2)
    variants = [Variant("tome r=4", "tome", {"r": 4}), Variant("tome r=12", "tome", {"r": 12})]
    rows = benchmark(tiny_vit("vit"), variants, settings)  # the model's own 32 x 32 images
    assert [r.label for r in rows] == ["unpruned", "tome r=4", "tome r=12"]
    assert rows[0].speedup == 1.0 and rows[0].macs_ratio == 1.0
    assert rows[0].gmacs > rows[1].gmacs > rows[2].gmacs
    assert rows[0].selection_share == 0 < min(rows[1].selection_share, rows[2].selection_share)
    for row in rows:
        assert row.images_per_s == pytest.approx(2 / (row.latency_ms / 1e3))
        assert row.peak_memory_mb > 0
    table = format_table(rows)
    assert "tome r=12" in table and "speed-up" in table and "sel %" in table
    data = json.loads(rows_to_json(rows, settings, model="tiny"))
    assert data["model"] == "tiny" and len(data["rows"]) == 3


def test_input_size_is_what_the_model_was_built_for():
    with torch.device("meta"):
        resized = timm.create_model("vit_tiny_patch16_384", img_size=64, in_chans=1)
    assert input_size_of(resized) == (1, 64, 64)  # not its pretrained_cfg's (3, 384, 384)
    stem = torch.nn.Conv2d(3, 8, 4)
    stem.pretrained_cfg = {"input_size": (3, 96, 96)}
    assert input_size_of(stem) == (3, 96, 96)
    assert input_size_of(torch.nn.Identity()) == (3, 224, 224)


def test_compiled_benchmark_times_compiled_and_eager_models_in_the_same_rounds(monkeypatch):
    """compile=True: every model, the unpruned one too, is compiled (aot_eager stands in for
    inductor here) and also run eagerly; rows carry the compiled model's gain over eager."""
    compiled = []

    def aot_eager(model: torch.nn.Module) -> torch.nn.Module:
        compiled.append(model)
        return torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(bench, "compiled", aot_eager)
    settings = BenchSettings(batch_size=2, warmup=1, repeats=3, compile=True)
    rows = benchmark(
        tiny_vit("vit"), [Variant("tome r=4", "tome", {"r": 4})], settings, (3, 32, 32)
    )
    assert len(compiled) == 2 and not tokcomp.is_patched(compiled[0])
    assert tokcomp.is_patched(compiled[1])
    assert all(row.compile_gain > 0 and row.compile_gain_spread >= 0 for row in rows)
    assert "vs eager" in format_table(rows)


def test_video_benchmark_budgets_are_each_knob_at_a_tenth_and_dycoke_at_its_nearest():
    """DyCoke keeps 3 of 8 frames whole (pairs prune 1, 3, 5, 7, the window 2) whatever k, so
    its nearest share to 10% is k = 1 (37.5%); every other knob is the share itself."""
    script = eval_script("bench_vlm_video")
    budgets = script.budgets(["zoo", "random", "dycoke"], tokens=8 * 196, frames=8)
    assert budgets == {"zoo": {"keep": 0.1}, "random": {"keep_ratio": 0.1}, "dycoke": {"k": 1.0}}
    assert merged_kept(8 * 196, 8, 1.0) == 3 * 196


def test_video_benchmark_tiny_mode_times_every_method_against_the_unpruned_model(capsys):
    """--tiny: the Amdahl bound, then one row per visual-token method with its kept share of
    the tiny video's 72 tokens (7, 9.7%; DyCoke 27, 37.5%; SparseVLM's last stage below its
    average)."""
    assert eval_script("bench_vlm_video").main(["--tiny", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("Amdahl bound by MACs") for line in lines)
    rows = {line.split()[0]: line.split() for line in lines if line[:12].strip() in METHODS}
    assert sorted(rows) == sorted(METHODS)
    kept = {name: row[-1] for name, row in rows.items()}
    assert kept.pop("dycoke") == "37.5%"
    assert float(kept.pop("sparsevlm").rstrip("%")) < 9.7
    assert set(kept.values()) == {"9.7%"}


def test_peak_memory_leaves_out_storages_that_existed_before_the_call():
    """Views and in-place ops on the inputs or the weights allocate nothing; a new tensor
    does."""
    inputs = torch.zeros(1000)  # 4000 bytes, before the call
    weight = torch.nn.Linear(50, 20).weight  # 4000 bytes

    def forward():
        with torch.inference_mode():
            return inputs.view(10, 100), inputs.add_(1.0), weight.t(), weight[:10].reshape(-1)

    assert peak_memory(forward) == 0
    assert peak_memory(lambda: (inputs.view(10, 100), inputs * 2.0)) == 4000


def test_compiled_benchmark_refuses_to_time_the_first_call_that_compiles(monkeypatch):
    """Without a warm-up round the first timed round of every compiled model would be its
    compilation, and the eager runs of that round would not pay for one."""
    monkeypatch.setattr(bench, "compiled", lambda model: torch.compile(model, backend="eager"))
    settings = BenchSettings(batch_size=2, warmup=0, repeats=1, compile=True)
    with pytest.raises(ValueError, match="at least one warm-up round"):
        benchmark(tiny_vit("vit"), [Variant("tome r=4", "tome", {"r": 4})], settings, (3, 32, 32))


def test_a_noisy_compile_gain_is_flagged_in_the_table():
    def row(label: str, gain: float, spread: float) -> bench.BenchRow:
        return bench.BenchRow(label, None, {}, 1.0, 1.0, 0.0, 10.0, 1.0, 0.0, 100.0, 1.0, gain)

    calm, noisy = row("unpruned", 1.2, 0.05), row("tome", 1.3, 0.4)
    calm.compile_gain_spread, noisy.compile_gain_spread = 0.05, 0.4
    assert calm.gain_trusted and not noisy.gain_trusted
    table = format_table([calm, noisy])
    assert "1.20x" in table and "1.30?" in table and "too noisy to trust" in table
    assert "too noisy" not in format_table([calm])


def test_vlm_benchmark_pairs_its_speedups_by_round_and_flags_a_noisy_one():
    """eval/bench_vlm.py: the warm-up round is dropped, each round's unpruned run is paired
    with the pruned run of the same round (a load that changes between rounds cancels), and
    a spread too wide to trust is flagged."""
    script = eval_script("bench_vlm")
    load = iter([50.0, 50.0, 1.0, 1.0, 4.0, 4.0, 2.0, 2.0])  # per call; the first round: warm-up
    cost = {"unpruned": 2.0, "zoo default": 1.0}
    called = []

    class Watch:
        def run(self, forward):
            forward()
            seconds = cost[called[-1]] * next(load)
            return {"total": seconds, "prefill": seconds / 2}

    runs = {label: script.Contender(lambda k=label: called.append(k)) for label in cost}
    records = script.rounds(runs, Watch(), repeats=3)
    assert [r["total"] for r in records["unpruned"]] == [2.0, 8.0, 4.0]
    assert [r["total"] for r in records["zoo default"]] == [1.0, 4.0, 2.0]
    first = script.speedup(records, "zoo default", "total")
    assert (first.ratio, first.spread) == (2.0, 0.0)
    assert script.ratio_text(first).startswith("2.00x")
    records["zoo default"][1]["prefill"] *= 3  # a load that hit only the pruned run
    assert script.ratio_text(script.speedup(records, "zoo default", "prefill")).startswith("2.00?")


def test_video_benchmark_keeps_the_flag_of_a_noisy_speedup_that_reaches_a_floor():
    script = eval_script("bench_vlm_video")
    rows = [
        {"method": "noisy", "prefill": Speedup(9.0, 0.5), "ttft": Speedup(1.5, 0.01)},
        {"method": "calm", "prefill": Speedup(6.0, 0.02), "ttft": Speedup(3.5, 0.01)},
    ]
    prefill, ttft = script.floor_lines(rows)
    assert prefill.endswith(": noisy?, calm") and ttft.endswith(": calm")


def test_encoder_and_method_benchmarks_keep_the_flag_of_a_noisy_speedup():
    rows = [
        bench.BenchRow("unpruned", None, {}, 1.0, 1.0, 0.0, 10.0, 1.0, 0.0, 100.0),
        bench.BenchRow("tome", "tome", {}, 0.5, 0.5, 0.0, 20.0, 2.0, 0.5, 50.0),
        bench.BenchRow("pitome", "pitome", {}, 0.5, 0.5, 0.0, 20.0, 2.0, 0.05, 50.0),
    ]
    floor_report = eval_script("bench_encoders").floor_report
    report, passed = floor_report(rows)
    noisy, calm = report.splitlines()
    assert "2.00?" in noisy and "2.00x" in calm
    assert not passed and floor_report([rows[0], rows[2]])[1]  # a floor needs a trusted figure
    quotients = eval_script("bench_methods").quotient_lines(rows)
    assert quotients[-2].endswith("1.00?") and quotients[-1].endswith("1.00")


def _compiled_row(speedup: float, spread: float, gain: float, gain_spread: float) -> bench.BenchRow:
    """A compressed row at half the MACs, compiled, with these figures."""
    figures = dict(compile_gain=gain, compile_gain_spread=gain_spread)
    return bench.BenchRow("tome", "tome", {}, 0.5, 0.5, 0.0, 20.0, speedup, spread, 50.0, **figures)


@pytest.mark.parametrize(
    ("row", "passes"),
    [
        (_compiled_row(1.95, 0.02, 1.2, 0.02), True),
        (_compiled_row(1.85, 0.02, 1.2, 0.02), False),  # under 0.95 of the MACs ratio
        (_compiled_row(1.899, 0.02, 1.2, 0.02), False),  # 0.9495: printed 0.95 before
        (_compiled_row(1.95, 0.5, 1.2, 0.02), False),  # the speed-up too noisy to trust
        (_compiled_row(1.95, 0.02, 0.98, 0.02), False),  # compiled slower than eager
        (_compiled_row(1.95, 0.02, 1.2, 0.5), False),  # the compiled gain too noisy to trust
    ],
)
def test_compiled_floors_need_each_figure_reached_and_trusted(row, passes):
    """eval/bench_compile.py: the speed-up at 0.95 of the MACs ratio and compiled faster than
    eager, each with a spread narrow enough to read."""
    unpruned = bench.BenchRow("unpruned", None, {}, 1.0, 1.0, 0.0, 10.0, 1.0, 0.0, 100.0)
    report, passed = eval_script("bench_compile").floor_report([unpruned, row])
    assert passed is passes
    assert report.endswith("ok" if passes else "MISSED")
    assert f"i.e. {row.speedup * row.macs_ratio:.3f} of the MACs ratio" in report


@pytest.mark.parametrize(
    ("prefill", "first", "holds"),
    [
        (Speedup(4.2, 0.02), Speedup(2.6, 0.02), True),
        (Speedup(3.9, 0.02), Speedup(2.6, 0.02), False),
        (Speedup(4.2, 0.02), Speedup(2.4, 0.02), False),
        (Speedup(4.2, 0.5), Speedup(2.6, 0.02), False),
        (Speedup(4.2, 0.02), Speedup(2.6, 0.5), False),
    ],
)
def test_vlm_floors_need_both_speedups_reached_and_trusted(prefill, first, holds):
    assert eval_script("bench_vlm").floors_hold(prefill, first) is holds


def test_generation_floors_hold_at_every_batch_with_trusted_figures(capsys):
    """eval/bench_vlm_generate.py: 1.5x at batch 8, never slower than unpruned elsewhere."""
    verdict = eval_script("bench_vlm_generate").verdict
    calm = [(1, 0, 0, Speedup(1.02, 0.02)), (8, 0, 0, Speedup(1.6, 0.02))]
    assert verdict(calm)
    assert not verdict([(1, 0, 0, Speedup(0.97, 0.02)), calm[1]])  # slower at batch 1
    assert not verdict([calm[0], (8, 0, 0, Speedup(1.4, 0.02))])  # under 1.5x at batch 8
    assert not verdict([calm[0], (8, 0, 0, Speedup(1.6, 0.5))])  # too noisy to trust
    assert capsys.readouterr().out.count("MISSED") == 3
