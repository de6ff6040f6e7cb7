"""Triton TBIK matmul under the interpreter (small sizes): accuracy against float64, the leaf
plan, and bit identity across M (row alone vs inside batches), across the split of the tree's
top levels over programs (combined in-kernel), across launch variants (flat/unrolled loop,
stack top in memory), and across a K split into 2/4/8 TP partials combined by
combine_partials; plus the converse: a different tree (leaf length, combine order) changes bits.
Whether the tile shape changes bits on the GPU is checked by bench/tbik_matmul.py (the
interpreter's dot is a numpy matmul per chunk, not the GPU's MMA)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import exactllm.kernels.tree_matmul_triton as tk  # noqa: E402
from exactllm.kernels.tree import combine_partials  # noqa: E402
from exactllm.kernels.tree_matmul_triton import (Config, tbik_matmul, tbik_matmul_partial,  # noqa: E402
                                                 tbik_matmul_ref)

# K=256: 8 leaves of 32; K=768: 8 leaves of 96 (chunks of 32); K=704 (=5632/8): 8 leaves of 88
# (masked chunks of 64).  With MAX_LEAF=32 each piece holds 4 leaves (K=768: 24 each; K=704: 22
# each), 32 leaves in all: a 5-level stack, masked chunks.
KS = [256, 768, 704]
CFG = Config(32, 32, 4, 2)


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def _inputs(K, dtype, M=70, N=40, seed=0):
    g = torch.Generator().manual_seed(seed + K)
    return torch.randn(M, K, generator=g).to(dtype), (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)


@pytest.fixture(params=[1024, 32], ids=["leaf1024", "leaf32"])
def max_leaf(request, monkeypatch):
    monkeypatch.setattr(tk, "MAX_LEAF", request.param)
    return request.param


def test_leaf_plan():
    assert tk.leaf_plan(256) == (1, 256) and tk.leaf_plan(704) == (1, 704)   # TinyLlama K/8
    assert tk.leaf_plan(2048) == (2, 1024) and tk.leaf_plan(1040) == (2, 576)
    for L in range(1, 5000, 7):
        nlp, leaf = tk.leaf_plan(L)
        assert nlp & (nlp - 1) == 0 and leaf <= tk.MAX_LEAF and -(-L // leaf) == nlp, L
    assert tk.tree_shape(5632, 1) == (8, 704, 704, 1, 64)
    assert tk.tree_shape(704, 8) == (1, 704, 704, 1, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("K", KS)
def test_accuracy_vs_float64(K, dtype):
    """FP32 accumulation of exact products: ||y - y64|| / ||y64|| < 1e-6, kernel and reference."""
    x, w = _inputs(K, dtype)
    ref = x.double() @ w.double().T
    y = tbik_matmul(x, w, config=CFG)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert rel_err(y, ref) < 1e-6
    assert rel_err(tbik_matmul_ref(x, w), ref) < 1e-6
    y16 = tbik_matmul(x, w, out_dtype=dtype, config=CFG)
    assert y16.dtype == dtype
    if dtype == torch.bfloat16:   # the interpreter truncates bf16 stores (the GPU rounds to nearest:
        ulp = torch.finfo(dtype).eps * y.abs().to(dtype).float()   # bench/tbik_matmul.py checks it)
        assert ((y16.float() - y.to(dtype).float()).abs() <= ulp).all()
    else:
        assert torch.equal(y16, y.to(dtype))   # rounded once, on store


@pytest.mark.parametrize("K", [256, 704])
def test_invariant_across_m_splits_variants_and_tp(K, max_leaf):
    x, w = _inputs(K, torch.bfloat16)
    y = tbik_matmul(x, w, splits=1, config=CFG)
    for s in (2, 8):                               # tree top levels cut across programs
        assert torch.equal(tbik_matmul(x, w, splits=s, config=CFG), y)
    assert int(tk._counters(x.device).abs().sum()) == 0        # the last program resets them
    for cfg in (CFG._replace(unroll=True), CFG._replace(spill_top=True)):
        assert torch.equal(tbik_matmul(x, w, splits=2, config=cfg), y)
    for start, m in ((5, 1), (33, 37)):            # other rows, other places in the block
        assert torch.equal(tbik_matmul(x[start:start + m], w, config=CFG), y[start:start + m])
        assert torch.equal(tbik_matmul(x[start:start + m], w, config=CFG, splits=4), y[start:start + m])
    for parts in (2, 8):                           # K over TP ranks, partials combined in order
        k = K // parts
        partials = [tbik_matmul_partial(x[:, r * k:(r + 1) * k], w[:, r * k:(r + 1) * k], parts, config=CFG)
                    for r in range(parts)]
        assert torch.equal(combine_partials(partials), y)


SWAP = Config(16, 32, 4, 2, swap=True)


@pytest.mark.parametrize("K", [256, 704])
def test_swapped_tile_same_bits(K):
    """The small-M tile (weights as the MMA's row operand, acc [BN, BM]) indexes the same
    outputs and the same K steps as the normal tile: equal here with every split, stack variant,
    row offset and TP split (under the interpreter each chunk is one numpy matmul, so this checks
    the indexing; bench/tbik_matmul.py --small checks the MMA bits on the GPU)."""
    x, w = _inputs(K, torch.bfloat16, M=20)
    y = tbik_matmul(x, w, splits=1, config=CFG)
    for s in (1, 8):
        assert torch.equal(tbik_matmul(x, w, splits=s, config=SWAP), y)
    for cfg in (SWAP._replace(unroll=True), SWAP._replace(spill_top=True)):
        assert torch.equal(tbik_matmul(x, w, splits=2, config=cfg), y)
    assert torch.equal(tbik_matmul(x[7:8], w, config=SWAP), y[7:8])
    k = K // 2
    partials = [tbik_matmul_partial(x[:, r * k:(r + 1) * k], w[:, r * k:(r + 1) * k], 2, config=SWAP)
                for r in range(2)]
    assert torch.equal(combine_partials(partials), y)
    assert not torch.equal(tbik_matmul(x, w.flip(1), config=SWAP), y)   # the check can fail


def test_small_m_config_choice():
    """The swapped tile only where its bits are checked: M <= small_m (Hopper, bf16 x)."""
    assert tk.pick_config(1, 2048, 2048, 8, small_m=16) == tk.SMALL_CONFIG
    assert tk.pick_config(16, 2048, 2048, 8, "q8_0", small_m=16) == tk.SMALL_CONFIG
    assert not tk.pick_config(17, 2048, 2048, 8, small_m=16).swap
    assert not tk.pick_config(1, 2048, 2048, 8).swap                      # off Hopper / other dtypes
    assert tk.pick_config(1, 2048, 2048, 8, "q8_0", fixed=True, small_m=16) == tk.FIXED_CONFIG


def test_default_config_path():
    """No config given: pick_config / default_splits choose (here 64x64 tiles, split 2 ways)."""
    x, w = _inputs(256, torch.bfloat16, M=3, N=200)
    y = tbik_matmul(x, w)
    assert rel_err(y, x.double() @ w.double().T) < 1e-6
    assert torch.equal(tbik_matmul(x[1:2], w), y[1:2])


def test_other_tree_differs(monkeypatch):
    """A different tree over the same data changes bits (so the checks above can fail):
    shorter leaves (MAX_LEAF 32 vs 1024) for K=768 and 1408."""
    for K in (768, 704):
        x, w = _inputs(K, torch.bfloat16, seed=2)
        y = tbik_matmul(x, w, config=CFG)
        monkeypatch.setattr(tk, "MAX_LEAF", 32)
        y_short = tbik_matmul(x, w, config=CFG)
        monkeypatch.setattr(tk, "MAX_LEAF", 1024)
        assert not torch.equal(y, y_short)


def test_combine_order_matters():
    """Summing the same 8 partials left to right instead of by tree changes bits."""
    found = False
    for K in KS:
        x, w = _inputs(K, torch.bfloat16, seed=1)
        k = K // 8
        partials = [tbik_matmul_partial(x[:, r * k:(r + 1) * k], w[:, r * k:(r + 1) * k], 8, config=CFG)
                    for r in range(8)]
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
    with pytest.raises(ValueError):
        tbik_matmul(x, w, splits=16)
