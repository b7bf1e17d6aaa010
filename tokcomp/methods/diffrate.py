"""DiffRate: prune by class attention, then merge into the most important tokens, at rates
searched per block (Chen et al., ICCV 2023; docs/methods.md section 3). Inference side; the rate
search lives in tokcomp.search.diffrate."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.base import BlockMethod, BlockPosition, Geometry, Method
from tokcomp.methods.registry import register
from tokcomp.methods.state import Signal, Signals, TokenState, rank_by_score
from tokcomp.ops import MergePlan, best_match, gather_rows


@register
@dataclass(kw_only=True)
class DiffRate(BlockMethod):
    """Per block: sort tokens by class-token attention, keep the first prune_kept[l], then
    merge all but the first merge_kept[l] into their most similar kept token (hidden-state
    cosine, plain mean; sizes of merged tokens scaled by that similarity).

    prune_kept, merge_kept: per-block token counts including protected tokens (as DiffRate
    exports them); block 0 keeps everything. Load searched or published schedules from
    configs/ (tokcomp.apply(model, "configs/<model>/diffrate-<G>g.json")).
    """

    name: ClassVar[str] = "diffrate"
    budget: ClassVar[str] = "merge_kept"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.CLS_ATTN})

    prune_kept: list[int] | None = None
    merge_kept: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.prune_kept is None) != (self.merge_kept is None):
            raise ValueError("diffrate: give both prune_kept and merge_kept")
        if self.target_macs is not None:
            raise ValueError(
                "diffrate learns its rates: run `tokcomp search diffrate --target-macs ...` "
                "(or load a preset from configs/), then apply the config it writes"
            )

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        if self.prune_kept is None:
            raise ValueError(
                "diffrate needs prune_kept and merge_kept lists (or a config from "
                "`tokcomp search diffrate` / configs/)"
            )
        self._check_lists(geometry)
        return list(self.merge_kept)

    def candidates(self, geometry: Geometry) -> Iterator[Method]:
        raise NotImplementedError  # target_macs is refused in __post_init__

    def _check_lists(self, geometry: Geometry) -> None:
        for label, counts in (("prune_kept", self.prune_kept), ("merge_kept", self.merge_kept)):
            if len(counts) != geometry.depth:
                raise ValueError(
                    f"diffrate: {label} lists {len(counts)} blocks, the model has {geometry.depth}"
                )
            previous = geometry.tokens
            for index, count in enumerate(counts):
                if count > previous:
                    raise ValueError(
                        f"diffrate: {label} must not increase, but block {index} keeps {count} "
                        f"after {previous}"
                    )
                previous = count
        if self.prune_kept[0] != geometry.tokens or self.merge_kept[0] != geometry.tokens:
            raise ValueError("diffrate never compresses block 0: its counts must keep all tokens")
        for index, (pruned, merged) in enumerate(
            zip(self.prune_kept, self.merge_kept, strict=True)
        ):
            if merged > pruned:
                raise ValueError(
                    f"diffrate: block {index} merges to {merged} tokens after pruning to {pruned}"
                )

    def check_schedule(self, geometry: Geometry, schedule: list[int]) -> None:
        if self.prune_kept is None:
            return
        self._check_lists(geometry)
        if schedule != self.merge_kept:
            raise ValueError("diffrate: the schedule must equal merge_kept")

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        protected = state.protected
        ranked = rank_by_score(signals.cls_attn.mean(dim=1)[:, protected:], protected)
        pruned = self.prune_kept[position.index] if self.prune_kept is not None else keep
        pruned = min(pruned, state.tokens)
        if keep == pruned:
            return state.prune(ranked[:, :keep])
        return _merge_into_important(state, ranked[:, :pruned], keep)

    def reduce_macs(self, geometry: Geometry, tokens: int, keep: int, index: int) -> int:
        """Hidden-state match of the tokens merged away against the `keep` kept ones."""
        pruned = self.prune_kept[index] if self.prune_kept is not None else keep
        return (min(pruned, tokens) - keep) * keep * geometry.width


def _merge_into_important(state: TokenState, ranked: torch.Tensor, keep: int) -> TokenState:
    """Fold the tokens ranked after `keep` into their most similar token among the first
    `keep` (never a protected one): plain mean of features, similarity-scaled sizes."""
    dst, src = ranked[:, :keep], ranked[:, keep:]
    metric = state.x.detach()
    similarity, match = best_match(
        gather_rows(metric, src), gather_rows(metric, dst), 0, state.protected
    )
    sizes = state.sizes()
    scaled = sizes.scatter(1, src, sizes.gather(1, src) * similarity.clamp_min(0))
    # a row with no finite similarity comes back matched to index 0, a protected token
    plan = MergePlan(dst, src, match.clamp(min=state.protected))
    return state.merge(plan, weight=torch.ones_like(sizes), size=scaled)
