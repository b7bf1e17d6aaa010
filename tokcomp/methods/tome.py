"""ToMe: bipartite soft matching between attention and MLP (Bolya et al., ICLR 2023)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from tokcomp.methods.base import (
    BlockMethod,
    BlockPosition,
    Geometry,
    Method,
    require,
    split_match_macs,
)
from tokcomp.methods.registry import register
from tokcomp.methods.state import Signal, Signals, TokenState
from tokcomp.ops import bipartite_plan, max_bipartite_merges


@register
@dataclass(kw_only=True)
class ToMe(BlockMethod):
    """Merge the `r` most similar tokens per block (keys metric, size-weighted average).

    r: tokens merged per block (int), or an explicit per-block list (padded with 0); a block
    merges at most half its unprotected tokens, and a settled config lists what each block
    merges where r asked for more.
    inflection: with an int r, ToMe's linear schedule: the first block merges
    int(r * (1 - inflection)), the last 2r minus that (-1 = the paper's decreasing schedule).
    prop_attn: on, as in the released timm patch; the released MAE patch turns it off for
    MAE-finetuned checkpoints: pass prop_attn=False for those (docs/methods.md section 1; a
    checkpoint's training recipe cannot be read off its architecture).
    """

    name: ClassVar[str] = "tome"
    budget: ClassVar[str] = "r"
    schedule_shapers: ClassVar[tuple[str, ...]] = ("inflection",)
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.KEYS})
    only_merges: ClassVar[bool] = True

    r: int | list[int] = 0
    inflection: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        per_block = self.r if isinstance(self.r, list) else [self.r]
        ok = all(v >= 0 for v in per_block)
        require(self.name, "r", self.r, ok, "a non-negative int or a list of them")
        if self.inflection is not None and isinstance(self.r, list):
            raise ValueError("tome: inflection applies to an int r, not to a per-block list")
        if self.inflection is not None and self.target_macs is not None:
            raise ValueError(
                "tome: target_macs chooses a constant r, so inflection has no effect with it; "
                "drop inflection, or give r with inflection instead of target_macs"
            )
        if self.inflection is not None and not -1 <= self.inflection <= 1:
            raise ValueError(
                f"tome: inflection is in [-1, 1] (-1 decreasing, 0 constant, 1 increasing), got "
                f"{self.inflection!r}"
            )

    def merges_per_block(self, depth: int) -> list[int]:
        """ToMe's per-block r before clipping to what each block can merge."""
        if isinstance(self.r, list):
            if len(self.r) > depth:
                raise ValueError(f"tome: r lists {len(self.r)} blocks, the model has {depth}")
            return self.r + [0] * (depth - len(self.r))
        if self.inflection is None:
            return [self.r] * depth
        first = int(self.r * (1.0 - self.inflection))
        last = 2 * self.r - first
        step = (last - first) / max(depth - 1, 1)
        return [int(first + step * i) for i in range(depth)]

    def settle(self, geometry: Geometry) -> Method:
        """With an r some block cannot merge (more than half its unprotected tokens), the
        per-block merges it actually makes, so that config_of reports what runs."""
        merges = self.merges_made(geometry)
        if merges == self.merges_per_block(geometry.depth):
            return self
        return self.with_options(r=merges, inflection=None)

    def merges_made(self, geometry: Geometry) -> list[int]:
        """Per block, the merges r makes once clipped to what the block can merge."""
        tokens, merges = geometry.tokens, []
        for r in self.merges_per_block(geometry.depth):
            merges.append(min(r, max_bipartite_merges(tokens, geometry.protected)))
            tokens -= merges[-1]
        return merges

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        merged = itertools.accumulate(self.merges_made(geometry))
        return [geometry.tokens - count for count in merged]

    def candidates(self, geometry: Geometry) -> Iterator[Method]:
        for r in range(max_bipartite_merges(geometry.tokens, geometry.protected) + 1):
            yield self.with_options(r=r, inflection=None, target_macs=None, schedule=None)

    def check_schedule(self, geometry: Geometry, schedule: list[int]) -> None:
        tokens = geometry.tokens
        for index, keep in enumerate(schedule):
            most = max_bipartite_merges(tokens, geometry.protected)
            if tokens - keep > most:
                raise ValueError(
                    f"tome merges at most half the unprotected tokens per block: block {index} "
                    f"goes from {tokens} to {keep} tokens, at least {tokens - most} must remain"
                )
            tokens = keep

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        plan = bipartite_plan(signals.keys, state.protected, state.tokens - keep)
        return state.merge(plan)

    def reduce_macs(self, geometry: Geometry, tokens: int, keep: int, index: int) -> int:
        """Bipartite matching of all tokens' head-averaged keys (the protected ones included)."""
        return split_match_macs(tokens, geometry.head_dim)
