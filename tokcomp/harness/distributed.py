"""Data-parallel runs under torchrun: the process group from the environment, shards that
cover every sample exactly once, and sums across ranks. One process is a world of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from tokcomp.errors import TokcompError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> World:
        """Join the process group torchrun describes in the environment (nccl on GPUs, gloo
        on CPUs); a plain run is a world of one and starts nothing."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend)
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            size=size,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )

    @property
    def is_main(self) -> bool:
        """Whether this process writes results, plots and state (rank 0)."""
        return self.rank == 0

    def device(self, device: str | torch.device) -> torch.device:
        """This rank's device: its own GPU (cuda:LOCAL_RANK) when asked for cuda."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and self.size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, dataset: Dataset) -> Dataset:
        """Every size-th sample from this rank's offset: the shards cover the data exactly
        once (no padding duplicates), so summed counts equal a one-process run."""
        if self.size == 1:
            return dataset
        return Subset(dataset, range(self.rank, len(dataset), self.size))

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: dict[str, float]) -> dict[str, float]:
        """Each value's maximum over the ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: dict[str, float], op: dist.ReduceOp) -> dict[str, float]:
        if self.size == 1:
            return dict(values)
        tensor = torch.tensor(
            list(values.values()), dtype=torch.float64, device=self._comm_device()
        )
        dist.all_reduce(tensor, op=op)
        return dict(zip(values, tensor.tolist(), strict=True))

    def from_main(self, produce: Callable[[], T]) -> T:
        """Rank 0's `produce()` on every rank (no other rank calls it); a TokcompError it
        raises is raised on every rank, so no rank waits for one that stopped."""
        result, problem = None, None
        if self.is_main:
            try:
                result = produce()
            except TokcompError as err:
                problem = err
        result, problem = self.broadcast((result, problem))
        if problem is not None:
            raise problem
        return result

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0, device=self._comm_device())
        return holder[0]

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


#: A plain, single-process run.
SINGLE = World()
