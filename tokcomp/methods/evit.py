"""EViT-style top-k: keep the tokens the class token attends to most, fuse the rest into one
attention-weighted token (Liang et al., ICLR 2022; docs/methods.md section 6)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.base import BlockMethod, BlockPosition, Geometry, Method
from tokcomp.methods.budget import check_layers, check_ratio, ratio_candidates, ratio_schedule
from tokcomp.methods.registry import register
from tokcomp.methods.state import Signal, Signals, TokenState, rank_by_score
from tokcomp.ops import MergePlan


@register
@dataclass(kw_only=True)
class EViT(BlockMethod):
    """Top-k by class-token attention (averaged over heads) at `layers`.

    keep_ratio: fraction of unprotected tokens kept at each layer in `layers` (default:
    EViT's DeiT locations 3, 6, 9 scaled to the depth). fuse: add one token equal to the
    attention-weighted sum of the dropped tokens, as the released EViT code does.
    """

    name: ClassVar[str] = "evit"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.CLS_ATTN})
    schedule_shapers: ClassVar[tuple[str, ...]] = ("layers",)

    keep_ratio: float = 0.7
    layers: list[int] | None = None
    fuse: bool = True
    prop_attn: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.name, self.keep_ratio)

    def settle(self, geometry: Geometry) -> Method:
        check_layers(self.name, self.layers, geometry.depth)
        if self.layers is not None:
            return self
        return self.with_options(layers=[geometry.depth * k // 4 for k in (1, 2, 3)])

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        return ratio_schedule(geometry, self.keep_ratio, self.layers, extra=int(self.fuse))

    def candidates(self, geometry: Geometry) -> Iterator[Method]:
        return ratio_candidates(self)

    def check_schedule(self, geometry: Geometry, schedule: list[int]) -> None:
        if not self.fuse:
            return
        tokens = geometry.tokens
        for index, keep in enumerate(schedule):
            if keep < tokens and keep < geometry.protected + 2:
                raise ValueError(
                    f"evit with fuse=True keeps at least one token besides the fused one and "
                    f"the {geometry.protected} protected: block {index} keeps only {keep}"
                )
            tokens = keep

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        protected = state.protected
        attention = signals.cls_attn.mean(dim=1)[:, protected:].float()
        ranked = rank_by_score(attention, protected)
        if not self.fuse:
            return state.prune(ranked[:, :keep])
        plan = MergePlan.fold_tail(ranked, keep)
        dropped = ranked[:, keep - 1 :]  # the fused token and the tokens folded into it
        dropped_attention = attention.gather(1, dropped - protected)
        dropped_attention = dropped_attention.clamp_min(torch.finfo(torch.float32).tiny)
        weight = torch.ones_like(state.sizes()).scatter(1, dropped, dropped_attention)
        fused = state.merge(plan, weight=weight)
        total = dropped_attention.sum(dim=1)
        x = fused.x.clone()
        x[:, -1] *= total[:, None].to(x.dtype)
        return fused.with_x(x)
