"""An independent, plain transcription of ToMe (Bolya et al. 2023) on a timm ViT with one
class token: eager attention, the bipartite matching and size-weighted merge written out
step by step. Tests compare tokcomp's optimised path against it."""

from __future__ import annotations

import torch


def tome_forward(model, images: torch.Tensor, r: int, prop_attn: bool = True) -> torch.Tensor:
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = torch.ones(x.shape[0], x.shape[1], 1)
    for block in model.blocks:
        out, keys = _attention(block.attn, block.norm1(x), size if prop_attn else None)
        x = x + block.ls1(out)
        merges = min(r, (x.shape[1] - 1) // 2)
        if merges > 0:
            x, size = _merge(x, size, keys.mean(dim=1), merges)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


def _attention(attn, x: torch.Tensor, size: torch.Tensor | None):
    batch, tokens, channels = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
    return attn.proj(out), k


def _merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int):
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    scores[:, 0, :] = -torch.inf  # the class token never merges
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unmerged = edge_idx[:, r:].sort(dim=1).values
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:
        channels = t.shape[-1]
        src, dst = t[:, ::2], t[:, 1::2]
        kept = src.gather(1, unmerged.expand(-1, -1, channels))
        moved = src.gather(1, src_idx.expand(-1, -1, channels))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, channels), moved, reduce="sum")
        return torch.cat([kept, dst], dim=1)

    x, size = merge(x * size), merge(size)
    return x / size, size
