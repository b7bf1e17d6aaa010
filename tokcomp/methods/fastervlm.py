"""FasterVLM: keep the visual tokens the vision tower's class token attends to most, before the
projector (Zhang et al., arXiv 2412.01818; docs/methods.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.registry import register
from tokcomp.methods.visual import VisualMethod, VisualSignal, VisualTokens, most_attended


@register
@dataclass(kw_only=True)
class FasterVLM(VisualMethod):
    """Keep per image the `keep` visual tokens (default 64, the released scripts' smallest
    budget; 128 and 192 are the others) that receive the most class-token attention in the
    vision tower's feature layer (the layer whose output the projector takes: layer 22 of
    LLaVA-1.5's CLIP-L, `attentions[-2]` in Theia-4869/FasterVLM clip_encoder.py), averaged
    over heads; kept tokens stay in raster order and are numbered contiguously, as the released
    code inserts fewer tokens. LLaVA-NeXT: `keep` is the image's budget, shared evenly by its
    crops (the released budget is per crop: keep = T x crops) among the checkpoint's unpadded
    tokens, image-newline tokens kept (the released code neither unpads nor adds newlines:
    docs/methods.md section 6.6).
    Towers without a class token (SigLIP) rank by the mean attention each token receives.
    """

    name: ClassVar[str] = "fastervlm"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset({VisualSignal.ATTENTION})

    keep: int | float = 64

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        return most_attended(visual.attention, keep)
