"""Random pruning: the floor every method must beat (docs/methods.md section 6)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.base import BlockMethod, BlockPosition, Geometry, Method
from tokcomp.methods.budget import check_layers, check_ratio, ratio_candidates, ratio_schedule
from tokcomp.methods.registry import register
from tokcomp.methods.state import Signal, Signals, TokenState, top_in_order
from tokcomp.methods.visual import VisualMethod, VisualTokens
from tokcomp.ops import seeded_uniform


@register
@dataclass(kw_only=True)
class RandomPrune(BlockMethod, VisualMethod):
    """Keep a random subset of the unprotected tokens at each reducing block.

    keep_ratio: fraction of unprotected tokens each block in `layers` (default: all) keeps;
    or pass another method's `schedule` to compare at exactly its token counts. Each image
    gets its own subset, as random baselines usually do, so that a result measures random
    pruning and not one lucky or unlucky subset (one subset shared by every image moved the
    default ViT's top-1 at half the MACs by 2 points from seed to seed). The subsets are
    drawn from `seed` and the block index; the image at position i of a batch gets the same
    one at every call and every batch size. On a VLM it keeps `keep_ratio` of each
    image's visual tokens, numbered as `positions` says ("renumber" or "keep", as for the
    other visual-token methods, so that each can be compared at its own setting).
    """

    name: ClassVar[str] = "random"
    needs: ClassVar[frozenset[Signal]] = frozenset()
    budget: ClassVar[str] = "keep_ratio"
    schedule_shapers: ClassVar[tuple[str, ...]] = ("layers",)

    keep_ratio: float = 1.0
    layers: list[int] | None = None
    seed: int = 0
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.name, self.keep_ratio)

    def visual_keep(self) -> float:
        """keep_ratio, a fraction even when given as an int (keep_ratio=1 keeps every token)."""
        return float(self.keep_ratio)

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        if self.positions != "renumber":
            raise ValueError("random: positions applies to a VLM's visual tokens only")
        check_layers(self.name, self.layers, geometry.depth)
        return ratio_schedule(geometry, self.keep_ratio, self.layers)

    def candidates(self, geometry: Geometry) -> Iterator[Method]:
        return ratio_candidates(self)

    def budget_candidates(self, selectable: int) -> Iterator[Method]:
        return ratio_candidates(self)

    def check_visual_options(self) -> None:
        defaults = {"layers": None, "prop_attn": True, "trace_source": False}
        given = [name for name, default in defaults.items() if getattr(self, name) != default]
        if given:
            raise ValueError(
                f"random: {', '.join(map(repr, given))} has no meaning on a VLM (it prunes "
                "visual tokens once, before the language model); drop it"
            )

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        protected = state.protected
        scores = self._scores(state.x, state.tokens - protected, position.index)
        return state.prune(top_in_order(scores, keep - protected, protected))

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        """VLMs: a random `keep` of each image's visual tokens (the budget is `keep_ratio` of
        them), drawn per image."""
        scores = self._scores(visual.outputs, visual.tokens, 0)
        return top_in_order(scores, keep, 0)

    def _scores(self, rows: torch.Tensor, tokens: int, salt: int) -> torch.Tensor:
        """(batch, tokens) uniform scores, on the device of `rows` (batch first), drawn from
        `seed`, `salt` (the block index) and the row alone (rows are consecutive draws of one
        seeded generator, so a larger batch only appends rows); the top of each row is that
        image's random subset. A custom op, so torch.compile traces it without a break."""
        return seeded_uniform(rows.shape[0], tokens, self.seed * 100_003 + salt, rows.device)
