"""Triton TBIK matmul under the interpreter (small sizes): accuracy against float64, and bit
identity across M (row alone vs inside batches), across the in-GPU split of the tree's top
levels, and across a K split into 2/4/8 TP partials combined by combine_partials."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from exactllm.kernels.tree import combine_partials  # noqa: E402
from exactllm.kernels.tree_matmul_triton import (tbik_matmul, tbik_matmul_partial,  # noqa: E402
                                                 tbik_matmul_ref)

# K=256: one 32-tile per piece; K=768: 3 tiles per piece (padded to 4); K=1408 (=5632/4):
# 11 tiles of 16 per piece (padded to 16, four stack levels).
KS = [256, 768, 1408]


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def _inputs(K, dtype, M=70, N=40, seed=0):
    g = torch.Generator().manual_seed(seed + K)
    return torch.randn(M, K, generator=g).to(dtype), (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K", KS)
def test_accuracy_vs_float64(K, dtype):
    """FP32 accumulation of exact products: ||y - y64|| / ||y64|| < 1e-6, kernel and reference."""
    x, w = _inputs(K, dtype)
    ref = x.double() @ w.double().T
    y = tbik_matmul(x, w)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert rel_err(y, ref) < 1e-6
    assert rel_err(tbik_matmul_ref(x, w), ref) < 1e-6
    assert tbik_matmul(x, w, out_dtype=dtype).dtype == dtype


@pytest.mark.parametrize("K", KS)
def test_invariant_across_m_splits_and_tp(K):
    x, w = _inputs(K, torch.bfloat16)
    y = tbik_matmul(x, w, splits=1)
    for s in (2, 4, 8):                            # tree top levels cut across programs
        assert torch.equal(tbik_matmul(x, w, splits=s), y)
    for start, m in ((5, 1), (0, 3), (33, 37), (6, 64)):   # other rows, other places in the block
        assert torch.equal(tbik_matmul(x[start:start + m], w), y[start:start + m])
    for parts in (2, 4, 8):                        # K over TP ranks, partials combined in order
        k = K // parts
        partials = [tbik_matmul_partial(x[:, r * k:(r + 1) * k], w[:, r * k:(r + 1) * k], parts)
                    for r in range(parts)]
        assert torch.equal(combine_partials(partials), y)


def test_combine_order_matters():
    """Summing the same 8 partials left to right instead of by tree changes bits (so the
    TP checks above can fail)."""
    found = False
    for K in KS:
        x, w = _inputs(K, torch.bfloat16, seed=1)
        k = K // 8
        partials = [tbik_matmul_partial(x[:, r * k:(r + 1) * k], w[:, r * k:(r + 1) * k], 8) for r in range(8)]
        seq = partials[0]
        for p in partials[1:]:
            seq = seq + p
        found |= not torch.equal(seq, combine_partials(partials))
    assert found


def test_rejects_bad_split():
    x, w = _inputs(256, torch.float32, M=2, N=3)
    with pytest.raises(ValueError):
        tbik_matmul_partial(x, w, 3)
    with pytest.raises(ValueError):
        tbik_matmul(x, w, splits=3)
