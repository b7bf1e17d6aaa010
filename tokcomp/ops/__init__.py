"""Tensor primitives of token compression, with no knowledge of models.

Every op has a pure-PyTorch reference (`*_reference`) and, where it pays, a compiled kernel
from csrc/; the dispatcher in `dispatch` picks one, checks a compiled kernel against the
reference on its first call (`selfcheck`; TOKCOMP_VERIFY=0 skips it), and `backend()` says
which is active (`backend(device, verbose=True)`: per op, with the checks).

Non-finite inputs follow one rule on every route (reference, C++, CUDA, cupy): arithmetic is
IEEE float32, so NaN and inf propagate through sums and means (`weighted_merge`,
`attention_pagerank`), and a NaN never wins a comparison: where an op ranks values, a NaN counts
as -inf. The cosine similarity of a row holding a NaN or an inf is NaN (normalising it gives
NaN), hence:

- `best_match`: such a pair is never the best; a row without a finite candidate gets score -inf
  and index 0, like a row with no eligible partner;
- `energy_score`: such a pair adds ELU(-inf) = -alpha, so energies stay finite;
- `greedy_maxmin`: a NaN (or -inf) score dist * weight counts as -inf: those rows are picked
  after all others, lowest index first.
- `greedy_dpp`: a NaN (or -inf) marginal gain d2 counts as -inf the same way.
"""

from tokcomp.ops.bipartite import bipartite_plan, max_bipartite_merges
from tokcomp.ops.dispatch import backend
from tokcomp.ops.dpp import cosine_similarity_matrix, greedy_dpp, greedy_dpp_reference
from tokcomp.ops.energy import energy_score, energy_score_reference
from tokcomp.ops.match import best_match, best_match_reference
from tokcomp.ops.maxmin import cosine_distances, greedy_maxmin, greedy_maxmin_reference
from tokcomp.ops.merge import weighted_merge, weighted_merge_reference
from tokcomp.ops.pagerank import attention_pagerank, attention_pagerank_reference
from tokcomp.ops.plan import MergePlan, gather_rows
from tokcomp.ops.seeded import seeded_uniform

__all__ = [
    "MergePlan",
    "attention_pagerank",
    "attention_pagerank_reference",
    "backend",
    "best_match",
    "best_match_reference",
    "bipartite_plan",
    "cosine_distances",
    "cosine_similarity_matrix",
    "energy_score",
    "energy_score_reference",
    "gather_rows",
    "greedy_dpp",
    "greedy_dpp_reference",
    "greedy_maxmin",
    "greedy_maxmin_reference",
    "max_bipartite_merges",
    "seeded_uniform",
    "weighted_merge",
    "weighted_merge_reference",
]
