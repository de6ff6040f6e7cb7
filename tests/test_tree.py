"""Fixed-tree (TBIK) reference ops: accuracy against float64, and bit-identity across batch
composition, prefill vs decode, KV-cache capacity and K split over 2/4/8 ranks.  Each
invariance is paired with a search showing that the plain torch op does change bits under
the same variation, so the invariance checks are able to fail."""
import math

import pytest
import torch
import torch.nn.functional as F

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import tree
from exactllm.kernels.tree import (attention_tree, combine_partials, exp_det, k_pieces, log_det,
                                   log_softmax_tree, rmsnorm_tree, softmax_tree, tree_matmul,
                                   tree_matmul_partial, tree_sum)

EPS32 = 2.0 ** -24


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def bits_equal(a, b):
    """Bitwise equality (distinguishes -0.0 from 0.0 and compares NaN payloads)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32 if a.element_size() == 4 else torch.int16),
        b.contiguous().view(torch.int32 if b.element_size() == 4 else torch.int16))


# ---------------------------------------------------------------- accuracy vs float64

@pytest.mark.parametrize("n", [1, 2, 3, 31, 100, 1024, 5632])
def test_tree_sum_error_bound(n):
    """Pairwise summation bound: |s - S| <= ceil(log2 n) * u * sum|x| (u = 2^-24)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(16, n, generator=g) * torch.rand(16, 1, generator=g) * 100
    got = tree_sum(x, -1)
    ref = x.double().sum(-1)
    bound = max(1, math.ceil(math.log2(n))) * EPS32 * x.double().abs().sum(-1)
    assert ((got.double() - ref).abs() <= bound).all()


def test_tree_sum_dim_and_pieces():
    x = torch.randn(5, 24, 7)
    assert bits_equal(tree_sum(x, 1), tree_sum(x.transpose(1, 2), -1))
    # pieces=8 of 3 elements: each piece padded to 4, so it equals eight 3-sums combined.
    parts = [tree_sum(x[:, 3 * i:3 * i + 3].transpose(1, 2), -1) for i in range(8)]
    assert bits_equal(tree_sum(x, 1, pieces=8), combine_partials(parts))


def test_exp_log_det_accuracy():
    """Deterministic exp/log stay within 1 ulp of the float64 result (rel err < 1.2e-7)."""
    x = torch.rand(200_000) * 170 - 85
    assert ((exp_det(x).double() - x.double().exp()).abs() / x.double().exp()).max() < 1.2e-7
    assert exp_det(torch.tensor([0.0, -math.inf])).tolist() == [1.0, 0.0]
    y = torch.rand(200_000).double() ** 8 * 1e6 + 1e-30
    y = y.float()
    ref = y.double().log()
    assert ((log_det(y).double() - ref).abs() <= 1.2e-7 * ref.abs().clamp_min(1e-3)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [64, 300, 5632])
def test_tree_matmul_accuracy(dtype, K):
    """||y - y64|| / ||y64|| < 1e-6 for float32 accumulation of the (exact) operand values."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(9, K, generator=g).to(dtype)
    w = (torch.randn(40, K, generator=g) / math.sqrt(K)).to(dtype)
    y = tree_matmul(x, w)
    assert y.dtype == torch.float32
    assert rel_err(y, x.double() @ w.double().T) < 1e-6
    assert tree_matmul(x, w, out_dtype=dtype).dtype == dtype


def test_tree_matmul_quant_weight_and_leading_dims():
    w = torch.randn(48, 256)
    qw = QuantWeight.quantize(w, "q4_1")
    x = torch.randn(2, 3, 256)
    y = tree_matmul(x, qw)
    assert y.shape == (2, 3, 48)
    assert bits_equal(y, tree_matmul(x, qw.dequantize(torch.float32)))
    assert rel_err(y, x.double() @ qw.dequantize(torch.float32).double().T) < 1e-6


def test_rmsnorm_softmax_accuracy():
    x = torch.randn(33, 700) * 3
    w = torch.rand(700) + 0.5
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel_err(rmsnorm_tree(x, w, 1e-5), ref) < 1e-6
    assert rel_err(softmax_tree(x), torch.softmax(x.double(), -1)) < 1e-6
    assert rel_err(log_softmax_tree(x), torch.log_softmax(x.double(), -1)) < 1e-6
    assert rel_err(softmax_tree(x, dim=0), torch.softmax(x.double(), 0)) < 1e-6


def attention_ref64(q, k, v, pos, scale):
    Tq, Hq, D = q.shape
    g = Hq // k.shape[1]
    kk = k.double().repeat_interleave(g, 1)
    vv = v.double().repeat_interleave(g, 1)
    s = torch.einsum("thd,jhd->thj", q.double(), kk) * scale
    mask = torch.arange(k.shape[0])[None, :] <= pos[:, None]
    s = s.masked_fill(~mask[:, None, :], -math.inf)
    return torch.einsum("thj,jhd->thd", torch.softmax(s, -1), vv)


def test_attention_accuracy():
    g = torch.Generator().manual_seed(3)
    T, Hq, Hkv, D = 150, 8, 2, 32
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    pos = torch.arange(T)
    out = attention_tree(q, k, v, pos, 1 / math.sqrt(D), kv_split=64)
    assert out.shape == (T, Hq, D)
    assert rel_err(out, attention_ref64(q, k, v, pos, 1 / math.sqrt(D))) < 1e-6


# ---------------------------------------------------------------- invariance

def test_tree_matmul_batch_invariant(monkeypatch):
    """A row's output is the same bits alone, or at any place in a batch of 1..64 other rows,
    and whatever the chunking of M and N (forced tiny here)."""
    g = torch.Generator().manual_seed(0)
    K, N = 320, 72
    w = torch.randn(N, K, generator=g).bfloat16()
    row = torch.randn(1, K, generator=g).bfloat16()
    alone = tree_matmul(row, w)
    for m in (1, 2, 5, 17, 64):
        others = torch.randn(m, K, generator=g).bfloat16()
        at = int(torch.randint(0, m + 1, (1,), generator=g))
        batch = torch.cat([others[:at], row, others[at:]])
        assert bits_equal(tree_matmul(batch, w)[at:at + 1], alone)
    monkeypatch.setattr(tree, "_CHUNK_ELEMS", 3 * 512)
    assert bits_equal(tree_matmul(batch, w)[at:at + 1], alone)


@pytest.mark.parametrize("K", [256, 768, 5632])
def test_tree_matmul_k_split(K):
    """K split into 2/4/8 contiguous equal slices, partials combined in rank order == TP=1."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(6, K, generator=g)
    w = torch.randn(24, K, generator=g)
    full = tree_matmul(x, w)
    assert bits_equal(tree_matmul_partial(x, w, 1), full)
    for parts in (2, 4, 8):
        s = K // parts
        partials = [tree_matmul_partial(x[:, r * s:(r + 1) * s], w[:, r * s:(r + 1) * s], parts)
                    for r in range(parts)]
        assert bits_equal(combine_partials(partials), full)
        assert bits_equal(combine_partials(torch.stack(partials)), full)


def test_k_split_rejects_impossible_split():
    assert k_pieces(5632) == 8 and k_pieces(300) == 4 and k_pieces(301) == 1
    for parts in (3, 16):   # not a power of two / deeper than the tree's top levels
        with pytest.raises(ValueError):
            tree_matmul_partial(torch.randn(2, 64), torch.randn(3, 64), parts)


def test_fast_matmul_is_not_invariant():
    """The plain x @ w.T changes bits with batch size and with a K split (so the tests above can fail)."""
    g = torch.Generator().manual_seed(1)
    batch_diff = split_diff = False
    for K, N in [(256, 96), (512, 64), (1000, 128)]:
        x = torch.randn(64, K, generator=g)
        w = torch.randn(N, K, generator=g)
        full = x @ w.T
        batch_diff |= any(not bits_equal((x[:m] @ w.T)[:1], full[:1]) for m in (1, 2, 3, 8, 33))
        s = K // 4
        split = combine_partials([x[:, r * s:(r + 1) * s] @ w[:, r * s:(r + 1) * s].T for r in range(4)])
        split_diff |= not bits_equal(split, full)
    assert batch_diff and split_diff


def test_row_ops_batch_and_padding_invariant():
    g = torch.Generator().manual_seed(2)
    H = 300
    w = torch.rand(H, generator=g) + 0.5
    row = torch.randn(1, H, generator=g) * 4
    ref = (rmsnorm_tree(row, w, 1e-6), softmax_tree(row), log_softmax_tree(row))
    for m in (1, 3, 8, 64):
        batch = torch.cat([torch.randn(m, H, generator=g) * 4, row])
        got = (rmsnorm_tree(batch, w, 1e-6), softmax_tree(batch), log_softmax_tree(batch))
        for a, b in zip(got, ref):
            assert bits_equal(a[-1:], b)
    # Extra -inf capacity (e.g. masked vocab or cache slots) changes nothing.
    for pad in (1, 8, 16, 64, 300):
        padded = F.pad(row, (0, pad), value=-math.inf)
        assert bits_equal(softmax_tree(padded)[:, :H], ref[1])
        assert bits_equal(log_softmax_tree(padded)[:, :H], ref[2])


def test_fast_softmax_changes_with_padding():
    g = torch.Generator().manual_seed(0)
    found = False
    for L in range(1, 300, 7):
        x = torch.randn(8, L, generator=g) * 5
        for pad in (1, 8, 16, 64, 300):
            padded = torch.softmax(F.pad(x, (0, pad), value=-math.inf), -1)[:, :L]
            found |= not bits_equal(torch.softmax(x, -1), padded)
        # ...and the tree version never does on the same inputs
        assert all(bits_equal(softmax_tree(x), softmax_tree(F.pad(x, (0, p), value=-math.inf))[:, :L])
                   for p in (1, 16, 300))
    assert found


def test_attention_prefill_decode_capacity_invariant():
    """Each query row: computed inside the full prefill, inside a chunked prefill, or alone as a
    decode step against a cache with spare (garbage) capacity -> identical bits."""
    g = torch.Generator().manual_seed(4)
    T, Hq, Hkv, D, S = 140, 4, 2, 16, 32
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    scale = 1 / math.sqrt(D)
    prefill = attention_tree(q, k, v, torch.arange(T), scale, kv_split=S)
    chunk = attention_tree(q[50:90], k[:90], v[:90], torch.arange(50, 90), scale, kv_split=S)
    assert bits_equal(chunk, prefill[50:90])
    cap = 200
    kc = torch.cat([k, torch.randn(cap - T, Hkv, D, generator=g)])
    vc = torch.cat([v, torch.randn(cap - T, Hkv, D, generator=g)])
    for t in (0, 1, 31, 32, 33, 64, 100, 139):
        dec = attention_tree(q[t:t + 1], kc, vc, torch.tensor([t]), scale, kv_split=S)
        assert bits_equal(dec, prefill[t:t + 1])
        exact_len = attention_tree(q[t:t + 1], k[:t + 1], v[:t + 1], torch.tensor([t]), scale, kv_split=S)
        assert bits_equal(exact_len, prefill[t:t + 1])


def test_fast_sdpa_prefill_vs_decode_differs():
    g = torch.Generator().manual_seed(5)
    found = False
    for T in (80, 130, 257):
        q, k, v = (torch.randn(1, 4, T, 32, generator=g) for _ in range(3))
        full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for t in (T // 2, T - 1):
            dec = F.scaled_dot_product_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1])
            found |= not bits_equal(dec, full[:, :, t:t + 1])
    assert found
