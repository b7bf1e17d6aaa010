"""The benchmark harness: rows, ratios against the unpruned run, and the memory tracker."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit

from tokcomp.bench import BenchSettings, Variant, benchmark, format_table, peak_memory, rows_to_json


def test_peak_memory_counts_live_tensors_created_during_the_call():
    def forward():
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float32)  # 2000 bytes, a still alive
        del a
        c = torch.empty(250, dtype=torch.float64)  # 2000 bytes, a freed
        return b, c

    assert peak_memory(forward) == 6000


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
