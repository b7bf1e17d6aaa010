"""Speed of ToMe and PiToMe at about 40% fewer MACs on ViT-B/16 CLIP image
towers: open_clip "ViT-B-16" and a Hugging Face CLIPVisionModel of the same shape, both with
random weights (speed does not depend on them), CPU, fp32, batch 16.

Each compressed tower is timed in the same run as the unpruned one (tokcomp.bench: warm-up,
interleaved repeats, medians). The floor is a speed-up of 0.8 x (unpruned MACs / pruned
MACs); the script exits with status 1 when a row misses it. OpenMP threads wait passively
unless OMP_WAIT_POLICY says otherwise (see below).

    python eval/bench_encoders.py
    python eval/bench_encoders.py --threads 2 --repeats 9 --json results/bench_encoders.json
"""

from __future__ import annotations

import os

# libgomp's default spin-waiting makes every small op cost a scheduler tick (4-8 ms) on a
# shared 2-core machine, which penalises the many small ops of a compressed model; passive
# waiting measures the model rather than its neighbours. Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import add_json_arguments, check_json_argument, script_parser

import tokcomp
from tokcomp.bench import BenchRow, BenchSettings, Variant, benchmark, format_table
from tokcomp.files import write_text_whole
from tokcomp.harness.arguments import non_negative_int, positive_int

#: Part of the ideal speed-up (unpruned MACs / pruned MACs) a compressed tower must reach.
FLOOR = 0.8
TARGET_MACS = 0.6


def open_clip_tower() -> nn.Module:
    """The image tower of open_clip's ViT-B-16 CLIP, random weights."""
    import open_clip

    return open_clip.create_model("ViT-B-16", pretrained=None).visual


def hf_clip_tower() -> nn.Module:
    """A Hugging Face CLIPVisionModel shaped like CLIP ViT-B/16, random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=16,
        image_size=224,
    )
    return CLIPVisionModel(config)


TOWERS: dict[str, Callable[[], nn.Module]] = {
    "open_clip ViT-B-16": open_clip_tower,
    "HF CLIPVisionModel ViT-B/16": hf_clip_tower,
}


def variants() -> list[Variant]:
    """ToMe, and PiToMe where tokcomp ships it, at TARGET_MACS of the unpruned MACs."""
    methods = [m for m in ("tome", "pitome") if m in tokcomp.methods()]
    options = {"target_macs": TARGET_MACS}
    return [Variant(f"{m} target_macs={TARGET_MACS}", m, options) for m in methods]


def floor_report(rows: list[BenchRow]) -> tuple[str, bool]:
    """Each compressed row's speed-up against its floor, and whether all reach it with a
    spread narrow enough to trust."""
    lines, ok = [], True
    for row in rows[1:]:
        floor = FLOOR / row.macs_ratio
        passed = row.speedup >= floor and row.trusted
        ok &= passed
        verdict = "ok" if passed else "MISSED"
        flag = "x" if row.trusted else "? (too noisy to trust)"
        lines.append(f"  {row.label}: {row.speedup:.2f}{flag}, floor {floor:.2f}x -> {verdict}")
    return "\n".join(lines), ok


def run_tower(name: str, build: Callable[[], nn.Module], settings: BenchSettings) -> list[BenchRow]:
    """Benchmark one tower and print its table and floor report."""
    torch.manual_seed(0)
    rows = benchmark(build().eval(), variants(), settings)
    print(
        f"\n{name}, batch {settings.batch_size}, {settings.threads} threads, fp32, CPU, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(format_table(rows))
    print(floor_report(rows)[0])
    return rows


def write_json(path: Path, settings: BenchSettings, results: dict[str, list[BenchRow]]) -> None:
    """Save the settings and every tower's rows."""
    data = {
        "settings": asdict(settings),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "towers": {name: [asdict(row) for row in rows] for name, rows in results.items()},
    }
    write_text_whole(path, json.dumps(data, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on every tower; 1 if a floor is missed."""
    parser = script_parser(__doc__)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=7)
    add_json_arguments(parser)
    args = parser.parse_args(argv)
    check_json_argument(parser, args)
    settings = BenchSettings(
        batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats, threads=args.threads
    )
    results = {name: run_tower(name, build, settings) for name, build in TOWERS.items()}
    if args.json:
        write_json(args.json, settings, results)
    return 0 if all(floor_report(rows)[1] for rows in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
