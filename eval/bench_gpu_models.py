"""Throughput of DeiT-S and ViT-B/16 (timm, random weights) under ToMe r=13, PiToMe at ToMe
r=13's MACs, a DiffRate preset and Zero-TPrune, against the unpruned model of the same run:
images/s and speed-up, with ToMe's benchmark convention (warm-up runs, then the median of timed
runs) through tokcomp.bench.benchmark; fp16 autocast by default on CUDA.

    python eval/bench_gpu_models.py --device cuda --batch-size 256 --json results/models.json
    python eval/bench_gpu_models.py --device cpu --batch-size 2 --repeats 1   # smoke test
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import refusing, script_parser

import tokcomp
from tokcomp.bench import BenchSettings, Variant, benchmark, format_table, rows_to_json
from tokcomp.files import write_text_whole
from tokcomp.harness.arguments import DTYPES, check_new_file, device, non_negative_int, positive_int

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

#: timm name -> (label, DiffRate preset, Zero-TPrune preset or None for the method's defaults).
MODELS = {
    "deit_small_patch16_224": (
        "DeiT-S",
        CONFIGS / "deit_small_patch16_224" / "diffrate-2.9g.json",
        CONFIGS / "deit_small_patch16_224" / "zero_tprune-3.0g.json",
    ),
    "vit_base_patch16_224": (
        "ViT-B/16",
        CONFIGS / "deit_base_patch16_224" / "diffrate-11.5g.json",
        None,
    ),
}


def tome_macs_ratio(model: nn.Module, r: int = 13) -> float:
    """MACs of `model` under ToMe with `r` merges per block, as a fraction of the unpruned."""
    base = tokcomp.macs(model)
    ratio = tokcomp.macs(tokcomp.apply(model, "tome", r=r)) / base
    tokcomp.remove(model)
    return ratio


def variants(model: nn.Module, diffrate: Path, zero_tprune: Path | None) -> list[Variant]:
    """ToMe r=13, PiToMe at the same MACs, the DiffRate preset, Zero-TPrune (preset or default)."""
    ratio = tome_macs_ratio(model)
    rows = [
        Variant("tome r=13", "tome", {"r": 13}),
        Variant(f"pitome macs={ratio:.3f}", "pitome", {"target_macs": ratio}),
        Variant(f"diffrate {diffrate.stem.split('-')[1]}", str(diffrate)),
    ]
    if zero_tprune is None:
        rows.append(Variant("zero_tprune default", "zero_tprune"))
    else:
        rows.append(Variant(f"zero_tprune {zero_tprune.stem.split('-')[1]}", str(zero_tprune)))
    return rows


def main(argv: list[str] | None = None) -> None:
    """Benchmark every model of MODELS (or --models) and print one table each."""
    parser = script_parser(__doc__)
    parser.add_argument("--device", type=device, default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument(
        "--dtype", default=None, choices=DTYPES, help="autocast dtype (cuda: float16, cpu: none)"
    )
    parser.add_argument("--warmup", type=non_negative_int, default=5)
    parser.add_argument("--repeats", type=positive_int, default=20)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", type=Path, help="write every model's rows here (overwritten)")
    args = parser.parse_args(argv)
    if args.json:
        with refusing(parser):  # a folder, or a file in a folder's place (eval/gpu_check.sh
            check_new_file(args.json, True, "--json")  # reruns overwrite their results)
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    settings = BenchSettings(
        batch_size=args.batch_size,
        device=args.device,
        dtype=dtype,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    precision = "float32" if dtype == "float32" else f"{dtype} autocast"
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, ops backend "
        f"{tokcomp.backend(args.device)}, batch {args.batch_size}, {args.device} {precision}, "
        f"warm-up {args.warmup}, median of {args.repeats}"
    )
    results = {}
    for name in args.models:
        label, diffrate, zero_tprune = MODELS[name]
        model = timm.create_model(name, pretrained=False)
        rows = benchmark(model, variants(model, diffrate, zero_tprune), settings)
        print(f"\n{label} ({name})")
        print(format_table(rows))
        results[name] = json.loads(rows_to_json(rows, settings, model=name))
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        write_text_whole(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
