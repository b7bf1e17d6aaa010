"""Does ranking tokens pay on the default ViT? Prune by fixed rules at the same blocks and
token counts and compare top-1 on Fashion-MNIST test images.

Rules (each keeps the protected tokens and the top of its score):
  random          the `random` method (a subset per image at each block, as in the sweeps)
  attn-top        most class-token attention (EViT's ranking, no fused token)
  attn-bottom     least class-token attention (the opposite ranking)
  garment-oracle  brightest input patches first: background goes before the garment

If even the oracle and the opposite ranking both lose to random, importance ranking cannot
beat random on this model: what it needs is coverage, which random keeps and ranking loses.
With --fuse each ranking rule also runs with its dropped tokens folded into one token of
their total size (proportional attention keeps their mass), to see how much of the loss is
the lost mass and how much the lost spread.

    OMP_WAIT_POLICY=PASSIVE python eval/probe_selection.py --limit 2000 [--fuse]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the training script's helpers
from script_args import REPO, fractions_of_one, refusing, script_parser
from train_vit_fmnist import normalize, patch_brightness

import tokcomp
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.data import limited
from tokcomp.harness.fashion_mnist import DEFAULT_ROOT, load_arrays, place_at_fixed_offsets
from tokcomp.harness.imagenet import canvas_of
from tokcomp.methods.base import BlockMethod, BlockPosition, Geometry
from tokcomp.methods.budget import ratio_schedule
from tokcomp.methods.state import Signal, Signals, TokenState, rank_by_score
from tokcomp.models import create_model
from tokcomp.ops import MergePlan

#: The shipped Fashion-MNIST ViT (eval/train_vit_fmnist.py), wherever the script is run from.
CHECKPOINT = REPO / "eval" / "models" / "vit-fmnist" / "model.safetensors"

Score = Callable[[TokenState, Signals], torch.Tensor]


@dataclass(kw_only=True)
class ScoredPrune(BlockMethod):
    """Keep the protected tokens and the highest-scoring others (diagnostic only); with
    `fuse`, the last kept slot is one token holding all the dropped ones (size-weighted mean,
    sizes summed)."""

    name: ClassVar[str] = "scored"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.CLS_ATTN})
    score: Score = field(compare=False)
    keep_ratio: float = 0.7
    layers: list[int] = field(default_factory=lambda: [3, 6, 9])
    fuse: bool = False

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        return ratio_schedule(geometry, self.keep_ratio, self.layers)

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        ranked = rank_by_score(self.score(state, signals), state.protected)
        if not self.fuse:
            return state.prune(ranked[:, :keep])
        return state.merge(MergePlan.fold_tail(ranked, keep))


def class_attention(state: TokenState, signals: Signals) -> torch.Tensor:
    return signals.cls_attn.mean(dim=1)[:, state.protected :].float()


class GarmentOracle:
    """Score = brightness of the input patches a token covers (set per batch)."""

    brightness: torch.Tensor  # (B, patches)

    def __call__(self, state: TokenState, signals: Signals) -> torch.Tensor:
        inside = state.source[:, state.protected :, state.protected :].float()
        return (inside * self.brightness[:, None, :]).sum(-1)


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, oracle) -> float:
    """Top-1 (percent) of `model` on uint8 images, feeding the oracle each batch's patches."""
    patch = model.patch_embed.patch_size[0]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 250):
            batch = images[start : start + 250]
            brightness = patch_brightness(batch, patch)
            oracle.brightness = brightness + torch.rand(brightness.shape) * 1e-3  # break ties
            logits = model(normalize(batch))
            correct += (logits.argmax(-1) == labels[start : start + 250]).sum().item()
    return 100 * correct / len(images)


def main(argv: list[str] | None = None) -> None:
    """Print top-1 of every rule at every keep ratio."""
    p = script_parser(__doc__)
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument(
        "--limit", type=positive_int, default=2000, help="test images, as the harness picks them"
    )
    p.add_argument(
        "--keep-ratios",
        type=fractions_of_one,
        default="0.7,0.55",
        help="kept fraction at blocks 3, 6, 9",
    )
    p.add_argument("--fuse", action="store_true", help="also run each ranking with fusion")
    args = p.parse_args(argv)
    torch.manual_seed(0)  # the oracle's tie-breaking noise
    with refusing(p):  # the checkpoint and the data, before any pass
        model = create_model(checkpoint=args.checkpoint).eval()
        images, labels = load_arrays(DEFAULT_ROOT, "test")
    pick = torch.tensor(list(limited(range(len(images)), args.limit)))  # the harness's subset
    images = torch.from_numpy(images.copy())
    canvas = canvas_of(model)
    if canvas:
        images = place_at_fixed_offsets(images, canvas)
    images = images[pick]
    labels = torch.from_numpy(labels.astype("int64"))[pick]
    oracle = GarmentOracle()
    rules = {
        "attn-top": class_attention,
        "attn-bottom": lambda state, signals: -class_attention(state, signals),
        "garment-oracle": oracle,
    }
    print(f"unpruned: {top1(model, images, labels, oracle):.2f}")
    for ratio in args.keep_ratios:
        tokcomp.apply(model, "random", keep_ratio=ratio, layers=[3, 6, 9])
        macs = tokcomp.config_of(model).macs_ratio
        results = {"random": top1(model, images, labels, oracle)}
        for name, score in rules.items():
            for fuse in (False, True) if args.fuse else (False,):
                rule = ScoredPrune(score=score, keep_ratio=ratio, fuse=fuse, trace_source=True)
                tokcomp.apply(model, rule)
                results[name + "+fuse" * fuse] = top1(model, images, labels, oracle)
        row = "  ".join(f"{name} {value:.2f}" for name, value in results.items())
        print(f"keep {ratio} at blocks 3/6/9 ({macs:.3f} of the MACs): {row}", flush=True)


if __name__ == "__main__":
    main()
