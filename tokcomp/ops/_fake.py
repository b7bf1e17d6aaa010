"""Fake (meta) kernels of the compiled ops `torch.ops.tokcomp.*`: output shapes and dtypes
without computing anything, so the ops trace under torch.compile and run on meta tensors.

Imported by `tokcomp.ops.dispatch.extension()`; it loads `tokcomp._C` first (which defines the
ops), so importing it fails with ImportError when the extension is not built. The C++ library
names this module (set_python_module), so torch can also import it on demand.
"""

from __future__ import annotations

import torch

import tokcomp._C  # noqa: F401  (defines the tokcomp ops; must load before registering)


@torch.library.register_fake("tokcomp::best_match")
def _best_match_fake(
    a: torch.Tensor, b: torch.Tensor, a_protected: int, b_protected: int
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "best_match takes (B, N, C) tensors")
    torch._check(a.shape[0] == b.shape[0], lambda: "best_match: batch sizes must agree")
    torch._check(a.shape[2] == b.shape[2], lambda: "best_match: channel sizes must agree")
    rows = (a.shape[0], a.shape[1])
    return a.new_empty(rows, dtype=torch.float32), a.new_empty(rows, dtype=torch.int64)


@torch.library.register_fake("tokcomp::weighted_merge")
def _weighted_merge_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    size: torch.Tensor,
    keep_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(x.dim() == 3, lambda: "weighted_merge: x must be (B, N, C)")
    torch._check(keep_idx.dim() == 2, lambda: "weighted_merge: keep_idx must be (B, K)")
    batch, kept = x.shape[0], keep_idx.shape[1]
    out = x.new_empty((batch, kept, x.shape[2]))
    return out, x.new_empty((batch, kept), dtype=torch.float32)
