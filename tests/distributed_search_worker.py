"""Run under torchrun by tests/test_distributed.py: a few DiffRate search steps on
rank-specific random batches, whole and in micro-batches; each rank saves both searches'
rates and its model weights for comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import tiny_vit

from tokcomp.adapters import find_adapter
from tokcomp.harness.distributed import World
from tokcomp.methods.diffrate_search import DiffRateRates
from tokcomp.search.diffrate import SearchSettings, search_diffrate


def main(output: Path) -> None:
    torch.set_num_threads(1)
    world = World.from_env("cpu")
    model = tiny_vit("vit", seed=world.rank)  # different weights: rank 0's must win
    torch.manual_seed(100 + world.rank)  # different data on every rank
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    searched = {}
    for micro_batch in (None, 3):  # 3: each batch of 4 in chunks of 3 and 1
        torch.manual_seed(0)
        rates = DiffRateRates(find_adapter(model).spec(), granularity=4)
        settings = SearchSettings(0.6, epochs=1, progress=False, micro_batch=micro_batch)
        search_diffrate(model, batches, settings, rates, world=world)
        searched[micro_batch] = rates.state_dict()
    saved = {"rates": searched[None], "micro_batch_rates": searched[3], "model": model.state_dict()}
    torch.save(saved, output / f"rank{world.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
