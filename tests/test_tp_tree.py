"""Tensor parallelism over real gloo process groups (1, 2, 4 ranks on CPU).

Row-parallel linear: the ranks' TBIK subtree partials combined by ``tree_allreduce`` equal the
TP=1 ``tree_matmul`` bit for bit, on every rank; the plain fast path (local matmul + all_reduce)
does not; column-parallel outputs gathered by ``all_gather_cat`` are exact; a failing rank
surfaces as WorkerError with its traceback."""
import pytest
import torch
import torch.distributed as dist

from exactllm.distributed import WorkerError, all_gather_cat, all_reduce, launch, shard, tree_allreduce
from exactllm.formats.quant import QuantWeight
from exactllm.kernels.tree import tree_matmul, tree_matmul_partial

# (M, K, N, seed): K=1408 = 5632/4 has non-power-of-two tree pieces (8 of 176).
CASES = [(5, 256, 48, 0), (3, 1408, 40, 1), (17, 512, 64, 2)]


def _inputs(M, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5


def _tp_worker(rank, world, cases):
    out = []
    for M, K, N, seed in cases:
        x, w = _inputs(M, K, N, seed)
        x_l, w_l = shard(x, 1, rank, world), shard(w, 1, rank, world)
        tree = tree_allreduce(tree_matmul_partial(x_l, w_l, world))
        fast = all_reduce(x_l @ w_l.T)
        col = all_gather_cat(tree_matmul(x, shard(w, 0, rank, world)), dim=-1)
        qw = QuantWeight.quantize(w, "q8_0")
        qtree = tree_allreduce(tree_matmul_partial(x_l, shard(qw, 1, rank, world), world))
        out.append((tree, fast, col, qtree))
    return out


def _failing_worker(rank, world):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 would wait forever: launch must stop it


def test_tree_allreduce_matches_tp1_and_fast_does_not():
    fast_differs = False
    for world in (1, 2, 4):
        per_rank = launch(_tp_worker, world, args=(CASES,))
        assert len(per_rank) == world
        for (M, K, N, seed), *results in zip(CASES, *per_rank):
            x, w = _inputs(M, K, N, seed)
            ref_tree, ref_fast = tree_matmul(x, w), x @ w.T
            ref_q = tree_matmul(x, QuantWeight.quantize(w, "q8_0"))
            for tree, fast, col, qtree in results:
                assert torch.equal(tree, ref_tree)
                assert torch.equal(col, ref_tree)
                assert torch.equal(qtree, ref_q)
                assert (fast - ref_fast).abs().max() < 1e-4   # same math, other rounding
                fast_differs |= not torch.equal(fast, ref_fast)
    assert fast_differs


def test_worker_exception_surfaces():
    with pytest.raises(WorkerError, match=r"(?s)rank 1 of 2 failed.*ValueError: boom on purpose"):
        launch(_failing_worker, 2, timeout=60)
