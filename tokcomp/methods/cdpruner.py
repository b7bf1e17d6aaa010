"""CDPruner: keep the visual tokens of maximal conditional diversity, a greedy DPP MAP on their
similarity weighted by their relevance to the instruction (Zhang et al., "Beyond Attention or
Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", NeurIPS 2025;
Theia-4869/CDPruner; docs/methods.md section 6.9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokcomp.methods.registry import register
from tokcomp.methods.visual import VisualGeometry, VisualMethod, VisualSignal, VisualTokens
from tokcomp.ops import greedy_dpp

#: Added to the shifted relevance so the least relevant token keeps a non-zero weight (released
#: llava_arch.py encode_images).
RELEVANCE_FLOOR = 1e-6


def instruction_relevance(unit: torch.Tensor, text: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(B, N) relevance of unit-norm visual tokens (B, N, D) to their prompts' text: the mean
    over the text tokens of their cosine similarity to the token (one matmul with the mean
    unit text vector), min-max normalised per sample to (0, 1] as the released code does over
    its whole batch."""
    rows = []
    for tokens, words in zip(unit, text, strict=True):
        if words.shape[0] == 0:
            raise ValueError(
                "cdpruner: a prompt has no text tokens to condition its visual tokens on; give "
                "each image an instruction (or use divprune, its unconditional counterpart)"
            )
        direction = F.normalize(words.float(), dim=-1).mean(dim=0)
        rows.append((tokens @ direction[:, None])[:, 0])
    relevance = torch.stack(rows)
    low, high = relevance.aminmax(dim=1, keepdim=True)
    return (relevance - low + RELEVANCE_FLOOR) / (high - low)


@register
@dataclass(kw_only=True)
class CDPruner(VisualMethod):
    """Greedy MAP of the DPP with kernel L = diag(r) S diag(r) over an image's projector outputs
    (S their cosine similarities, r their relevance to the prompt's text, instruction_relevance),
    exactly `keep` steps (default 64, the released scripts' smallest budget; 128 and 192 are the
    others; LLaVA-NeXT: per crop, even shares); kept tokens in raster order, numbered
    contiguously. The text is the prompt's own tokens in the language model's input embeddings
    (the released code's CLIP text tower is not part of a Hugging Face VLM checkpoint)."""

    name: ClassVar[str] = "cdpruner"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset({VisualSignal.TEXT})

    keep: int | float = 64

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        unit = F.normalize(visual.outputs.float(), dim=-1)
        similarity = unit @ unit.transpose(-1, -2)
        return greedy_dpp(similarity, instruction_relevance(unit, visual.text), keep)

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """The N x N cosine similarities and the N relevances (the greedy steps count 0)."""
        return (tokens * tokens + tokens) * geometry.output_width
