"""Speed of every seed method at three budgets on DeiT-S (random weights), against the
unpruned model in the same run: MACs ratio, measured speed-up, and their quotient.

python eval/bench_methods.py [--batch-size 32] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import add_json_arguments, check_json_argument, script_parser

from tokcomp.bench import BenchRow, BenchSettings, Variant, benchmark, format_table, rows_to_json
from tokcomp.files import write_text_whole
from tokcomp.harness.arguments import DTYPES, device, positive_int

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "deit_small_patch16_224"
BUDGETS = (0.8, 0.65, 0.5)


def variants() -> list[Variant]:
    """ToMe r=13, each method at three MACs budgets (DiffRate: its published 3.1/2.7/2.3-GMAC
    schedules), plus the Zero-TPrune preset."""
    rows = [Variant("tome r=13", "tome", {"r": 13})]
    for method in ("tome", "pitome", "zero_tprune", "evit", "random"):
        rows += [Variant(f"{method} {b:.2f}", method, {"target_macs": b}) for b in BUDGETS]
    rows += [
        Variant(f"diffrate {g}g", str(PRESETS / f"diffrate-{g}g.json"))
        for g in ("3.1", "2.7", "2.3")
    ]
    rows.append(Variant("zero_tprune preset", str(PRESETS / "zero_tprune-3.0g.json")))
    return rows


def quotient_lines(rows: list[BenchRow]) -> list[str]:
    """Each compressed row's speed-up over its MACs ratio's ideal one ("?": the speed-up is too
    noisy to trust)."""
    lines = ["", "speed-up / (unpruned MACs / pruned MACs):"]
    for row in rows[1:]:
        flag = "" if row.trusted else "?"
        lines.append(f"  {row.label:<24}{row.speedup * row.macs_ratio:6.2f}{flag}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=7, help="timed rounds")
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="autocast dtype")
    add_json_arguments(parser)
    args = parser.parse_args(argv)
    check_json_argument(parser, args)
    settings = BenchSettings(
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        threads=args.threads,
    )
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    rows = benchmark(model, variants(), settings)
    threads = args.threads or torch.get_num_threads()
    print(f"DeiT-S, batch {args.batch_size}, {args.device} {args.dtype}, {threads} threads")
    print(format_table(rows))
    print("\n".join(quotient_lines(rows)))
    if args.json:
        write_text_whole(args.json, rows_to_json(rows, settings, model="deit_small_patch16_224"))


if __name__ == "__main__":
    main()
