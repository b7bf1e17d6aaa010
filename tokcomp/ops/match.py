"""Bipartite best match: for every token of set A, its most similar token of set B (cosine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokcomp.ops.dispatch import compiled_op, float32_math


@float32_math
def best_match_reference(
    a: torch.Tensor, b: torch.Tensor, a_protected: int = 0, b_protected: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch version of `best_match`; the definition the compiled kernels must match."""
    scores = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(-1, -2)
    scores.masked_fill_(scores.isnan(), -torch.inf)  # a NaN is never the best (tokcomp.ops)
    scores[:, :a_protected, :] = -torch.inf
    scores[:, :, :b_protected] = -torch.inf
    best, index = scores.max(dim=-1)
    index[:, :a_protected] = 0
    index[best == -torch.inf] = 0
    return best, index


def best_match(
    a: torch.Tensor, b: torch.Tensor, a_protected: int = 0, b_protected: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine score (float32) and index (int64) over `b` for every row of `a`.

    a: (B, Na, C), b: (B, Nb, C), any float dtype (computed in float32). The first
    `a_protected` rows of `a` never match (score -inf, index 0); the first `b_protected`
    rows of `b` are never chosen. A row with no eligible partner gets -inf and index 0. A NaN
    score (a row holding a NaN or an inf) counts as -inf: never the best (tokcomp.ops). No
    gradient: a selection signal (the inputs are taken detached).
    """
    _check_match_inputs(a, b, a_protected, b_protected)
    a, b = a.detach(), b.detach()
    if a.dtype != b.dtype:  # the kernels take one dtype; the reference computes in float32
        a, b = a.float(), b.float()
    op = compiled_op("best_match", a.device, a.dtype)
    if op is None:
        return best_match_reference(a, b, a_protected, b_protected)
    return op(a, b, a_protected, b_protected)  # the ops take strided rows (x[:, ::2])


def _check_match_inputs(a: torch.Tensor, b: torch.Tensor, a_protected: int, b_protected: int):
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(
            f"best_match takes (B, N, C) tensors, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(
            f"best_match: batch and channels must agree, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if b.shape[1] == 0:
        raise ValueError("best_match: set B is empty")
    if not (0 <= a_protected <= a.shape[1] and 0 <= b_protected <= b.shape[1]):
        raise ValueError(f"best_match: protected counts {a_protected}, {b_protected} out of range")
