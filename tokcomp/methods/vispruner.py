"""VisPruner: important visual tokens by the tower's class-token attention, then diverse ones by
removing near-duplicates among the rest (Zhang et al., ICCV 2025; docs/methods.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.base import split_match_macs
from tokcomp.methods.registry import register
from tokcomp.methods.visual import VisualGeometry, VisualMethod, VisualSignal, VisualTokens
from tokcomp.ops import best_match, gather_rows

#: Near-duplicates removed per matching round (the released code's 8).
_PER_ROUND = 8


@register
@dataclass(kw_only=True)
class VisPruner(VisualMethod):
    """Keep per image `keep` visual tokens (default 64): int(keep * important) important ones,
    those receiving the most class-token attention in the tower's feature layer (as FasterVLM;
    head sum, same order as the released head mean), and the rest diverse. The diverse ones
    come from the other tokens in descending-attention order: each round splits them
    alternately into A and B, scores every A token by its best cosine match in B on the
    pre-projector features, and drops the (at most 8) best-matched A tokens, until as many
    remain as are wanted; survivors of A stay in descending-score order ahead of B, as in the
    released code (Theia-4869/VisPruner llava_arch.py encode_images). important: the
    released argparse default 0.5 (its README uses 0.75 at 64 tokens). Kept tokens stay in
    raster order, numbered contiguously.
    """

    name: ClassVar[str] = "vispruner"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset(
        {VisualSignal.ATTENTION, VisualSignal.FEATURES}
    )

    keep: int | float = 64
    important: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.important, bool) or not 0 <= self.important <= 1:
            raise ValueError(
                f"vispruner: important must be a fraction in [0, 1], got {self.important!r}"
            )

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        order = visual.attention.float().argsort(dim=1, descending=True, stable=True)
        important = int(keep * self.important)
        rest = _without_duplicates(visual.features, order[:, important:], keep - important)
        return torch.cat([order[:, :important], rest], dim=1).sort(dim=1).values

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """Each round's feature match of the remaining tokens' alternate halves (the tower's
        attention is the MACs model's)."""
        important = int(keep * self.important)
        rest, wanted, total = tokens - important, keep - important, 0
        while wanted and rest > wanted:
            total += split_match_macs(rest, geometry.feature_width)
            rest -= min(_PER_ROUND, rest - wanted, (rest + 1) // 2)  # only A tokens go
        return total


def _without_duplicates(features: torch.Tensor, rest: torch.Tensor, wanted: int) -> torch.Tensor:
    """`wanted` of the (B, R) token indices `rest`, near-duplicates removed round by round."""
    if wanted == 0:
        return rest[:, :0]
    while rest.shape[1] > wanted:
        drop = min(_PER_ROUND, rest.shape[1] - wanted)
        a, b = rest[:, 0::2], rest[:, 1::2]
        score, _ = best_match(gather_rows(features, a), gather_rows(features, b))
        ranked = score.argsort(dim=1, descending=True, stable=True)
        rest = torch.cat([a.gather(1, ranked[:, drop:]), b], dim=1)
    return rest
