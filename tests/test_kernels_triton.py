"""Triton kernels vs their torch references, under the Triton interpreter on CPU.

Every check draws fresh random inputs (the seed is in the failure message), poisons the
kernel's output with NaN first (so an unwritten element fails), and bounds the relative error
||out - ref64|| / ||ref64|| against a float64 reference: 1e-5 for float32 data, 2e-3 for
float16 (one fp16 rounding of the output is ~3e-4 in norm). The *_ref function must meet the
same bound, and the kernel must agree with it. float16 stands in for the 16-bit path: the
Triton 3.9 interpreter computes bf16 ``tl.dot`` wrongly.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import activation, attention, matmul, rmsnorm, rope
from exactllm.kernels import activation_triton, attention_triton, matmul_triton, qgemv_triton, rmsnorm_triton, rope_triton
from kernel_testing import BOUND, DTYPES, fresh_gen, poison, rel


def check(out, ref_out, ref64, dtype, seed):
    bound = BOUND[dtype]
    e_out, e_ref = rel(out, ref64), rel(ref_out, ref64)
    assert e_ref <= bound, f"reference off by {e_ref} (seed {seed})"
    assert e_out <= bound, f"kernel off by {e_out} > {bound} (seed {seed})"
    assert rel(out, ref_out) <= 2 * bound, f"kernel vs reference (seed {seed})"


# ------------------------------------------------------------------------------ linear

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", None])
def test_linear_kernels(qtype, dtype, monkeypatch):
    """Every path of matmul_triton.linear against float64: GEMM tile configs (both K orders for
    4-bit weights), and linear() in fast mode through the fused GEMM (M = 1 and 5) and dequantize +
    matmul (M above FUSED_MAX_M); invariant mode's tiles. (The few-row quantized GEMV that layers/ops.py
    routes to first: tests/test_qgemv.py.)"""
    gen, seed = fresh_gen()
    M, N, K = 5, 40, 160  # K = 5 blocks: exercises the masked tail of every K tile below
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen)
    W = QuantWeight.quantize(w, qtype) if qtype else w.to(dtype)
    ref64 = x.double() @ (W.dequantize(torch.float64) if qtype else W.double()).T
    ref = matmul.linear_ref(x, W)
    configs = [(16, 16, 64, 4, 2), (32, 32, 128, 4, 1), (64, 16, 256, 4, 3), matmul_triton.INVARIANT_CONFIG]
    runs = [lambda o, c=c: matmul_triton.gemm(x, W, c, out=o) for c in configs]
    runs += [lambda o: matmul_triton.linear(x, W, invariant=True, out=o)]
    table = matmul_triton.BF16_TILES if qtype is None else matmul_triton.WGMMA_TILES
    runs += [lambda o, c=c: matmul_triton.gemm(x, W, c, out=o) for c in table[0][1][1:]]
    if qtype:
        runs += [lambda o, c=c: matmul_triton.gemm(x, W, c, out=o, natural=False) for c in configs[:2]]
        runs += [lambda o: torch.cat([matmul_triton.linear(x[i:i + 1], W) for i in range(M)])]  # M = 1
        runs += [lambda o: matmul_triton.linear(x, W, out=o)]  # fused GEMM
        monkeypatch.setattr(matmul_triton, "FUSED_MAX_M", 2)
        runs += [lambda o: matmul_triton.linear(x, W, out=o)]  # dequantize + matmul
    for run in runs:
        check(run(poison((M, N), dtype)), ref, ref64, dtype, seed)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_dequantize_kernel(qtype):
    """Same values as the torch dequantizer: exact for Q4_0/Q8_0 ((q - o) * d is exact in float32);
    Q4_1's q * d + min may be one fused rounding instead of two."""
    gen, seed = fresh_gen()
    W = QuantWeight.quantize(torch.randn(24, 224, generator=gen), qtype)
    got = matmul_triton.dequantize(W, torch.float32)
    want = W.dequantize(torch.float32)
    if qtype == "q4_1":
        assert torch.allclose(got, want, rtol=2e-7, atol=1e-7), f"seed {seed}"
    else:
        assert torch.equal(got, want), f"seed {seed}"


def test_invariant_tiles_stay_in_one_class(monkeypatch):
    """The invariant mode may take, at any M, any candidate of its table for dense weights: those must
    lie in one class of configs shown bit-identical on the H100 (bench/linear_kernels.py, section
    classes): BF16 activations on Hopper, the BF16 table (both MMA families gave the same bits), BLOCK_K
    a multiple of 32; other activation dtypes and GPUs: the one INVARIANT_CONFIG at every M. Quantized
    weights take the TBIK tree instead (tests/test_tree_matmul_triton_quant.py)."""
    assert {matmul_triton.invariant_config(m, 2048, 2048, torch.bfloat16, torch.device("cpu"))
            for m in range(1, 4097, 7)} == {matmul_triton.INVARIANT_CONFIG}
    monkeypatch.setattr(matmul_triton, "_is_hopper", lambda device: True)
    bf16 = [c for _, cands in matmul_triton.BF16_TILES for c in cands]
    assert all(bk % 32 == 0 for _, _, bk, _, _ in bf16)
    for dtype in (torch.float16, torch.float32):
        assert {matmul_triton.invariant_config(m, 2048, 2048, dtype) for m in range(1, 4097, 7)} == \
            {matmul_triton.INVARIANT_CONFIG}
    assert all(matmul_triton.invariant_config(m, 2048, 2048, torch.bfloat16) in bf16 for m in range(1, 4097, 7))


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0", None])
def test_linear_invariant_mode_is_batch_invariant(qtype):
    """A row's bits do not depend on the batch around it: row r alone (M = 1) == row r inside
    M = 17 and M = 64. Quantized weights go through the TBIK tree (float16 activations: the
    interpreter's bf16 dots are wrong), dense ones through the fixed float32 GEMM config; the GPU
    checks of tiles that change with M are bench/linear_kernels.py (sections classes and final) and
    bench/tbik_matmul.py --quant.
    The check can fail: fast mode (the quantized GEMV at M = 1, which layers/ops.py routes there, and
    tensor cores at M = 17) gives other bits for some rows, and for the dense GEMM another BLOCK_K does."""
    gen, seed = fresh_gen()
    K, N = 256, 48
    dtype = torch.float32 if qtype is None else torch.float16
    x = torch.randn(64, K, generator=gen, dtype=dtype)
    w = torch.randn(N, K, generator=gen)
    W = QuantWeight.quantize(w, qtype) if qtype else w
    full = {m: matmul_triton.linear(x[:m], W, invariant=True) for m in (17, 64)}
    for r in (0, 9, 16):
        alone = matmul_triton.linear(x[r:r + 1], W, invariant=True)[0]
        assert all(torch.equal(alone, full[m][r]) for m in (17, 64)), f"seed {seed}"
    if qtype:
        fast = matmul_triton.linear(x[:17], W)
        assert any(not torch.equal(qgemv_triton.gemv(x[r:r + 1], W)[0], fast[r]) for r in range(17))
    else:   # the float32 accumulator's bits (an output buffer in float32) show the order changes
        cfg = matmul_triton.invariant_config(17, N, K, dtype)
        assert cfg == matmul_triton.INVARIANT_CONFIG
        acc = lambda c: matmul_triton.gemm(x[:17], W, c, out=torch.empty(17, N))  # noqa: E731
        assert not torch.equal(acc((cfg[0], cfg[1], 32 if cfg[2] != 32 else 64) + cfg[3:]), acc(cfg)), f"seed {seed}"


# ------------------------------------------------------------------------- elementwise

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(dtype, with_residual):
    gen, seed = fresh_gen()
    x = torch.randn(7, 100, generator=gen).to(dtype)
    w = 1 + 0.1 * torch.randn(100, generator=gen)
    r = torch.randn(7, 100, generator=gen).to(dtype) if with_residual else None
    y = poison(x.shape, dtype)
    res = poison(x.shape, dtype)
    out = rmsnorm_triton.rmsnorm(x, w, 1e-5, r, out=y, residual_out=res)
    ref = rmsnorm.rmsnorm_ref(x, w, 1e-5, r)
    s = x.double() + (r.double() if with_residual else 0)
    if with_residual:
        out, new_res = out
        ref, ref_res = ref
        assert torch.equal(new_res, ref_res)  # the residual stream is the same rounded sum
        s = new_res.double()
    ref64 = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    check(out, ref, ref64, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place(dtype):
    gen, seed = fresh_gen()
    cos, sin = rope.rope_cache(32, 64, 10000.0)
    x = torch.randn(6, 5, 32, generator=gen).to(dtype)
    pos = torch.randint(0, 64, (6,), generator=gen)
    ref = rope.apply_rope_ref(x, pos, cos, sin)
    c, s = rope.rope_cache(32, 64, 10000.0)  # float64 angles rounded once: compare in float64
    xd = x.double()
    ang = torch.arange(64, dtype=torch.float64)[:, None] * (1.0 / 10000.0 ** (torch.arange(0, 32, 2) / 32.0))
    cd, sd = ang.cos()[pos][:, None], ang.sin()[pos][:, None]
    ref64 = torch.stack((xd[..., 0::2] * cd - xd[..., 1::2] * sd, xd[..., 0::2] * sd + xd[..., 1::2] * cd), -1).flatten(-2)
    buf = x.clone()
    out = rope_triton.apply_rope(buf, pos, cos, sin)
    assert out.data_ptr() == buf.data_ptr()
    check(out, ref, ref64, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gen, seed = fresh_gen()
    g = (3 * torch.randn(9, 333, generator=gen)).to(dtype)
    u = torch.randn(9, 333, generator=gen).to(dtype)
    out = activation_triton.silu_mul(g, u, out=poison(g.shape, dtype))
    gd = g.double()
    check(out, activation.silu_mul_ref(g, u), gd * torch.sigmoid(gd) * u.double(), dtype, seed)


# --------------------------------------------------------------------------- attention

def paged_case(gen, ctx, q_lens, hq, hkv, d=16, page=4, dtype=torch.float32):
    """Random K/V in shuffled pages, and query rows for each sequence's last q_lens tokens."""
    n_pages = sum(-(-c // page) for c in ctx) + 3
    kc = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    free = torch.randperm(n_pages, generator=gen).tolist()
    width = max(-(-c // page) for c in ctx)
    tables = []
    for c in ctx:
        n = -(-c // page)
        tables.append([free.pop() for _ in range(n)] + [0] * (width - n))
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], hq, d, generator=gen).to(dtype)
    i32 = torch.int32
    return q, kc, vc, torch.tensor(cu, dtype=i32), torch.tensor(ctx, dtype=i32), torch.tensor(tables, dtype=i32)


def attention64(q, kc, vc, cu, ctx, tables, scale):
    up = [t.double() if t.is_floating_point() else t for t in (q, kc, vc, cu, ctx, tables)]
    return attention.paged_attention_ref(*up, scale)


CASES = {  # (context lengths, query rows per sequence): prefill, chunked prefill, decode, mixed
    "mixed": ([37, 5, 20, 64], [37, 1, 3, 1]),
    "decode": ([9, 33, 1, 50], [1, 1, 1, 1]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_paged_attention(dtype, case, heads):
    gen, seed = fresh_gen()
    args = paged_case(gen, *CASES[case], *heads, dtype=dtype)
    ref64 = attention64(*args, 0.3)
    ref = attention.paged_attention_ref(*args, 0.3)
    for kw in ({"tiles": (16, 16, 4)}, {"tiles": (32, 16, 4)}, {"kv_split": 16, "tiles": (16, 16, 4)}):
        out = attention_triton.paged_attention(*args, 0.3, out=poison(args[0].shape, dtype), **kw)
        check(out, ref, ref64, dtype, seed)


@pytest.mark.parametrize("heads,tiles", [((6, 2), (16, 16, 4)), ((4, 4), (32, 16, 4))])
def test_attention_invariant_mode_prefill_equals_decode(heads, tiles):
    """With a fixed KV split, a token's output is bitwise the same whether it is computed in a
    prefill, a chunked prefill or a decode step, alone or batched; fast mode's is not.
    (The second case has query tiles of 32 tokens straddling split boundaries.)"""
    gen, seed = fresh_gen()
    L = 70
    q, kc, vc, _, _, tables = paged_case(gen, [L], [L], *heads)
    i32 = torch.int32

    def run(rows, ctx_len, **kw):
        cu = torch.tensor([0, rows.shape[0]], dtype=i32)
        return attention_triton.paged_attention(rows, kc, vc, cu, torch.tensor([ctx_len], dtype=i32), tables, 0.3, **kw)

    inv = dict(kv_split=16, tiles=tiles)
    prefill = run(q, L, **inv)
    chunk = run(q[40:], L, **inv)
    decode = run(q[L - 1:], L, **inv)
    assert torch.equal(prefill[40:], chunk), f"seed {seed}"
    assert torch.equal(prefill[L - 1], decode[0]), f"seed {seed}"
    # batched with another sequence (its own pages, after ours) in one decode step
    q2, kc2, vc2, _, _, tables2 = paged_case(gen, [33], [33], *heads)
    kc_all, vc_all = torch.cat((kc, kc2)), torch.cat((vc, vc2))
    w = max(tables.shape[1], tables2.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, w - t.shape[1]))
    tab = torch.cat((pad(tables), pad(tables2 + kc.shape[0])))
    both = attention_triton.paged_attention(torch.cat((q[L - 1:], q2[-1:])), kc_all, vc_all,
                                            torch.tensor([0, 1, 2], dtype=i32), torch.tensor([L, 33], dtype=i32),
                                            tab, 0.3, **inv)
    assert torch.equal(both[0], decode[0]), f"seed {seed}"
    fast_prefill = run(q, L, tiles=tiles)
    fast_decode = run(q[L - 1:], L, tiles=tiles)
    assert not torch.equal(fast_prefill[L - 1], fast_decode[0]), "fast mode happened to match: pick another case"
