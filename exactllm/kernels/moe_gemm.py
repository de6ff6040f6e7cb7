"""Grouped expert GEMM for MoE layers: BF16, and FP8 e4m3 with scales.

Layout: the rows of ``a`` [M, K] are sorted by expert; ``offsets`` [E+1] (int64) gives each
expert's row range (rows offsets[e]:offsets[e+1] use expert e). ``w`` [E, N, K] holds the
experts' weights in nn.Linear layout (output rows, K contiguous), so out = a_e @ w[e].T.

FP8 path: ``a`` is float8_e4m3fn with one fp32 scale per row (per token), ``w`` is
float8_e4m3fn with one fp32 scale per output channel ([E, N]); out = (a_q @ w_q.T) * sa * sw,
accumulated in fp32 on Hopper's FP8 tensor cores.

FP4 path (weight-only): ``w`` is MXFP4 as gguf defines it (formats/quant.py), split in planes
``w_qs`` uint8 [E, N, K//2] (GGUF nibble order per 32-block) and ``w_e`` uint8 [E, N, K//32]
(E8M0 exponents); the kernel dequantizes each weight tile in registers to the activation dtype
(exact: a value has at most 2 significant bits) and runs a 16-bit (or fp32) tensor-core dot with
fp32 accumulation. Hopper has no FP4 tensor cores, so FP4 here saves weight bytes (4.25 bits
per weight), not math; activations stay BF16.

NVFP4 path (weight-only, same kernel): planes as gguf lays NVFP4 out (formats/quant.py): ``w_qs``
uint8 [E, N, K//2] (per 16-block: byte j = weight j low nibble, weight j+8 high) and ``w_s`` UE4M3
scales uint8 [E, N, K//16], plus NVFP4's second level, one fp32 scale per expert ``w_g`` [E]
applied to the fp32 accumulator (4.5 bits per weight).

Every output row depends only on its own input row, the expert's weights and a fixed K tiling
chosen from (N, K) alone, so the kernel is batch invariant by construction: the same token gives
the same bits whatever else was routed to its expert.

Each Triton kernel has a plain-torch reference with the same signature (``*_ref``).
CPU tests run the kernels under TRITON_INTERPRET=1; note that the Triton 3.9 interpreter
computes bf16 ``tl.dot`` wrongly, so CPU tests exercise the 16-bit path with fp16.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from exactllm.formats.quant import dequantize_mxfp4, dequantize_nvfp4, quantize_mxfp4, quantize_nvfp4

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs may lack triton: the torch references still work.
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_EPS = 1e-12


# ----------------------------------------------------------------------------- references

def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 e4m3 quantization of the last dim: q = x / s, s = amax(|row|) / 448."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(_EPS) / FP8_MAX
    q = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def grouped_gemm_ref(a, w, offsets, a_scale=None, w_scale=None, out_dtype=None, a_rows=None, out_rows=None):
    """out[rows of e] = (a[rows] * a_scale) @ (w[e] * w_scale[e]).T, in fp32, cast to out_dtype.

    ``a_rows`` (gather): expert-sorted row i reads a[a_rows[i]] (and its scale); ``out_rows``
    (scatter): it is written to out[out_rows[i]]. They spare a separate permutation pass."""
    out_dtype = out_dtype or (a.dtype if a.dtype != FP8 else torch.bfloat16)
    if a_rows is not None:
        a = a[a_rows]
        a_scale = a_scale[a_rows] if a_scale is not None else None
    M, N = a.shape[0], w.shape[1]
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        ae = a[lo:hi].float()
        if a_scale is not None:
            ae = ae * a_scale[lo:hi, None]
        we = w[e].float()
        if w_scale is not None:
            we = we * w_scale[e][:, None]
        out[lo:hi] = (ae @ we.T).to(out_dtype)
    if out_rows is not None:
        out = torch.empty_like(out).index_copy_(0, out_rows, out)
    return out


def grouped_gemm_mxfp4_ref(a, w_qs, w_e, offsets, out_dtype=None, a_rows=None, out_rows=None):
    """:func:`grouped_gemm_ref` with MXFP4 expert weights (planes w_qs [E, N, K//2], w_e [E, N, K//32])."""
    return grouped_gemm_ref(a, dequantize_mxfp4(w_qs, w_e), offsets, out_dtype=out_dtype or a.dtype,
                            a_rows=a_rows, out_rows=out_rows)


def grouped_gemm_nvfp4_ref(a, w_qs, w_s, w_g, offsets, out_dtype=None, a_rows=None, out_rows=None):
    """:func:`grouped_gemm_ref` with NVFP4 expert weights (planes w_qs [E, N, K//2], w_s [E, N, K//16],
    per-expert fp32 scale w_g [E]): out = (a @ dequant(w_e).T) * w_g[e], in fp32."""
    out = grouped_gemm_ref(a, dequantize_nvfp4(w_qs, w_s), offsets, out_dtype=torch.float32,
                           a_rows=a_rows)
    counts = (offsets[1:] - offsets[:-1]).cpu()
    out *= torch.repeat_interleave(w_g.float(), counts.to(w_g.device))[:, None]
    if out_rows is not None:
        out = torch.empty_like(out).index_copy_(0, out_rows, out)
    return out.to(out_dtype or a.dtype)


def silu_mul_ref(h: torch.Tensor, quant: bool = False):
    """SwiGLU on h = [gate | up] ([M, 2F]): silu(gate) * up, computed in fp32.

    quant=False returns h.dtype [M, F]; quant=True returns (fp8 [M, F], per-row scale [M])."""
    g, u = h.float().chunk(2, dim=-1)
    y = F.silu(g) * u
    if quant:
        return quantize_rows_fp8_ref(y)
    return y.to(h.dtype)


# ----------------------------------------------------------------------------- Triton

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _grouped_gemm_kernel(a_ptr, w_ptr, out_ptr, offsets_ptr, tile_expert_ptr, tile_first_ptr,
                             a_scale_ptr, w_scale_ptr, a_rows_ptr, out_rows_ptr, N, K, E,
                             stride_am, stride_we, stride_wn, stride_om,
                             SCALED: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Axis 0 walks N blocks so that the programs sharing one A tile run together and the
        # expert's weights stay in L2 across its M tiles.
        pid_n = tl.program_id(0)
        tile = tl.program_id(1)
        e = tl.load(tile_expert_ptr + tile)
        if e >= E:  # the grid is an upper bound on the tile count (no host sync)
            return
        row0 = tl.load(offsets_ptr + e) + (tile - tl.load(tile_first_ptr + e)) * BLOCK_M
        row_end = tl.load(offsets_ptr + e + 1)
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < row_end
        n_ok = rn < N
        ra = tl.load(a_rows_ptr + rm, mask=m_ok, other=0) if GATHER else rm
        ro = tl.load(out_rows_ptr + rm, mask=m_ok, other=0) if SCATTER else rm
        a_ptrs = a_ptr + ra[:, None].to(tl.int64) * stride_am + rk[None, :]
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SCALED:
            sa = tl.load(a_scale_ptr + ra, mask=m_ok, other=0.0)
            sw = tl.load(w_scale_ptr + e * N + rn, mask=n_ok, other=0.0)
            acc = acc * sa[:, None] * sw[None, :]
        o_ptrs = out_ptr + ro[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _mxfp4_tile(qs_ptr, e_ptr, rn, kk, ok, stride_qn, stride_en):
        """Weight tile [BLOCK_K, BLOCK_N] (k-major) of one expert's MXFP4 planes, in fp32.

        Weight k of a row sits in byte (k//32)*16 + k%16, low nibble for k%32 < 16, else high;
        its value is the doubled E2M1 kvalue times 2^(e-128) (see formats/quant.py)."""
        byte = (kk // 32) * 16 + (kk % 16)
        shift = ((kk // 16) % 2) * 4
        qb = tl.load(qs_ptr + rn[None, :].to(tl.int64) * stride_qn + byte[:, None], mask=ok, other=0)
        nib = (qb.to(tl.int32) >> shift[:, None]) & 15
        mag = nib & 7
        big = (2 + (mag & 1)) << tl.maximum((mag >> 1) - 1, 0)  # 4 6 8 12 for mag 4..7
        val = tl.where(mag < 4, mag, big).to(tl.float32)
        val = tl.where(nib > 8, -val, val)
        ex = tl.load(e_ptr + rn[None, :].to(tl.int64) * stride_en + (kk // 32)[:, None], mask=ok, other=0)
        ex = ex.to(tl.int32)
        bits = tl.where(ex < 2, 0x00200000 << ex, (ex - 1) << 23)
        return val * bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _nvfp4_tile(qs_ptr, s_ptr, rn, kk, ok, stride_qn, stride_sn):
        """Weight tile [BLOCK_K, BLOCK_N] (k-major) of one expert's NVFP4 planes, in fp32.

        Weight k of a row sits in byte (k//16)*8 + k%8, low nibble for k%16 < 8, else high; its
        value is the doubled E2M1 kvalue times half the UE4M3 scale of 16-block k//16."""
        byte = (kk // 16) * 8 + (kk % 8)
        shift = ((kk // 8) % 2) * 4
        qb = tl.load(qs_ptr + rn[None, :].to(tl.int64) * stride_qn + byte[:, None], mask=ok, other=0)
        nib = (qb.to(tl.int32) >> shift[:, None]) & 15
        mag = nib & 7
        big = (2 + (mag & 1)) << tl.maximum((mag >> 1) - 1, 0)
        val = tl.where(mag < 4, mag, big).to(tl.float32)
        val = tl.where(nib > 8, -val, val)
        sb = tl.load(s_ptr + rn[None, :].to(tl.int64) * stride_sn + (kk // 16)[:, None], mask=ok, other=0)
        sb = sb.to(tl.int32)
        ex = (sb >> 3) & 15
        man = sb & 7
        pow2 = ((ex - 11 + 127) << 23).to(tl.float32, bitcast=True)
        half = tl.where(ex == 0, man.to(tl.float32) * 0.0009765625, (8 + man).to(tl.float32) * pow2)
        half = tl.where(sb == 0x7F, 0.0, half)
        return val * half

    @triton.jit
    def _grouped_gemm_mxfp4_kernel(a_ptr, qs_ptr, e_ptr, g_ptr, out_ptr, offsets_ptr, tile_expert_ptr, tile_first_ptr,
                                   a_rows_ptr, out_rows_ptr, N, K, E, stride_am, stride_qe, stride_qn,
                                   stride_ee, stride_en, stride_om,
                                   NVFP4: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
                                   PRECISION: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Same tiling and tile map as _grouped_gemm_kernel; only the weight load differs.
        # NVFP4: e_ptr holds the UE4M3 16-block scales and g_ptr the per-expert fp32 scale.
        pid_n = tl.program_id(0)
        tile = tl.program_id(1)
        e = tl.load(tile_expert_ptr + tile)
        if e >= E:
            return
        row0 = tl.load(offsets_ptr + e) + (tile - tl.load(tile_first_ptr + e)) * BLOCK_M
        row_end = tl.load(offsets_ptr + e + 1)
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < row_end
        n_ok = rn < N
        ra = tl.load(a_rows_ptr + rm, mask=m_ok, other=0) if GATHER else rm
        ro = tl.load(out_rows_ptr + rm, mask=m_ok, other=0) if SCATTER else rm
        a_ptrs = a_ptr + ra[:, None].to(tl.int64) * stride_am + rk[None, :]
        qs_base = qs_ptr + e.to(tl.int64) * stride_qe
        e_base = e_ptr + e.to(tl.int64) * stride_ee
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if NVFP4:
                b = _nvfp4_tile(qs_base, e_base, rn, kk, k_ok[:, None] & n_ok[None, :], stride_qn, stride_en)
            else:
                b = _mxfp4_tile(qs_base, e_base, rn, kk, k_ok[:, None] & n_ok[None, :], stride_qn, stride_en)
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
        if NVFP4:
            acc = acc * tl.load(g_ptr + e)
        o_ptrs = out_ptr + ro[:, None].to(tl.int64) * stride_om + rn[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _round_e4m3(x):
        """Round fp32 to 3 mantissa bits, nearest-even, with integer ops, so that the cast to
        e4m3 that follows is exact for normal values. The Triton 3.9 interpreter's own cast drops
        the carry into the exponent (126.2 -> 64; triton-lang/triton PR #11897); this keeps CPU
        tests and GPU on one rounding."""
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, R, K, stride_x, stride_q,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k = tl.arange(0, BLOCK_K)
        ok = (r[:, None] < R) & (k[None, :] < K)
        x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + k[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0
        q = _round_e4m3(tl.clamp(x / s[:, None], -448.0, 448.0))
        tl.store(q_ptr + r[:, None].to(tl.int64) * stride_q + k[None, :], q.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr + r, s, mask=r < R)

    @triton.jit
    def _silu_mul_kernel(h_ptr, y_ptr, s_ptr, M, Fdim, stride_h, stride_y,
                         QUANT: tl.constexpr, BLOCK_F: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        f = tl.arange(0, BLOCK_F)
        ok = f < Fdim
        g = tl.load(h_ptr + r * stride_h + f, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + r * stride_h + Fdim + f, mask=ok, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        if QUANT:
            s = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
            y = _round_e4m3(tl.clamp(y / s, -448.0, 448.0))
            tl.store(s_ptr + r, s)
        tl.store(y_ptr + r * stride_y + f, y.to(y_ptr.dtype.element_ty), mask=ok)


def _gemm_config(N: int, K: int, fp8: bool) -> dict:
    """Tile shape from (N, K) only (never from M: keeps the kernel batch invariant)."""
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    if fp8:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)


def tile_map(offsets: torch.Tensor, block_m: int, max_tiles: int):
    """Per-tile expert id (E past the last tile) and each expert's first tile, without host sync."""
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(max_tiles, device=offsets.device, dtype=tile_end.dtype)
    tile_expert = torch.searchsorted(tile_end, t, right=True).to(torch.int32)
    return tile_expert, (tile_end - tiles).to(torch.int32)


def grouped_gemm(a, w, offsets, a_scale=None, w_scale=None, out_dtype=None, a_rows=None, out_rows=None):
    """Triton grouped GEMM; same signature and meaning as :func:`grouped_gemm_ref`."""
    fp8 = a.dtype == FP8
    assert (a_scale is None) == (w_scale is None), "scales come in pairs"
    assert a.stride(-1) == 1 and w.stride(-1) == 1
    out_dtype = out_dtype or (a.dtype if not fp8 else torch.bfloat16)
    M, K = a.shape
    E, N, _ = w.shape
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0:
        return out
    cfg = _gemm_config(N, K, fp8)
    bm = cfg["BLOCK_M"]
    max_tiles = triton.cdiv(M, bm) + E
    tile_expert, tile_first = tile_map(offsets, bm, max_tiles)
    scaled = a_scale is not None
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), max_tiles)
    _grouped_gemm_kernel[grid](
        a, w, out, offsets, tile_expert, tile_first,
        a_scale if scaled else a, w_scale if scaled else a,
        a_rows if a_rows is not None else offsets, out_rows if out_rows is not None else offsets, N, K, E,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0), SCALED=scaled,
        GATHER=a_rows is not None, SCATTER=out_rows is not None, **cfg)
    return out


def _grouped_gemm_fp4(a, w_qs, w_sc, w_g, offsets, out_dtype, a_rows, out_rows):
    """Launch of the FP4 kernel: MXFP4 (w_g None, w_sc E8M0 per 32) or NVFP4 (UE4M3 per 16 + w_g)."""
    nv = w_g is not None
    assert a.stride(-1) == 1 and w_qs.stride(-1) == 1 and w_sc.stride(-1) == 1
    out_dtype = out_dtype or a.dtype
    M, K = a.shape
    E, N, _ = w_qs.shape
    blk = 16 if nv else 32
    assert K % blk == 0 and w_qs.shape[-1] == K // 2 and w_sc.shape == (E, N, K // blk)
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0:
        return out
    cfg = _gemm_config(N, K, False)
    cfg["BLOCK_K"] = max(cfg["BLOCK_K"], 32)  # whole scale blocks per K step
    bm = cfg["BLOCK_M"]
    max_tiles = triton.cdiv(M, bm) + E
    tile_expert, tile_first = tile_map(offsets, bm, max_tiles)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), max_tiles)
    _grouped_gemm_mxfp4_kernel[grid](
        a, w_qs, w_sc, w_g.float().contiguous() if nv else w_sc, out, offsets, tile_expert, tile_first,
        a_rows if a_rows is not None else offsets, out_rows if out_rows is not None else offsets, N, K, E,
        a.stride(0), w_qs.stride(0), w_qs.stride(1), w_sc.stride(0), w_sc.stride(1), out.stride(0),
        NVFP4=nv, GATHER=a_rows is not None, SCATTER=out_rows is not None,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **cfg)
    return out


def grouped_gemm_mxfp4(a, w_qs, w_e, offsets, out_dtype=None, a_rows=None, out_rows=None):
    """Triton grouped GEMM with in-kernel MXFP4 dequantization; same signature and meaning as
    :func:`grouped_gemm_mxfp4_ref`. fp32 activations use an IEEE fp32 dot (no TF32)."""
    return _grouped_gemm_fp4(a, w_qs, w_e, None, offsets, out_dtype, a_rows, out_rows)


def grouped_gemm_nvfp4(a, w_qs, w_s, w_g, offsets, out_dtype=None, a_rows=None, out_rows=None):
    """Triton grouped GEMM with in-kernel NVFP4 dequantization; same signature and meaning as
    :func:`grouped_gemm_nvfp4_ref`."""
    return _grouped_gemm_fp4(a, w_qs, w_s, w_g, offsets, out_dtype, a_rows, out_rows)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`quantize_rows_fp8_ref` (one pass: read row, amax, write fp8)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    R = x2.shape[0]
    q = torch.empty(R, K, dtype=FP8, device=x.device)
    s = torch.empty(R, dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(K)
    block_r = max(1, min(16, 8192 // block_k))
    _quant_rows_kernel[(triton.cdiv(R, block_r),)](x2, q, s, R, K, x2.stride(0), q.stride(0),
                                                   BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4)
    return q.view(x.shape), s.view(x.shape[:-1])


def silu_mul(h: torch.Tensor, quant: bool = False):
    """Triton version of :func:`silu_mul_ref` (fused SwiGLU, optionally fused FP8 quantization)."""
    M, F2 = h.shape
    Fd = F2 // 2
    y = torch.empty(M, Fd, dtype=FP8 if quant else h.dtype, device=h.device)
    s = torch.empty(M, dtype=torch.float32, device=h.device) if quant else y
    if M:
        _silu_mul_kernel[(M,)](h, y, s, M, Fd, h.stride(0), y.stride(0), QUANT=quant,
                               BLOCK_F=triton.next_power_of_2(Fd), num_warps=4)
    return (y, s) if quant else y


# ----------------------------------------------------------------------------- expert FFN

def expert_ffn(x, offsets, w13, w2, precision: str = "bf16", backend: str = "torch", rows=None):
    """SwiGLU experts over expert-sorted rows: w2_e(silu(x W1_e) * (x W3_e)).

    With ``rows``, x is not sorted: expert-sorted row i is x[rows[i]], and the output comes back
    in x's row order (the first GEMM gathers, the second scatters).

    ``w13`` is [E, 2F, H] (gate rows then up rows), ``w2`` [E, H, F]. For precision="fp8" the
    weights are pairs (fp8 tensor, per-channel scale) and activations are quantized per token.
    For precision="fp4" the weights are MXFP4 plane pairs (qs, e) and activations stay in x.dtype;
    for "nvfp4" NVFP4 triples (qs, ue4m3 scales, per-expert fp32 scale).
    """
    if precision == "nvfp4":
        gemm_nv = grouped_gemm_nvfp4 if backend == "triton" else grouped_gemm_nvfp4_ref
        act = silu_mul if backend == "triton" else silu_mul_ref
        h = gemm_nv(x, *w13, offsets, a_rows=rows)
        return gemm_nv(act(h), *w2, offsets, out_rows=rows)
    if precision == "fp4":
        gemm4 = grouped_gemm_mxfp4 if backend == "triton" else grouped_gemm_mxfp4_ref
        act = silu_mul if backend == "triton" else silu_mul_ref
        (q13, e13), (q2, e2) = w13, w2
        h = gemm4(x, q13, e13, offsets, a_rows=rows)
        return gemm4(act(h), q2, e2, offsets, out_rows=rows)
    gemm = grouped_gemm if backend == "triton" else grouped_gemm_ref
    act = silu_mul if backend == "triton" else silu_mul_ref
    quant = quantize_rows_fp8 if backend == "triton" else quantize_rows_fp8_ref
    if precision == "fp8":
        (w13q, w13s), (w2q, w2s) = w13, w2
        xq, xs = quant(x)
        h = gemm(xq, w13q, offsets, xs, w13s, out_dtype=x.dtype, a_rows=rows)
        hq, hs = act(h, quant=True)
        return gemm(hq, w2q, offsets, hs, w2s, out_dtype=x.dtype, out_rows=rows)
    h = gemm(x, w13, offsets, a_rows=rows)
    return gemm(act(h), w2, offsets, out_rows=rows)


LOW_PRECISION_FORMATS = ("fp8", "fp4", "nvfp4")
# Largest E2M1 value times the largest usable UE4M3 scale: gguf's (ggml's) fp32 -> UE4M3 encoder
# sends every scale in [256, 448) to 448, so the top binade is unusable and 240 is the top.
NVFP4_RANGE = 6.0 * 240.0


def quantize_nvfp4_experts(w: torch.Tensor):
    """[E, N, K] -> NVFP4 (qs, UE4M3 scales, per-expert fp32 scale g): the blocks encode w / g,
    with g = max|w_e| / (6 * 240) so that the expert's largest block gets the top usable UE4M3
    scale (without g, weights ~0.02 get subnormal block scales of 1-3 significant bits)."""
    g = w.abs().amax((1, 2)).float() / NVFP4_RANGE
    g = torch.where(g > 0, g, torch.ones_like(g))
    qs, sc = quantize_nvfp4(w.float() / g[:, None, None])
    return qs, sc, g


def quantize_expert_weights(w: torch.Tensor, backend: str = "torch", fmt: str = "fp8"):
    """BF16 [E, N, K] -> fmt "fp8": (fp8 [E, N, K], per-output-channel scale [E, N]);
    fmt "fp4": MXFP4 planes (qs uint8 [E, N, K//2], e uint8 [E, N, K//32]);
    fmt "nvfp4": :func:`quantize_nvfp4_experts` (both FP4 formats: torch on every backend)."""
    if fmt == "fp4":
        return quantize_mxfp4(w)
    if fmt == "nvfp4":
        return quantize_nvfp4_experts(w)
    if fmt != "fp8":
        raise ValueError(f"unknown low-precision format {fmt!r}; use one of {', '.join(LOW_PRECISION_FORMATS)}")
    return (quantize_rows_fp8 if backend == "triton" else quantize_rows_fp8_ref)(w)
