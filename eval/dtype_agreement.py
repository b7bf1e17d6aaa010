"""Does bfloat16 change a classifier's accuracy, beyond noise? Each setting runs in float32 and
under bfloat16 autocast on the same images; the images whose prediction turns right or wrong
give the paired difference and its standard error (McNemar's), which an unpaired comparison of
two accuracies cannot.

    python eval/dtype_agreement.py --checkpoint results/dinov2-card/with-fmnist-head.safetensors \
        --data fashion-mnist --limit 5000 --methods tome,pitome,zero_tprune --budgets 0.65 \
        --config configs/dinov2_vits14/diffrate-0.65.json
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import refusing, script_parser

import tokcomp
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.data import limited
from tokcomp.harness.imagenet import autocast_to, model_dataset
from tokcomp.harness.sweep import Point, add_sweep_arguments, plan_points, sweep_points
from tokcomp.models import create_model

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Agreement:
    """Two runs' predictions on the same labelled images: accuracies (percent), the images
    only the second gets right (`gained`) or wrong (`lost`), and the standard error of the
    paired difference in points."""

    first: float
    second: float
    gained: int
    lost: int
    se: float

    @classmethod
    def of(cls, first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor) -> Agreement:
        """The agreement of predictions `first` and `second` (N,) with `labels` (N,)."""
        right_first, right_second = first == labels, second == labels
        n = len(labels)
        gained = int((right_second & ~right_first).sum())
        lost = int((right_first & ~right_second).sum())
        variance = (gained + lost - (gained - lost) ** 2 / n) / n**2
        return cls(
            100.0 * float(right_first.float().mean()),
            100.0 * float(right_second.float().mean()),
            gained,
            lost,
            100.0 * math.sqrt(max(variance, 0.0)),
        )


def predictions(
    model: torch.nn.Module, loader: DataLoader, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 class, label) of every image, the model under autocast to `dtype` (float32:
    none)."""
    found, labels = [], []
    with torch.inference_mode(), autocast_to(CPU, dtype):
        for images, batch_labels in loader:
            found.append(model(images).float().argmax(dim=1))
            labels.append(torch.as_tensor(batch_labels))
    return torch.cat(found), torch.cat(labels)


def compare(model: torch.nn.Module, point: Point, loader: DataLoader) -> Agreement:
    """`point`'s predictions in float32 against bfloat16 on the loader's images."""
    point.apply_to(model)
    try:
        exact, labels = predictions(model, loader, torch.float32)
        lowered, _ = predictions(model, loader, torch.bfloat16)
    finally:
        if tokcomp.is_patched(model):
            tokcomp.remove(model)
    return Agreement.of(exact, lowered, labels)


def describe(point: Point) -> str:
    """A setting as the table names it: "unpruned", "tome target_macs=0.65", a config file."""
    if point.config is not None:
        return point.label
    return f"{point.method or 'unpruned'} {point.label}".strip()


def main(argv: list[str] | None = None) -> None:
    """Print, per setting, float32 and bfloat16 accuracy and their paired difference."""
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=positive_int)
    add_sweep_arguments(parser, budgets="target MACs fractions, e.g. 0.8,0.65")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with refusing(parser):  # every setting applied once: a bad option or config is refused
        points = sweep_points(args.methods, args.budgets, args.variant, args.config)
        model = create_model(checkpoint=args.checkpoint).eval()
        plan_points(model, points)
        dataset = limited(model_dataset(args.data, model), args.limit)
    loader = DataLoader(dataset, args.batch_size, num_workers=2)
    print(f"{args.checkpoint}, {len(dataset)} images of {args.data}, float32 vs bfloat16")
    header = ("setting", "float32", "bfloat16", "Δ", "± SE", "gained", "lost")
    print(f"{header[0]:<32}" + "".join(f"{name:>9}" for name in header[1:]))
    for point in points:
        result = compare(model, point, loader)
        change = result.second - result.first
        print(
            f"{describe(point):<32}{result.first:>9.2f}{result.second:>9.2f}{change:>+9.2f}"
            f"{result.se:>9.2f}{result.gained:>9}{result.lost:>9}"
        )


if __name__ == "__main__":
    main()
