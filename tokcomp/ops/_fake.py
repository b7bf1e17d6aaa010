"""Fake (meta) kernels of tokcomp's ops: output shapes and dtypes without computing anything, so
the ops trace under torch.compile and run on meta tensors.

`register(namespace)` registers them for the ops of one torch library: "tokcomp", the compiled
extension `tokcomp._C` (done when this module is imported and the extension loads: the C++
library names this module with set_python_module, so torch can also import it on demand), and
"tokcomp_cupy", the cupy route (done by tokcomp.ops.cupy_kernels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _best_match_fake(
    a: torch.Tensor, b: torch.Tensor, a_protected: int, b_protected: int
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "best_match takes (B, N, C) tensors")
    torch._check(a.shape[0] == b.shape[0], lambda: "best_match: batch sizes must agree")
    torch._check(a.shape[2] == b.shape[2], lambda: "best_match: channel sizes must agree")
    rows = (a.shape[0], a.shape[1])
    return a.new_empty(rows, dtype=torch.float32), a.new_empty(rows, dtype=torch.int64)


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


def _energy_score_fake(metric: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    torch._check(metric.dim() == 3, lambda: "energy_score: metric must be (B, T, C)")
    return metric.new_empty(metric.shape[:2], dtype=torch.float32)


def _attention_pagerank_fake(attn: torch.Tensor, iterations: int) -> torch.Tensor:
    torch._check(attn.dim() == 4, lambda: "attention_pagerank: attn must be (B, H, N, N)")
    torch._check(attn.shape[2] == attn.shape[3], lambda: "attention_pagerank: attn must be square")
    return attn.new_empty(attn.shape[:3], dtype=torch.float32)


def _greedy_maxmin_fake(
    dist: torch.Tensor, weight: torch.Tensor, first: torch.Tensor, k: int
) -> torch.Tensor:
    torch._check(dist.dim() == 3, lambda: "greedy_maxmin: dist must be (B, N, N)")
    torch._check(1 <= k <= dist.shape[1], lambda: "greedy_maxmin: k must be in 1..N")
    return dist.new_empty((dist.shape[0], k), dtype=torch.int64)


def _greedy_dpp_fake(similarity: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    torch._check(similarity.dim() == 3, lambda: "greedy_dpp: similarity must be (B, N, N)")
    torch._check(1 <= k <= similarity.shape[1], lambda: "greedy_dpp: k must be in 1..N")
    return similarity.new_empty((similarity.shape[0], k), dtype=torch.int64)


#: Op name -> fake kernel, the same for every namespace that implements the op.
FAKES: dict[str, Callable] = {
    "best_match": _best_match_fake,
    "weighted_merge": _weighted_merge_fake,
    "energy_score": _energy_score_fake,
    "attention_pagerank": _attention_pagerank_fake,
    "greedy_maxmin": _greedy_maxmin_fake,
    "greedy_dpp": _greedy_dpp_fake,
}


def register(namespace: str) -> None:
    """Register the fake kernels for the ops `namespace::<name>` that exist (an extension built
    before an op was added lacks it)."""
    library = getattr(torch.ops, namespace)
    for name, fake in FAKES.items():
        if hasattr(library, name):
            torch.library.register_fake(f"{namespace}::{name}")(fake)


try:
    import tokcomp._C  # noqa: F401  (defines the tokcomp ops; must load before registering)
except ImportError:
    pass  # not built: nothing to register for "tokcomp"
else:
    register("tokcomp")
