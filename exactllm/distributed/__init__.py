"""Process groups and collectives on torch.distributed (gloo on CPU, NCCL on CUDA).

``launch``: spawn one worker per rank on this host (or join a torchrun job) and collect results.
``tp``: tensor-parallel helpers, including the TBIK ``tree_allreduce``.
"""
from exactllm.distributed.launch import WorkerError, launch
from exactllm.distributed.tp import (all_gather_cat, all_reduce, get_rank, get_world_size, shard,
                                     tree_allreduce)

__all__ = ["WorkerError", "launch", "all_gather_cat", "all_reduce", "get_rank", "get_world_size",
           "shard", "tree_allreduce"]
