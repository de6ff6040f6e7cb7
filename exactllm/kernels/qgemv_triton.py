"""Few-row linears on GGUF block-quantized weights (Q4_0, Q4_1, Q8_0: the planes of QuantWeight),
with the op before them fused in: the quantized twin of kernels/gemv_triton.py, same signatures
(gemv, norm_gemv, silu_gemv; a QuantWeight in place of the dense weight), same prologues (PLAIN,
NORM, NORM_ADD, SILU through gemv_triton's ``_input``), same rounding points of the input; torch
references in kernels/gemv.py (they dequantize a QuantWeight to float32).

Why: at M = 1 a Q4_0 decode linear reads 0.56 bytes per weight, so TinyLlama's matrices take
0.8-13 us at 2.9 TB/s; the old GEMV (matmul_triton, one row per program, no prefetch, no PDL, its
config picked by timing at first use) took 6-27 us on them.

Layout of the work: a program owns BLOCK_N whole rows of the weight and BLOCK_M rows of x and
walks K in tiles of NB 32-blocks, as 5-D tiles [BLOCK_M, BLOCK_N, NB, S, 8]: a thread holds runs of
8 quant bytes (two int32 words, one 64-bit load) and the 8 x values those bytes multiply (one
128-bit load of BF16), so quants and x share one register layout with no shuffle between them
(a 4-bit block's low nibbles are weights 0..15, its high nibbles 16..31: x is read in natural
order, low and high half). x and its prologue are computed once per tile for all BLOCK_N weight
rows. Quants become float32 without an int->float instruction (a quarter-rate op on Hopper): per
word one shift and one logic op place the four nibbles, then one prmt per byte builds the float
1 + n/16 (inline PTX; the interpreter computes the same values with shifts and a bitcast); a block's
sum of (1 + n/16) x, minus 1.5 (Q4_0) or 1 (Q4_1) times the block's sum of x (shared by every
weight row), times 16 d gives its contribution. Q8_0 bytes become 2^23 + q + 128, minus that
offset exactly. The next tile's quants and scales are loaded before the current tile is summed.
Programmatic dependent launch (Hopper; kernels/pdl.py): the first tile of weights is loaded before
griddepcontrol.wait, as in gemv_triton.

Where it stands (H100, bench/gemv_quant.py, gemv_quant.json): 1.2-2x faster than the old GEMV
on the 2048-row matrices (o, qkv, down), within 2% or faster on gate_up and lm_head; 20-47% of the
Q4_0 byte floor, 38-79% of Q8_0's (the table's configs, graph-timed from HBM). The CUDA-core unpacking (~3 instructions per weight) and the loads it keeps in
registers (no pipelining of non-dot loads in Triton) bound it; the byte floor needs the weight stream
held in shared memory (cp.async / TMA) or tensor cores for the dot.

Numerics: float32 accumulation; the per-block partial sums land in a [BLOCK_M, BLOCK_N, NB]
accumulator summed over NB at the end, so the bits depend on NB and on the layout: the config is
a fixed table by (qtype, BLOCK_M, matrix class) (CONFIGS), never chosen by timing, so fast mode gives
the same bits in every process. Each output row depends only on its own x row; BLOCK_M follows M, so this
is not a batch-invariant kernel (the invariant modes never call it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import pdl
from exactllm.kernels.gemv_triton import EntryPoints, _block_m, _input, _normed_input
from exactllm.kernels.matmul_triton import QCODES

MAX_BLOCK_M = 8
# (BLOCK_N, NB 32-blocks per K tile, num_warps) by (qtype, BLOCK_M) and matrix class: "small" (the
# 2048-row matrices of K <= 4096: one K tile per row, all of it in flight at once), "deep" (K > 4096:
# a few tiles per row, the next one loaded while the current is summed), "wide" (N >= WIDE_N: many
# programs, short tiles so each keeps a load in flight). Fixed, never chosen by timing (the bits
# depend on it); from the H100 sweeps of bench/gemv_quant.py. None of these spills on sm_90.
WIDE_N, DEEP_K = 8192, 4096
_M1 = {"q4_0": {"small": (4, 64, 2), "deep": (2, 64, 2), "wide": (2, 32, 1)},
       "q8_0": {"small": (4, 64, 2), "deep": (4, 64, 4), "wide": (2, 16, 1)}}
_M1["q4_1"] = _M1["q4_0"]
CONFIGS = {(q, bm, c): cfg for q in ("q4_0", "q4_1", "q8_0") for c in ("small", "deep", "wide")
           for bm, cfg in ((1, _M1[q][c]), (2, (2, 64, 4)), (4, (2, 64, 4)), (8, (1, 64, 4)))}
# byte k of u under 0x3F in the top byte: the float32 with byte k as bits 16..23 (4-bit quants)
_PRMT_NIB = tl.constexpr("prmt.b32 $0, u, 0x3F000000, 0x7054; prmt.b32 $1, u, 0x3F000000, 0x7154; "
                         "prmt.b32 $2, u, 0x3F000000, 0x7254; prmt.b32 $3, u, 0x3F000000, 0x7354;")
# byte k of u under the bytes 0x4B 0x00 0x00 of 2^23: the float32 2^23 + byte (int8 quants)
_PRMT_I8 = tl.constexpr("prmt.b32 $0, u, 0x4B000000, 0x7650; prmt.b32 $1, u, 0x4B000000, 0x7651; "
                        "prmt.b32 $2, u, 0x4B000000, 0x7652; prmt.b32 $3, u, 0x4B000000, 0x7653;")


@triton.jit
def _bytes_f32(w, OP: tl.constexpr, ASM: tl.constexpr):
    """The four bytes of each int32 word w as four float32 tensors, exact and without an int->float
    instruction (a quarter-rate op on Hopper): 1 + n/16 for the low (OP 0) or high (OP 1) nibble n
    of each byte, 2^23 + q + 128 for an int8 q (OP 2). ASM: one shift and one logic op place the
    four nibbles (or flip the four signs), then one prmt per byte puts it under the exponent byte.
    Without ASM (the interpreter) the same values by shifts, masks and a bitcast."""
    if not ASM:
        return _byte_f32(w, 0, OP), _byte_f32(w, 8, OP), _byte_f32(w, 16, OP), _byte_f32(w, 24, OP)
    if OP == 0:  # n at bits 3..6 of each byte, bit 7 set: byte = 0x80 | n << 3 -> 0x3F800000 | n << 19
        v0, v1, v2, v3 = tl.inline_asm_elementwise(
            "{ .reg .b32 u; shl.b32 u, $4, 3; lop3.b32 u, u, 0x78787878, 0x80808080, 0xEA; " + _PRMT_NIB + " }",
            "=r,=r,=r,=r,r", [w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    elif OP == 1:
        v0, v1, v2, v3 = tl.inline_asm_elementwise(
            "{ .reg .b32 u; shr.b32 u, $4, 1; lop3.b32 u, u, 0x78787878, 0x80808080, 0xEA; " + _PRMT_NIB + " }",
            "=r,=r,=r,=r,r", [w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        v0, v1, v2, v3 = tl.inline_asm_elementwise(
            "{ .reg .b32 u; xor.b32 u, $4, 0x80808080; " + _PRMT_I8 + " }",
            "=r,=r,=r,=r,r", [w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    return v0, v1, v2, v3


@triton.jit
def _byte_f32(w, SHIFT: tl.constexpr, OP: tl.constexpr):
    v = (w >> SHIFT) & 0xFF
    if OP == 2:
        return ((v ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True)
    n = v & 15 if OP == 0 else v >> 4
    return ((n << 19) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _split4(x):
    """x [..., 8] -> four [..., 2] tensors: elements b and 4 + b of the last dim, b = 0..3."""
    x = tl.reshape(x, x.shape[:-1] + (2, 2, 2))
    e, o = tl.split(x)            # even / odd b
    b0, b2 = tl.split(e)
    b1, b3 = tl.split(o)
    return b0, b1, b2, b3


@triton.jit
def _dot_words(w, x, OP: tl.constexpr, ASM: tl.constexpr):
    """Sum over the bytes of words w [..., S, 2] (int32) of value * x, x [..., S, 8] float32 in
    natural order (byte 4 * word + b multiplies x[..., 4 * word + b]); value as in _bytes_f32, minus
    2^23 + 128 for int8 (exact): so q * x for Q8_0 and (1 + n/16) * x for nibbles."""
    v0, v1, v2, v3 = _bytes_f32(w, OP, ASM)
    x0, x1, x2, x3 = _split4(x)
    if OP == 2:
        v0 -= 8388736.0
        v1 -= 8388736.0
        v2 -= 8388736.0
        v3 -= 8388736.0
    return v0 * x0 + v1 * x1 + v2 * x2 + v3 * x3


@triton.jit(do_not_specialize=["M"])
def _qgemv_kernel(x_ptr, r_ptr, nw_ptr, q_ptr, sc_ptr, mn_ptr, y_ptr, ro_ptr, M, N, K,
                  stride_xm, stride_rm, stride_qn, stride_sn, stride_ym, stride_om, eps,
                  QTYPE: tl.constexpr, PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  NB: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    S: tl.constexpr = 4 if QTYPE == 3 else 2             # 8-byte runs (two int32 words) per block row
    pid_n = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    n_blk = K // 32
    # 5-D [BLOCK_M, BLOCK_N, NB, S, 2 words] for quants, [BLOCK_M, 1, NB, S, 8] for x: one thread
    # holds 8 quant bytes (two words, 64-bit load) and the 8 x values they multiply (16 bytes)
    offs_m = m0 + tl.arange(0, BLOCK_M)[:, None, None, None, None]
    mask_m = offs_m < M
    n5 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :, None, None, None]
    b5 = tl.arange(0, NB)[None, None, :, None, None]
    run = tl.arange(0, S)[None, None, None, :, None]
    word = run * 2 + tl.arange(0, 2)[None, None, None, None, :]
    col = run * 8 + tl.arange(0, 8)[None, None, None, None, :]
    q_rows = q_ptr.to(tl.pointer_type(tl.int32)) + n5 * (stride_qn // 4) + b5 * (S * 2) + word
    s_rows = sc_ptr + n5 * stride_sn + b5
    m_rows = mn_ptr + n5 * stride_sn + b5
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    r_rows = r_ptr + offs_m.to(tl.int64) * stride_rm
    ro_rows = ro_ptr + offs_m.to(tl.int64) * stride_om
    dt = y_ptr.dtype.element_ty
    mask_n = n5 < N
    # first tile: needs no activation, so it is requested before waiting for the previous kernel
    q = tl.load(q_rows, mask=mask_n & (b5 < n_blk), other=0)
    d = tl.load(s_rows, mask=mask_n & (b5 < n_blk), other=0.0)
    mn = d
    if QTYPE == 2:
        mn = tl.load(m_rows, mask=mask_n & (b5 < n_blk), other=0.0)
    pdl.enter(PDL)
    rstd = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        ss = tl.zeros([BLOCK_M, 1, NB, S, 8], dtype=tl.float32)
        for k0 in range(0, K, NB * 32):
            kk = k0 + b5 * 32 + col
            for half in tl.static_range(4 // S):
                s = _input(x_rows, r_rows, kk + half * 16, mask_m & (kk < K), PROLOGUE).to(tl.float32)
                ss += s * s
        ss = tl.sum(tl.sum(tl.sum(ss, axis=4, keep_dims=True), axis=3, keep_dims=True), axis=2, keep_dims=True)
        rstd = 1.0 / tl.sqrt_rn(ss / K + eps)
    write_res = pid_n == 0
    acc = tl.zeros([BLOCK_M, BLOCK_N, NB, 1, 1], dtype=tl.float32)
    for b0 in range(0, n_blk, NB):
        nxt = mask_n & (b0 + NB + b5 < n_blk)
        q_next = tl.load(q_rows + (b0 + NB) * (S * 2), mask=nxt, other=0)
        d_next = tl.load(s_rows + b0 + NB, mask=nxt, other=0.0)
        mn_next = d_next
        if QTYPE == 2:
            mn_next = tl.load(m_rows + b0 + NB, mask=nxt, other=0.0)
        kk = (b0 + b5) * 32 + col                     # x columns of the low nibbles / the int8s
        xmask = mask_m & (b0 + b5 < n_blk)
        x_lo = _normed_input(x_rows, r_rows, nw_ptr, ro_rows, kk, xmask, xmask, rstd, write_res, PROLOGUE,
                             dt).to(tl.float32)
        if QTYPE == 3:
            part = tl.sum(tl.sum(_dot_words(q, x_lo, 2, ASM), axis=4, keep_dims=True), axis=3, keep_dims=True)
            acc += part * d.to(tl.float32)
        else:
            # nibbles come as 1 + n/16: sum (1 + n/16) x - c * sum x = sum (n - 16 (c - 1)) x / 16, so
            # c = 1.5 gives Q4_0's n - 8 and c = 1 Q4_1's n; the block's sum of x serves all rows
            x_hi = _normed_input(x_rows, r_rows, nw_ptr, ro_rows, kk + 16, xmask, xmask, rstd, write_res,
                                 PROLOGUE, dt).to(tl.float32)
            part = tl.sum(tl.sum(_dot_words(q, x_lo, 0, ASM) + _dot_words(q, x_hi, 1, ASM), axis=4, keep_dims=True),
                          axis=3, keep_dims=True)
            xs = tl.sum(tl.sum(x_lo + x_hi, axis=4, keep_dims=True), axis=3, keep_dims=True)
            acc += (part - (1.5 if QTYPE == 1 else 1.0) * xs) * (16.0 * d.to(tl.float32))
            if QTYPE == 2:  # Q4_1: x' = n d + min, so each block adds min * sum(x) too
                acc += xs * mn.to(tl.float32)
        q = q_next
        d = d_next
        mn = mn_next
    y = tl.reshape(tl.sum(acc, axis=2), (BLOCK_M, BLOCK_N))
    rows = m0 + tl.arange(0, BLOCK_M)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(y_ptr + rows.to(tl.int64) * stride_ym + cols, y.to(dt), mask=(rows < M) & (cols < N))


def config_for(qtype: str, M: int, N: int, K: int) -> tuple:
    """The fixed (BLOCK_N, NB, num_warps) for M rows of x and an [N, K] weight of this qtype (CONFIGS)."""
    kind = "wide" if N >= WIDE_N else ("deep" if K > DEEP_K else "small")
    return CONFIGS[qtype, _block_m(M), kind]


def _launch(prologue: int, x, r, nw, w: QuantWeight, eps: float, config: tuple | None, out, residual_out):
    """y = prologue(x, r) @ w.T into ``out`` (and x + r into ``residual_out`` for NORM_ADD)."""
    if not isinstance(w, QuantWeight):
        raise TypeError(f"qgemv_triton takes a QuantWeight, got {type(w).__name__}")
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"weight {tuple(w.shape)} does not match x {tuple(x.shape)}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0:
        return y
    block_m = _block_m(M)
    bn, nb, warps = config_for(w.qtype, M, N, K) if config is None else config
    ro = residual_out if residual_out is not None else y
    mn = w.min if w.min is not None else w.scale
    use_pdl = pdl.enabled(x.device)
    _qgemv_kernel[(triton.cdiv(N, bn), triton.cdiv(M, block_m))](
        x, r, nw, w.qs, w.scale, mn, y, ro, M, N, K, x.stride(0), r.stride(0), w.qs.stride(0), w.scale.stride(0),
        y.stride(0), ro.stride(0), eps, QTYPE=QCODES[w.qtype], PROLOGUE=prologue, BLOCK_M=block_m, BLOCK_N=bn,
        NB=nb, ASM=x.device.type == "cuda", PDL=use_pdl, num_warps=warps, num_stages=1, **pdl.launch_kwargs(use_pdl))
    return y


_QUANT = EntryPoints(_launch)
gemv, norm_gemv, silu_gemv = _QUANT.gemv, _QUANT.norm_gemv, _QUANT.silu_gemv
