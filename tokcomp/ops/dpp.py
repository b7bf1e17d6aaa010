"""Greedy MAP inference of a determinantal point process (Chen, Zhang and Zhou, NeurIPS 2018,
"Fast Greedy MAP Inference for Determinantal Point Process to Improve Recommendation
Diversity", Algorithm 1): pick k rows, each next pick being the row that most increases the
log-determinant of the picked sub-kernel. CDPruner selects visual tokens with it, on the
conditional kernel L = diag(r) S diag(r) (docs/methods.md section 6.9).

Semantics every implementation (reference, compiled `tokcomp::greedy_dpp`) must match exactly:

- Inputs: `similarity` (B, N, N) float32, S[b]; `relevance` (B, N) float32, r[b]; `k`,
  1 <= k <= N. Other float dtypes are converted to float32 before the op. The kernel is
  L[j, m] = (r[j] * S[j, m]) * r[m]; the compiled op never materialises it (it reads only the
  diagonal and the rows of picked j; the reference keeps a (B, N, N) residual). S need not be
  symmetric.
- d2[m] = L[m, m]. Step i (0-based) picks j, the unpicked m with the largest d2[m] (ties: the
  lowest index). Unless it is the last step, it then forms, in float32 with every product and
  difference rounded on its own (no fused multiply-add), e[m] = L[j, m], then for t = 0..i-1 in
  order e[m] = e[m] - c_t[j] * c_t[m], then e[m] = e[m] / sqrt(d2[j]); c_i = e and
  d2[m] = d2[m] - e[m] * e[m]. Exactly k steps: no stop when d2 runs out (released CDPruner).
- Non-finite values (tokcomp.ops): a d2 that is NaN or -inf counts as the lowest float32
  (`LOWEST`) when ranking, so such rows are picked after every row with a finite d2, lowest
  index first; picked rows are never picked again. (A d2 <= 0 picked, once the kernel's rank
  is used up, makes later d2 NaN: the remaining picks then go by lowest index.)
- Output: (B, k) int64, the picks sorted ascending (the released code's raster order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokcomp.ops.dispatch import compiled_op, float32_math
from tokcomp.ops.maxmin import LOWEST


def cosine_similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the rows of (B, N, C) `x`, as (B, N, N) float32."""
    unit = F.normalize(x.float(), dim=-1)
    return unit @ unit.transpose(-1, -2)


def _ranked(d2: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """d2 as ranked by a step: NaN and -inf as LOWEST, picked rows -inf."""
    return d2.nan_to_num(nan=LOWEST, posinf=torch.inf, neginf=LOWEST).masked_fill(taken, -torch.inf)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float32 square root (torch's vectorised float32 sqrt may be off by
    an ulp; float64 rounded to float32 is exact for square roots), as C++ and CUDA give it."""
    return x.double().sqrt().float()


@float32_math
def greedy_dpp_reference(similarity: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """The definition (module docstring), vectorised over the batch and the candidate rows."""
    batch, tokens = relevance.shape
    rows = torch.arange(batch, device=relevance.device)
    # residual[b, j, m]: L[j, m] less c_t[j] * c_t[m] for the steps t so far, in step order: the
    # e of the definition for every j at once, so that a step costs a few ops, not one per t
    residual = (relevance[:, :, None] * similarity) * relevance[:, None, :]
    products = torch.empty_like(residual)  # reused: a fresh (B, N, N) per step costs page faults
    d2 = residual.diagonal(dim1=1, dim2=2)  # a view: each step's update is d2 - e * e there
    taken = torch.zeros(batch, tokens, dtype=torch.bool, device=relevance.device)
    chosen = torch.empty(batch, k, dtype=torch.long, device=relevance.device)
    for step in range(k):
        pick = _ranked(d2, taken).argmax(dim=1)
        chosen[:, step] = pick
        taken[rows, pick] = True
        if step == k - 1:
            break
        e = residual[rows, pick] / _sqrt(d2[rows, pick, None])
        residual -= torch.mul(e[:, :, None], e[:, None, :], out=products)
    return chosen.sort(dim=1).values


def greedy_dpp(similarity: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy DPP MAP picks (B, k) int64, ascending; see the module docstring.

    Runs the compiled `tokcomp::greedy_dpp` where it is built for the device, the reference
    otherwise.
    """
    _check_inputs(similarity, relevance, k)
    similarity, relevance = similarity.float().contiguous(), relevance.float().contiguous()
    op = compiled_op("greedy_dpp", similarity.device, similarity.dtype)
    if op is None:
        return greedy_dpp_reference(similarity, relevance, k)
    return op(similarity, relevance, k)


def _check_inputs(similarity: torch.Tensor, relevance: torch.Tensor, k: int) -> None:
    if similarity.dim() != 3 or similarity.shape[1] != similarity.shape[2]:
        raise ValueError(f"greedy_dpp: similarity must be (B, N, N), got {tuple(similarity.shape)}")
    if tuple(relevance.shape) != tuple(similarity.shape[:2]):
        raise ValueError(
            f"greedy_dpp: relevance must be (B, N) = {tuple(similarity.shape[:2])}, got "
            f"{tuple(relevance.shape)}"
        )
    if not 1 <= k <= similarity.shape[1]:
        raise ValueError(f"greedy_dpp: k must be in 1..{similarity.shape[1]}, got {k}")
