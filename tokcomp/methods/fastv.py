"""FastV: drop the visual tokens that get the least attention after the first K language-model
layers (Chen et al., ECCV 2024; docs/methods.md section 6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.registry import register
from tokcomp.methods.visual import (
    LLMStageMethod,
    VisualTokens,
    check_decoder_layer,
    last_text_token,
    most_attended,
)

QUERIES = ("last", "text")


@register
@dataclass(kw_only=True)
class FastV(LLMStageMethod):
    """After decoder layer `layer` (K; layers 0..K-1 see every token), keep per image the `keep`
    visual tokens (default half) that receive the most attention in layer K-1, averaged over
    heads and over the queries: the prompt's last text token ("last"; its last token, as in the
    released code, unless padding or an image follows) or all its text tokens ("text"). The
    scores come from layer K-1's own q/k projections with its RoPE, so the model keeps its
    attention implementation (sdpa). Kept tokens keep their position ids by default, as in the
    released code. The first K layers cache the whole prompt, the others the pruned one;
    decoding attends to each accordingly.
    """

    name: ClassVar[str] = "fastv"
    layers_option: ClassVar[str] = "layer"
    rounding: ClassVar[Callable[[float], int]] = staticmethod(round)

    keep: int | float = 0.5
    positions: str = "keep"
    layer: int = 2
    query: str = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_decoder_layer(self.name, "layer", self.layer)
        if self.query not in QUERIES:
            raise ValueError(f"fastv: query must be one of {QUERIES}, got {self.query!r}")

    def boundaries(self, llm_depth: int) -> list[int]:
        return [self.layer]

    def queries(self, text: torch.Tensor) -> torch.Tensor:
        return text if self.query == "text" else last_text_token(text)

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        return most_attended(visual.attention, keep)
