"""Greedy weighted max-min selection (farthest-point sampling): pick k rows, each next pick
being the row farthest from everything picked so far, times its weight. DivPrune (unit
weights) and ZOO-Prune (weights = sensitivity) select visual tokens with it.

Semantics every implementation (reference, fast PyTorch form, compiled `tokcomp::greedy_maxmin`)
must match exactly:

- Inputs: `dist` (B, N, N) float32, dist[b, i, j] the distance of row j from row i (only rows
  of picked i are read; symmetry is not required); `weight` (B, N) float32, >= 0;
  `first` (B,) int64 in [0, N), the first pick of each batch entry (chosen by the caller);
  `k`, 1 <= k <= N. Other float dtypes are converted to float32 before the op.
- Step 0 picks `first[b]`. At step t >= 1 every unpicked j has score[j] = the minimum over the
  picked i of dist[b, i, j] * weight[b, j] (float32 products; for finite values this equals
  min_i dist[b, i, j] times weight[b, j]). The pick is the unpicked j with the largest score;
  ties go to the lowest index. Picked rows are never picked again, even when every remaining
  score is 0 or negative.
- Non-finite values (tokcomp.ops): a product that is NaN (or -inf) counts as -inf, so a row
  with one is picked after every row with a finite score, lowest index first. In every
  implementation it is the lowest float32 (`LOWEST`), below which only picked rows rank.
- Output: (B, k) int64, the picks in pick order (not sorted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokcomp.ops.dispatch import compiled_op


def cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between the rows of (B, N, C) `x`, as (B, N, N) float32."""
    unit = F.normalize(x.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(-1, -2)


#: What a NaN or -inf score dist * weight becomes: the lowest float32 (picked rows are -inf).
LOWEST = torch.finfo(torch.float32).min


def _scores(dist: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dist * weight (rows of dist times weight over their last dimension), NaN and -inf as
    LOWEST."""
    return (dist * weight).nan_to_num(nan=LOWEST, posinf=torch.inf, neginf=LOWEST)


def greedy_maxmin_reference(
    dist: torch.Tensor, weight: torch.Tensor, first: torch.Tensor, k: int
) -> torch.Tensor:
    """The definition (module docstring) as a plain loop vectorised over the batch: per step one
    masked argmax and one running minimum, in float32 as the op computes."""
    dist, weight = dist.float(), weight.float()
    batch, tokens = weight.shape
    rows = torch.arange(batch, device=dist.device)
    chosen = torch.empty(batch, k, dtype=torch.long, device=dist.device)
    taken = torch.zeros(batch, tokens, dtype=torch.bool, device=dist.device)
    chosen[:, 0] = first
    taken[rows, first] = True
    score = _scores(dist[rows, first], weight)
    for step in range(1, k):
        pick = score.masked_fill(taken, -torch.inf).argmax(dim=1)
        chosen[:, step] = pick
        taken[rows, pick] = True
        score = torch.minimum(score, _scores(dist[rows, pick], weight))
    return chosen


def _greedy_maxmin_fast(
    dist: torch.Tensor, weight: torch.Tensor, first: torch.Tensor, k: int
) -> torch.Tensor:
    """The same picks with fewer ops per step: distances are weighted once (N^2), then each
    step is a row gather, an in-place minimum, one -inf write and an argmax."""
    batch = weight.shape[0]
    rows = torch.arange(batch, device=dist.device)
    weighted = _scores(dist, weight[:, None, :])
    chosen = torch.empty(batch, k, dtype=torch.long, device=dist.device)
    chosen[:, 0] = first
    score = weighted[rows, first]
    score[rows, first] = -torch.inf
    for step in range(1, k):
        pick = score.argmax(dim=1)
        chosen[:, step] = pick
        torch.minimum(score, weighted[rows, pick], out=score)
        score[rows, pick] = -torch.inf
    return chosen


def greedy_maxmin(
    dist: torch.Tensor, weight: torch.Tensor, first: torch.Tensor, k: int
) -> torch.Tensor:
    """Greedy weighted max-min picks (B, k) int64 in pick order; see the module docstring.

    Runs the compiled `tokcomp::greedy_maxmin` where it is built for the device, the fastest
    pure-PyTorch form otherwise (identical picks to `greedy_maxmin_reference`).
    """
    _check_inputs(dist, weight, first, k)
    dist, weight = dist.float().contiguous(), weight.float().contiguous()
    first = first.long().contiguous()
    op = compiled_op("greedy_maxmin", dist.device, dist.dtype)
    if op is None:
        return _greedy_maxmin_fast(dist, weight, first, k)
    return op(dist, weight, first, k)


def _check_inputs(dist: torch.Tensor, weight: torch.Tensor, first: torch.Tensor, k: int) -> None:
    if dist.dim() != 3 or dist.shape[1] != dist.shape[2]:
        raise ValueError(f"greedy_maxmin: dist must be (B, N, N), got {tuple(dist.shape)}")
    batch, tokens = dist.shape[:2]
    if tuple(weight.shape) != (batch, tokens) or tuple(first.shape) != (batch,):
        raise ValueError(
            f"greedy_maxmin: weight must be (B, N) and first (B,) for dist {tuple(dist.shape)}, "
            f"got {tuple(weight.shape)} and {tuple(first.shape)}"
        )
    if not 1 <= k <= tokens:
        raise ValueError(f"greedy_maxmin: k must be in 1..{tokens}, got {k}")
    if bool((weight < 0).any()):
        raise ValueError("greedy_maxmin: weights must be >= 0")
    if bool(((first < 0) | (first >= tokens)).any()):
        raise ValueError(f"greedy_maxmin: first picks must be in 0..{tokens - 1}")
