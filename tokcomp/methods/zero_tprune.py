"""Zero-TPrune: attention-graph importance plus similarity pruning, zero-shot (Wang, Dedhia,
Jha, CVPR 2024; docs/methods.md section 4). No official code is public; this follows the paper."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.methods.base import (
    BlockMethod,
    BlockPosition,
    Geometry,
    Method,
    require,
    split_match_macs,
)
from tokcomp.methods.budget import check_layers, check_ratio, ratio_candidates, ratio_schedule
from tokcomp.methods.registry import register
from tokcomp.methods.state import Signal, Signals, TokenState, top_in_order
from tokcomp.ops import MergePlan, attention_pagerank, best_match, gather_rows

#: WPR iterations in the first, middle and last third of the blocks (paper: about 30-50,
#: 5-10 and 1).
DEFAULT_ITERATIONS = (30, 5, 1)


@register
@dataclass(kw_only=True)
class ZeroTPrune(BlockMethod):
    """Prune by Weighted-PageRank importance (I-stage) and by similarity (S-stage).

    keep_ratio / layers: each block in `layers` keeps this fraction of its unprotected
    tokens; the default (0.7 at blocks 3, 6, 9 of 12, scaled to the depth) removes 34.8% of
    DeiT-S's model MACs (34.6% with its own PageRank and matching counted), the paper's
    operating point. iterations: WPR steps per block (default by
    position, DEFAULT_ITERATIONS). similarity_share: the part of each block's pruning done by
    the S-stage. variance_band: heads whose importance variance (scores over the unprotected
    tokens divided by their mean, so a uniform head has 0) lies outside it are left out of
    the root-mean-square head aggregation (VHF); if none is inside, all heads count.
    similarity_sizes: a token the S-stage prunes hands its size to its twin, so proportional
    attention still counts it there (tokcomp's option, off in the paper; docs/methods.md
    section 4.4).
    """

    name: ClassVar[str] = "zero_tprune"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.ATTN, Signal.KEYS})
    schedule_shapers: ClassVar[tuple[str, ...]] = ("layers",)

    keep_ratio: float = 0.7
    layers: list[int] | None = None
    iterations: list[int] | None = None
    similarity_share: float = 0.5
    variance_band: list[float] | None = None
    similarity_sizes: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio(self.name, self.keep_ratio)
        if not 0 <= self.similarity_share <= 1:
            raise ValueError(
                f"zero_tprune: similarity_share must be in [0, 1], got {self.similarity_share}"
            )
        iterations = self.iterations
        ok = iterations is None or all(count >= 0 for count in iterations)
        require(self.name, "iterations", iterations, ok, "None or a list of ints >= 0")
        band = self.variance_band
        if band is not None and (len(band) != 2 or not 0 <= band[0] <= band[1]):
            raise ValueError(
                f"zero_tprune: variance_band is [low, high] with 0 <= low <= high, got {band}"
            )

    def settle(self, geometry: Geometry) -> Method:
        check_layers(self.name, self.layers, geometry.depth)
        depth = geometry.depth
        iterations = self.iterations
        if iterations is None:
            iterations = [DEFAULT_ITERATIONS[min(3 * i // depth, 2)] for i in range(depth)]
        if len(iterations) != depth:
            raise ValueError(
                f"zero_tprune: iterations lists {len(iterations)} blocks, the model has {depth}"
            )
        return self.with_options(
            layers=[depth * k // 4 for k in (1, 2, 3)] if self.layers is None else self.layers,
            iterations=iterations,
            variance_band=[0.01, 0.7] if self.variance_band is None else self.variance_band,
        )

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        return ratio_schedule(geometry, self.keep_ratio, self.layers)

    def candidates(self, geometry: Geometry) -> Iterator[Method]:
        return ratio_candidates(self)

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        protected = state.protected
        importance = self.importance(signals.attn, protected, self.iterations[position.index])
        importance = importance[:, protected:]
        similar = self.similar_pairs(state.tokens, keep, protected)
        marked, twin = _similarity_pruned(signals.keys[:, protected:], importance, similar)
        score = importance.masked_fill(marked, -torch.inf)
        keep_idx = top_in_order(score, keep - protected, protected)
        if not self.similarity_sizes or similar == 0:
            return state.prune(keep_idx)
        return state.merge(*_twin_plan(state, keep_idx, marked, twin))

    def similar_pairs(self, tokens: int, keep: int, protected: int) -> int:
        """Tokens the S-stage prunes at a block going from `tokens` to `keep`."""
        return min(round((tokens - keep) * self.similarity_share), (tokens - protected) // 2)

    def reduce_macs(self, geometry: Geometry, tokens: int, keep: int, index: int) -> int:
        """WPR steps (one row vector times each head's attention matrix), plus the S-stage's
        key match of the importance-alternated halves where it prunes."""
        pagerank = self.iterations[index] * geometry.heads * tokens * tokens
        if self.similar_pairs(tokens, keep, geometry.protected) == 0:
            return pagerank
        return pagerank + split_match_macs(tokens - geometry.protected, geometry.head_dim)

    def importance(self, attn: torch.Tensor, protected: int, iterations: int) -> torch.Tensor:
        """(B, N) token importance: per-head WPR, VHF head filter, root-mean-square (EIR)."""
        scores = attention_pagerank(attn, iterations)
        keep_head = head_filter(scores[..., protected:], *self.variance_band)
        squares = (scores**2 * keep_head[..., None]).sum(dim=1)
        return (squares / keep_head.sum(dim=1, keepdim=True)).sqrt()


def head_filter(scores: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(B, H) float mask of the heads whose scaled score variance lies in [low, high]
    (all heads where none does)."""
    scaled = scores / scores.mean(dim=-1, keepdim=True).clamp_min(1e-12)
    variance = scaled.var(dim=-1, unbiased=False)
    inside = (variance >= low) & (variance <= high)
    inside |= ~inside.any(dim=1, keepdim=True)
    return inside.float()


def _similarity_pruned(
    keys: torch.Tensor, importance: torch.Tensor, pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """S-stage: alternate the tokens, by importance, into two groups; in each of the `pairs`
    most similar cross-group pairs (key cosine) mark the less important token. (B, T) bool
    marks, and (B, T) each marked token's stronger twin (its own index where unmarked)."""
    pruned = torch.zeros_like(importance, dtype=torch.bool)
    own = torch.arange(importance.shape[1], device=importance.device).expand_as(importance)
    if pairs == 0:
        return pruned, own
    order = importance.argsort(dim=1, descending=True)
    a, b = order[:, ::2], order[:, 1::2]
    score, match = best_match(gather_rows(keys, a), gather_rows(keys, b))
    top = score.topk(pairs, dim=1).indices
    first, second = a.gather(1, top), b.gather(1, match.gather(1, top))
    first_weaker = importance.gather(1, first) < importance.gather(1, second)
    weaker = torch.where(first_weaker, first, second)
    stronger = torch.where(first_weaker, second, first)
    twin = own.scatter_reduce(1, weaker, stronger, reduce="amax", include_self=False)
    return pruned.scatter(1, weaker, True), twin


def _twin_plan(
    state: TokenState, keep_idx: torch.Tensor, marked: torch.Tensor, twin: torch.Tensor
) -> tuple[MergePlan, torch.Tensor, torch.Tensor]:
    """Keep `keep_idx`; each dropped token the S-stage marked hands its size, not its value,
    to its twin (to the twin's twin where the twin was marked too). The plan, weights and
    sizes for `TokenState.merge`; a token the I-stage dropped takes its size with it."""
    protected, (batch, tokens) = state.protected, state.x.shape[:2]
    position = torch.full((batch, tokens), -1, dtype=torch.long, device=keep_idx.device)
    rows = torch.arange(keep_idx.shape[1], device=keep_idx.device).expand_as(keep_idx)
    position = position.scatter(1, keep_idx, rows)[:, protected:]
    dropped = position < 0
    src = (~dropped).to(torch.uint8).argsort(dim=1, stable=True)[:, : tokens - keep_idx.shape[1]]
    heir = twin.gather(1, src)
    heir = torch.where(dropped.gather(1, heir), twin.gather(1, heir), heir)
    dst = position.gather(1, heir)
    carries = marked.gather(1, src) & (dst >= 0)
    src = src + protected
    sizes = state.sizes()
    size = sizes.scatter(1, src, sizes.gather(1, src) * carries)
    weight = sizes.scatter(1, src, 0.0)
    return MergePlan(keep_idx, src, dst.clamp_min(0)), weight, size
