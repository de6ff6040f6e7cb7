"""Linear layers y = x @ w.T in Triton, on GGUF block-quantized (Q4_0, Q4_1, Q8_0) or dense weights.

Same signature as ``matmul.linear_ref``; the weight planes of ``QuantWeight`` (qs, scale, min)
are read directly and dequantized in registers, products accumulated in float32.

Kernels:
- GEMM (tensor cores): the weight tile is dequantized to x's dtype in registers and fed to one
  ``tl.dot`` per K tile, in K order (a 4-bit block's low nibbles are weights 0..15, the high ones
  16..31; they are joined back into that order). ``natural=False`` instead takes two dots per tile
  (all low halves, then all high halves): another summation order, kept to show that order matters.
- Dequantize: planes -> dense weights in one pass, for cuBLAS at large M (fast mode).

Numerics. Invariant mode, quantized weights: the TBIK tree of kernels/tree_matmul_triton.py (the
planes read and dequantized in registers, the tree's top levels split over SMs at small M; its
bits depend on K alone). H100, TinyLlama's layer linears (bench/tbik_matmul.py --quant): 0.5-0.95x
the time of the wgmma GEMM below at M=1, 0.75-1.4x at M=256 (tree on the dequantized weight);
lm_head 1.0-1.25x at M=1 and ~1.8x at M=256. Invariant mode, dense weights: this GEMM, which
never splits K; a K tile is reduced by tensor-core MMA steps of 16 in K order into the float32 accumulator. On the
H100 (bench/linear_kernels.py, section classes) every Triton tile config gave bit-identical outputs
for BF16 weights (wgmma and mma.sync alike), so with BF16 activations on Hopper the invariant mode
picks its tiles by M among BF16_TILES, timing the candidates once per shape and M bucket; other
activation dtypes and GPUs keep one fixed INVARIANT_CONFIG. (For weights dequantized in registers
only the wgmma tiles formed one class: WGMMA_TILES.)
Fast mode: cuBLAS for dense weights; for quantized ones the fused GEMM with any tiles (mma.sync
included), then dequantize + cuBLAS, by M (see linear()); layers/ops.py sends the fewest rows to the
quantized GEMV of kernels/qgemv_triton.py before they reach linear().
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from exactllm.formats.quant import QuantWeight
from exactllm.kernels.rope_triton import rope_kv_tile

QCODES = {None: 0, "q4_0": 1, "q4_1": 2, "q8_0": 3}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the invariant mode at every M, where no
# class of bit-identical configs has been shown (see _invariant_table).
INVARIANT_CONFIG = (64, 64, 64, 4, 3)


@triton.jit
def _nibble_f32(v, QTYPE: tl.constexpr):
    """A 4-bit quant v (int32, 0..15) as an exact float32 without an int->float instruction (a
    quarter-rate op on Hopper): OR-ed into the mantissa of 2^23, then 2^23 (+ 8 for Q4_0) subtracted."""
    f = (v | 0x4B000000).to(tl.float32, bitcast=True)
    return f - 8388616.0 if QTYPE == 1 else f - 8388608.0


@triton.jit
def silu_mul_input(x_rows, u_rows, offs, mask, SILU: tl.constexpr):
    """A linear's input tile: x, or (SILU) silu(x) * u with activation_triton's SwiGLU arithmetic
    (float32, one rounding to x's dtype), so a fused down projection sees the SwiGLU kernel's bits."""
    x = tl.load(x_rows + offs, mask=mask, other=0.0)
    if SILU:
        g = x.to(tl.float32)
        u = tl.load(u_rows + offs, mask=mask, other=0.0).to(tl.float32)
        x = (g / (1.0 + tl.exp(-g)) * u).to(x.dtype)
    return x


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x_ptr, u_ptr, w_ptr, sc_ptr, mn_ptr, y_ptr, M, N, K, stride_xm, stride_um, stride_wn, stride_sn,
                 stride_ym, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, q_width, kv_width, stride_c,
                 stride_cslot, stride_ch,
                 QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, PRECISION: tl.constexpr, NATURAL: tl.constexpr, SILU: tl.constexpr,
                 ROPE_KV: tl.constexpr, HEAD_DIM: tl.constexpr):
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
    u_row = u_ptr + offs_m[:, None] * stride_um
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
                x = silu_mul_input(x_row, u_row, (k0 + tl.arange(0, BLOCK_K))[None, :], xmask, SILU)
                acc = tl.dot(x, tl.trans(w.to(dt)), acc, input_precision=PRECISION)
            else:  # two dots: all low halves of the tile's blocks, then all high halves
                col = tl.reshape(byte + (byte // 16) * 16, (BLOCK_K // 2,))  # column of each low nibble
                hmask = tl.reshape(tl.broadcast_to((blk < K // 32)[:, None], (NB, 16)), (BLOCK_K // 2,))
                x_lo = silu_mul_input(x_row, u_row, col[None, :], mask_m[:, None] & hmask[None, :], SILU)
                x_hi = silu_mul_input(x_row, u_row, (col + 16)[None, :], mask_m[:, None] & hmask[None, :], SILU)
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
            x = silu_mul_input(x_row, u_row, kk[None, :], mask_m[:, None] & kmask[None, :], SILU)
            acc = tl.dot(x, tl.trans(w.to(dt)), acc, input_precision=PRECISION)
    out = acc.to(y_ptr.dtype.element_ty)
    if ROPE_KV:
        out = rope_kv_tile(out, offs_m[:, None], pid_n * BLOCK_N, M, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr,
                           vc_ptr, q_width, kv_width, stride_c, stride_cslot, stride_ch, BLOCK_N, HEAD_DIM)
    y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, out, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int8_f32(v):
    """An int8 quant v (sign-extended int32) as an exact float32, by the same mantissa trick."""
    return (((v & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _dequant_kernel(w_ptr, sc_ptr, mn_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                    QTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """Planes -> dense [N, K] in out's dtype (float32 math, then one rounding); per thread one
    block row of quants in, contiguous runs of 16 (4-bit) or 32 (Q8_0) values out."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    blk = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    m2 = (offs_n < N)[:, None] & (blk < K // 32)[None, :]
    m3 = m2[:, :, None]
    d = tl.load(sc_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
    w_rows = w_ptr + offs_n[:, None, None] * stride_wn
    out_rows = out_ptr + offs_n[:, None, None] * stride_on
    dt = out_ptr.dtype.element_ty
    if QTYPE == 3:
        col = (blk[:, None] * 32 + tl.arange(0, 32)[None, :])[None]
        q = tl.load(w_rows + col, mask=m3, other=0).to(tl.int32)
        tl.store(out_rows + col, (_int8_f32(q) * d).to(dt), mask=m3)
    else:
        j = tl.arange(0, 16)[None, :]
        q = tl.load(w_rows + (blk[:, None] * 16 + j)[None], mask=m3, other=0).to(tl.int32)
        lo = _nibble_f32(q & 15, QTYPE) * d
        hi = _nibble_f32(q >> 4, QTYPE) * d
        if QTYPE == 2:
            mn = tl.load(mn_ptr + offs_n[:, None] * stride_sn + blk[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
            lo += mn
            hi += mn
        col = (blk[:, None] * 32 + j)[None]
        tl.store(out_rows + col, lo.to(dt), mask=m3)
        tl.store(out_rows + col + 16, hi.to(dt), mask=m3)


def _planes(w):
    if isinstance(w, QuantWeight):
        return w.qs, w.scale, (w.min if w.min is not None else w.scale), QCODES[w.qtype]
    return w, w, w, 0


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm(x: torch.Tensor, w, config: tuple, out: torch.Tensor | None = None, natural: bool = True,
         up: torch.Tensor | None = None, rope_kv: tuple | None = None) -> torch.Tensor:
    """Tensor-core GEMM with an explicit (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
    4-bit weights: ``natural`` feeds each K tile to one dot in K order; otherwise two dots per tile
    (low nibbles, then high), an order that depends on BLOCK_K.  ``up``: the input is silu(x) * up
    (SwiGLU in the prologue); ``rope_kv`` (rope_triton.rope_kv_args): RoPE and the KV-cache write in
    the epilogue of a qkv projection; both give the bits of the separate kernels."""
    bm, bn, bk, warps, stages = config
    M, K = x.shape
    N = w.shape[0]
    qs, sc, mn, code = _planes(w)
    if code and bk % 32:
        raise ValueError("quantized weights need BLOCK_K a multiple of 32")
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype or up.stride(1) != 1 or x.stride(1) != 1):
        raise ValueError(f"up {tuple(up.shape)} {up.dtype} must be laid out as x {tuple(x.shape)} {x.dtype}")
    head_dim, epi = rope_kv if rope_kv is not None else (0, (x,) * 6 + (0,) * 5)
    if rope_kv is not None and (N != epi[6] + 2 * epi[7] or bn % 2):
        raise ValueError("the rope_kv epilogue needs a whole qkv output and an even BLOCK_N")
    if M:
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _gemm_kernel[grid](x, x if up is None else up, qs, sc, mn, y, M, N, K, x.stride(0),
                           0 if up is None else up.stride(0), qs.stride(0), sc.stride(0), y.stride(0), *epi,
                           QTYPE=code, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                           PRECISION=_precision(x.dtype), NATURAL=natural, SILU=up is not None,
                           ROPE_KV=rope_kv is not None, HEAD_DIM=head_dim, num_warps=warps, num_stages=stages)
    return y


def dequantize(w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dense [N, K] copy of a quantized weight in one pass (for cuBLAS at large M)."""
    N, K = w.shape
    mn = w.min if w.min is not None else w.scale
    out = torch.empty(N, K, dtype=dtype, device=w.qs.device)
    bn, bb = 16, 8
    _dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K // 32, bb))](
        w.qs, w.scale, mn, out, N, K, w.qs.stride(0), w.scale.stride(0), out.stride(0),
        QTYPE=QCODES[w.qtype], BLOCK_N=bn, BLOCK_B=bb, num_warps=4)
    return out


# Tensor-core tiles by M bucket: (largest M of the bucket, candidate configs; the first is the
# default), from the H100 sweeps of bench/linear_kernels.py (bench/results/linear_sweep*.json).
# WGMMA_TILES: BLOCK_M >= 64 with 4 or 8 warps, so Triton emits wgmma. On the H100 every such config
# gave the same bits (K is summed in 16-wide MMA steps in K order, whatever the tile), while mma.sync
# tiles (BLOCK_M = 16) gave other bits for quantized weights; for BF16 weights both instruction
# families gave identical bits, so BF16_TILES mixes them. Within one table the invariant mode may
# take any candidate at any M: it times them once per (shape, bucket) and keeps the fastest (dense
# weights; quantized ones go through TBIK in invariant mode).
WGMMA_TILES = [(64, [(64, 32, 128, 4, 4), (64, 16, 256, 4, 3), (64, 64, 128, 4, 4), (64, 64, 64, 4, 3)]),
               (256, [(64, 32, 128, 4, 4), (64, 64, 128, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4)]),
               (512, [(64, 64, 128, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4)]),
               (None, [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)])]
BF16_TILES = [(16, [(16, 16, 256, 2, 4), (16, 32, 256, 4, 3), (16, 128, 128, 4, 3)]),
              (64, [(64, 32, 128, 4, 4), (64, 128, 128, 4, 3), (16, 16, 256, 2, 4)]),
              (256, [(64, 64, 128, 4, 4), (64, 128, 128, 4, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                     (64, 64, 256, 4, 3)]),
              (512, [(64, 128, 128, 4, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (64, 64, 128, 4, 4)]),
              (None, [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)])]
# fast mode, quantized weights: the fused dequantizing GEMM up to FUSED_MAX_M rows (an mma.sync tile),
# and up to FUSED_MAX_M_WIDE for wide matrices (N >= WIDE_N; a wgmma tile); one dequantize pass +
# cuBLAS above (H100: it wins from there on, bench/results/linear_final.json, section small). One
# fixed tile per bucket (not timed: see linear).
FAST_TILES = [(16, [(16, 16, 256, 2, 4)]), (64, [(64, 32, 128, 4, 4)])]
FUSED_MAX_M, FUSED_MAX_M_WIDE, WIDE_N = 16, 64, 8192
TILE_TABLES = {"bf16": BF16_TILES, "wgmma": WGMMA_TILES}
_tiles_best: dict = {}


def _bucket(table: list, M: int) -> tuple:
    for i, (max_m, cands) in enumerate(table):
        if max_m is None or M <= max_m:
            return i, cands
    raise AssertionError("tile table without a last row")


def _tuned_tiles(x: torch.Tensor, w, table: str) -> tuple:
    """The fastest candidate of x's M bucket in TILE_TABLES[table], timed once per (table, shape,
    dtype, bucket) on the GPU; the bucket's first candidate where no timing can be taken (CPU,
    CUDA-graph capture)."""
    i, cands = _bucket(TILE_TABLES[table], x.shape[0])
    qtype = w.qtype if isinstance(w, QuantWeight) else None
    key = (table, tuple(w.shape), qtype, x.dtype, i)
    if key in _tiles_best:
        return _tiles_best[key]
    if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing() or len(cands) == 1:
        return cands[0]
    from triton.testing import do_bench
    times = [(do_bench(lambda c=c: gemm(x, w, c), warmup=5, rep=20, return_mode="median"), c) for c in cands]
    _tiles_best[key] = min(times)[1]
    return _tiles_best[key]


def _invariant_table(dtype: torch.dtype, device: torch.device) -> str | None:
    """The tile table the invariant mode may tune over for dense weights, or None for the one fixed
    INVARIANT_CONFIG: the class was shown on a Hopper GPU (H100, Triton 3.6) for BF16 activations
    only; other GPUs have other MMA instructions, so they keep the fixed config."""
    return "bf16" if dtype == torch.bfloat16 and _is_hopper(device) else None


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def invariant_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device = torch.device("cuda")) -> tuple:
    """The invariant mode's default GEMM tiles for an [M, K] x [N, K].T product with dense weights
    (linear() may time the other candidates of the same table and bucket)."""
    table = _invariant_table(dtype, device)
    return INVARIANT_CONFIG if table is None else _bucket(TILE_TABLES[table], M)[1][0]


def linear(x: torch.Tensor, w, invariant: bool = False, out: torch.Tensor | None = None,
           up: torch.Tensor | None = None, rope_kv: tuple | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype (as ``matmul.linear_ref``).  Invariant mode only:
    ``up`` (x is then the gate: silu(x) * up is the input) and ``rope_kv`` (the rope_kv epilogue of
    a qkv projection), as in ``gemm``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, N = x.shape[0], w.shape[0]
    qtype = w.qtype if isinstance(w, QuantWeight) else None
    if invariant:
        if qtype is not None:   # the TBIK tree: split over SMs at small M, batch invariant too
            from exactllm.kernels.tree_matmul_triton import tbik_matmul
            y = tbik_matmul(x, w, out_dtype=x.dtype, up=up, rope_kv=rope_kv)
            return y if out is None else out.copy_(y)
        table = _invariant_table(x.dtype, x.device)
        return gemm(x, w, INVARIANT_CONFIG if table is None else _tuned_tiles(x, w, table), out, up=up,
                    rope_kv=rope_kv)
    assert up is None and rope_kv is None, "the fused prologue / epilogue are invariant-mode only"
    if qtype is None:
        y = F.linear(x, w.to(x.dtype))
        return y if out is None else out.copy_(y)
    if M <= FUSED_MAX_M or (M <= FUSED_MAX_M_WIDE and N >= WIDE_N):
        # the bucket's first tile, never a timed choice: the candidates differ in bits for quantized
        # weights (mma.sync vs wgmma), so a pick by timing could differ between two processes
        return gemm(x, w, _bucket(FAST_TILES, M)[1][0], out)
    y = F.linear(x, dequantize(w, x.dtype))
    return y if out is None else out.copy_(y)
