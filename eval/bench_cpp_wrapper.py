"""What inductor's C++ wrapper gives compiled models on the CPU: the unpruned model, ToMe r=13
and PiToMe at 0.6 of the MACs (or the --variant ones), each compiled with tokcomp's CPU
inference settings (tokcomp.bench.CPU_INFERENCE_SETTINGS) and again with the Python wrapper
instead, all timed in the same interleaved rounds (docs/methods.md section 8.1).

Prints each model's time with either wrapper, the C++ wrapper's gain per model (medians of
paired per-round ratios, with their spread) and each compressed model's speed-up over the
unpruned one under either wrapper. The outputs of the two wrappers are the same kernels'.

    python eval/bench_cpp_wrapper.py --dtype bfloat16 --repeats 21
"""

from __future__ import annotations

import os

# As in eval/bench_compile.py: passive OpenMP waiting, no first-call kernel checks timed.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKCOMP_VERIFY", "0")

import copy
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args, compiled_comparison
from compiled_comparison import add_model_arguments, models_by_label
from script_args import script_parser
from torch._dynamo.utils import counters

from tokcomp.bench import BASELINE, compiled, runner
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.timing import Contender, Speedup, interleaved

WRAPPERS = {"C++": True, "Python": False}


def report(seconds: dict[tuple[str, str], Sequence[float]], repeats: int) -> list[str]:
    """The lines printed for per-(model label, wrapper) seconds timed in the same rounds."""
    labels = list(dict.fromkeys(label for label, _ in seconds))
    lines = [f"{'model':<28}" + "".join(f"{w + ' ms':>12}" for w in WRAPPERS) + "  C++ gain"]
    for label in labels:
        gain = Speedup.paired(seconds[label, "Python"], seconds[label, "C++"])
        times = "".join(f"{1e3 * statistics.median(seconds[label, w]):>12.1f}" for w in WRAPPERS)
        lines.append(f"{label:<28}{times}  {gain.ratio:.3f}x (spread {gain.spread:.1%})")
    lines.append(f"speed-up over the unpruned model, medians of {repeats} rounds:")
    for label in labels[1:]:
        ups = {w: Speedup.paired(seconds[BASELINE.label, w], seconds[label, w]) for w in WRAPPERS}
        figures = (f"{w} {u.ratio:.3f}x ({u.spread:.1%})" for w, u in ups.items())
        lines.append(f"  {label}: " + ", ".join(figures))
    return lines


def compiled_runs(
    variants: dict[str, nn.Module], images: torch.Tensor, dtype: str
) -> dict[tuple[str, str], Callable[[], Any]]:
    """Per (model label, wrapper) a call of the model compiled with that wrapper, each on a
    copy of its own: dynamo reuses a model's compiled code whatever the inductor settings, so
    a second wrapper compiled on the same model runs the first one's code."""
    return {
        (label, name): runner(compiled(copy.deepcopy(v), cpp_wrapper=cpp), images, dtype)
        for label, v in variants.items()
        for name, cpp in WRAPPERS.items()
    }


def main(argv: list[str] | None = None) -> None:
    """Time every model with both wrappers in the same rounds and print the comparison."""
    parser = script_parser(__doc__)
    add_model_arguments(parser, "time")
    parser.add_argument("--repeats", type=positive_int, default=15)
    args = parser.parse_args(argv)
    images, variants = models_by_label(parser, args)
    runs = compiled_runs(variants, images, args.dtype)
    with torch._dynamo.config.patch(recompile_limit=max(8, len(runs))):
        for forward in runs.values():  # compile, then one warm call
            forward()
            forward()
    if counters["frames"]["ok"] != len(runs):
        raise SystemExit(f"{counters['frames']['ok']} compiles for {len(runs)} compiled models")
    contenders = [Contender(forward) for forward in runs.values()]
    times = interleaved(contenders, args.repeats, images.device)
    print(
        f"{args.model}, {args.dtype}, batch {args.batch_size}, {args.threads} threads, "
        f"compiled (inductor, freezing), {args.repeats} interleaved rounds"
    )
    print("\n".join(report(dict(zip(runs, times, strict=True)), args.repeats)))


if __name__ == "__main__":
    main()
