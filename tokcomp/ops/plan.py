"""How a layer reduces its tokens, as indices: which rows stay and where merged rows go."""

from __future__ import annotations

from typing import NamedTuple

import torch


class MergePlan(NamedTuple):
    """keep_idx (B, K): rows that become the output rows, in output order.
    src_idx (B, R): rows folded into an output row; dst_pos (B, R): that row's position."""

    keep_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_pos: torch.Tensor

    @classmethod
    def prune(cls, keep_idx: torch.Tensor) -> MergePlan:
        """A plan that keeps `keep_idx` and drops every other row."""
        empty = keep_idx.new_empty(keep_idx.shape[0], 0)
        return cls(keep_idx, empty, empty)

    @classmethod
    def fold_tail(cls, ranked: torch.Tensor, keep: int) -> MergePlan:
        """A plan that keeps the first `keep` rows of `ranked` (B, N) and folds every later
        one into the last kept row (one fused token, as EViT's)."""
        tail = ranked[:, keep:]
        return cls(ranked[:, :keep], tail, torch.full_like(tail, keep - 1))


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for (B, N, ...) x and (B, K) index."""
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(shape))
