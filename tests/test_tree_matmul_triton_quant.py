"""Triton TBIK matmul on quantized weights (Q8_0, Q4_0, Q4_1 planes read directly), under the
interpreter at small sizes.

The kernel dequantizes each weight in registers to x's dtype, so its bits must equal those of the
same kernel on the dense weight ``W.dequantize(dtype)``: checked bitwise for both ways of reading
the planes (whole 32-blocks where every K chunk starts on a block: K=256, 768; element by element
where the tree's leaves do not: K=704 has pieces of 88).  Then: error against float64, invariance
across M, splits of the tree over programs and K split over 2/8 TP ranks (``QuantWeight.shard``
along K, whole blocks: 2 only for K=704), and the converse: another tree (two leaves per piece) gives other bits.  Bound
(float16 x): the kernel rounds each weight to float16 (relative 2^-11), so against the float64
product with the unrounded weights ||y - ref|| / ||ref|| < 1e-3; against the float64 product with
the float16-rounded weights (what the kernel multiplies) < 1e-6 (FP32 accumulation only).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import exactllm.kernels.tree_matmul_triton as tk  # noqa: E402
from exactllm.formats.quant import QuantWeight  # noqa: E402
from exactllm.kernels.tree import combine_partials  # noqa: E402
from exactllm.kernels.tree_matmul_triton import Config, tbik_matmul, tbik_matmul_partial, tbik_matmul_ref  # noqa: E402
from kernel_testing import fresh_gen, rel  # noqa: E402

CFG = Config(32, 32, 4, 2)
QTYPES = ["q8_0", "q4_0", "q4_1"]


def _inputs(K, qtype, dtype=torch.float16, M=20, N=40):
    gen, seed = fresh_gen()
    x = torch.randn(M, K, generator=gen).to(dtype)
    return x, QuantWeight.quantize(torch.randn(N, K, generator=gen) / K ** 0.5, qtype), seed


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("K", [256, 704])
def test_same_bits_as_dequantized_weight(qtype, K):
    assert tk._aligned(tk.tree_shape(K, 1)) == (K == 256)
    for dtype in (torch.float16, torch.float32):
        x, W, seed = _inputs(K, qtype, dtype, M=5)
        y = tbik_matmul(x, W, config=CFG)
        assert torch.equal(y, tbik_matmul(x, W.dequantize(dtype), config=CFG)), f"{dtype} seed {seed}"


@pytest.mark.parametrize("qtype,K", [("q8_0", 704), ("q4_0", 256), ("q4_1", 768)])
def test_accuracy_and_invariance(qtype, K):
    x, W, seed = _inputs(K, qtype)
    y = tbik_matmul(x, W, splits=1, config=CFG)
    exact = x.double() @ W.dequantize(torch.float64).T
    seen = x.double() @ W.dequantize(x.dtype).double().T
    assert rel(y, exact) < 1e-3 and rel(y, seen) < 1e-6, f"seed {seed}"
    assert rel(tbik_matmul_ref(x, W), seen) < 1e-6, f"seed {seed}"
    for s in (2, 8):                                       # the tree's top levels over programs
        assert torch.equal(tbik_matmul(x, W, splits=s, config=CFG), y), f"splits {s} seed {seed}"
    assert torch.equal(tbik_matmul(x[7:8], W, config=CFG, splits=4), y[7:8]), f"seed {seed}"
    assert torch.equal(tbik_matmul(x[3:12], W, config=CFG._replace(block_m=16)), y[3:12]), f"seed {seed}"
    for parts in [p for p in (2, 8) if K // 32 % p == 0]:  # K over TP ranks, whole blocks each
        k = K // parts
        partials = [tbik_matmul_partial(x[:, r * k:(r + 1) * k], W.shard(1, r, parts), parts, config=CFG)
                    for r in range(parts)]
        assert torch.equal(combine_partials(partials), y), f"parts {parts} seed {seed}"


@pytest.mark.parametrize("qtype,K", [("q8_0", 256), ("q4_1", 256), ("q4_0", 704)])
def test_swapped_tile_same_bits(qtype, K):
    """The small-M tile reads the planes as [rows, blocks, bytes] (K = 256: by block; 704: per
    element) and gives the bits of the normal tile, across splits and TP shards."""
    x, W, seed = _inputs(K, qtype, M=5)
    y = tbik_matmul(x, W, splits=1, config=CFG)
    swap = Config(16, 32, 4, 2, swap=True)
    for s in (1, 8):
        assert torch.equal(tbik_matmul(x, W, splits=s, config=swap), y), f"splits {s} seed {seed}"
    k = K // 2
    partials = [tbik_matmul_partial(x[:, r * k:(r + 1) * k], W.shard(1, r, 2), 2, config=swap) for r in range(2)]
    assert torch.equal(combine_partials(partials), y), f"seed {seed}"


def test_other_tree_differs(monkeypatch):
    """Two leaves of 32 per piece instead of one of 64 (K=512; both read by block): other bits."""
    x, W, seed = _inputs(512, "q8_0")
    y = tbik_matmul(x, W, config=CFG)
    monkeypatch.setattr(tk, "MAX_LEAF", 32)
    assert tk.tree_shape(512, 1) == (16, 64, 32, 2, 32)
    assert not torch.equal(tbik_matmul(x, W, config=CFG), y), f"seed {seed}"


def test_rejects_mismatched_k():
    x, W, _ = _inputs(256, "q4_0", M=2)
    with pytest.raises(ValueError):
        tbik_matmul(x[:, :128], W)
