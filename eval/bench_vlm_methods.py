"""Every visual-token method at 64 of 576 visual tokens on the LLaVA-1.5-shaped VLM of
eval/bench_vlm.py (random weights, one image, a 40-token prompt, fp32, CPU): the LLM prefill
(the first pass through the decoder layers) and the time to first token (tower, the
method's own selection, prefill) of generate(max_new_tokens=1), each against the unpruned
model timed in the same interleaved rounds (tokcomp.harness.timing: medians of the
per-round ratios, with their spread; a spread over 10% is flagged "?"), next to the
analytic MACs ratio, the selection's share of the MACs and the share of the visual tokens left
after the method's last cut (tokcomp.config_of).

`keep` is 64 for every method: the visual tokens that reach the language model's later
layers (PyramidDrop's after its last stage, DART's pivots included; FastV, PyramidDrop and
DART run the first layers on all 576). Methods are those of `tokcomp.methods("vlm")`.

    python eval/bench_vlm_methods.py                      # about 10-20 minutes on 2 cores
    python eval/bench_vlm_methods.py --methods fastervlm,dart --layers 4 --repeats 1
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/bench_encoders.py
os.environ.setdefault("TOKCOMP_VERIFY", "0")  # the kernels' first-call checks stay untimed

import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import KEEP, build, inputs, layers_that_fit
from script_args import refusing, script_parser

import tokcomp
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.timing import Contender, PrefillTimer, Speedup, interleaved
from tokcomp.methods import method_class
from tokcomp.methods.visual import VisualSignal

CPU = torch.device("cpu")
TOKENS = 576
#: The visual-token methods that prune images (those declaring FRAMES prune videos).
IMAGE_METHODS = [
    name
    for name in tokcomp.methods("vlm")
    if VisualSignal.FRAMES not in method_class(name).visual_needs
]


def budget(method: str) -> dict[str, float]:
    """KEEP of the 576 visual tokens in `method`'s budget knob (random's is a fraction)."""
    knob = method_class(method).budget
    return {knob: KEEP if knob == "keep" else KEEP / TOKENS}


def contenders(
    model: nn.Module, batch: dict[str, torch.Tensor], budgets: dict[str, dict], prefill: dict
) -> dict[str, Contender]:
    """generate(max_new_tokens=1) unpruned and with each method at its options in `budgets`,
    its patch applied (or removed) before the timed call; each call's prefill seconds land in
    `prefill[label]`."""
    layers = model.model.language_model.layers

    def run(label: str) -> None:
        with PrefillTimer(layers, CPU) as timer:
            model.generate(**batch, max_new_tokens=1, do_sample=False)
        prefill.setdefault(label, []).append(timer.seconds)

    def patching(label: str, method: str | None) -> Contender:
        def prepare() -> None:
            if tokcomp.is_patched(model):
                tokcomp.remove(model)
            if method is not None:
                tokcomp.apply(model, method_of(label), **budgets[label])

        return Contender(lambda: run(label), prepare)

    return {
        "unpruned": patching("unpruned", None),
        **{label: patching(label, label) for label in budgets},
    }


def check_methods_apply(model: nn.Module, budgets: dict[str, dict]) -> None:
    """Apply each method in `budgets` once (then remove it), raising what tokcomp raises for
    one that cannot apply to `model` (DART's pivot layer beyond a one-layer model, say)."""
    for label, options in budgets.items():
        tokcomp.apply(model, method_of(label), **options)
        tokcomp.remove(model)


def method_of(label: str) -> str:
    """The method a row's label names ("fastv+tome": fastv, with merging in the tower)."""
    return label.partition("+")[0]


def table(
    model: nn.Module,
    budgets: dict[str, dict],
    totals: dict[str, list[float]],
    prefill: dict,
    frames: int | None = None,
) -> list[dict[str, Any]]:
    """One row per method: its speed-ups against the unpruned runs of the same rounds (the
    warm-up round dropped), its MACs and the share of the selectable visual tokens it keeps
    (config_of's, on a reference video of `frames` frames when given)."""
    rows = []
    for name, options in budgets.items():
        patched = tokcomp.apply(model, method_of(name), **options)
        config = tokcomp.config_of(patched, frames=frames)
        tokcomp.remove(model)
        rows.append(
            {
                "method": name,
                "ttft": Speedup.paired(totals["unpruned"], totals[name]),
                "prefill": Speedup.paired(prefill["unpruned"][1:], prefill[name][1:]),
                "ttft_ms": statistics.median(totals[name]) * 1e3,
                "macs_ratio": config.macs_ratio,
                "selection_share": config.selection_macs / config.macs,
                "kept": kept_share(config),
            }
        )
    return rows


def kept_share(config: tokcomp.Config) -> float:
    """The share of the reference item's selectable visual tokens left after the method's last
    cut (the last decoder layer's visual tokens, the always-kept ones aside)."""
    fixed = config.model["fixed_visual"]
    return (config.schedule[-1] - fixed) / (config.model["visual_tokens"] - fixed)


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The table of `table`'s rows, with the legend of its flags."""
    print(
        f"{'method':12s} {'TTFT speed-up':>18s} {'prefill speed-up':>18s} {'TTFT ms':>9s} "
        f"{'MACs':>6s} {'sel %':>6s} {'kept':>6s}"
    )
    for row in rows:
        print(
            f"{row['method']:12s} {_ratio(row['ttft']):>18s} {_ratio(row['prefill']):>18s} "
            f"{row['ttft_ms']:9.0f} {row['macs_ratio']:6.3f} {row['selection_share']:6.1%} "
            f"{row['kept']:6.1%}"
        )
    print('"?": the per-round speed-ups spread over more than 10% of their median (IQR)')


def _ratio(speedup: Speedup) -> str:
    return f"{speedup.ratio:6.2f}x{' ' if speedup.trusted else '?'} ({speedup.spread:5.1%})"


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--methods", default=",".join(IMAGE_METHODS))
    parser.add_argument(
        "--layers", type=positive_int, default=None, help="decoder layers (default: fit)"
    )
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads (see bench_vlm)"
    )
    args = parser.parse_args(argv)
    methods = [name for name in args.methods.split(",") if name]
    unknown = sorted(set(methods) - set(IMAGE_METHODS))
    if unknown or not methods:
        which = f"{unknown} are not visual-token methods that prune images" if unknown else "none"
        parser.error(f"--methods: {which}; choose from {', '.join(IMAGE_METHODS)}")
    torch.set_num_threads(args.threads)
    layers = args.layers or layers_that_fit()
    print(
        f"LLaVA-1.5-shaped, random weights, fp32, {layers} decoder layers, {args.threads} "
        f"thread(s), {KEEP} of 576 visual tokens, median of {args.repeats} interleaved rounds "
        "after a warm-up",
        flush=True,
    )
    model, batch = build(layers), inputs()
    budgets = {name: budget(name) for name in methods}
    with refusing(parser):
        check_methods_apply(model, budgets)
    prefill: dict[str, list[float]] = {}
    runs = contenders(model, batch, budgets, prefill)
    with torch.inference_mode():
        seconds = interleaved(list(runs.values()), args.repeats, CPU)
    totals = dict(zip(runs, seconds, strict=True))
    rows = table(model, budgets, totals, prefill)
    print(f"unpruned: time to first token {statistics.median(totals['unpruned']) * 1e3:.0f} ms")
    print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
