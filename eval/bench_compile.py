"""Speed of ToMe r=13 and PiToMe at 0.6 of the MACs under torch.compile (inductor) on DeiT-S and
ViT-B/16 (random weights: speed does not depend on them), CPU, batch 32, 2 threads.

Every model, the unpruned one included, is compiled the same way and also run eagerly, all
in the same interleaved rounds (tokcomp.bench with compile: warm-up rounds compile, then
medians of paired per-round ratios). Floors, per compressed row:
- compiled speed-up (against the compiled unpruned model) >= 0.95 x (unpruned MACs / MACs);
- compiled tokcomp faster than eager tokcomp (its "vs eager" gain > 1).
--dtype bfloat16 runs everything under CPU autocast to bfloat16 (the speed-up then against the
bfloat16 unpruned model). Exit status 1 when a floor is missed or a speed-up's spread is too
wide to trust (flagged "?").

    python eval/bench_compile.py                     # about 15-25 minutes on 2 busy cores
    python eval/bench_compile.py --dtype bfloat16 --models deit_small_patch16_224
    python eval/bench_compile.py --dtype bfloat16 --variant tome:r=0 --variant tome:r=13
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: spinning workers cost a scheduler tick per small op on a shared
# 2-core machine (see eval/bench_encoders.py). Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKCOMP_VERIFY", "0")  # the kernels' first-call checks stay untimed

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args, compiled_comparison
from compiled_comparison import TOME_AND_PITOME
from script_args import refusing, script_parser, timm_models

from tokcomp.bench import (
    BenchRow,
    BenchSettings,
    Variant,
    benchmark,
    format_table,
    parse_variant,
    rows_to_json,
    variant_model,
)
from tokcomp.errors import UsageError
from tokcomp.files import write_text_whole
from tokcomp.harness.arguments import check_new_file, positive_int

MODELS = ("deit_small_patch16_224", "vit_base_patch16_224")
#: Part of the ideal speed-up (unpruned MACs / MACs) a compiled compressed model must reach.
FLOOR = 0.95


def floor_report(rows: list[BenchRow]) -> tuple[str, bool]:
    """Each compressed row against both floors, and whether all rows pass and are trusted."""
    lines, ok = [], True
    for row in rows[1:]:
        ideal = FLOOR / row.macs_ratio
        passed = row.speedup >= ideal and row.compile_gain > 1 and row.trusted
        passed &= row.gain_trusted
        ok &= passed
        lines.append(
            f"  {row.label}: compiled speed-up {row.speedup:.3f}x (spread "
            f"{row.speedup_spread:.1%}), floor {ideal:.3f}x = {FLOOR} / MACs ratio "
            f"{row.macs_ratio:.3f}, i.e. {row.speedup * row.macs_ratio:.3f} of the MACs ratio; "
            f"compiled over eager {row.compile_gain:.2f}{'x' if row.gain_trusted else '?'} -> "
            f"{'ok' if passed else 'MISSED'}"
        )
    return "\n".join(lines), ok


def json_file(folder: Path, model: str, dtype: str) -> Path:
    """Where --json FOLDER gets `model`'s rows."""
    return folder / f"{model}-{dtype}.json"


def check_json_folder(folder: Path, models: list[str], dtype: str, force: bool) -> None:
    """Refuse (UsageError), before any work, a --json folder that is a file, or whose files
    for these models would be overwritten without --force."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--json {folder} is a file; give a folder (each model's rows go in it)")
    for model in models:
        check_new_file(json_file(folder, model, dtype), force, "--json")


def build_parser() -> argparse.ArgumentParser:
    """The script's command line."""
    parser = script_parser(__doc__)
    parser.add_argument(
        "--models", type=timm_models, default=",".join(MODELS), help="timm model names"
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        help="method:key=value,... to time instead of the two defaults (repeatable); "
        "tome:r=0 runs tokcomp's blocks reducing nothing",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--warmup",
        type=positive_int,
        default=2,
        help="untimed rounds first (at least 1: the first call of a compiled model compiles it)",
    )
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument(
        "--json",
        type=Path,
        help="also write each model's rows here, a folder: <model>-<dtype>.json per model",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing --json files")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, --variant defaulting to TOME_AND_PITOME; refused before any work: a --json
    folder `check_json_folder` refuses, and a variant that cannot apply to a model."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.variant = args.variant or TOME_AND_PITOME
    with refusing(parser):
        if args.force and not args.json:
            raise UsageError("--force overwrites the --json files; give --json FOLDER, or drop it")
        if args.json:
            check_json_folder(args.json, args.models, args.dtype, args.force)
        check_variants(args.models, args.variant)
    return args


def check_variants(models: list[str], variants: Sequence[Variant]) -> None:
    """Apply each variant once to each model, raising what tokcomp raises for one that
    cannot apply."""
    for name in models:
        model = timm.create_model(name)
        for variant in variants:
            variant_model(model, variant)


def print_report(name: str, args: argparse.Namespace, rows: list[BenchRow]) -> bool:
    """`name`'s setting, table and floors; whether every floor is met."""
    print(
        f"\n{name}, batch {args.batch_size}, {args.threads} threads, {args.dtype}, CPU, "
        f"compiled (inductor) and eager, medians of {args.repeats} interleaved rounds, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    print(format_table(rows))
    report, passed = floor_report(rows)
    print(report, flush=True)
    return passed


def bench_settings(args: argparse.Namespace) -> BenchSettings:
    """The measurement the options ask for, every model compiled."""
    return BenchSettings(
        batch_size=args.batch_size,
        dtype=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        compile=True,
    )


def write_rows(path: Path, rows: list[BenchRow], settings: BenchSettings, model: str) -> None:
    """`model`'s rows and the settings as JSON at `path`, its folder made if missing."""
    write_text_whole(path, rows_to_json(rows, settings, model=model))


def main(argv: list[str] | None = None) -> int:
    """Benchmark every model; 1 if a floor is missed."""
    args = parse_args(argv)
    settings = bench_settings(args)
    ok = True
    for name in args.models:
        torch.manual_seed(0)
        rows = benchmark(timm.create_model(name), args.variant, settings)
        ok &= print_report(name, args, rows)
        if args.json:
            write_rows(json_file(args.json, name, args.dtype), rows, settings, name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
