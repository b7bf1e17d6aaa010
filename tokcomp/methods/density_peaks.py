"""Density peaks with k nearest neighbours (DPC-kNN; Du et al. 2016), as SparseVLM's token
recycling and FastVID's anchors use it: a token scores high when it is dense and far from
any denser token (docs/methods.md sections 6.11 and 6.13)."""

from __future__ import annotations

import torch


def scaled_distances(points: torch.Tensor) -> torch.Tensor:
    """(..., M, M) Euclidean distances of (..., M, C) `points` over sqrt(C), by one matmul;
    exactly 0 from a token to itself."""
    squares = points.square().sum(dim=-1)
    inner = points @ points.mT
    squared = (squares[..., :, None] + squares[..., None, :] - 2 * inner).clamp_min(0)
    distance = squared.sqrt() / points.shape[-1] ** 0.5
    return distance.diagonal_scatter(torch.zeros_like(squares), dim1=-2, dim2=-1)


def density_peak_scores(
    distance: torch.Tensor, neighbours: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., M) each token's density exp(-mean squared distance to its `neighbours` nearest,
    itself included; plus `noise`, where given, to break ties) and its score: density times
    the distance to its nearest denser token (the largest distance for the densest). Without
    noise, of tokens of equal density the earlier counts as the denser."""
    nearest = distance.topk(min(neighbours, distance.shape[-1]), dim=-1, largest=False).values
    density = (-nearest.square().mean(dim=-1)).exp()
    if noise is not None:
        density = density + noise
    denser = density[..., None, :] > density[..., :, None]
    if noise is None:
        # as the released noise does, one of equally dense tokens (duplicates) is their peak
        index = torch.arange(density.shape[-1], device=density.device)
        tied = density[..., None, :] == density[..., :, None]
        denser = denser | (tied & (index[None, :] < index[:, None]))
    farthest = distance.flatten(-2).amax(dim=-1)[..., None, None]
    separation = torch.where(denser, distance, farthest).amin(dim=-1)
    return density, separation * density
