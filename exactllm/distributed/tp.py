"""Tensor-parallel helpers on torch.distributed: rank/world, sharding, and the collectives of
row-parallel (tree or plain all-reduce) and column/vocab-parallel (all-gather) layers.

Rank r of a group owns slice r of every sharded dimension; ``tree_allreduce`` relies on it:
the K slice of group rank r is the r-th subtree of the TBIK tree (kernels/tree.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from exactllm.kernels.tree import combine_partials


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if _active() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if _active() else 1


def shard(t, dim: int, index: int, parts: int):
    """Part ``index`` of ``parts`` equal contiguous pieces of a tensor or QuantWeight along ``dim``."""
    if not isinstance(t, torch.Tensor):
        return t.shard(dim, index, parts)  # QuantWeight: whole blocks along K
    size = t.shape[dim]
    if size % parts:
        raise ValueError(f"dimension {dim} of size {size} is not divisible into {parts} shards")
    step = size // parts
    return t.narrow(dim, index * step, step).contiguous()


def _gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    world = dist.get_world_size(group)
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        flat = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(flat, x, group=group)
        return list(flat.unbind(0))
    if x.is_cuda:  # gloo gathers host tensors only (ranks sharing a GPU, see engine/tp_workers.py)
        return [p.to(x.device) for p in _gather(x.cpu(), group)]
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return parts


def tree_allreduce(partial: torch.Tensor, group=None) -> torch.Tensor:
    """Sum the ranks' subtree roots (fp32 [M, N]) along the top levels of the TBIK tree, in
    group-rank order: bit-identical to the TP=1 tree matmul, on every rank.  The group size
    must be a power of two."""
    if get_world_size(group) == 1:
        return partial
    return combine_partials(_gather(partial, group))


def all_gather_cat(x: torch.Tensor, dim: int = -1, group=None) -> torch.Tensor:
    """Concatenate the ranks' pieces along ``dim`` in rank order (column / vocab parallel)."""
    if get_world_size(group) == 1:
        return x
    return torch.cat(_gather(x, group), dim=dim)


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Plain in-place sum all-reduce (fast mode: order chosen by the backend)."""
    if get_world_size(group) > 1:
        if x.is_cuda and dist.get_backend(group) != "nccl":  # through host memory, as _gather
            x.copy_(all_reduce(x.cpu(), group))
        else:
            dist.all_reduce(x, group=group)
    return x
