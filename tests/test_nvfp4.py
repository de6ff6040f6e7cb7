"""NVFP4 (gguf's block layout) as an expert weight format: the UE4M3 scale codec and the block
dequantizer bit-exact with gguf.quants.NVFP4; our quantizer (gguf defines none) picks the nearest
grid value under gguf's own fp32 -> UE4M3 rounding; the grouped GEMM that dequantizes NVFP4
in-kernel (Triton interpreter vs torch reference vs float64); ReaLB's "nvfp4" low precision."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import gguf
import numpy as np
import pytest
import torch

from exactllm.balance import ReaLB, ReaLBConfig
from exactllm.formats.quant import (E2M1_X2, NVFP4_GGML_TYPE, NVFP4_TYPE_SIZE, dequantize, dequantize_nvfp4,
                                    quantize, quantize_nvfp4, ue4m3_from_fp32, ue4m3_half)
from exactllm.kernels import moe_gemm as mg
from moe_testing import COUNTS, expert_weights, offsets, rel

NV = gguf.GGMLQuantizationType.NVFP4


def test_layout_matches_gguf():
    assert gguf.GGML_QUANT_SIZES[NV] == (64, NVFP4_TYPE_SIZE) and int(NV) == NVFP4_GGML_TYPE
    with pytest.raises(NotImplementedError):  # why the quantizer is ours: gguf has none
        gguf.quants.quantize(np.ones((1, 64), np.float32), NV)


def test_ue4m3_codec_bit_exact_with_gguf():
    rng = np.random.default_rng(0)
    # every float32 bit pattern step across [0, 512), dense sampling near the subnormal edge and
    # the exact rounding points (mantissa bit 19 set), plus negatives, zero and beyond 448
    grid = np.arange(0, 0x44000000, 997, dtype=np.uint32).view(np.float32)
    edges = np.float32(2.0) ** np.arange(-12, 10, dtype=np.float32)
    x = np.concatenate([grid, rng.random(50_000).astype(np.float32) * 0.02, edges, edges * np.float32(1.0625),
                        edges * np.float32(0.99), np.array([0, -1, 448, 449, 480, 1e30, 0.0155, 2 ** -6], np.float32)])
    want = gguf.quants.NVFP4.fp32_to_ue4m3(x.copy())
    assert np.array_equal(ue4m3_from_fp32(torch.from_numpy(x)).numpy(), want)
    b = np.arange(256, dtype=np.uint8)
    want = gguf.quants.NVFP4.ue4m3_to_fp32(b).astype(np.float32)
    assert np.array_equal(ue4m3_half(torch.from_numpy(b)).numpy().view(np.uint32), want.view(np.uint32))


def test_dequantize_every_byte_like_gguf():
    raw = np.random.default_rng(1).integers(0, 256, (64, 20 * NVFP4_TYPE_SIZE), dtype=np.uint8)
    for j in range(4):  # all 256 scale bytes in every scale position
        raw[:, j::NVFP4_TYPE_SIZE] = (np.arange(64 * 20).reshape(64, 20) * 7 + j) % 256
    want = gguf.quants.dequantize(raw, NV)
    got = dequantize(torch.from_numpy(raw), "nvfp4")
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


def _brute_force(x: np.ndarray) -> np.ndarray:
    """Plain numpy NVFP4 quantizer: scale byte from gguf's own rounding, then gguf's MXFP4 rule
    (argmin over all 16 nibbles of the float32 error, first on ties). Raw GGUF bytes."""
    blocks = x.reshape(-1, 16).astype(np.float32)
    sc = gguf.quants.NVFP4.fp32_to_ue4m3(np.abs(blocks).max(-1) / np.float32(6))
    d = gguf.quants.NVFP4.ue4m3_to_fp32(sc).astype(np.float32)
    kv = np.array(E2M1_X2, np.float32)
    q = np.abs(d[:, None, None] * kv[None, None, :] - blocks[:, :, None]).argmin(-1).astype(np.uint8)
    qs = q[:, :8] | (q[:, 8:] << 4)
    sup = blocks.shape[0] // 4
    return np.concatenate([sc.reshape(sup, 4), qs.reshape(sup, 32)], -1).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("scale", [1.0, 0.02, 300.0, 1e-4])
def test_quantize_is_nearest_grid_value(scale):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((24, 128)) * scale).astype(np.float32)
    x[0] = 0.0
    x[1, :64] = (rng.integers(-24, 25, 64) * 0.25).astype(np.float32)  # exact midpoints at s = 1
    raw = quantize(torch.from_numpy(x), "nvfp4")
    assert raw.shape == (24, 2 * NVFP4_TYPE_SIZE) and np.array_equal(raw.numpy(), _brute_force(x))
    deq = dequantize(raw, "nvfp4")
    assert np.array_equal(deq.numpy().view(np.uint32), gguf.quants.dequantize(raw.numpy(), NV).view(np.uint32))
    qs, sc = quantize_nvfp4(torch.from_numpy(x))
    assert qs.shape == (24, 64) and sc.shape == (24, 8) and torch.equal(dequantize_nvfp4(qs, sc), deq)
    # Error bound with s the 16-block's scale: within half the widest grid gap (2 s) of the nearest
    # value, and past 6 s (clipped) by at most amax - 6 s. A normal UE4M3 scale is amax/6 rounded to
    # 3 mantissa bits (amax <= 6.4 s), so there the error is <= s; gguf's subnormal scales (below
    # 2^-6) round coarsely, so small blocks may clip further.
    xt = torch.from_numpy(x).reshape(-1, 16)
    s = 2 * ue4m3_half(sc).reshape(-1, 1)
    err = (deq.reshape(-1, 16) - xt).abs()
    amax = xt.abs().amax(-1, keepdim=True)
    assert (err <= torch.maximum(s, amax - 6 * s) * (1 + 1e-6)).all()
    normal = (sc.reshape(-1) >> 3) > 0
    assert (err[normal] <= s[normal] * (1 + 1e-6)).all()


def test_nvfp4_beats_mxfp4_on_gaussian_weights():
    w = torch.randn(4, 64, 256) * 0.02  # expert-weight magnitude
    qs, sc, g = mg.quantize_nvfp4_experts(w)
    nv = dequantize_nvfp4(qs, sc) * g[:, None, None]
    mx = dequantize(quantize(w, "mxfp4"), "mxfp4")
    e_nv, e_mx = rel(nv, w), rel(mx, w)
    assert 0.05 < e_nv < 0.9 * e_mx < 0.15  # measured 0.095 vs 0.113 relative rms
    # the per-expert scale makes it scale-free; without it small weights get subnormal block
    # scales (measured 0.104 at this size) or none at all (1.0, every weight 0, at 1e-3)
    qs2, sc2, g2 = mg.quantize_nvfp4_experts(w / 20)
    assert abs(rel(dequantize_nvfp4(qs2, sc2) * g2[:, None, None], w / 20) - e_nv) < 1e-3
    assert rel(dequantize(quantize(w, "nvfp4"), "nvfp4"), w) > 1.05 * e_nv
    assert rel(dequantize(quantize(w / 20, "nvfp4"), "nvfp4"), w / 20) > 0.5


def _nv_weights(E, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mg.quantize_nvfp4_experts(torch.randn(E, N, K, generator=g) * 0.05)


def _float64_gemm(a, qs, sc, g, counts):
    e_of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    w = dequantize_nvfp4(qs, sc).double() * g.double()[:, None, None]
    return torch.einsum("mk,mnk->mn", a.double(), w[e_of_row])


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.float16, 1e-6)])
def test_nvfp4_gemm_triton_vs_float64(dtype, bound):
    # fp16 stands in for bf16 (the interpreter mis-computes bf16 tl.dot); the weight tile is exact
    # in the activation dtype (<= 5 significant bits), so the error is fp32 accumulation only.
    off = offsets(COUNTS)
    a = torch.randn(int(off[-1]), 192).to(dtype)  # K = 3 super-blocks: a partial last K tile
    qs, sc, g = _nv_weights(len(COUNTS), 40, 192)
    ref = _float64_gemm(a, qs, sc, g, COUNTS)
    out = mg.grouped_gemm_nvfp4(a, qs, sc, g, off, out_dtype=torch.float32)
    assert rel(out, ref) < bound
    assert rel(mg.grouped_gemm_nvfp4_ref(a, qs, sc, g, off, out_dtype=torch.float32), ref) < bound
    # a wrong nibble order (halves of each 16-block swapped) or a missing expert scale is far off
    swapped = ((qs >> 4) | (qs << 4))
    assert rel(mg.grouped_gemm_nvfp4(a, swapped, sc, g, off, out_dtype=torch.float32), ref) > 0.1
    assert rel(mg.grouped_gemm_nvfp4(a, qs, sc, g * 1.5, off, out_dtype=torch.float32), ref) > 0.1


def test_nvfp4_gemm_gather_scatter_rows():
    off = offsets(COUNTS)
    M = int(off[-1])
    a = torch.randn(M, 64).half()
    perm = torch.randperm(M)
    qs, sc, g = _nv_weights(len(COUNTS), 32, 64)
    want = torch.empty(M, 32, dtype=torch.float32)
    want[perm] = mg.grouped_gemm_nvfp4_ref(a[perm], qs, sc, g, off, out_dtype=torch.float32)
    for rows in (dict(a_rows=perm), dict(out_rows=perm)):
        for fn in (mg.grouped_gemm_nvfp4, mg.grouped_gemm_nvfp4_ref):
            got = fn(a if "a_rows" in rows else a[perm], qs, sc, g, off, out_dtype=torch.float32, **rows)
            exp = want if "out_rows" in rows else want[perm]
            assert rel(got, exp) < 1e-6


def test_nvfp4_expert_ffn_triton_matches_torch_and_bound():
    off = offsets(COUNTS)
    x = torch.randn(int(off[-1]), 64)
    w13, w2 = expert_weights(len(COUNTS), 64, 64, seed=0)
    q = [mg.quantize_expert_weights(w, fmt="nvfp4") for w in (w13, w2)]
    perm = torch.randperm(int(off[-1]))
    ref = mg.expert_ffn(x.half(), off, *q, precision="nvfp4", rows=perm)
    assert rel(mg.expert_ffn(x.half(), off, *q, precision="nvfp4", backend="triton", rows=perm), ref) < 5e-3
    full = mg.expert_ffn(x, off, w13, w2, rows=perm)
    fp4 = mg.expert_ffn(x, off, *[mg.quantize_expert_weights(w, fmt="fp4") for w in (w13, w2)], precision="fp4",
                        rows=perm)
    # stated bound as for MXFP4 (30% relative L2 of the SwiGLU experts); NVFP4 is the closer one
    assert rel(ref, full) < rel(fp4, full) < 0.30


def test_realb_nvfp4_conversion_and_llm_option():
    w13, w2 = torch.randn(2, 16, 64).bfloat16(), torch.randn(2, 64, 64).bfloat16()
    rb = ReaLB(ReaLBConfig(low_precision="nvfp4", resident=True))
    (q13, s13, g13), (q2, s2, g2) = ReaLB.finish(rb.start_conversion(w13, w2))
    assert q13.shape == (2, 16, 32) and s13.shape == (2, 16, 4) and g13.shape == (2,) and q2.shape == (2, 64, 32)
    # 4.5 bits per weight plus one fp32 scale per expert and matrix
    assert rb.resident_bytes() == (2 * 16 * 64 + 2 * 64 * 64) * 9 // 16 + 2 * 2 * 4
    from exactllm.llm import LLM
    llm = LLM("random:moe-mini", enable_expert_parallel=True, load_balancer="realb", realb_low_precision="nvfp4")
    assert all(f.layer.balancer.cfg.low_precision == "nvfp4" for f in llm.engine.runner.model.moe_layers)
    with pytest.raises(ValueError, match="'nvfp4'"):
        ReaLBConfig(low_precision="fp6")
