"""VisionZip: dominant visual tokens by class-token attention, the rest merged into a few
contextual tokens (Yang et al., CVPR 2025; docs/methods.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokcomp.methods.registry import register
from tokcomp.methods.visual import (
    Selection,
    VisualGeometry,
    VisualMethod,
    VisualSignal,
    VisualTokens,
)
from tokcomp.ops import gather_rows


@register
@dataclass(kw_only=True)
class VisionZip(VisualMethod):
    """Keep per image `keep` tokens: keep - round(keep * contextual) dominant ones (at least one),
    those receiving the most class-token attention (summed over heads) in the vision tower's
    feature layer (the one LLaVA takes features from); without a class token (SigLIP), the most
    attention received on average over all queries. The remaining tokens, in original order,
    give `contextual` * keep targets picked at a uniform stride; every other remaining token
    joins the target whose head-averaged key of that layer is most similar (cosine), and a
    contextual token is its target's features plus the mean features of the tokens that joined
    it (as in the released code), through the projector. Default 10/64 contextual: 54 + 10
    for 64 tokens, the paper's split. Each contextual token takes its target's place in the
    sequence (the released code appends them after the dominant tokens).
    """

    name: ClassVar[str] = "visionzip"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset(
        {VisualSignal.FEATURES, VisualSignal.ATTENTION, VisualSignal.KEYS}
    )

    keep: int | float = 64
    contextual: float = 10 / 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.contextual < 1:
            raise ValueError(
                f"visionzip: contextual must be a fraction in [0, 1), got {self.contextual!r}"
            )

    def split(self, keep: int) -> tuple[int, int]:
        """(dominant, contextual) token counts for a budget of `keep` (at least one dominant
        token when keeping any)."""
        contextual = min(round(keep * self.contextual), max(keep - 1, 0))
        return keep - contextual, contextual

    def select(self, visual: VisualTokens, keep: int) -> Selection:
        dominant_count, contextual_count = self.split(keep)
        order = visual.attention.float().argsort(dim=1, descending=True, stable=True)
        dominant = order[:, :dominant_count]
        rest = order[:, dominant_count:].sort(dim=1).values
        if contextual_count == 0:
            index = dominant.sort(dim=1).values
            return Selection(index, gather_rows(visual.outputs, index))
        stride = max(1, rest.shape[1] // contextual_count)
        is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=rest.device)
        is_target[torch.arange(0, rest.shape[1], stride, device=rest.device)[:contextual_count]] = (
            True
        )
        targets, others = rest[:, is_target], rest[:, ~is_target]
        contextual = visual.project(_contextual_features(visual, targets, others))
        index = torch.cat([dominant, targets], dim=1)
        outputs = torch.cat(
            [gather_rows(visual.outputs, dominant), contextual.to(visual.outputs.dtype)], 1
        )
        index, order = index.sort(dim=1)
        return Selection(index, gather_rows(outputs, order))

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """Key similarity of the N - keep joining tokens to the contextual targets, and the
        contextual tokens through the projector (the feature layer's attention and keys are the
        MACs model's)."""
        contextual = self.split(keep)[1]
        similarity = (tokens - keep) * contextual * geometry.key_width
        return similarity + contextual * geometry.projector_token_macs


def _contextual_features(
    visual: VisualTokens, targets: torch.Tensor, others: torch.Tensor
) -> torch.Tensor:
    """(B, c, C): each target's features plus the mean features of the others nearest to it."""
    keys = F.normalize(visual.keys.float(), dim=-1)
    similarity = gather_rows(keys, others) @ gather_rows(keys, targets).transpose(1, 2)
    nearest = similarity.argmax(dim=2)
    features = visual.features
    joined = gather_rows(features, others)
    sums = features.new_zeros(targets.shape + features.shape[2:])
    sums.scatter_add_(1, nearest[..., None].expand_as(joined), joined)
    counts = torch.zeros(targets.shape, device=features.device).scatter_add_(
        1, nearest, torch.ones_like(nearest, dtype=torch.float32)
    )
    means = sums / counts.clamp_min(1)[..., None].to(sums.dtype)
    return gather_rows(features, targets) + means
