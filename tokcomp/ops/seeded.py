"""Seeded uniform draws as a torch custom op: the same numbers eagerly and under torch.compile
(a torch.Generator cannot be traced; an opaque op keeps the draw inside the graph)."""

from __future__ import annotations

import torch


@torch.library.custom_op("tokcomp_py::seeded_uniform", mutates_args=())
def seeded_uniform(batch: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """(batch, tokens) float32 uniform draws of a CPU generator seeded with `seed`, on `device`;
    rows are consecutive draws, so a larger batch only appends rows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, tokens, generator=generator).to(device)


@seeded_uniform.register_fake
def _seeded_uniform_fake(batch: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    return torch.empty(batch, tokens, device=device)
