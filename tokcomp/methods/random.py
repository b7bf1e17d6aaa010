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
from tokcomp.methods.visual import VisualTokens, check_positions


@register
@dataclass(kw_only=True)
class RandomPrune(Method):
    """Keep a random subset of the unprotected tokens at each reducing block.

    keep_ratio: fraction of unprotected tokens each block in `layers` (default: all) keeps;
    or pass another method's `schedule` to compare at exactly its token counts. The subset
    is drawn from `seed` and the block index, the same for every image (so results do not
    depend on batch composition) and every call. On a VLM it keeps `keep_ratio` of each
    image's visual tokens, numbered as `positions` says ("renumber" or "keep", as for the
    other visual-token methods, so that each can be compared at its own setting).
    """

    name: ClassVar[str] = "random"
    needs: ClassVar[frozenset[Signal]] = frozenset()

    keep_ratio: float = 1.0
    layers: list[int] | None = None
    seed: int = 0
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.name, self.keep_ratio)
        check_positions(self.name, self.positions)

    def knob_schedule(self, layout: Layout) -> list[int]:
        if self.positions != "renumber":
            raise ValueError("random: positions applies to a VLM's visual tokens only")
        check_layers(self.name, self.layers, layout.depth)
        return ratio_schedule(layout, self.keep_ratio, self.layers)

    def candidates(self, layout: Layout) -> Iterator[Method]:
        return ratio_candidates(self)

    def reduce(self, state: TokenState, signals: Signals, keep: int, layer: Layer) -> TokenState:
        protected = state.protected
        chosen = self._subset(state.tokens - protected, keep - protected, layer.index)
        index = torch.cat([torch.arange(protected), chosen + protected])
        return state.prune(index.to(state.x.device).expand(state.x.shape[0], -1))

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        """VLMs: a random `keep` of each image's visual tokens (the budget is `keep_ratio` of
        them), the same subset for every image of the same size."""
        chosen = self._subset(visual.tokens, keep, 0)
        return chosen.to(visual.outputs.device).expand(visual.batch, -1)

    def _subset(self, tokens: int, keep: int, salt: int) -> torch.Tensor:
        """`keep` of range(tokens), ascending, drawn from `seed` and `salt` (the block index)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + salt)
        return torch.randperm(tokens, generator=generator)[:keep].sort().values
