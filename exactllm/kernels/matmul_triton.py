"""Linear layers y = x @ w.T in Triton, on GGUF block-quantized (Q4_0, Q4_1, Q8_0) or dense weights.

Same signature as ``matmul.linear_ref``; the weight planes of ``QuantWeight`` (qs, scale, min)
are read directly and dequantized in registers, products accumulated in float32.

Two kernels:
- GEMV (fast mode, M <= GEMV_MAX_M, quantized): one program per (BLOCK_N rows, one x row);
  per 32-block it sums q * x on the CUDA cores and scales once by d (and adds min * sum(x)
  for Q4_1). Bytes-bound: the weight planes are read once per x row (rows share L2).
- GEMM (tensor cores): the weight tile is dequantized to x's dtype and fed to ``tl.dot``.
  For the 4-bit types a K-tile is two dots: the low nibbles (weights j of each 32-block)
  against x[:, 32b + j] and the high nibbles (weights j + 16) against x[:, 32b + 16 + j],
  so no in-register interleave is needed.

Numerics: in ``invariant`` mode the GEMM runs with one fixed tile config (``INVARIANT_CONFIG``)
for every M and every weight type, and never split-K, so a row's reduction order does not
depend on how many rows share the call. In fast mode dense weights go to cuBLAS (torch), and
quantized tiles are chosen from M.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from exactllm.formats.quant import QuantWeight

QCODES = {None: 0, "q4_0": 1, "q4_1": 2, "q8_0": 3}
GEMV_MAX_M = 4
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): fixed, whatever M is.
INVARIANT_CONFIG = (64, 64, 64, 4, 3)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, sc_ptr, mn_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                 QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles walk the N tiles together, so weight tiles are reused in L2
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows_in_group
    pid_n = (pid % width) // rows_in_group
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + offs_m[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        if QTYPE == 1 or QTYPE == 2:
            i = tl.arange(0, BLOCK_K // 2)           # byte index in this K tile
            blk = k0 // 32 + i // 16                 # 32-block of each byte
            col = blk * 32 + i % 16                  # weight of its low nibble (high: col + 16)
            kmask = col < K
            wmask = mask_n[:, None] & kmask[None, :]
            q = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + i)[None, :], mask=wmask, other=0)
            d = tl.load(sc_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=wmask, other=0.0).to(tl.float32)
            lo = (q & 15).to(tl.float32)
            hi = (q >> 4).to(tl.float32)
            if QTYPE == 1:
                w_lo = (lo - 8.0) * d
                w_hi = (hi - 8.0) * d
            else:
                mn = tl.load(mn_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=wmask, other=0.0).to(tl.float32)
                w_lo = lo * d + mn
                w_hi = hi * d + mn
            xmask = mask_m[:, None] & kmask[None, :]
            x_lo = tl.load(x_row + col[None, :], mask=xmask, other=0.0)
            x_hi = tl.load(x_row + (col + 16)[None, :], mask=xmask, other=0.0)
            acc = tl.dot(x_lo, tl.trans(w_lo.to(dt)), acc, input_precision=PRECISION)
            acc = tl.dot(x_hi, tl.trans(w_hi.to(dt)), acc, input_precision=PRECISION)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            wmask = mask_n[:, None] & kmask[None, :]
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=wmask, other=0)
            if QTYPE == 3:
                d = tl.load(sc_ptr + offs_n[:, None] * stride_sn + (kk // 32)[None, :], mask=wmask, other=0.0)
                w = w.to(tl.float32) * d.to(tl.float32)
            x = tl.load(x_row + kk[None, :], mask=mask_m[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(dt)), acc, input_precision=PRECISION)
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, sc_ptr, mn_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                 QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    n_blocks = K // 32
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for b0 in range(0, n_blocks, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        bmask = bb < n_blocks
        m2 = mask_n[:, None] & bmask[None, :]
        m3 = m2[:, :, None]
        d = tl.load(sc_ptr + offs_n[:, None] * stride_sn + bb[None, :], mask=m2, other=0.0).to(tl.float32)
        if QTYPE == 3:
            j = tl.arange(0, 32)
            q = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + (bb * 32)[None, :, None] + j[None, None, :],
                        mask=m3, other=0).to(tl.float32)
            x = tl.load(x_row + (bb * 32)[:, None] + j[None, :], mask=bmask[:, None], other=0.0).to(tl.float32)
            acc += tl.sum(q * x[None, :, :], axis=2) * d
        else:
            j = tl.arange(0, 16)
            q = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + (bb * 16)[None, :, None] + j[None, None, :],
                        mask=m3, other=0)
            x_lo = tl.load(x_row + (bb * 32)[:, None] + j[None, :], mask=bmask[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(x_row + (bb * 32 + 16)[:, None] + j[None, :], mask=bmask[:, None], other=0.0).to(tl.float32)
            lo = (q & 15).to(tl.float32)
            hi = (q >> 4).to(tl.float32)
            dot = tl.sum(lo * x_lo[None, :, :] + hi * x_hi[None, :, :], axis=2)
            xsum = tl.sum(x_lo + x_hi, axis=1)[None, :]
            if QTYPE == 1:
                acc += (dot - 8.0 * xsum) * d
            else:
                mn = tl.load(mn_ptr + offs_n[:, None] * stride_sn + bb[None, :], mask=m2, other=0.0).to(tl.float32)
                acc += dot * d + mn * xsum
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def _planes(w):
    if isinstance(w, QuantWeight):
        return w.qs, w.scale, (w.min if w.min is not None else w.scale), QCODES[w.qtype]
    return w, w, w, 0


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm(x: torch.Tensor, w, config: tuple, out: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor-core GEMM with an explicit (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    bm, bn, bk, warps, stages = config
    M, K = x.shape
    N = w.shape[0]
    qs, sc, mn, code = _planes(w)
    if code and bk % 32:
        raise ValueError("quantized weights need BLOCK_K a multiple of 32")
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _gemm_kernel[grid](x, qs, sc, mn, y, M, N, K, x.stride(0), qs.stride(0), sc.stride(0), y.stride(0),
                           QTYPE=code, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                           PRECISION=_precision(x.dtype), num_warps=warps, num_stages=stages)
    return y


def gemv(x: torch.Tensor, w: QuantWeight, config: tuple = (8, 8, 4), out: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA-core GEMV-style kernel for few rows: config (BLOCK_N, BLOCK_B blocks of 32, num_warps)."""
    bn, bb, warps = config
    M, K = x.shape
    N = w.shape[0]
    qs, sc, mn, code = _planes(w)
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        _gemv_kernel[(triton.cdiv(N, bn), M)](x, qs, sc, mn, y, N, K, x.stride(0), qs.stride(0), sc.stride(0),
                                             y.stride(0), QTYPE=code, BLOCK_N=bn, BLOCK_B=bb, num_warps=warps)
    return y


def fast_gemm_config(M: int, N: int) -> tuple:
    """Tiles for fast mode, chosen from M (never used by the invariant modes)."""
    if M <= 16:
        return (16, 32, 128, 4, 4)
    if M <= 32:
        return (32, 64, 128, 4, 4)
    if M <= 64:
        return (64, 64, 128, 4, 4)
    return (128, 128, 64, 8, 3)


# GEMV tiles per (N, K, qtype), tuned once per shape on first use (fast mode only).
GEMV_CONFIGS = [(4, 16, 4), (8, 8, 4), (8, 16, 4), (16, 8, 4), (16, 16, 8), (32, 8, 8)]
_gemv_best: dict = {}


def _tuned_gemv_config(x: torch.Tensor, w: QuantWeight) -> tuple:
    key = (w.shape, w.qtype, x.dtype)
    if key in _gemv_best:
        return _gemv_best[key]
    if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return GEMV_CONFIGS[1]
    from triton.testing import do_bench
    times = [(do_bench(lambda c=c: gemv(x, w, c), warmup=5, rep=20, return_mode="median"), c) for c in GEMV_CONFIGS]
    _gemv_best[key] = min(times)[1]
    return _gemv_best[key]


def linear(x: torch.Tensor, w, invariant: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype (as ``matmul.linear_ref``)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if invariant:
        return gemm(x, w, INVARIANT_CONFIG, out)
    if not isinstance(w, QuantWeight):
        y = F.linear(x, w.to(x.dtype))
        return y if out is None else out.copy_(y)
    M, N = x.shape[0], w.shape[0]
    if M <= GEMV_MAX_M:
        return gemv(x, w, _tuned_gemv_config(x, w), out)
    return gemm(x, w, fast_gemm_config(M, N), out)
