"""SparseVLM v1.5: text-guided visual-token sparsification inside the language model, with
recycling of deleted tokens (Zhang et al., "SparseVLM: Visual Token Sparsification for
Efficient Vision-Language Model Inference", ICML 2025; docs/methods.md section 6.11)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch

from tokcomp.methods.density_peaks import density_peak_scores, scaled_distances
from tokcomp.methods.registry import register
from tokcomp.methods.visual import (
    LLMStageMethod,
    Selection,
    VisualGeometry,
    VisualTokens,
    most_attended,
)
from tokcomp.ops import gather_rows

#: The released layers whose outputs are pruned, of LLaVA-1.5's 32 (score.py layer_dict).
RELEASED_LAYERS = (2, 6, 15)
RELEASED_DEPTH = 32
#: The released visual tokens kept at each stage for T = 64, 128, 192 of 576 (score.py
#: sparse_token_list_*), as fractions of the image's tokens, with keep-nothing and
#: keep-everything as the ends of the interpolation (section 6.11).
ANCHORS = (
    (0.0, (0.0, 0.0, 0.0)),
    *(
        (t / 576, tuple(k / 576 for k in kept))
        for t, kept in (
            (64, (66, 30, 17)),
            (128, (303, 110, 36)),
            (192, (300, 200, 110)),
        )
    ),
    (1.0, (1.0, 1.0, 1.0)),
)
#: Share of the deleted tokens recycled (the most attended ones), and deleted tokens per
#: merged token (utils.py cluster_and_merge callers: int(0.3 n) + 1, int(m / 10) + 1).
RECYCLED_SHARE = 0.3
PER_CLUSTER = 10
#: Scale of the noise that breaks density ties (cluster_and_merge: 1e-6 * rand).
DENSITY_NOISE = 1e-6


@register
@dataclass(kw_only=True)
class SparseVLM(LLMStageMethod):
    """Raters: the text tokens after the image whose mean softmax attention from the image's
    input embeddings (raw dot products, softmax over the text) exceeds their mean, chosen once
    on the prompt. After each decoder layer of `layers` (released 2, 6, 15 of 32), keep per
    image the visual tokens the raters attend to most in that layer (heads and raters
    averaged); recycle the most attended int(0.3 d) + 1 of the d deleted ones into
    int(m / 10) + 1 tokens by DPC-kNN clustering of that layer's outputs, inserted after the
    kept visual tokens (Gumpest/SparseVLMs v1.5 734d900: modelling_sparse_llama.py
    LlamaDynamicvitModel.forward, score.py attn_postprocess_topk, utils.py cluster_and_merge).

    keep: the visual tokens the released budget label T names (a fraction of the image's or
    a count): their average over the language model's layers. The stage counts interpolate
    the released lists (192 -> 300/200/110, 128 -> 303/110/36, 64 -> 66/30/17 of 576) linearly
    in T / N. layers: None scales the released ones to the model's depth. seed: the density
    noise's (the released code draws it unseeded). Kept tokens are renumbered contiguously.
    """

    name: ClassVar[str] = "sparsevlm"

    keep: int | float = 192 / 576
    positions: str = "renumber"
    layers: list[int] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and (
            len(self.layers) != len(RELEASED_LAYERS)
            or any(v < 0 for v in self.layers)
            or list(self.layers) != sorted(self.layers)
        ):
            raise ValueError(
                f"sparsevlm: layers must be {len(RELEASED_LAYERS)} ascending ints >= 0 (the "
                f"decoder layers after which it prunes, released {list(RELEASED_LAYERS)}), got "
                f"{self.layers!r}"
            )

    def pruning_layers(self, llm_depth: int) -> list[int]:
        """The layers whose outputs each stage prunes: `layers`, or the released ones scaled to
        the depth (rounded, at most the last layer but one)."""
        if self.layers is not None:
            return list(self.layers)
        scaled = (int(layer * llm_depth / RELEASED_DEPTH + 0.5) for layer in RELEASED_LAYERS)
        return [min(llm_depth - 2, layer) for layer in scaled]

    def boundaries(self, llm_depth: int) -> list[int]:
        return sorted({layer + 1 for layer in self.pruning_layers(llm_depth)})

    def kept_at(self, stage: int, tokens: int, llm_depth: int) -> int:
        """The count of the last released stage whose layer lands on this boundary (stages
        whose scaled layers coincide prune once, to the later count)."""
        boundary = self.boundaries(llm_depth)[stage]
        layers = self.pruning_layers(llm_depth)
        last = max(s for s, layer in enumerate(layers) if layer + 1 == boundary)
        return stage_counts(self.kept_of(tokens) / tokens, tokens)[last]

    def after_cut(self, kept: int, tokens: int) -> int:
        return tokens if kept >= tokens else kept + clusters(recycled(tokens - kept))

    def queries(self, text: torch.Tensor) -> torch.Tensor:
        """Every text token (the raters among them weigh)."""
        return text

    def query_weights(
        self, rows: torch.Tensor, visual: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        """The raters among the text tokens after each sample's last visual token weigh 1, the
        other rows 0 (a sample without raters: every row 1)."""
        columns = torch.arange(rows.shape[1], device=rows.device)[None]
        after = rows & (columns > columns.masked_fill(~visual, -1).amax(dim=1, keepdim=True))
        images, image_valid = _packed(embeds, visual)
        texts, text_valid = _packed(embeds, after)
        raters = _raters(images.float(), image_valid, texts.float(), text_valid)
        weights = torch.zeros_like(rows, dtype=torch.float)
        weights[after] = raters[text_valid].float()
        return torch.where(weights.any(dim=1, keepdim=True), weights, rows.float())

    def query_weight_macs(self, visual: int, rows: int, width: int) -> int:
        return visual * rows * width

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor | Selection:
        tokens = visual.tokens
        if keep >= tokens:
            return torch.arange(tokens, device=visual.outputs.device).expand(visual.batch, -1)
        kept = most_attended(visual.attention, keep)
        merged, places = self.recycle(visual, _complement(kept, tokens))
        index = torch.cat([kept, places], dim=1).sort(dim=1).values
        outputs = torch.cat([gather_rows(visual.outputs, kept), merged], dim=1)
        return Selection(index, outputs)

    def recycle(
        self, visual: VisualTokens, deleted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged tokens (B, c, D) of the most attended of the (B, d) `deleted` ones, and
        the places they take: their cluster centres'."""
        scores = visual.attention.gather(1, deleted)
        order = scores.argsort(dim=1, descending=True, stable=True)
        candidates = deleted.gather(1, order[:, : recycled(deleted.shape[1])])
        noise = self.density_noise(candidates.shape[1], candidates.device)
        states = gather_rows(visual.outputs, candidates)
        merged, centres = cluster_and_merge(states, clusters(candidates.shape[1]), noise)
        return merged, candidates.gather(1, centres)

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """The recycled tokens' pairwise distances."""
        if keep >= tokens:
            return 0
        return recycled(tokens - keep) ** 2 * geometry.output_width

    def density_noise(self, count: int, device: torch.device) -> torch.Tensor:
        """(count,) the density tie-breaking noise, the same for every call and batch row."""
        generator = torch.Generator().manual_seed(self.seed)
        return (torch.rand(count, generator=generator) * DENSITY_NOISE).to(device)


def stage_counts(fraction: float, tokens: int) -> list[int]:
    """Visual tokens kept at each of the three stages for a budget of `fraction` of an
    image's `tokens`: the released lists, linearly interpolated in the fraction."""
    (low, low_kept), (high, high_kept) = next(
        pair for pair in pairwise(ANCHORS) if fraction <= pair[1][0]
    )
    t = (fraction - low) / (high - low)
    shares = [a + t * (b - a) for a, b in zip(low_kept, high_kept, strict=True)]
    return [max(1, min(tokens, round(share * tokens))) for share in shares]


def recycled(deleted: int) -> int:
    """Deleted tokens recycled: the most attended int(0.3 d) + 1."""
    return int(deleted * RECYCLED_SHARE) + 1


def clusters(count: int) -> int:
    """Merged tokens the `count` recycled ones become."""
    return int(count / PER_CLUSTER) + 1


def cluster_and_merge(
    x: torch.Tensor, count: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of (B, M, C) `x` into `count` clusters: the (B, count, C) cluster means, in
    the order of their centres (B, count), highest distance x density first. Distances are
    Euclidean over sqrt(C); density exp(-mean squared distance to the `count` nearest, self
    included) plus `noise` (M,); a token's distance is to its nearest denser one (the largest
    distance for the densest); each token joins its nearest centre."""
    points = x.float()
    distance = scaled_distances(points)
    density, scores = density_peak_scores(distance, count, noise)
    centres = scores.argsort(dim=1, descending=True, stable=True)[:, :count]
    assigned = distance.gather(1, centres[..., None].expand(-1, -1, x.shape[1])).argmin(dim=1)
    assigned.scatter_(1, centres, torch.arange(count, device=x.device).expand_as(centres))
    sums = points.new_zeros(x.shape[0], count, x.shape[2])
    sums.scatter_add_(1, assigned[..., None].expand_as(points), points)
    sizes = points.new_zeros(x.shape[0], count).scatter_add_(1, assigned, torch.ones_like(density))
    return (sums / (sizes[..., None] + 1e-6)).to(x.dtype), centres


def _raters(
    images: torch.Tensor, image_valid: torch.Tensor, texts: torch.Tensor, text_valid: torch.Tensor
) -> torch.Tensor:
    """(B, M) the text tokens whose attention from the visual ones, softmax over the text and
    averaged over the visual tokens, exceeds its mean over the text."""
    logits = (images @ texts.mT).masked_fill(~text_valid[:, None], -torch.inf)
    probs = logits.softmax(dim=-1).nan_to_num(0.0) * image_valid[..., None]
    received = probs.sum(dim=1) / image_valid.sum(dim=1, keepdim=True)
    mean = (received * text_valid).sum(dim=1, keepdim=True) / text_valid.sum(1, keepdim=True)
    return (received > mean) & text_valid


def _packed(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of (B, L, D) `x` that (B, L) `mask` marks, in order, right-padded to the most
    (B, K, D), and which are real (B, K)."""
    order = (~mask).long().argsort(dim=1, stable=True)[:, : int(mask.sum(dim=1).max())]
    return gather_rows(x, order), mask.gather(1, order)


def _complement(kept: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, tokens - k) ascending: the indices not in (B, k) `kept`."""
    out = torch.ones(kept.shape[0], tokens, dtype=torch.bool, device=kept.device)
    out.scatter_(1, kept, False)
    return out.nonzero()[:, 1].view(kept.shape[0], tokens - kept.shape[1])
