"""Tensor-parallel context handed to layers: which rank this is and how to combine partial results.

A single-process model uses ``TPContext()`` (world 1), for which every collective is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from exactllm.distributed import tp


@dataclass(frozen=True)
class TPContext:
    rank: int = 0
    world: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.world == 1 else tp.all_reduce(x, self.group)

    def all_gather_cat(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return x if self.world == 1 else tp.all_gather_cat(x, dim, self.group)

    def tree_allreduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Combine the ranks' TBIK subtree roots in fixed order (bit-identical to TP=1)."""
        return partial if self.world == 1 else tp.tree_allreduce(partial, self.group)

    def shard_range(self, size: int) -> tuple[int, int]:
        """This rank's contiguous [start, end) of a dimension of ``size`` split evenly."""
        if size % self.world:
            raise ValueError(f"dimension {size} is not divisible by tensor_parallel_size {self.world}")
        part = size // self.world
        return self.rank * part, (self.rank + 1) * part
