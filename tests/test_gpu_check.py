"""The CPU-side pieces of eval/gpu_check.sh (the GPU machine's one command): the script
parses, and its model benchmark runs end to end (here on the CPU, tiny batch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses() -> None:
    result = subprocess.run(
        ["bash", "-n", str(ROOT / "eval" / "gpu_check.sh")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_gpu_model_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "models.json"
    command = [
        sys.executable,
        str(ROOT / "eval" / "bench_gpu_models.py"),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--models",
        "deit_small_patch16_224",
        "--json",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["deit_small_patch16_224"]["rows"]
    labels = [row["label"] for row in rows]
    assert labels[0] == "unpruned"
    assert labels[1:] == ["tome r=13", labels[2], "diffrate 2.9g", "zero_tprune 3.0g"]
    assert labels[2].startswith("pitome macs=")
    assert all(row["images_per_s"] > 0 for row in rows)
    assert all(row["macs_ratio"] < 0.8 for row in rows[1:])
