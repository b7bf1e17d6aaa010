"""PyramidDrop: visual tokens dropped in stages across the language model's layers, ranked by
the last prompt token's attention (Xing et al., CVPR 2025; docs/methods.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch

from tokcomp.methods.base import require
from tokcomp.methods.registry import register
from tokcomp.methods.visual import LLMStageMethod, VisualTokens, last_text_token, most_attended


@register
@dataclass(kw_only=True)
class PyramidDrop(LLMStageMethod):
    """Before each decoder layer of `layers` (default: a quarter, half and three quarters of
    the depth, the released [8, 16, 24] for LLaVA-1.5's 32 layers), keep int(N0 * lambda^s)
    of each image's N0 visual tokens at stage s = 1, 2, ...: those the prompt's last text
    token (the released last instruction token) attends to most in that layer, from the layer's
    own q/k projections and RoPE before it runs (Cooperx521/PyramidDrop modeling_llama_pdrop.py
    pdrop_rank_drop), averaged over heads; the kept tokens keep their order and are renumbered
    contiguously after each stage.

    keep: the visual tokens left after the last stage (a fraction of the image's, or a count);
    lambda = keep^(1/stages). Default 0.125: lambda = 0.5 over three stages, the paper's
    576 / 288 / 144 / 72 on LLaVA-1.5, as FastV's keep counts the tokens after its cut.
    """

    name: ClassVar[str] = "pyramiddrop"

    keep: int | float = 0.125
    positions: str = "renumber"
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = self.layers
        ok = layers is None or (layers != [] and all(a < b for a, b in pairwise([0, *layers])))
        require(self.name, "layers", layers, ok, "None or distinct ascending decoder layers >= 1")

    def boundaries(self, llm_depth: int) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        quarters = (max(1, min(llm_depth - 1, round(llm_depth * k / 4))) for k in (1, 2, 3))
        return sorted(set(quarters))

    def scoring_layer(self, boundary: int) -> int:
        return boundary

    def kept_at(self, stage: int, tokens: int, llm_depth: int) -> int:
        stages = len(self.boundaries(llm_depth))
        if stage == stages - 1:
            return self.kept_of(tokens)
        ratio = (self.kept_of(tokens) / tokens) ** (1 / stages)
        return max(1, int(tokens * ratio ** (stage + 1)))

    def queries(self, text: torch.Tensor) -> torch.Tensor:
        return last_text_token(text)

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        return most_attended(visual.attention, keep)
