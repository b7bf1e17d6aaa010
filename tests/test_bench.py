"""The benchmark harness: rows, ratios against the unpruned run, and the memory tracker; the
video benchmark script (eval/bench_vlm_video.py) in its tiny mode."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from fixtures import eval_script

import tokcomp
from tokcomp import bench
from tokcomp.bench import BenchSettings, Variant, benchmark, format_table, peak_memory, rows_to_json
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
    rows = benchmark(tiny_vit("vit"), variants, settings, input_size=(3, 32, 32))
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
    assert all(row.compile_gain > 0 for row in rows)
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
