"""Random pruning: the floor every method must beat (METHODS.md section 6)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.base import Layer, Layout, Method
from tokcomp.methods.budget import check_layers, check_ratio, ratio_candidates, ratio_schedule
from tokcomp.methods.registry import register
from tokcomp.methods.state import Signal, Signals, TokenState


@register
@dataclass(kw_only=True)
class RandomPrune(Method):
    """Keep a random subset of the unprotected tokens at each reducing block.

    keep_ratio: fraction of unprotected tokens each block in `layers` (default: all) keeps;
    or pass another method's `schedule` to compare at exactly its token counts. The subset
    is drawn from `seed` and the block index, the same for every image (so results do not
    depend on batch composition) and every call.
    """

    name: ClassVar[str] = "random"
    needs: ClassVar[frozenset[Signal]] = frozenset()

    keep_ratio: float = 1.0
    layers: list[int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.name, self.keep_ratio)

    def knob_schedule(self, layout: Layout) -> list[int]:
        check_layers(self.name, self.layers, layout.depth)
        return ratio_schedule(layout, self.keep_ratio, self.layers)

    def candidates(self, layout: Layout) -> Iterator[Method]:
        return ratio_candidates(self)

    def reduce(self, state: TokenState, signals: Signals, keep: int, layer: Layer) -> TokenState:
        protected, unprotected = state.protected, state.tokens - state.protected
        generator = torch.Generator().manual_seed(self.seed * 100_003 + layer.index)
        chosen = torch.randperm(unprotected, generator=generator)[: keep - protected]
        index = torch.cat([torch.arange(protected), chosen.sort().values + protected])
        return state.prune(index.to(state.x.device).expand(state.x.shape[0], -1))
