"""The token state that flows through a compressed model, and the signals a block exposes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch

from tokcomp.ops import MergePlan, gather_rows, weighted_merge


class Signal(enum.Enum):
    """What a method may ask a block to compute besides its output."""

    KEYS = "keys"  # attention keys averaged over heads, (B, N, head_dim)
    CLS_ATTN = "cls_attn"  # attention row of the first (class) token, (B, heads, N)
    ATTN = "attn"  # full attention matrices, (B, heads, N, N)


@dataclass(frozen=True)
class Signals:
    """The signals one block computed for the method (None where not requested)."""

    keys: torch.Tensor | None = None
    cls_attn: torch.Tensor | None = None
    attn: torch.Tensor | None = None


@dataclass(frozen=True)
class TokenState:
    """Tokens between blocks.

    x: (B, N, C) hidden states. size: (B, N) float32, how many input patches each token
    stands for; None while every token stands for one. source: optional (B, N, N_input) 0/1
    map of the input patches inside each token. protected: how many leading tokens (class,
    distillation, register tokens) are never pruned, merged away or merged into. mask:
    optional (B, N) differentiable keep-mask used while searching rates (DiffRate): masked
    tokens stay in the sequence but receive no attention.
    """

    x: torch.Tensor
    protected: int
    size: torch.Tensor | None = None
    source: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.x.shape[1]

    def sizes(self) -> torch.Tensor:
        """Token sizes, materialised as ones when no merge has happened yet."""
        if self.size is not None:
            return self.size
        return self.x.new_ones(self.x.shape[:2], dtype=torch.float32)

    def pool_weights(self) -> torch.Tensor | None:
        """Per-token weights for average pooling: sizes, times the search mask if any;
        None when a plain mean is right."""
        if self.mask is None:
            return self.size
        return self.sizes() * self.mask

    def with_x(self, x: torch.Tensor) -> TokenState:
        return replace(self, x=x)

    def prune(self, keep_idx: torch.Tensor) -> TokenState:
        """Keep the rows `keep_idx` (B, K) in that order; drop the rest."""
        return self.merge(MergePlan.prune(keep_idx))

    def merge(
        self,
        plan: MergePlan,
        weight: torch.Tensor | None = None,
        size: torch.Tensor | None = None,
    ) -> TokenState:
        """Apply `plan`. Features are averaged with `weight` (default: the sizes, ToMe's "wavg");
        output sizes sum `size` (default: the sizes); a folded row of size 0 brings no patches."""
        source = self._merged_source(plan, size)
        if plan.src_idx.shape[1] == 0 and weight is None and size is None:
            kept_size = None if self.size is None else self.size.gather(1, plan.keep_idx)
            return replace(
                self, x=gather_rows(self.x, plan.keep_idx), size=kept_size, source=source
            )
        sizes = self.sizes()
        x, new_size = weighted_merge(
            self.x,
            sizes if weight is None else weight,
            sizes if size is None else size,
            *plan,
        )
        return replace(self, x=x, size=new_size, source=source)

    def _merged_source(
        self, plan: MergePlan, size: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if self.source is None:
            return None
        kept = gather_rows(self.source, plan.keep_idx)
        if plan.src_idx.shape[1] == 0:
            return kept
        moved = gather_rows(self.source, plan.src_idx)
        if size is not None:  # a row folded with size 0 brings no patches
            moved = moved * (size.gather(1, plan.src_idx) > 0)[..., None]
        index = plan.dst_pos[..., None].expand(-1, -1, kept.shape[-1])
        return kept.scatter_reduce(1, index, moved, reduce="amax")

    def unmerged(self) -> TokenState:
        """The tokens back on the input grid: every input patch takes the value of the token it
        was merged into (ToMe for Stable Diffusion's unmerge); needs `source` and a state that
        only merged (a pruned patch would have no token)."""
        if self.source is None:
            raise ValueError("unmerge needs the source map: start the state with trace_source")
        owner = self.source.argmax(dim=1)
        return TokenState(gather_rows(self.x, owner), self.protected)

    def log_size_bias(self) -> torch.Tensor | None:
        """Proportional attention: log(size) of the key tokens as an additive (B, 1, 1, N)
        mask; None while all sizes are one (adding zeros would change nothing)."""
        if self.size is None:
            return None
        return self.size.log()[:, None, None, :].to(self.x.dtype)


def rank_by_score(score: torch.Tensor, protected: int) -> torch.Tensor:
    """(B, protected + N) token indices: the protected tokens in place, then the other N by
    descending `score` (B, N)."""
    order = score.argsort(dim=1, descending=True) + protected
    head = torch.arange(protected, device=order.device).expand(order.shape[0], -1)
    return torch.cat([head, order], dim=1)


def top_in_order(score: torch.Tensor, count: int, protected: int) -> torch.Tensor:
    """(B, protected + count) token indices: the protected tokens, then the `count` others of
    highest `score` (B, N) in their original order."""
    top = score.topk(count, dim=1).indices.sort(dim=1).values + protected
    head = torch.arange(protected, device=top.device).expand(top.shape[0], -1)
    return torch.cat([head, top], dim=1)
