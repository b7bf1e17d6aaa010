"""PiToMe's energy score: how redundant each token is among the others (docs/methods.md
section 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokcomp.ops.dispatch import compiled_op, float32_math


@float32_math
def energy_score_reference(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """Plain PyTorch version of `energy_score` (materialises the T x T similarities)."""
    normed = F.normalize(metric.float(), dim=-1)
    similarity = normed @ normed.transpose(-1, -2)
    similarity.masked_fill_(similarity.isnan(), -torch.inf)  # a NaN counts as -inf (tokcomp.ops)
    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1)


def energy_score(metric: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """E_i = mean_j ELU(cos(metric_i, metric_j) - margin) for metric (B, T, C); (B, T) float32.

    High energy: the token has many similar tokens (redundant); low: isolated, informative.
    A NaN cosine (a row holding a NaN or an inf) counts as -inf: its term is -alpha. No
    gradient: a selection signal (the metric is taken detached).
    """
    if metric.dim() != 3:
        raise ValueError(f"energy_score: metric must be (B, T, C), got {tuple(metric.shape)}")
    if not (math.isfinite(margin) and math.isfinite(alpha)):
        raise ValueError(f"energy_score: margin and alpha must be finite, got {margin}, {alpha}")
    metric = metric.detach()
    op = compiled_op("energy_score", metric.device, metric.dtype)
    if op is None:
        return energy_score_reference(metric, margin, alpha)
    return op(metric.contiguous(), float(margin), float(alpha))
