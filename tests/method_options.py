"""Options per method for the shared tests: keep everything, and a middle budget."""

from __future__ import annotations


def keep_all(method: str, tokens: int, depth: int) -> dict:
    """Options under which `method` keeps every token of a model with `tokens` and `depth`."""
    if method == "diffrate":
        return {"prune_kept": [tokens] * depth, "merge_kept": [tokens] * depth}
    return {"target_macs": 1.0}


def middle(method: str, tokens: int, depth: int) -> dict:
    """Options that remove roughly a third of the MACs."""
    if method == "diffrate":
        steps = [0, 6, 14, 22, 30, 38, 46, 54]
        return {
            "prune_kept": [tokens - s // 2 * 2 for s in steps[:depth]],
            "merge_kept": [tokens - s - (s > 0) * 6 for s in steps[:depth]],
        }
    return {"target_macs": 0.7}
