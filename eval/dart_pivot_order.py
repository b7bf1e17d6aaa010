"""Does the order in which DART's pivots claim their tokens matter? The released code runs the
pivots in the order of a Python set of token positions (an artefact); tokcomp fixes the order
(image pivots, then text pivots, each by descending key norm; docs/methods.md section 6.10).
`dart_shuffled` claims with the same pivots and quotas in a random order (one seeded draw per
batch). On the easy-VQA demo VLM this reports both methods' accuracy (tokcomp's VQA sweep) and,
per budget, the mean Jaccard index of the two kept sets of each distinct selection (an image
under its question's pivots: the sweep's memory and speed probes, which select again on its
first batch, are not counted twice). Selections run only for results the sweep measures: on a
rerun that reuses saved results the script says so instead of a mean.

    OMP_WAIT_POLICY=PASSIVE python eval/dart_pivot_order.py --limit 5000 \\
        --budgets 0.1875,0.4375 --output results/dart-pivot-order

(0.1875 and 0.4375 of 64 tokens: 4 pivots + 8 x 1 and 4 + 8 x 3, the released T // 8 quotas.)
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import script_parser

from tokcomp.cli import main as tokcomp_main
from tokcomp.harness.arguments import positive_int
from tokcomp.methods import VisualTokens, dart
from tokcomp.methods.registry import register

#: Per kept count, the Jaccard index of tokcomp's and the shuffled order's kept sets, by the
#: digest of the selection's inputs (its first draw is kept).
AGREEMENT: dict[int, dict[str, float]] = defaultdict(dict)
ORDERS = torch.Generator().manual_seed(0)
FIXED_ORDER_CLAIM = dart._claim


def _claim_in_random_order(
    states: torch.Tensor, pivots: torch.Tensor, quotas: torch.Tensor, taken: torch.Tensor
) -> torch.Tensor:
    order = torch.randperm(pivots.shape[1], generator=ORDERS)
    fixed = FIXED_ORDER_CLAIM(states, pivots, quotas, taken)
    shuffled = FIXED_ORDER_CLAIM(states, pivots[:, order], quotas[:, order], taken)
    jaccard = (fixed & shuffled).sum(dim=1) / (fixed | shuffled).sum(dim=1)
    for row, value in enumerate(jaccard.tolist()):
        key = _digest(states[row], pivots[row], quotas[row], taken[row])
        AGREEMENT[int(fixed[row].sum())].setdefault(key, value)
    return shuffled


def _digest(*tensors: torch.Tensor) -> str:
    """A digest of the values of `tensors`: the same selection problem gives the same one."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _random_order() -> Iterator[None]:
    dart._claim = _claim_in_random_order
    try:
        yield
    finally:
        dart._claim = FIXED_ORDER_CLAIM


@register
@dataclass(kw_only=True)
class ShuffledDART(dart.DART):
    """DART with its pivots claiming in a random order."""

    name: ClassVar[str] = "dart_shuffled"

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        with _random_order():
            return super().select(visual, keep)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--limit", type=positive_int, default=5000)
    parser.add_argument("--budgets", default="0.1875,0.4375")
    parser.add_argument("--output", default="results/dart-pivot-order")
    args = parser.parse_args(argv)
    sweep = ["--methods", "dart,dart_shuffled", "--budgets", args.budgets, "--output", args.output]
    data = ["--data", "easy-vqa", "--limit", str(args.limit), "--threads", "1"]
    code = tokcomp_main(["eval", "vqa", *data, *sweep])
    if code != 0:
        return code
    if not AGREEMENT:
        print(
            f"no DART selection ran: the sweep reused the results saved in {args.output}; give "
            "another --output to measure how much the pivot order changes the kept sets"
        )
    for kept, by_selection in sorted(AGREEMENT.items()):
        values = list(by_selection.values())
        print(
            f"keep {kept}: mean Jaccard of the kept sets, fixed vs random pivot order: "
            f"{statistics.fmean(values):.3f} over {len(values)} selections (identical: "
            f"{sum(v == 1.0 for v in values) / len(values):.1%})"
        )
    return code


if __name__ == "__main__":
    raise SystemExit(main())
