"""Where does a compiled compressed model spend its time? torch.profiler self time per op
group for DeiT-S unpruned, ToMe r=13 and PiToMe at 0.6 of the MACs (or the --variant ones),
each compiled (inductor, static shapes) as eval/bench_compile.py compiles them but with
inductor's Python wrapper, whose calls the profiler sees (the same kernels), profiled in
alternation, with each group's ratio to the unpruned model's (docs/methods.md section 8.1).

    python eval/profile_compiled.py --dtype bfloat16
    python eval/profile_compiled.py --dtype float32
    python eval/profile_compiled.py --dtype bfloat16 --kernels   # each inductor kernel apart
    python eval/profile_compiled.py --variant tome:r=13 --variant tome:r=13,prop_attn=false
"""

from __future__ import annotations

import os

# As in eval/bench_compile.py: passive OpenMP waiting, no first-call kernel checks timed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKCOMP_VERIFY", "0")

import argparse
import collections
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args, compiled_comparison
from compiled_comparison import add_model_arguments, models_by_label
from script_args import script_parser

from tokcomp.bench import BASELINE, compiled, runner
from tokcomp.harness.arguments import positive_int

#: ATen ops reported on their own; every other ATen op is "other".
NAMED_OPS = ("aten::addmm", "aten::copy_", "aten::mkldnn_convolution", "aten::sort")


def op_group(key: str) -> str:
    """The row a profiler event's self time goes to."""
    if key.startswith("## Call CompiledFxGraph"):
        return "inductor kernels"
    if key.startswith("graph_"):  # a kernel profiled apart (--kernels)
        return kernel_name(key)
    if "flash_attention" in key:
        return "sdpa (flash, CPU)"
    if key.startswith(("tokcomp::", "mkldnn::")) or key in NAMED_OPS:  # mkldnn: frozen linears
        return key
    return "other"


def kernel_name(key: str) -> str:
    """An inductor kernel's name without its graph and its index ("graph_1_cpp_fused_gelu_7"
    -> "cpp_fused_gelu"), so that the same fusion adds up across blocks and models."""
    return re.sub(r"_\d+$", "", re.sub(r"^graph_\d+_", "", key))


def self_ms(forward: Callable[[], object]) -> collections.Counter:
    """Self milliseconds per op group of one profiled call of `forward`."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    totals: collections.Counter = collections.Counter()
    for event in prof.key_averages():
        totals[op_group(event.key)] += event.self_cpu_time_total / 1e3
    return totals


def main(argv: list[str] | None = None) -> None:
    """Print the per-group table, summed over `--rounds` profiled calls of each model."""
    parser = script_parser(__doc__)
    add_model_arguments(parser, "profile")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="time each inductor kernel apart (inductor's kernel profile), not as one group; "
        "'inductor kernels' is then the compiled graphs' own overhead",
    )
    args = parser.parse_args(argv)
    torch._inductor.config.cpp.enable_kernel_profile = args.kernels
    images, variants = models_by_label(parser, args)
    runs = {
        label: runner(compiled(v, cpp_wrapper=False), images, args.dtype)
        for label, v in variants.items()
    }
    for forward in runs.values():  # compile, then one warm call
        forward()
        forward()
    totals = {label: collections.Counter() for label in runs}
    for _ in range(args.rounds):
        for label, forward in runs.items():
            totals[label] += self_ms(forward)
    print_table(totals, args)


def print_table(totals: dict[str, collections.Counter], args: argparse.Namespace) -> None:
    """Self ms per group and model, with the ratio to the unpruned model's."""
    base = totals[BASELINE.label]
    groups = sorted(
        {g for t in totals.values() for g in t},
        key=lambda g: -max(t.get(g, 0.0) for t in totals.values()),
    )
    print(
        f"{args.model}, {args.dtype}, batch {args.batch_size}, {args.threads} threads, compiled: "
        f"self ms summed over {args.rounds} profiled calls each (ratio to unpruned)"
    )
    width = max(26, *(len(group) + 2 for group in groups))
    print(f"{'op group':<{width}}" + "".join(f"{label:>26}" for label in totals))
    for group in [*groups, "total"]:
        row = f"{group:<{width}}"
        reference = sum(base.values()) if group == "total" else base.get(group, 0.0)
        for counts in totals.values():
            value = sum(counts.values()) if group == "total" else counts.get(group, 0.0)
            ratio = f"({value / reference:.3f})" if reference else ""
            row += f"{value:>17.1f} {ratio:>8}"
        print(row)


if __name__ == "__main__":
    main()
