"""Weighted token merge: gather the kept tokens, fold the merged-away ones into them."""

from __future__ import annotations

import torch

from tokcomp.ops.dispatch import compiled_op


def weighted_merge_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    size: torch.Tensor,
    keep_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch version of `weighted_merge`; the definition the compiled kernels match."""
    channels = x.shape[-1]
    weighted = x.float() * weight.float()[..., None]
    out = weighted.gather(1, keep_idx[..., None].expand(-1, -1, channels))
    norm = weight.float().gather(1, keep_idx)
    out_size = size.float().gather(1, keep_idx)
    if src_idx.shape[1]:
        out.scatter_add_(
            1,
            dst_pos[..., None].expand(-1, -1, channels),
            weighted.gather(1, src_idx[..., None].expand(-1, -1, channels)),
        )
        norm.scatter_add_(1, dst_pos, weight.float().gather(1, src_idx))
        out_size.scatter_add_(1, dst_pos, size.float().gather(1, src_idx))
    return (out / norm[..., None]).to(x.dtype), out_size


def weighted_merge(
    x: torch.Tensor,
    weight: torch.Tensor,
    size: torch.Tensor,
    keep_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens: output row j is the `weight`-weighted mean of token keep_idx[j] and of every
    token src_idx[r] with dst_pos[r] == j; its size is the sum of their `size`.

    x: (B, N, C); weight, size: (B, N) (may be the same tensor: ToMe's "wavg"; ones for a
    plain mean); keep_idx: (B, K), src_idx and dst_pos: (B, R), int64. Returns x (B, K, C)
    in x's dtype and size (B, K) float32. Accumulates in float32; NaN and inf propagate as in
    IEEE arithmetic (tokcomp.ops).
    """
    _check_merge_inputs(x, weight, size, keep_idx, src_idx, dst_pos)
    # the compiled kernels have no backward: gradients go through the reference
    op = None if _needs_grad(x, weight, size) else compiled_op("weighted_merge", x.device, x.dtype)
    if op is None:
        return weighted_merge_reference(x, weight, size, keep_idx, src_idx, dst_pos)
    return op(
        x.contiguous(),
        weight.float().contiguous(),
        size.float().contiguous(),
        keep_idx.contiguous(),
        src_idx.contiguous(),
        dst_pos.contiguous(),
    )


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on `tensors`."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_merge_inputs(x, weight, size, keep_idx, src_idx, dst_pos) -> None:
    if x.dim() != 3:
        raise ValueError(f"weighted_merge: x must be (B, N, C), got {tuple(x.shape)}")
    if weight.shape != x.shape[:2] or size.shape != x.shape[:2]:
        raise ValueError(
            f"weighted_merge: weight {tuple(weight.shape)} and size {tuple(size.shape)} "
            f"must be (B, N) = {tuple(x.shape[:2])}"
        )
    if keep_idx.dim() != 2 or keep_idx.shape[0] != x.shape[0]:
        raise ValueError(f"weighted_merge: keep_idx must be (B, K), got {tuple(keep_idx.shape)}")
    if src_idx.shape != dst_pos.shape or src_idx.dim() != 2 or src_idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"weighted_merge: src_idx {tuple(src_idx.shape)} and dst_pos "
            f"{tuple(dst_pos.shape)} must both be (B, R)"
        )
    for name, index in (("keep_idx", keep_idx), ("src_idx", src_idx), ("dst_pos", dst_pos)):
        if index.dtype != torch.int64:
            raise ValueError(f"weighted_merge: {name} must be int64, got {index.dtype}")
