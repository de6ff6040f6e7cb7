"""The invariant linears with the op next to them fused in, under the interpreter (small sizes):
SwiGLU in the input of the down projection (``up=``) and RoPE + the KV-cache write in the epilogue
of the qkv projection (``rope_kv=``), in the TBIK tree (tree_matmul_triton) and in the batch-invariant
GEMM (matmul_triton).  Each fused call must give the bits of the unfused ops it replaces
(activation_triton.silu_mul then the linear; the linear then rope_triton.rope_kv), so train == serve
and the invariance tests keep holding whichever path a caller takes: checked bitwise for tiles that
span heads and the q | k | v sections, swapped small-M tiles, splits of the tree over programs, TP
partials, quantized weights, and padding rows (slot -1).  Against float64 the fused outputs stay
within 2^-7 (relative) and within 2^-6 of their torch references (two bf16 outputs, one ulp each: the
interpreter truncates bf16 stores).  bench/invariance_gpu.py and
bench/ab_step.py check the same bits on the GPU end to end."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from exactllm.formats.quant import QuantWeight  # noqa: E402
from exactllm.kernels import activation_triton, matmul_triton, rope, rope_triton  # noqa: E402
import exactllm.kernels.tree_matmul_triton as tk  # noqa: E402
from exactllm.kernels.tree import combine_partials  # noqa: E402
from exactllm.kernels.tree_matmul_triton import (Config, tbik_matmul, tbik_matmul_partial,  # noqa: E402
                                                 tbik_matmul_ref)
from kernel_testing import fresh_gen, rel  # noqa: E402

D, HQ, HKV = 16, 6, 2                       # head_dim, q heads, kv heads: qkv N = 160
QW, KVW = HQ * D, HKV * D
CONFIGS = [Config(32, 32, 4, 2), Config(16, 64, 4, 2, swap=True), Config(16, 32, 4, 2, swap=True)]
DT = torch.bfloat16


def _qkv_case(M, K=256, qtype=None):
    gen, seed = fresh_gen()
    x = torch.randn(M, K, generator=gen).to(DT)
    w = torch.randn(QW + 2 * KVW, K, generator=gen) / K ** 0.5
    w = QuantWeight.quantize(w, qtype) if qtype else w.to(DT)
    cos, sin = rope.rope_cache(D, 64, 10000.0)
    pos = torch.randint(0, 64, (M,), generator=gen)
    slots = torch.randperm(4 * 8, generator=gen)[:M]
    slots[M // 2] = -1                      # a CUDA-graph padding row: stores nothing
    caches = [torch.randn(8, 4, HKV, D, generator=gen).to(DT) for _ in range(2)]
    return x, w, (pos, cos, sin, slots), caches, seed


def _unfused_qkv(linear, x, w, rope_in, caches):
    """The linear, then the rope_kv kernel on its q/k/v views (as Ops.norm_qkv_rope_kv did)."""
    pos, cos, sin, slots = rope_in
    kc, vc = (c.clone() for c in caches)
    qkv = linear(x, w)
    q, k, v = (p.view(x.shape[0], -1, D) for p in qkv.split((QW, KVW, KVW), dim=-1))
    rope_triton.rope_kv(q, k, v, pos, cos, sin, kc, vc, slots)
    return qkv, kc, vc


def _fused_qkv(linear, x, w, rope_in, caches):
    pos, cos, sin, slots = rope_in
    kc, vc = (c.clone() for c in caches)
    qkv = linear(x, w, rope_kv=rope_triton.rope_kv_args(QW, KVW, D, pos, cos, sin, kc, vc, slots))
    return qkv, kc, vc


def _tbik(cfg, splits):
    return lambda x, w, **kw: tbik_matmul(x, w, out_dtype=x.dtype, config=cfg, splits=splits, **kw)


@pytest.mark.parametrize("rope_swap", [True, False], ids=["swap_epilogue", "swap_kernel"])
@pytest.mark.parametrize("qtype", [None, "q8_0", "q4_1"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["32x32", "swap16x64", "swap16x32"])
def test_tbik_rope_kv_epilogue_same_bits(cfg, qtype, rope_swap, monkeypatch):
    """ROPE_SWAP off (the default: a GPU mismatch, see tree_matmul_triton) sends swapped tiles to the
    rope_kv kernel after the tree; on, the epilogue code of the swapped tile is checked here too."""
    if rope_swap is False and not cfg.swap:
        pytest.skip("ROPE_SWAP only concerns swapped tiles")
    monkeypatch.setattr(tk, "ROPE_SWAP", rope_swap)
    x, w, rope_in, caches, seed = _qkv_case(M=5, qtype=qtype)
    for splits in (1, 4):                   # the epilogue runs in the program that combines the splits
        want = _unfused_qkv(_tbik(cfg, splits), x, w, rope_in, caches)
        got = _fused_qkv(_tbik(cfg, splits), x, w, rope_in, caches)
        for g, r in zip(got, want):
            assert torch.equal(g, r), f"seed {seed}"
    assert not torch.equal(got[1], caches[0]), "the k cache was written"


def test_tbik_rope_kv_reference_and_accuracy():
    """Fused kernel vs its torch reference (same signature) and vs float64."""
    x, w, rope_in, caches, seed = _qkv_case(M=3)
    got = _fused_qkv(_tbik(CONFIGS[0], 1), x, w, rope_in, caches)
    ref = _fused_qkv(lambda x, w, **kw: tbik_matmul_ref(x, w, out_dtype=x.dtype, **kw), x, w, rope_in, caches)
    q64 = (x.double() @ w.double().T)[:, :QW].reshape(3, HQ, D)
    pos, cos, sin, _ = rope_in
    c, s = cos.double()[pos][:, None], sin.double()[pos][:, None]
    q64 = torch.stack((q64[..., 0::2] * c - q64[..., 1::2] * s, q64[..., 0::2] * s + q64[..., 1::2] * c), -1)
    for out in (got[0], ref[0]):
        assert rel(out[:, :QW], q64.reshape(3, QW)) < 2 ** -7, f"seed {seed}"
    for g, r in zip(got, ref):
        assert rel(g, r) < 2 ** -6, f"seed {seed}"


@pytest.mark.parametrize("qtype", [None, "q8_0"])
def test_tbik_silu_prologue_same_bits(qtype):
    """Down projection of silu(gate) * up, gate and up the strided halves of one gate_up output."""
    gen, seed = fresh_gen()
    M, F, N = 6, 256, 48
    gate_up = torch.randn(M, 2 * F, generator=gen).to(DT)
    gate, up = gate_up.chunk(2, dim=-1)
    w = torch.randn(N, F, generator=gen) / F ** 0.5
    w = QuantWeight.quantize(w, qtype) if qtype else w.to(DT)
    h = activation_triton.silu_mul(gate, up)
    for cfg in CONFIGS:
        for splits in (1, 2):
            want = tbik_matmul(h, w, out_dtype=DT, config=cfg, splits=splits)
            assert torch.equal(tbik_matmul(gate, w, out_dtype=DT, config=cfg, splits=splits, up=up), want), \
                f"seed {seed}"
    ref = tbik_matmul_ref(gate, w, out_dtype=DT, up=up)
    assert rel(want, ref) < 2 ** -6, f"seed {seed}"   # two bf16 outputs, 1 ulp (2^-7) each
    assert not torch.equal(tbik_matmul(gate, w, out_dtype=DT, up=up.flip(1)), want)   # the check can fail
    parts = 2                               # TP: each rank's K slice, its partial root, combined in order
    k = F // parts
    w_sh = [w.shard(1, r, parts) if qtype else w[:, r * k:(r + 1) * k] for r in range(parts)]
    partials = [tbik_matmul_partial(gate[:, r * k:(r + 1) * k], w_sh[r], parts, config=CONFIGS[1],
                                    up=up[:, r * k:(r + 1) * k]) for r in range(parts)]
    assert torch.equal(combine_partials(partials), tbik_matmul(h, w)), f"seed {seed}"   # FP32 roots


@pytest.mark.parametrize("tile", [(16, 16, 64, 2, 2), (16, 128, 64, 4, 2), (32, 32, 64, 4, 2)])
def test_invariant_gemm_fusions_same_bits(tile):
    """matmul_triton's invariant GEMM (batch_invariant, dense weights) with the same two fusions."""
    x, w, rope_in, caches, seed = _qkv_case(M=5)

    def lin(x, w, **kw):
        return matmul_triton.gemm(x, w, tile, **kw)
    for g, r in zip(_fused_qkv(lin, x, w, rope_in, caches), _unfused_qkv(lin, x, w, rope_in, caches)):
        assert torch.equal(g, r), f"seed {seed}"
    gen, seed = fresh_gen()
    gate_up = torch.randn(5, 512, generator=gen).to(DT)
    gate, up = gate_up.chunk(2, dim=-1)
    wd = (torch.randn(40, 256, generator=gen) / 16).to(DT)
    want = matmul_triton.gemm(activation_triton.silu_mul(gate, up), wd, tile)
    assert torch.equal(matmul_triton.gemm(gate, wd, tile, up=up), want), f"seed {seed}"


def test_linear_entry_point_passes_fusions():
    """matmul_triton.linear(invariant=True, up=, rope_kv=): dense -> the GEMM, quantized -> TBIK."""
    x, w, rope_in, caches, seed = _qkv_case(M=4, qtype="q8_0")

    def lin(x, w, **kw):
        return matmul_triton.linear(x, w, invariant=True, **kw)
    for g, r in zip(_fused_qkv(lin, x, w, rope_in, caches), _unfused_qkv(lin, x, w, rope_in, caches)):
        assert torch.equal(g, r), f"seed {seed}"


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["32x32", "swap16x64"])
def test_tbik_rmsnorm_prologue_same_bits(cfg, with_residual, monkeypatch):
    """tbik_norm_matmul with the norm in its prologue (rmsnorm_triton.rms_row, the norm kernel's own
    code) == the RMSNorm kernel then the tree, with the rope_kv epilogue too; the new residual
    stream bit-equal; above NORM_MAX_M rows it runs the two kernels (same bits by definition)."""
    from exactllm.kernels import rmsnorm_triton
    from exactllm.kernels.tree_matmul_triton import NORM_MAX_M, tbik_norm_matmul
    x, w, rope_in, caches, seed = _qkv_case(M=5, qtype="q8_0" if with_residual else None)
    gen, _ = fresh_gen()
    res = torch.randn(x.shape, generator=gen).to(DT) if with_residual else None
    nw = 1.0 + 0.1 * torch.randn(x.shape[1], generator=gen)
    eps = 1e-5

    def two_kernels(x, w, **kw):
        h = rmsnorm_triton.rmsnorm(x, nw, eps) if res is None else rmsnorm_triton.rmsnorm(x, nw, eps, res)[0]
        return tbik_matmul(h, w, out_dtype=DT, config=cfg, splits=2, **kw)
    want = _unfused_qkv(two_kernels, x, w, rope_in, caches)
    want_res = x if res is None else rmsnorm_triton.rmsnorm(x, nw, eps, res)[1]
    seen = {}

    def fused(x, w, **kw):
        seen["y"], seen["res"] = tbik_norm_matmul(x, res, nw, eps, w, config=cfg, splits=2, **kw)
        return seen["y"]
    real = rmsnorm_triton.rmsnorm
    monkeypatch.setattr(rmsnorm_triton, "rmsnorm", None)   # the fused path must not call the norm kernel
    got = _fused_qkv(fused, x, w, rope_in, caches)
    monkeypatch.setattr(rmsnorm_triton, "rmsnorm", real)
    for g, r in zip(got, want):
        assert torch.equal(g, r), f"seed {seed}"
    assert torch.equal(seen["res"], want_res), f"seed {seed}"
    nw2 = nw.clone()
    nw2[7] += 0.5                                   # the check can fail: another norm weight
    assert not torch.equal(tbik_norm_matmul(x, res, nw2, eps, w, config=cfg)[0],
                           tbik_norm_matmul(x, res, nw, eps, w, config=cfg)[0])
    big = torch.randn(NORM_MAX_M + 1, x.shape[1], generator=gen).to(DT)   # two kernels above NORM_MAX_M
    y_big, _ = tbik_norm_matmul(big, None, nw, eps, w, config=cfg)
    assert torch.equal(y_big[:1], tbik_norm_matmul(big[:1], None, nw, eps, w, config=cfg)[0]), f"seed {seed}"
