"""DivPrune: keep the most diverse visual tokens (Alvar et al., CVPR 2025; docs/methods.md
section 6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.registry import register
from tokcomp.methods.visual import VisualGeometry, VisualMethod, VisualSignal, VisualTokens
from tokcomp.ops import cosine_distances, greedy_maxmin


def farthest_from_neighbours(dist: torch.Tensor) -> torch.Tensor:
    """(B,) the row of each (B, N, N) distance matrix whose nearest other row is farthest
    (ties: lowest index); the first pick of DivPrune."""
    eye = torch.eye(dist.shape[-1], dtype=torch.bool, device=dist.device)
    return dist.masked_fill(eye, torch.inf).amin(dim=1).argmax(dim=1)


@register
@dataclass(kw_only=True)
class DivPrune(VisualMethod):
    """Greedy max-min diversity on D = 1 - cosine between the projector outputs of an image's
    visual tokens, every token weighted alike; the first pick is the token farthest from its
    nearest neighbour. `keep` tokens per image, in their original order."""

    name: ClassVar[str] = "divprune"
    rounding: ClassVar[Callable[[float], int]] = staticmethod(round)
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset()

    keep: int | float = 64

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        dist = cosine_distances(visual.outputs)
        weight = dist.new_ones(dist.shape[:2])
        return greedy_maxmin(dist, weight, farthest_from_neighbours(dist), keep).sort(dim=1).values

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """The N x N cosine distances between the projector outputs."""
        return tokens * tokens * geometry.output_width
