"""Weighted PageRank on attention graphs (Zero-TPrune's importance, docs/methods.md section 4)."""

from __future__ import annotations

import torch

from tokcomp.ops.dispatch import compiled_op, float32_math


@float32_math
def attention_pagerank_reference(attn: torch.Tensor, iterations: int) -> torch.Tensor:
    """Plain PyTorch version of `attention_pagerank`."""
    tokens = max(attn.shape[-1], 1)  # no tokens: an empty result (no division by zero)
    scores = attn.new_full(attn.shape[:-1], 1.0 / tokens, dtype=torch.float32)
    probs = attn.float()
    for _ in range(iterations):
        scores = (scores.unsqueeze(-2) @ probs).squeeze(-2)
    return scores


def attention_pagerank(attn: torch.Tensor, iterations: int) -> torch.Tensor:
    """Scores s after `iterations` steps of s <- A^T s from uniform s = 1/N, for every
    (batch, head) attention matrix A of attn (B, H, N, N) (rows sum to one); (B, H, N)
    float32. A token is important when important tokens attend to it. NaN and inf entries
    propagate as in IEEE arithmetic (tokcomp.ops). No gradient: a selection signal (attn is
    taken detached)."""
    attn = attn.detach()
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention_pagerank: attn must be (B, H, N, N), got {tuple(attn.shape)}")
    if iterations < 0:
        raise ValueError(f"attention_pagerank: iterations must be >= 0, got {iterations}")
    op = compiled_op("attention_pagerank", attn.device, attn.dtype)
    if op is None:
        return attention_pagerank_reference(attn, iterations)
    return op(attn.contiguous(), int(iterations))
