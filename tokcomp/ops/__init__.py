"""Tensor primitives of token compression, with no knowledge of models.

Every op has a pure-PyTorch reference (`*_reference`) and, where it pays, a compiled kernel
from csrc/; the dispatcher in `dispatch` picks one and `backend()` says which is active.
"""

from tokcomp.ops.bipartite import bipartite_plan, max_bipartite_merges
from tokcomp.ops.dispatch import backend
from tokcomp.ops.match import best_match, best_match_reference
from tokcomp.ops.merge import weighted_merge, weighted_merge_reference
from tokcomp.ops.plan import MergePlan, gather_rows

__all__ = [
    "MergePlan",
    "backend",
    "best_match",
    "best_match_reference",
    "bipartite_plan",
    "gather_rows",
    "max_bipartite_merges",
    "weighted_merge",
    "weighted_merge_reference",
]
