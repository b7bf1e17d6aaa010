"""The first-call parity check of a compiled route (run by `tokcomp.ops.dispatch`): each op's
kernel on small fixed inputs (seeded, a few ms) against its PyTorch reference.

The inputs have clear winners (no near-ties), so indices must agree exactly, and a few NaN and
inf values, so the non-finite rule of tokcomp.ops is held too; finite values must agree within
1e-2, which catches a wrong kernel but not rounding (a TF32 or bfloat16 reference included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokcomp.ops.dpp import cosine_similarity_matrix, greedy_dpp_reference
from tokcomp.ops.energy import energy_score_reference
from tokcomp.ops.match import best_match_reference
from tokcomp.ops.maxmin import cosine_distances, greedy_maxmin_reference
from tokcomp.ops.merge import weighted_merge_reference
from tokcomp.ops.pagerank import attention_pagerank_reference

TOLERANCE = 1e-2


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _best_match_inputs(dtype: torch.dtype) -> tuple:
    """Rows of a near copies of rows of b (clear winners), one protected row in each; a's row 2
    is nearest to b's protected row 0, so its answer is its clear second best, b's row 7. A NaN
    row in a, an inf in b; b's row 4 a copy of its row 1 (a tie: the first index wins)."""
    generator = _generator()
    b = torch.randn(2, 10, 32, generator=generator)
    b[:, 4] = b[:, 1]
    a = b[:, [3, 1, 0, 1, 5, 9, 2]] * 1.5 + 0.05 * torch.randn(2, 7, 32, generator=generator)
    a[:, 2] += 1.5 * b[:, 7]
    a[:, 6] = torch.nan
    b[:, 8, 0] = torch.inf
    return a.to(dtype), b.to(dtype), 1, 1


def _weighted_merge_inputs(dtype: torch.dtype) -> tuple:
    """Ten tokens merged into four; a NaN and an inf in two of them."""
    generator = _generator()
    x = torch.randn(2, 10, 16, generator=generator)
    x[0, 7, 3] = torch.nan
    x[1, 8, 5] = torch.inf
    weight = torch.rand(2, 10, generator=generator) + 0.5
    order = torch.stack([torch.randperm(10, generator=generator) for _ in range(2)])
    dst_pos = torch.randint(0, 4, (2, 6), generator=generator)
    return x.to(dtype), weight, weight * 2, order[:, :4], order[:, 4:], dst_pos


def _energy_score_inputs(dtype: torch.dtype) -> tuple:
    """Twelve tokens around a shared direction (both ELU branches), one of them NaN."""
    metric = torch.randn(2, 12, 32, generator=_generator()) + 0.5
    metric[1, 4] = torch.nan
    return metric.to(dtype), 0.5, 1.0


def _attention_pagerank_inputs(dtype: torch.dtype) -> tuple:
    """Softmax attention, two heads, one NaN entry."""
    attn = (torch.randn(2, 2, 12, 12, generator=_generator()) * 2).softmax(dim=-1)
    attn[1, 0, 3, 5] = torch.nan
    return attn.to(dtype), 5


def _greedy_maxmin_inputs(dtype: torch.dtype) -> tuple:
    """Cosine distances of random rows, 9 of 12 picked (k < N: which ones is checked, not only
    their order); a row at NaN distance, one at inf."""
    generator = _generator()
    dist = cosine_distances(torch.randn(2, 12, 16, generator=generator))
    dist[0, :, 7] = torch.nan
    dist[1, :, 4] = torch.inf
    weight = torch.rand(2, 12, generator=generator) + 0.1
    return dist.to(dtype), weight, weight.argmax(dim=1), 9


def _greedy_dpp_inputs(dtype: torch.dtype) -> tuple:
    """Cosine similarities of 12 random rows (rank 16, so no residual runs out) with random
    relevance, 9 picked (k < N: which ones is checked, not only their order); a row of NaN
    relevance, one of inf similarity."""
    generator = _generator()
    similarity = cosine_similarity_matrix(torch.randn(2, 12, 16, generator=generator))
    relevance = torch.rand(2, 12, generator=generator) + 0.1
    relevance[0, 5] = torch.nan
    similarity[1, 3, 3] = torch.inf
    return similarity.to(dtype), relevance, 9


#: Op name -> (its check inputs on the CPU for a dtype, its reference).
CASES: dict[str, tuple[Callable[[torch.dtype], tuple], Callable]] = {
    "best_match": (_best_match_inputs, best_match_reference),
    "weighted_merge": (_weighted_merge_inputs, weighted_merge_reference),
    "energy_score": (_energy_score_inputs, energy_score_reference),
    "attention_pagerank": (_attention_pagerank_inputs, attention_pagerank_reference),
    "greedy_maxmin": (_greedy_maxmin_inputs, greedy_maxmin_reference),
    "greedy_dpp": (_greedy_dpp_inputs, greedy_dpp_reference),
}


def mismatch(name: str, kernel: Callable, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `kernel` (a compiled op `name`) agrees with the reference on `device` for
    inputs of `dtype`, else what differs."""
    make_inputs, reference = CASES[name]
    args = tuple(_to(value, device) for value in make_inputs(dtype))
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        try:
            got = kernel(*args)
        except Exception as err:  # any failure of the kernel is a failed check
            return f"it raised {type(err).__name__}: {err}"
        want = reference(*args)
    got, want = _as_tuple(got), _as_tuple(want)
    for position, (g, w) in enumerate(zip(got, want, strict=True)):
        problem = _compare(g.cpu(), w.cpu())
        if problem:
            return f"output {position}: {problem}"
    return None


def _to(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _as_tuple(result: torch.Tensor | tuple) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _compare(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when the outputs agree: same shape and dtype; equal integers; floats within
    TOLERANCE (absolute and relative) with the same non-finite values in the same places."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{got.dtype} {tuple(got.shape)}, the reference {want.dtype} {tuple(want.shape)}"
    if not got.is_floating_point():
        differ = int((got != want).sum())
        return f"{differ} of {got.numel()} indices differ" if differ else None
    got, want = got.float(), want.float()
    finite = want.isfinite()
    special = ~finite
    if not torch.equal(got.isfinite(), finite) or not torch.equal(
        got[special].nan_to_num(), want[special].nan_to_num()
    ):
        return "non-finite values differ"
    error = (got[finite] - want[finite]).abs()
    if bool((error > TOLERANCE * (1 + want[finite].abs())).any()):
        return f"values differ by up to {float(error.max()):.3g}"
    return None
