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


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] for (B, N, ...) x and (B, K) index."""
    shape = index.shape + x.shape[2:]
    return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(shape))
