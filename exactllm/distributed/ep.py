"""Expert parallelism: expert placement, the count exchange, and the dispatch/combine all-to-alls.

Experts live in physical *slots*: rank r owns slots [r*S, (r+1)*S). A ``Placement`` names the
logical expert held in each slot; without redundancy slot i holds expert i (contiguous shards),
with EPLB a hot expert can hold several slots, and each token-expert pair picks one replica.

One MoE step under EP (layers/moe.py drives it):
1. every rank counts its (token, expert) pairs per destination slot and per modality;
2. ``exchange_counts`` all-gathers those counts, so every rank knows the whole routing table
   [source rank, slot, modality]: its receive sizes, and every rank's load and vision share
   (what ReaLB decides from, identically on every rank with no further communication);
3. ``all_to_all`` moves the token rows (dispatch), and the expert outputs back (combine).
All communication is torch.distributed: gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Placement:
    """slots[r, j] = logical expert held by rank r's j-th slot (every expert at least once)."""

    slots: torch.Tensor  # int64 [n_ranks, slots_per_rank], on CPU
    n_experts: int

    @staticmethod
    def contiguous(n_experts: int, n_ranks: int) -> "Placement":
        if n_experts % n_ranks:
            raise ValueError(f"{n_experts} experts do not split over {n_ranks} ranks")
        return Placement(torch.arange(n_experts).view(n_ranks, -1), n_experts)

    @property
    def n_ranks(self) -> int:
        return self.slots.shape[0]

    @property
    def slots_per_rank(self) -> int:
        return self.slots.shape[1]

    @property
    def n_slots(self) -> int:
        return self.slots.numel()

    def local_experts(self, rank: int) -> list[int]:
        return self.slots[rank].tolist()

    def replica_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, max_replicas] global slot ids, padded with the first replica; [E] replica counts)."""
        flat = self.slots.flatten()
        n_rep = torch.bincount(flat, minlength=self.n_experts)
        if int(n_rep.min()) == 0:
            raise ValueError("placement leaves an expert without a slot")
        table = torch.empty(self.n_experts, int(n_rep.max()), dtype=torch.int64)
        for e in range(self.n_experts):
            where = (flat == e).nonzero().flatten()
            table[e] = where[torch.arange(table.shape[1]) % len(where)]
        return table, n_rep

    def slot_of(self, expert_ids: torch.Tensor, token_idx: torch.Tensor, tables=None) -> torch.Tensor:
        """Global slot of each (token, expert) pair: replicas are taken round-robin by token."""
        table, n_rep = tables if tables is not None else self.replica_table()
        table, n_rep = table.to(expert_ids.device), n_rep.to(expert_ids.device)
        pick = token_idx % n_rep[expert_ids]
        return table[expert_ids, pick]


def world(group) -> tuple[int, int]:
    """(rank, size) of ``group``; (0, 1) without one (None means no expert parallelism, even when a
    default process group exists, e.g. a tensor-parallel worker pool's)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def exchange_counts(local_counts: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather each rank's [n_slots, 2] pair counts into [n_ranks, n_slots, 2]."""
    _, size = world(group)
    if size == 1:
        return local_counts.unsqueeze(0)
    n = local_counts.shape[0]
    out = torch.empty((size * n,) + tuple(local_counts.shape[1:]), dtype=local_counts.dtype,
                      device=local_counts.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local_counts.contiguous(), group=group)
    return out.view((size,) + tuple(local_counts.shape))


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Rows of ``x`` grouped by destination rank go out; rows grouped by source rank come back."""
    _, size = world(group)
    if size == 1:
        return x
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def receive_layout(table: torch.Tensor, rank: int, slots_per_rank: int, output_size: int | None = None):
    """From the routing table, the layout of the rows this rank receives.

    Rows arrive grouped by source rank and, within a source, sorted by local slot. Returns
    (recv_splits per source, local slot id of each received row, expert row offsets [S+1]);
    ``output_size`` (the total received rows, when the caller knows it) avoids a host sync."""
    mine = table[:, rank * slots_per_rank:(rank + 1) * slots_per_rank, :].sum(-1)  # [R, S]
    recv_splits = mine.sum(1)
    local = torch.arange(slots_per_rank, device=table.device).repeat(table.shape[0])
    recv_slot = torch.repeat_interleave(local, mine.flatten(), output_size=output_size)
    offsets = torch.zeros(slots_per_rank + 1, dtype=torch.int64, device=table.device)
    offsets[1:] = torch.cumsum(mine.sum(0), 0)
    return recv_splits, recv_slot, offsets
