"""Linear layers y = x @ w.T in Triton, on GGUF block-quantized (Q4_0, Q4_1, Q8_0) or dense weights.

Same signature as ``matmul.linear_ref``; the weight planes of ``QuantWeight`` (qs, scale, min)
are read directly and dequantized in registers, products accumulated in float32.

Kernels:
- GEMV (fast mode, M <= GEMV_MAX_M, quantized): one program per (BLOCK_N outputs, all rows);
  the quant plane is read as int32 words, unpacked with shifts and masks and turned into
  floats by the 2^23 mantissa trick (no int->float instructions), multiplied with x on the
  CUDA cores, each word's partial sum scaled once by its block's d (Q4_1: + min * sum(x)).
- Fast mode, larger M: a one-pass Triton dequantization to x's dtype, then cuBLAS.
- GEMM (tensor cores, the invariant modes): the weight tile is dequantized to x's dtype and fed to ``tl.dot``.
  For the 4-bit types a K-tile is two dots: the low nibbles (weights j of each 32-block)
  against x[:, 32b + j] and the high nibbles (weights j + 16) against x[:, 32b + 16 + j],
  so no in-register interleave is needed.

Numerics: in ``invariant`` mode the GEMM runs with one fixed tile config (``INVARIANT_CONFIG``)
for every M and every weight type, and never split-K, so a row's reduction order does not
depend on how many rows share the call. In fast mode dense weights go to cuBLAS (torch), and
quantized weights take the GEMV up to GEMV_MAX_M rows and dequantize + cuBLAS above.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from exactllm.formats.quant import QuantWeight

QCODES = {None: 0, "q4_0": 1, "q4_1": 2, "q8_0": 3}
GEMV_MAX_M = 8
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): fixed, whatever M is.
INVARIANT_CONFIG = (64, 64, 64, 4, 3)


@triton.jit
def _nibble_f32(v, QTYPE: tl.constexpr):
    """A 4-bit quant v (int32, 0..15) as an exact float32 without an int->float instruction (a
    quarter-rate op on Hopper): OR-ed into the mantissa of 2^23, then 2^23 (+ 8 for Q4_0) subtracted."""
    f = (v | 0x4B000000).to(tl.float32, bitcast=True)
    return f - 8388616.0 if QTYPE == 1 else f - 8388608.0


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, w_ptr, sc_ptr, mn_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                 QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, PRECISION: tl.constexpr, NATURAL: tl.constexpr):
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
    NB: tl.constexpr = BLOCK_K // 32                     # 32-blocks per K tile (quantized weights)
    for k0 in range(0, K, BLOCK_K):
        if QTYPE == 1 or QTYPE == 2:
            blk = k0 // 32 + tl.arange(0, NB)
            bmask = mask_n[:, None] & (blk < K // 32)[None, :]
            # bytes [BLOCK_N, NB, 16]: byte j of a block holds weight j (low nibble) and j + 16 (high)
            byte = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
            q = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + byte[None, :, :], mask=bmask[:, :, None],
                        other=0).to(tl.int32)
            d = tl.load(sc_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=bmask, other=0.0).to(tl.float32)
            w_lo = _nibble_f32(q & 15, QTYPE) * d[:, :, None]
            w_hi = _nibble_f32(q >> 4, QTYPE) * d[:, :, None]
            if QTYPE == 2:
                mn = tl.load(mn_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=bmask, other=0.0).to(tl.float32)
                w_lo += mn[:, :, None]
                w_hi += mn[:, :, None]
            xmask = mask_m[:, None] & (k0 + tl.arange(0, BLOCK_K) < K)[None, :]
            if NATURAL:  # one dot over the K tile in K order: [lo 16 | hi 16] per block
                w = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))
                x = tl.load(x_row + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=xmask, other=0.0)
                acc = tl.dot(x, tl.trans(w.to(dt)), acc, input_precision=PRECISION)
            else:  # two dots: all low halves of the tile's blocks, then all high halves
                col = tl.reshape(byte + (byte // 16) * 16, (BLOCK_K // 2,))  # column of each low nibble
                hmask = tl.reshape(tl.broadcast_to((blk < K // 32)[:, None], (NB, 16)), (BLOCK_K // 2,))
                x_lo = tl.load(x_row + col[None, :], mask=mask_m[:, None] & hmask[None, :], other=0.0)
                x_hi = tl.load(x_row + (col + 16)[None, :], mask=mask_m[:, None] & hmask[None, :], other=0.0)
                acc = tl.dot(x_lo, tl.trans(tl.reshape(w_lo, (BLOCK_N, BLOCK_K // 2)).to(dt)), acc,
                             input_precision=PRECISION)
                acc = tl.dot(x_hi, tl.trans(tl.reshape(w_hi, (BLOCK_N, BLOCK_K // 2)).to(dt)), acc,
                             input_precision=PRECISION)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            wmask = mask_n[:, None] & kmask[None, :]
            if QTYPE == 3:
                blk = k0 // 32 + tl.arange(0, NB)
                bmask = mask_n[:, None] & (blk < K // 32)[None, :]
                q = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + (blk[:, None] * 32 + tl.arange(0, 32)[None, :])[None],
                            mask=bmask[:, :, None], other=0)
                d = tl.load(sc_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=bmask, other=0.0).to(tl.float32)
                w = tl.reshape(q.to(tl.float32) * d[:, :, None], (BLOCK_N, BLOCK_K))
            else:
                w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :], mask=wmask, other=0)
            x = tl.load(x_row + kk[None, :], mask=mask_m[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w.to(dt)), acc, input_precision=PRECISION)
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _unpack(words, n: tl.constexpr, QTYPE: tl.constexpr):
    """Quant n of each int32 word as an exact float32, without int->float conversions (a
    quarter-rate instruction on Hopper): the integer is OR-ed into the mantissa of 2^23 and
    2^23 (+ the format's offset) subtracted. Q4_0 gives q - 8, Q4_1 q, Q8_0 the signed q."""
    if QTYPE == 3:
        u = ((words >> (8 * n)) & 0xFF) ^ 0x80  # int8 q -> q + 128 in 0..255
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    u = (words >> (4 * n)) & 0xF
    if QTYPE == 1:
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _word_cols(wi, n: tl.constexpr, QTYPE: tl.constexpr):
    """Column (index in K) of quant n of word wi. A 4-bit 32-block is 4 words: word w holds
    bytes 4w..4w+3, nibble n is byte 4w + n // 2, low (weight j) or high (weight j + 16)."""
    if QTYPE == 3:
        return wi * 4 + n
    return (wi // 4) * 32 + (wi % 4) * 4 + n // 2 + 16 * (n % 2)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, sc_ptr, mn_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                 QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """y[m, n] for BLOCK_M rows x BLOCK_N outputs, BLOCK_B 32-blocks of K per step. The quant bytes
    are loaded as [BLOCK_N, BLOCK_B, 16] (16 contiguous bytes per block row), x as two contiguous
    16-element halves per block (the low- and high-nibble weights), each loaded once per step and
    used by all BLOCK_N rows; a block's partial sum is scaled once by its d."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_n = offs_n < N
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm
    w_rows = w_ptr + offs_n[:, None, None] * stride_wn
    n_blk = K // 32
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_B), dtype=tl.float32)
    for b0 in range(0, n_blk, BLOCK_B):
        blk = b0 + tl.arange(0, BLOCK_B)
        bmask = blk < n_blk
        m2 = mask_n[:, None] & bmask[None, :]
        xmask = mask_m[:, None, None] & bmask[None, :, None]
        d = tl.load(sc_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=m2, other=0.0).to(tl.float32)
        if QTYPE == 3:
            col = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
            q = tl.load(w_rows + col[None], mask=m2[:, :, None], other=0).to(tl.float32)
            xv = tl.load(x_rows + col[None], mask=xmask, other=0.0).to(tl.float32)
            part = tl.sum(q[None] * xv[:, None], axis=3)
        else:
            j = tl.arange(0, 16)[None, :]
            q = tl.load(w_rows + (blk[:, None] * 16 + j)[None], mask=m2[:, :, None], other=0).to(tl.int32)
            x_lo = tl.load(x_rows + (blk[:, None] * 32 + j)[None], mask=xmask, other=0.0).to(tl.float32)
            x_hi = tl.load(x_rows + (blk[:, None] * 32 + 16 + j)[None], mask=xmask, other=0.0).to(tl.float32)
            lo = _nibble_f32(q & 15, QTYPE)
            hi = _nibble_f32(q >> 4, QTYPE)
            part = tl.sum(lo[None] * x_lo[:, None] + hi[None] * x_hi[:, None], axis=3)
        acc += part * d[None]
        if QTYPE == 2:  # Q4_1: x' = q d + min, so each block adds min * sum(x) too
            mn = tl.load(mn_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=m2, other=0.0).to(tl.float32)
            acc += tl.sum(x_lo + x_hi, axis=2)[:, None, :] * mn[None]
    y = tl.sum(acc, axis=2)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dequant_kernel(w_ptr, sc_ptr, mn_ptr, out_ptr, N, n_words, stride_wn, stride_sn, stride_on,
                    QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Planes -> dense [N, K] in out's dtype (float32 math, then one rounding)."""
    NQ: tl.constexpr = 4 if QTYPE == 3 else 8
    WPB: tl.constexpr = 8 if QTYPE == 3 else 4
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    wi = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    m2 = (offs_n < N)[:, None] & (wi < n_words)[None, :]
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + wi[None, :], mask=m2, other=0)
    blk = wi // WPB
    d = tl.load(sc_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=m2, other=0.0).to(tl.float32)
    if QTYPE == 2:
        mn = tl.load(mn_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=m2, other=0.0).to(tl.float32)
    for n in tl.static_range(NQ):
        v = _unpack(words, n, QTYPE) * d
        if QTYPE == 2:
            v = v + mn
        dst = out_ptr + offs_n[:, None] * stride_on + _word_cols(wi, n, QTYPE)[None, :]
        tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=m2)


def _planes(w):
    if isinstance(w, QuantWeight):
        return w.qs, w.scale, (w.min if w.min is not None else w.scale), QCODES[w.qtype]
    return w, w, w, 0


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm(x: torch.Tensor, w, config: tuple, out: torch.Tensor | None = None, natural: bool = True) -> torch.Tensor:
    """Tensor-core GEMM with an explicit (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
    4-bit weights: ``natural`` feeds each K tile to one dot in K order; otherwise two dots per tile
    (low nibbles, then high), an order that depends on BLOCK_K."""
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
                           PRECISION=_precision(x.dtype), NATURAL=natural, num_warps=warps, num_stages=stages)
    return y


def _words(qs: torch.Tensor) -> torch.Tensor:
    """A quant plane [N, bytes] viewed as int32 words [N, bytes / 4] (no copy when aligned)."""
    if qs.stride(-1) != 1 or qs.stride(0) % 4 or qs.storage_offset() % 4:
        qs = qs.contiguous()
    return qs.view(torch.int32)


def gemv(x: torch.Tensor, w: QuantWeight, config: tuple = (8, 8, 4, 3), out: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA-core kernel for few rows: config (BLOCK_N, BLOCK_B 32-blocks per step, num_warps, num_stages);
    rows are taken in groups of up to GEMV_MAX_M per program (the weights are unpacked once per group)."""
    bn, bb, warps, stages = config
    M, K = x.shape
    N = w.shape[0]
    mn = w.min if w.min is not None else w.scale
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        bm = min(triton.next_power_of_2(M), GEMV_MAX_M)
        _gemv_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bm))](
            x, w.qs, w.scale, mn, y, M, N, K, x.stride(0), w.qs.stride(0), w.scale.stride(0), y.stride(0),
            QTYPE=QCODES[w.qtype], BLOCK_M=bm, BLOCK_N=bn, BLOCK_B=bb, num_warps=warps, num_stages=stages)
    return y


def dequantize(w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense [N, K] copy of a quantized weight in one pass (for cuBLAS at larger M)."""
    N, K = w.shape
    words = _words(w.qs)
    mn = w.min if w.min is not None else w.scale
    out = torch.empty(N, K, dtype=dtype, device=w.qs.device)
    bn, bw = 16, 64
    _dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(words.shape[1], bw))](
        words, w.scale, mn, out, N, words.shape[1], words.stride(0), w.scale.stride(0), out.stride(0),
        QTYPE=QCODES[w.qtype], BLOCK_N=bn, BLOCK_W=bw, num_warps=4)
    return out


# GEMV tiles per (N, K, qtype), tuned once per shape on first use (fast mode only).
GEMV_CONFIGS = [(4, 8, 2, 3), (8, 4, 4, 3), (8, 8, 4, 3), (8, 16, 4, 3), (16, 8, 4, 3), (16, 16, 8, 3), (32, 8, 8, 3)]
_gemv_best: dict = {}


def _tuned_gemv_config(x: torch.Tensor, w: QuantWeight) -> tuple:
    key = (w.shape, w.qtype, x.dtype, min(triton.next_power_of_2(x.shape[0]), GEMV_MAX_M))
    if key in _gemv_best:
        return _gemv_best[key]
    if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return GEMV_CONFIGS[2]
    from triton.testing import do_bench
    times = [(do_bench(lambda c=c: gemv(x, w, c), warmup=5, rep=20, return_mode="median"), c) for c in GEMV_CONFIGS]
    _gemv_best[key] = min(times)[1]
    return _gemv_best[key]


def invariant_config(M: int, N: int, K: int, dtype: torch.dtype, qtype: str | None) -> tuple:
    """The invariant mode's GEMM tiles for an [M, K] x [N, K].T product."""
    return INVARIANT_CONFIG


def linear(x: torch.Tensor, w, invariant: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype (as ``matmul.linear_ref``)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    qtype = w.qtype if isinstance(w, QuantWeight) else None
    if invariant:
        return gemm(x, w, invariant_config(x.shape[0], w.shape[0], x.shape[1], x.dtype, qtype), out)
    if qtype is None:
        y = F.linear(x, w.to(x.dtype))
        return y if out is None else out.copy_(y)
    if x.shape[0] <= GEMV_MAX_M:
        return gemv(x, w, _tuned_gemv_config(x, w), out)
    y = F.linear(x, dequantize(w, x.dtype))
    return y if out is None else out.copy_(y)
