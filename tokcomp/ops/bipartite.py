"""ToMe's bipartite soft matching as a MergePlan (docs/methods.md section 1)."""

from __future__ import annotations

import torch

from tokcomp.ops.match import best_match
from tokcomp.ops.plan import MergePlan


def max_bipartite_merges(tokens: int, protected: int) -> int:
    """The most tokens one bipartite step can merge away: half of the unprotected ones."""
    return max(tokens - protected, 0) // 2


def bipartite_plan(metric: torch.Tensor, protected: int, r: int) -> MergePlan:
    """Merge the `r` tokens of the alternate set A that best match a token of set B.

    metric: (B, N, C), compared by cosine. A = even positions, B = odd positions; the first
    `protected` tokens are never merged nor merged into. Output order: protected tokens,
    the unmerged A tokens by position, then the B tokens. A tokens without a finite match (a
    NaN or an inf in them or in every eligible B token) merge last, into the first unprotected
    B token.
    """
    tokens = metric.shape[1]
    if not 0 <= r <= max_bipartite_merges(tokens, protected):
        raise ValueError(
            f"bipartite step can merge 0..{max_bipartite_merges(tokens, protected)} of {tokens} "
            f"tokens with {protected} protected, asked for {r}"
        )
    batch, device = metric.shape[0], metric.device
    if tokens < 2:  # no B token: nothing to merge into (r is 0)
        everything = torch.arange(tokens, device=device).expand(batch, -1)
        return MergePlan(everything, everything[:, :0], everything[:, :0])
    a_protected, b_protected = (protected + 1) // 2, protected // 2
    score, match = best_match(metric[:, ::2], metric[:, 1::2], a_protected, b_protected)
    # ranked among the unprotected rows only: a protected row's -inf ties with a row that has
    # no finite match (score -inf, index 0: maybe a protected B token)
    order = a_protected + score[:, a_protected:].argsort(dim=1, descending=True)
    src_a = order[:, :r]
    unmerged_a = order[:, r:].sort(dim=1).values
    dst_b = match.gather(1, src_a).clamp(min=b_protected)
    a_count, b_count = score.shape[1], metric.shape[1] // 2
    b_rows = torch.arange(b_protected, b_count, device=device).expand(batch, -1)
    keep_idx = torch.cat(
        [
            torch.arange(protected, device=device).expand(batch, -1),
            2 * unmerged_a,
            2 * b_rows + 1,
        ],
        dim=1,
    )
    # B token j sits after the protected tokens and the unmerged A ones: a_count - r + j
    return MergePlan(keep_idx, 2 * src_a, a_count - r + dst_b)
