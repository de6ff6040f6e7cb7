"""Tensor-parallel context handed to layers: which rank this is and how to combine partial results.

A single-process model uses ``TPContext()`` (world 1), for which every collective is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TPContext:
    rank: int = 0
    world: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        import torch.distributed as dist
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_cat(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world == 1:
            return x
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def shard_range(self, size: int) -> tuple[int, int]:
        """This rank's contiguous [start, end) of a dimension of ``size`` split evenly."""
        if size % self.world:
            raise ValueError(f"dimension {size} is not divisible by tensor_parallel_size {self.world}")
        part = size // self.world
        return self.rank * part, (self.rank + 1) * part
