"""FastV: drop the visual tokens that get the least attention after the first K language-model
layers (Chen et al., ECCV 2024; METHODS.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.base import Layout, Method
from tokcomp.methods.registry import register
from tokcomp.methods.visual import VisualMethod, VisualSignal, VisualTokens, vlm_geometry

QUERIES = ("last", "text")


@register
@dataclass(kw_only=True)
class FastV(VisualMethod):
    """After decoder layer `layer` (K; layers 0..K-1 see every token), keep per image the `keep`
    visual tokens (default half) that receive the most attention in layer K-1, averaged over
    heads and over the queries: the prompt's last token ("last") or all its text tokens
    ("text"). The scores come from layer K-1's own q/k projections with its RoPE, so the model
    keeps its attention implementation (sdpa). Kept tokens keep their position ids by default,
    as in the released code. The first K layers cache the whole prompt, the others the pruned
    one; decoding attends to each accordingly.
    """

    name: ClassVar[str] = "fastv"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset()
    stage: ClassVar[str] = "llm"

    keep: int | float = 0.5
    positions: str = "keep"
    layer: int = 2
    query: str = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in QUERIES:
            raise ValueError(f"fastv: query must be one of {QUERIES}, got {self.query!r}")

    def settle(self, layout: Layout) -> Method:
        _, _, depth = vlm_geometry(layout, self.name)
        if (
            isinstance(self.layer, bool)
            or not isinstance(self.layer, int)
            or not 1 <= self.layer < depth
        ):
            raise ValueError(
                f"fastv: layer must be in 1..{depth - 1} (the language model has {depth} layers), "
                f"got {self.layer!r}"
            )
        return self

    def llm_schedule(self, layout: Layout, tokens: int, kept: int) -> list[int]:
        return [tokens] * self.layer + [kept] * (layout.llm_depth - self.layer)

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        order = visual.attention.argsort(dim=1, descending=True, stable=True)
        return order[:, :keep].sort(dim=1).values
