"""EPLB baseline: redundant copies of hot experts, placed from a sliding window of past loads.

The policy of DeepSeek's EPLB (flat, one node), written from its description:
1. replicate: give each of the ``n_redundant`` extra slots, one at a time, to the expert whose
   load per replica is highest;
2. pack: place replicas, heaviest first, each on the least-loaded rank that still has a free
   slot (and does not already hold that expert, where possible); every rank gets the same
   number of slots.
The load of an expert is its row count summed over the last ``window`` steps; a new placement
is computed every ``period`` steps. It predicts from history, so a hot expert that moves from
one step to the next (as vision-heavy batches do) is missed; and each redundant slot costs one
expert's weights of memory on its rank.
"""
from __future__ import annotations

from collections import deque

import torch

from exactllm.distributed.ep import Placement


def replicate(load: torch.Tensor, n_redundant: int) -> torch.Tensor:
    """Replica count per expert ([E] int64, each >= 1, summing to E + n_redundant)."""
    load = load.double()
    n_rep = torch.ones(load.numel(), dtype=torch.int64)
    for _ in range(n_redundant):
        n_rep[int(torch.argmax(load / n_rep))] += 1
    return n_rep


def pack(load: torch.Tensor, n_rep: torch.Tensor, n_ranks: int) -> Placement:
    """Balanced packing of replicas onto ranks with equal slot counts."""
    n_slots = int(n_rep.sum())
    if n_slots % n_ranks:
        raise ValueError(f"{n_slots} slots do not split over {n_ranks} ranks")
    per_rank = n_slots // n_ranks
    items = [(float(load[e]) / int(n_rep[e]), e) for e in range(load.numel()) for _ in range(int(n_rep[e]))]
    items.sort(key=lambda t: (-t[0], t[1]))
    rank_load = [0.0] * n_ranks
    held: list[list[int]] = [[] for _ in range(n_ranks)]
    for w, e in items:
        free = [r for r in range(n_ranks) if len(held[r]) < per_rank]
        fresh = [r for r in free if e not in held[r]] or free
        r = min(fresh, key=lambda r: (rank_load[r], r))
        held[r].append(e)
        rank_load[r] += w
    return Placement(torch.tensor([sorted(h) for h in held], dtype=torch.int64), load.numel())


def rebalance(load: torch.Tensor, n_ranks: int, n_redundant: int) -> Placement:
    return pack(load, replicate(load, n_redundant), n_ranks)


class EPLB:
    """Sliding-window EPLB; the harness feeds it each step's expert loads."""

    name = "eplb"

    def __init__(self, n_experts: int, n_ranks: int, n_redundant: int, window: int = 8, period: int = 1):
        if (n_experts + n_redundant) % n_ranks:
            raise ValueError("n_experts + n_redundant must be a multiple of n_ranks")
        self.n_experts, self.n_ranks, self.n_redundant = n_experts, n_ranks, n_redundant
        self.period = period
        self.history: deque[torch.Tensor] = deque(maxlen=window)
        self.steps = 0
        self.placement = rebalance(torch.ones(n_experts), n_ranks, n_redundant)

    def observe(self, expert_load: torch.Tensor) -> Placement | None:
        """Record one step's per-expert load; returns a new placement when one is due."""
        self.history.append(expert_load.detach().to(torch.int64).cpu())
        self.steps += 1
        if self.steps % self.period:
            return None
        self.placement = rebalance(torch.stack(list(self.history)).sum(0), self.n_ranks, self.n_redundant)
        return self.placement

    def extra_bytes_per_rank(self, bytes_per_expert: int) -> int:
        """Memory the redundant slots cost on each rank, beyond the plain E / n_ranks shard."""
        return (self.placement.slots_per_rank - self.n_experts // self.n_ranks) * bytes_per_expert
