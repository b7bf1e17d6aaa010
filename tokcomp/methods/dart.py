"""DART: keep the visual tokens that duplicate a few pivot tokens least, inside the language
model (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", 2025; docs/methods.md section 6.10)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokcomp.methods.base import require
from tokcomp.methods.registry import register
from tokcomp.methods.visual import (
    LLMSignal,
    LLMStageMethod,
    VisualGeometry,
    VisualTokens,
    check_decoder_layer,
)
from tokcomp.ops import gather_rows


@register
@dataclass(kw_only=True)
class DART(LLMStageMethod):
    """Before decoder layer `layer` (K = 2), per image: the `pivot_image` visual tokens and the
    `pivot_text` text tokens after the image with the largest L1 norm of layer K-1's post-RoPE
    keys (heads concatenated) are pivots; each pivot in turn (image pivots, then text pivots,
    each by descending norm) claims the pool tokens least cosine-similar to it on the
    final-normed hidden states entering layer K, which then leave the pool (the visual tokens
    that are not image pivots). Kept: the image pivots and every claimed token
    (xqy1111111/DART, upstream 5a19452, modeling_llama_self.py::DART.get_retained_image_token).

    keep: the visual tokens kept per image, pivots included; the pivots share the claims
    evenly, the first ones one more when they do not divide. The released T keeps T + 4
    (4 pivots + 8 * (T // 8)): default 0.23 keeps 132 of LLaVA-1.5's 576, the released T = 128.
    Kept tokens keep their position ids, as in the released code.
    """

    name: ClassVar[str] = "dart"
    layers_option: ClassVar[str] = "layer"
    llm_signal: ClassVar[LLMSignal] = LLMSignal.KEYS_AND_STATES

    keep: int | float = 0.23
    positions: str = "keep"
    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_decoder_layer(self.name, "layer", self.layer)
        for option, least in (("pivot_image", 1), ("pivot_text", 0)):
            value = getattr(self, option)
            require(self.name, option, value, value >= least, f"an int >= {least}")

    def boundaries(self, llm_depth: int) -> list[int]:
        return [self.layer]

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        image = _largest_l1(visual.keys, min(self.pivot_image, keep))
        kept = torch.zeros(visual.keys.shape[:2], dtype=torch.bool, device=image.device)
        kept.scatter_(1, image, True)
        if keep > image.shape[1]:
            valid = visual.text_valid
            text = _largest_l1(visual.text_keys, min(self.pivot_text, valid.shape[1]), valid)
            pivots = torch.cat(
                [gather_rows(visual.states, image), gather_rows(visual.text_states, text)], dim=1
            )
            real = torch.cat([torch.ones_like(image, dtype=torch.bool), valid.gather(1, text)], 1)
            kept = _claim(visual.states, pivots, _quotas(real, keep - image.shape[1]), kept)
        return kept.nonzero()[:, 1].view(visual.batch, keep)

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """The pivots' cosine similarities to every visual token (text pivots: all present)."""
        image = min(self.pivot_image, keep)
        if keep == image:
            return 0
        return (image + self.pivot_text) * tokens * geometry.output_width


def _largest_l1(keys: torch.Tensor, count: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, count) the tokens with the largest L1 key norm, largest first (ties: the earlier),
    among the `valid` ones while there are enough."""
    norms = keys.float().abs().sum(dim=-1)
    if valid is not None:
        norms = norms.masked_fill(~valid, -torch.inf)
    return norms.argsort(dim=1, descending=True, stable=True)[:, :count]


def _quotas(real: torch.Tensor, claims: int) -> torch.Tensor:
    """(B, P) tokens each real pivot claims: `claims` split evenly over them in order, the
    first ones one more where they do not divide; 0 for the others."""
    count = real.sum(dim=1, keepdim=True)
    rank = real.long().cumsum(dim=1) - 1
    return real * (claims // count + (rank < claims % count))


def _claim(
    states: torch.Tensor, pivots: torch.Tensor, quotas: torch.Tensor, taken: torch.Tensor
) -> torch.Tensor:
    """(B, N) `taken` plus what each pivot claims in turn: its quota of the tokens not yet taken
    least cosine-similar to it (ties: the earlier)."""
    similarity = F.normalize(pivots.float(), dim=-1) @ F.normalize(states.float(), dim=-1).mT
    most = int(quotas.max())
    ranks = torch.arange(most, device=taken.device)
    for pivot in range(pivots.shape[1]):
        scores = similarity[:, pivot].masked_fill(taken, torch.inf)
        order = scores.argsort(dim=1, stable=True)[:, :most]
        claimed = torch.zeros_like(taken).scatter(1, order, ranks < quotas[:, pivot, None])
        taken = taken | claimed
    return taken
