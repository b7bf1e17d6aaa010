"""PiToMe: energy-score merging that protects informative tokens (Tran et al., NeurIPS 2024;
docs/methods.md section 2)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.base import (
    AttentionStyle,
    BlockMethod,
    BlockPosition,
    Geometry,
    Method,
    split_match_macs,
)
from tokcomp.methods.budget import check_layers, check_ratio, ratio_candidates, ratio_schedule
from tokcomp.methods.registry import register
from tokcomp.methods.state import Signal, Signals, TokenState
from tokcomp.ops import MergePlan, best_match, energy_score, gather_rows

#: m0 as the released code sets it per codebase: its DeiT/MAE patches (timm), its CLIP/BLIP
#: patches on transformers models, its open_clip CLIP patch.
DEFAULT_MARGIN = {
    AttentionStyle.FUSED_QKV: 0.75,
    AttentionStyle.SEPARATE_QKV: 0.9,
    AttentionStyle.MULTIHEAD: 0.95,
}
#: The merge metric likewise: head-averaged keys in the timm patches, hidden states elsewhere.
DEFAULT_METRIC = {AttentionStyle.FUSED_QKV: "keys"}


@register
@dataclass(kw_only=True)
class PiToMe(BlockMethod):
    """Merge the 2r highest-energy tokens pairwise; keep the low-energy (isolated) ones.

    keep_ratio: each block keeps this fraction of its unprotected tokens (>= 0.5).
    margin: m0; block l of L uses m0 * (1 - l / L) (default per codebase, see DEFAULT_MARGIN).
    metric: "keys" (head-averaged) or "hidden" (default per codebase, see DEFAULT_METRIC).
    bsm_layers: blocks that use the "pitome_bsm" variant (energy-ordered alternate split
    with ToMe's top-r selection); the others use pure PiToMe (the 2r highest-energy tokens
    merge pairwise, no top-r filter). Default: every block. The released code is not one
    choice: its DeiT patch uses pitome_bsm in the first half of the blocks, its MAE patch in
    the second half. On DINOv2 ViT-S/14 pure PiToMe costs fidelity (mean class-token cosine
    on 49 CIFAR and scikit-image photos at 0.65 of the MACs: 0.9944 with every block bsm,
    0.9922 with the first half, 0.9541 with none; eval/models/dinov2-vits14/README.md), while
    on the Fashion-MNIST ViT the two agree (top-1 89.25 / 89.40 against 89.30 / 89.40 at 0.8
    / 0.65, 2,000 test images). The released DeiT setting is the first ceil(depth / 2) blocks.
    (docs/methods.md section 2).
    alpha: the ELU's alpha.
    """

    name: ClassVar[str] = "pitome"
    only_merges: ClassVar[bool] = True

    keep_ratio: float = 1.0
    margin: float | None = None
    metric: str | None = None
    bsm_layers: list[int] | None = None
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.name, self.keep_ratio, lowest=0.5, inclusive=True)
        if self.metric not in (None, "keys", "hidden"):
            raise ValueError(f"pitome: metric is 'keys' or 'hidden', got {self.metric!r}")
        for name in ("margin", "alpha"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"pitome: {name} must be a finite number, got {value!r}")

    @property
    def needs(self) -> frozenset[Signal]:  # type: ignore[override]
        return frozenset({Signal.KEYS}) if self.metric == "keys" else frozenset()

    def settle(self, geometry: Geometry) -> Method:
        check_layers(self.name, self.bsm_layers, geometry.depth, "bsm_layers", empty_ok=True)
        return self.with_options(
            margin=DEFAULT_MARGIN[geometry.attention] if self.margin is None else self.margin,
            metric=DEFAULT_METRIC.get(geometry.attention, "hidden")
            if self.metric is None
            else self.metric,
            bsm_layers=list(range(geometry.depth)) if self.bsm_layers is None else self.bsm_layers,
        )

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        return ratio_schedule(geometry, self.keep_ratio)

    def candidates(self, geometry: Geometry) -> Iterator[Method]:
        return ratio_candidates(self, lowest=0.5)

    def check_schedule(self, geometry: Geometry, schedule: list[int]) -> None:
        tokens = geometry.tokens
        for index, keep in enumerate(schedule):
            if 2 * (tokens - keep) > tokens - geometry.protected:
                raise ValueError(
                    f"pitome merges at most half the unprotected tokens per block: block "
                    f"{index} goes from {tokens} to {keep} tokens"
                )
            tokens = keep

    def margin_at(self, position: BlockPosition) -> float:
        """The energy margin at block `position`: m0 * (1 - l / L)."""
        return self.margin * (1 - position.index / position.depth)

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        protected, merges = state.protected, state.tokens - keep
        metric = (signals.keys if self.metric == "keys" else state.x)[:, protected:]
        energy = energy_score(metric, self.margin_at(position), self.alpha)
        order = energy.argsort(dim=1, descending=True)
        if position.index in self.bsm_layers:
            plan = _bsm_plan(metric, order, merges)
        else:
            plan = _energy_plan(metric, order, merges)
        return state.merge(_shift(plan, protected))

    def reduce_macs(self, geometry: Geometry, tokens: int, keep: int, index: int) -> int:
        """Energy: all unprotected pairs; then the match of the bsm variant's alternate halves,
        or of the 2r highest-energy tokens' halves (r x r)."""
        width = geometry.head_dim if self.metric == "keys" else geometry.width
        free, merges = tokens - geometry.protected, tokens - keep
        if index in self.bsm_layers:
            match = split_match_macs(free, width)
        else:
            match = merges * merges * width
        return free * free * width + match


def _energy_plan(metric: torch.Tensor, order: torch.Tensor, merges: int) -> MergePlan:
    """Pure PiToMe: the 2r highest-energy tokens alternate into A and B, every A merges into
    its most similar B; the others stay. Output: [others by energy, B]."""
    a, b = order[:, : 2 * merges : 2], order[:, 1 : 2 * merges : 2]
    _, match = best_match(gather_rows(metric, a), gather_rows(metric, b))
    others = order[:, 2 * merges :]
    return MergePlan(torch.cat([others, b], dim=1), a, others.shape[1] + match)


def _bsm_plan(metric: torch.Tensor, order: torch.Tensor, merges: int) -> MergePlan:
    """pitome_bsm: all tokens in energy order alternate into A and B, then ToMe's top-r:
    the r A tokens with the best matches merge. Output: [unmerged A, B]."""
    a, b = order[:, ::2], order[:, 1::2]
    score, match = best_match(gather_rows(metric, a), gather_rows(metric, b))
    ranked = score.argsort(dim=1, descending=True)
    sources, unmerged = ranked[:, :merges], ranked[:, merges:]
    dst_pos = unmerged.shape[1] + match.gather(1, sources)
    return MergePlan(torch.cat([a.gather(1, unmerged), b], dim=1), a.gather(1, sources), dst_pos)


def _shift(plan: MergePlan, protected: int) -> MergePlan:
    """A plan over the unprotected tokens, as a plan over all tokens (protected first)."""
    if protected == 0:
        return plan
    batch = plan.keep_idx.shape[0]
    head = torch.arange(protected, device=plan.keep_idx.device).expand(batch, -1)
    return MergePlan(
        torch.cat([head, plan.keep_idx + protected], dim=1),
        plan.src_idx + protected,
        plan.dst_pos + protected,
    )
