"""TBIK matmul in Triton: y = x @ w.T with the K reduction along one fixed binary tree.

The tree (a function of K alone).  K is cut into P = k_pieces(K) equal pieces of length L
(P <= 8, the deepest TP split, as in kernels/tree.py); each piece into NLP leaves (NLP a power
of two, 1 while L <= MAX_LEAF) of LEAF elements, the last one possibly shorter (``leaf_plan``).
A leaf is a sequential FP32 accumulation of its own products (``acc = tl.dot(a, b, acc)`` over
its K chunks from a zero accumulator); the P * NLP leaf roots are then summed by adding
adjacent pairs level by level.  TinyLlama: K=2048 -> 8 leaves of 256, K=5632 -> 8 of 704.

Inside a program the leaves are merged by a binary counter: a stack of log2(leaves) FP32
partials in registers (``_push``), so no partial goes through memory, except the stack's top
level when ``SPILL_TOP`` (one store and one load of the tile, to free registers for large
tiles).  The top levels of the tree may be cut at any power of two: across programs
(``splits``, chosen from the grid size to fill the GPU at small M: the last program of a tile,
found by an atomic counter, combines the splits' roots in split order) or across TP ranks
(``parts``: ``combine_partials`` finishes the tree in rank order).  Both are the same FP32
additions as the in-program counter, so TP=1/2/4/8 and every split give identical bits.

Quantized weights (QuantWeight: Q8_0, Q4_0, Q4_1) are read from their planes inside the leaf
loop and each weight is dequantized in registers to x's dtype (q * d, + min for Q4_1, in FP32,
then one rounding), so the bits are those of the same tree on ``W.dequantize(x.dtype)``: whole
32-blocks per load where every chunk starts on a block (``_aligned``: TinyLlama's K=2048 and
5632), else element by element.  TP shards (``QuantWeight.shard(dim=1)``) hold whole blocks.

Nothing in the arithmetic depends on M: the tree is fixed by K, the chunk size BK by the tree
(so every chunk boundary, hence every k16 MMA step, sits at the same K offsets), and the
tile sizes BLOCK_M/BLOCK_N only choose which program computes an output element.  Tile
configs therefore may follow M (``pick_config``); bench/tbik_matmul.py checks on the GPU that
every config gives the same bits.

Fusions (the ops around a decoder layer's linears, with the bits of the separate kernels, so the
invariant modes keep train == serve whichever path runs; tests/test_tree_matmul_fused.py under the
interpreter, bench/invariant_fusion_gpu.py on the GPU): ``up=`` reads gate and up and feeds
silu(gate) * up, rounded as activation_triton's SwiGLU kernel, to the down projection;
``tbik_norm_matmul`` puts the RMSNorm (and the residual add) in the prologue up to NORM_MAX_M rows,
each program computing its rows' inverse RMS with rmsnorm_triton.rms_row, the norm kernel's own code
in a launch of the same num_warps (same reduce layout); ``rope_kv=`` runs RoPE and the KV-cache write
in the qkv projection's epilogue (rope_triton.rope_kv_tile), except on the swapped tile (ROPE_SWAP).
H100, 2026-11-23 (BF16, Q8_0): SwiGLU prologue and rope epilogue equal to the separate kernels at
M = 1, 5, 17, 300, the norm prologue at M = 1, 5, except the rope epilogue on the swapped BF16 tile
at M = 5, hence ROPE_SWAP off.

Small M (``Config.swap``, up to SMALL_M rows): the tile is turned round, acc [BLOCK_N, BLOCK_M] +=
w [BLOCK_N, BK] @ x.T [BK, BLOCK_M], so the weights fill the wgmma's 64-row side and x its
16-wide side (m64n16k16 instead of m64n64k16 with 63 of 64 rows idle at M=1).  A leaf cannot
leave the tensor cores: an FP32 FMA chain in K order differs from the MMA's sum in 50% of the
outputs of one k16 step (73% over K=64), since the MMA does not add its products one by one.
But the MMA's sum is the same whichever operand is A: on H100 wgmma m64n64, the same with A and
B exchanged, m64n16 and a 16-row mma.sync agree bit for bit on the same data (bench/tbik_matmul.py
--small, leaf probe), and the swapped kernel equals the large-M one on every type (BF16, Q8_0,
Q4_0, Q4_1, weights dequantized in registers feeding wgmma's register operand), split and TP size.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from exactllm.formats.quant import QuantWeight
from exactllm.kernels.matmul_triton import QCODES, _is_hopper, _nibble_f32, dequantize, silu_mul_input
from exactllm.kernels.rmsnorm_triton import num_warps as rmsnorm_warps
from exactllm.kernels.rmsnorm_triton import rms_row
from exactllm.kernels.rope_triton import rope_kv_qkv, rope_kv_tile
from exactllm.kernels.activation import silu_mul_ref
from exactllm.kernels.rope import qkv_rope_kv_ref
from exactllm.kernels.tree import combine_partials, k_pieces

MAX_LEAF = 1024      # longest sequential leaf (elements of K)
MAX_DEPTH = 6        # up to 64 leaves per program
MAX_SPLITS = 8       # programs that may share one output tile
# Programmatic dependent launch (the kernel lets the next one launch, then waits for the previous
# one; never changes bits).  Off: on H100 at M=1 it moved TinyLlama's linears by -0.6..+2.7 us
# (BF16 1.5% less in all, Q8_0 2.5% more; bench/tbik_matmul.py --small, tbik_small_m.json), so
# it stays a measured alternative until an end-to-end run shows a gain.
PDL = False
_N_COUNTERS = 1 << 16


class Config(NamedTuple):
    """Launch shape of one call; none of it changes the bits (see module docstring)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    spill_top: bool = False   # keep the stack's top level in memory (frees registers)
    unroll: bool = False      # leaves unrolled (compile-time stack) instead of one flat loop
    swap: bool = False        # weights as the MMA's row operand: acc is [block_n, block_m] (small M)


class TreeShape(NamedTuple):
    local_leaves: int   # leaves of this rank's subtree (a power of two)
    piece_len: int      # L
    leaf: int           # LEAF
    leaves_per_piece: int
    block_k: int        # K chunk of the loop: a function of (L, LEAF) only


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _levels(n: int) -> int:
    return (n - 1).bit_length()


def leaf_plan(piece_len: int) -> "tuple[int, int]":
    """(leaves per piece NLP, leaf length LEAF) for a piece of ``piece_len`` elements: NLP the
    fewest power of two leaves of <= MAX_LEAF; LEAF rounded up to a multiple of 64 (else 16,
    else 1) as long as that still yields exactly NLP non-empty leaves."""
    nlp = _pow2(-(-piece_len // MAX_LEAF))
    for grain in (64, 16, 1):
        leaf = -(-(-(-piece_len // nlp)) // grain) * grain
        if -(-piece_len // leaf) == nlp:
            return nlp, leaf
    raise AssertionError("unreachable: grain 1 always gives nlp leaves")


def block_k_for(piece_len: int, leaf: int) -> int:
    """K chunk: the largest of 64/32/16 dividing every leaf (no masked tail), else 64."""
    last = piece_len - (piece_len - 1) // leaf * leaf
    for bk in (64, 32, 16):
        if leaf % bk == 0 and last % bk == 0:
            return bk
    return 64


def tree_shape(K_local: int, parts: int) -> TreeShape:
    K = K_local * parts
    pieces = k_pieces(K)
    if parts < 1 or parts & (parts - 1) or parts > pieces:
        raise ValueError(f"K={K} cannot be split into {parts} subtrees (tree has {pieces} pieces)")
    L = K // pieces
    nlp, leaf = leaf_plan(L)
    local = pieces // parts * nlp
    if _levels(local) > MAX_DEPTH:
        raise ValueError(f"K={K}: {local} leaves per rank exceed the {1 << MAX_DEPTH} supported")
    return TreeShape(local, L, leaf, nlp, block_k_for(L, leaf))


@triton.jit
def _push(c, g, s0, s1, s2, s3, s4, s5, DEPTH: tl.constexpr):
    """Push leaf ``c`` as leaf ``g`` (0-based) of a counter over 2**DEPTH leaves, g below the
    last.  Returns the carry (the merged subtree when all DEPTH low bits of g are set) and the
    updated stack s0..s5 (level l holds the root of a complete subtree of 2**l leaves)."""
    if DEPTH > 0:
        if g % 2 == 0:
            s0 = c
        else:
            c = s0 + c
            if DEPTH > 1:
                if (g // 2) % 2 == 0:
                    s1 = c
                else:
                    c = s1 + c
                    if DEPTH > 2:
                        if (g // 4) % 2 == 0:
                            s2 = c
                        else:
                            c = s2 + c
                            if DEPTH > 3:
                                if (g // 8) % 2 == 0:
                                    s3 = c
                                else:
                                    c = s3 + c
                                    if DEPTH > 4:
                                        if (g // 16) % 2 == 0:
                                            s4 = c
                                        else:
                                            c = s4 + c
                                            if DEPTH > 5:
                                                if (g // 32) % 2 == 0:
                                                    s5 = c
                                                else:
                                                    c = s5 + c
    return c, s0, s1, s2, s3, s4, s5


@triton.jit
def _drain(c, s0, s1, s2, s3, s4, s5, DEPTH: tl.constexpr):
    """Root after the last leaf ``c`` (all DEPTH bits set): merge it up through the stack."""
    if DEPTH > 0:
        c = s0 + c
    if DEPTH > 1:
        c = s1 + c
    if DEPTH > 2:
        c = s2 + c
    if DEPTH > 3:
        c = s3 + c
    if DEPTH > 4:
        c = s4 + c
    if DEPTH > 5:
        c = s5 + c
    return c


@triton.jit
def _dequant_blocks(w_ptr, sc_ptr, mn_ptr, rn, n_ok, k0, k_end, stride_wn, stride_sn,
                    QTYPE: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr):
    """Quantized weights [BK, BN] ([BN, BK] if SWAP) at K offsets k0 .. k0 + BK of the rows ``rn``,
    in float32 and K order (k0 a multiple of 32; blocks at or past ``k_end``, a multiple of 32, read
    as 0): whole blocks per load (16 bytes of nibbles or 32 int8), one scale per block.  The values
    are those of QuantWeight.dequantize (q * d exact; Q4_1 adds min with one rounding)."""
    NB: tl.constexpr = BK // 32
    EL: tl.constexpr = 32 if QTYPE == 3 else 16            # bytes per block
    blk = k0 // 32 + tl.arange(0, NB)
    el = tl.arange(0, EL)
    if SWAP:     # axes: row, block, byte
        bmask = n_ok[:, None] & (blk < k_end // 32)[None, :]
        blocks = rn[:, None] * stride_sn + blk[None, :]
        d = tl.load(sc_ptr + blocks, mask=bmask, other=0.0).to(tl.float32)[:, :, None]
        q = tl.load(w_ptr + rn[:, None, None] * stride_wn + (blk[:, None] * EL + el[None, :])[None, :, :],
                    mask=bmask[:, :, None], other=0)
    else:        # axes: block, byte, row
        bmask = (blk < k_end // 32)[:, None] & n_ok[None, :]
        blocks = rn[None, :] * stride_sn + blk[:, None]
        d = tl.load(sc_ptr + blocks, mask=bmask, other=0.0).to(tl.float32)[:, None, :]
        q = tl.load(w_ptr + rn[None, None, :] * stride_wn + (blk[:, None] * EL + el[None, :])[:, :, None],
                    mask=bmask[:, None, :], other=0)
    if QTYPE == 3:
        w = q.to(tl.float32) * d
    else:
        q = q.to(tl.int32)
        lo = _nibble_f32(q & 15, QTYPE) * d
        hi = _nibble_f32(q >> 4, QTYPE) * d
        if QTYPE == 2:
            mn = tl.load(mn_ptr + blocks, mask=bmask, other=0.0).to(tl.float32)
            if SWAP:
                mn = mn[:, :, None]
            else:
                mn = mn[:, None, :]
            lo += mn
            hi += mn
        # byte j of a block holds weight j (low nibble) and j + 16 (high): (.., 2, 16) is K order
        if SWAP:
            w = tl.permute(tl.join(lo, hi), (0, 1, 3, 2))
        else:
            w = tl.permute(tl.join(lo, hi), (0, 3, 1, 2))
    if SWAP:
        w = tl.reshape(w, (BN, BK))
    else:
        w = tl.reshape(w, (BK, BN))
    return w


@triton.jit
def _dequant_elems(w_rows, sc_rows, mn_rows, k, b_mask, QTYPE: tl.constexpr):
    """Quantized weights at any K offsets ``k`` (a grid broadcast against the row pointers
    ``w_rows``), in float32: the values of ``_dequant_blocks``, gathered element by element (trees
    whose chunks do not start on blocks)."""
    blk = k // 32
    d = tl.load(sc_rows + blk, mask=b_mask, other=0.0).to(tl.float32)
    if QTYPE == 3:
        return tl.load(w_rows + k, mask=b_mask, other=0).to(tl.float32) * d
    byte = tl.load(w_rows + (blk * 16 + k % 16), mask=b_mask, other=0).to(tl.int32)
    w = _nibble_f32((byte >> (k // 16 % 2 * 4)) & 15, QTYPE) * d
    if QTYPE == 2:
        w += tl.load(mn_rows + blk, mask=b_mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _rows_rstd(x_ptr, r_ptr, ro_ptr, m0, M, stride_xm, stride_rm, stride_rom, n_cols, eps, write_res,
               HAS_RES: tl.constexpr, BM: tl.constexpr, NBLOCK: tl.constexpr):
    """[BM] inverse RMS of rows m0 .. m0 + BM (0 past M), each by rmsnorm_triton.rms_row (the RMSNorm
    kernel's own code, one row at a time as there); ``write_res``: store the rows' x + residual."""
    rstd = tl.zeros((BM,), dtype=tl.float32)
    for i in range(0, tl.minimum(BM, M - m0)):
        row = (m0 + i).to(tl.int64)
        _, s = rms_row(x_ptr + row * stride_xm, r_ptr + row * stride_rm, ro_ptr + row * stride_rom, n_cols, eps,
                       HAS_RES, write_res, NBLOCK)
        rstd = tl.where(tl.arange(0, BM) == i, s, rstd)
    return rstd


@triton.jit
def _input_tile(x_rows, u_rows, offs, mask, nw_ptr, k, k_mask, rstd, PROLOGUE: tl.constexpr):
    """The linear's input at ``offs``: x (PROLOGUE 0); silu(x) * u (1, matmul_triton.silu_mul_input);
    the RMSNorm of x (2) or of x + u (3): the add rounded, then x * rstd * weight[k] rounded, as the
    RMSNorm kernel rounds them."""
    if PROLOGUE >= 2:
        x = tl.load(x_rows + offs, mask=mask, other=0.0)
        if PROLOGUE == 3:
            r = tl.load(u_rows + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        nw = tl.load(nw_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        return (x.to(tl.float32) * rstd * nw).to(x.dtype)
    return silu_mul_input(x_rows, u_rows, offs, mask, PROLOGUE == 1)


@triton.jit
def _leaf_chunk(acc, x_rows, u_rows, w_ptr, sc_ptr, mn_ptr, rn, stride_xk, stride_wn, stride_wk, stride_sn,
                m_ok, n_ok, rk, gl, c, L: tl.constexpr, LEAF: tl.constexpr, NLP: tl.constexpr,
                BK: tl.constexpr, BN: tl.constexpr, EVEN: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr, QTYPE: tl.constexpr, ALIGNED: tl.constexpr, SWAP: tl.constexpr,
                PROLOGUE: tl.constexpr, nw_ptr, rstd):
    """acc + the products of chunk ``c`` of leaf ``gl`` (of this rank's subtree).  Quantized
    weights (QTYPE 1..3, codes of matmul_triton.QCODES) are dequantized in registers to x's
    dtype: by whole 32-blocks where every chunk starts on one (ALIGNED), else per element.
    SWAP: acc [BN, BM] += w [BN, BK] @ x.T [BK, BM] (``x_rows`` then a [1, BM] grid), the same
    products on the same K steps with the MMA's roles of x and w exchanged.  PROLOGUE (``_input_tile``): the
    input is silu(x) * u (``u_rows`` like ``x_rows``) or the RMSNorm of x (+ u) by ``rstd``."""
    if EVEN:     # equal leaves, whole chunks: leaf gl starts at gl * LEAF
        k0 = gl * LEAF + c * BK
        k_end = k0 + BK
    else:
        p = gl // NLP
        j = gl - p * NLP
        k0 = p * L + j * LEAF + c * BK
        k_end = p * L + tl.minimum((j + 1) * LEAF, L)
    k = k0 + rk
    if SWAP:     # K along the x tile's rows and the weight tile's columns
        kx = k[:, None]
        kw = k[None, :]
        wrow = rn[:, None]
        a_mask = m_ok[None, :]
        b_mask = n_ok[:, None]
    else:
        kx = k[None, :]
        kw = k[:, None]
        wrow = rn[None, :]
        a_mask = m_ok[:, None]
        b_mask = n_ok[None, :]
    if not EVEN:
        a_mask = a_mask & (kx < k_end)
        b_mask = b_mask & (kw < k_end)
    a = _input_tile(x_rows, u_rows, kx * stride_xk, a_mask, nw_ptr, kx, kx < k_end, rstd, PROLOGUE)
    if QTYPE == 0:
        b = tl.load(w_ptr + wrow * stride_wn + kw * stride_wk, mask=b_mask, other=0.0)
    elif ALIGNED:
        b = _dequant_blocks(w_ptr, sc_ptr, mn_ptr, rn, n_ok, k0, k_end, stride_wn, stride_sn,
                            QTYPE, BK, BN, SWAP).to(a.dtype)
    else:
        b = _dequant_elems(w_ptr + wrow * stride_wn, sc_ptr + wrow * stride_sn, mn_ptr + wrow * stride_sn,
                           kw, b_mask, QTYPE).to(a.dtype)
    if UPCAST:   # the interpreter's bf16 dot is broken (triton 3.9); bf16 -> fp32 is exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if SWAP:
        acc = tl.dot(b, a, acc, input_precision=PREC)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _round(v, out_ptr):
    """FP32 -> the output's dtype, round to nearest even (as torch's .to)."""
    if out_ptr.dtype.element_ty == tl.float32:
        return v
    return v.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")


@triton.jit
def _store_out(v, out_ptr, rm, n0, M, N, stride_om, stride_on, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr,
               q_width, kv_width, stride_c, stride_cslot, stride_ch, BN: tl.constexpr, SWAP: tl.constexpr,
               ROPE_KV: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store the tile's FP32 root ``v`` ([BN, BM] if SWAP, else [BM, BN]) rounded to the output dtype;
    ROPE_KV: through the rope_kv epilogue (rope_triton.rope_kv_tile) in [BM, BN] orientation."""
    y = _round(v, out_ptr)
    rn = n0 + tl.arange(0, BN)
    if ROPE_KV:
        if SWAP:
            y = tl.trans(y)
        rows = rm[:, None]
        y = rope_kv_tile(y, rows, n0, M, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, q_width, kv_width,
                         stride_c, stride_cslot, stride_ch, BN, HEAD_DIM)
        om = rows
        on = rn[None, :]
    elif SWAP:
        om = rm[None, :]
        on = rn[:, None]
    else:
        om = rm[:, None]
        on = rn[None, :]
    tl.store(out_ptr + om * stride_om + on * stride_on, y, mask=(om < M) & (on < N))


@triton.jit(do_not_specialize=["M"])
def _tbik_kernel(x_ptr, u_ptr, w_ptr, sc_ptr, mn_ptr, out_ptr, ws_ptr, cnt_ptr, M, N,
                 stride_xm, stride_xk, stride_um, stride_wn, stride_wk, stride_sn, stride_om, stride_on,
                 pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, q_width, kv_width, stride_c,
                 stride_cslot, stride_ch, nw_ptr, ro_ptr, stride_rom, n_cols, eps,
                 L: tl.constexpr, LEAF: tl.constexpr, NLP: tl.constexpr,
                 LEAVES: tl.constexpr, DEPTH: tl.constexpr, SPLITS: tl.constexpr,
                 SPILL_TOP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 UNROLL: tl.constexpr, QTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                 SWAP: tl.constexpr, PDL: tl.constexpr, PROLOGUE: tl.constexpr, ROPE_KV: tl.constexpr,
                 HEAD_DIM: tl.constexpr, NBLOCK: tl.constexpr):
    if PDL:      # let the next kernel launch now; wait for the previous one before touching memory
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    split = pid % SPLITS
    tile = pid // SPLITS
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n                     # grouped order: neighbours share x rows in L2
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    if SWAP:     # the tile is [BN, BM]: om / on index its rows of x / of w along their axes
        om = rm[None, :]
        on = rn[:, None]
        zero = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        om = rm[:, None]
        on = rn[None, :]
        zero = tl.zeros((BM, BN), dtype=tl.float32)
    x_rows = x_ptr + om * stride_xm
    u_rows = u_ptr + om * stride_um
    rstd = 1.0
    if PROLOGUE >= 2:   # RMSNorm: each row's inverse RMS over all of K, as the RMSNorm kernel computes it
        rstd = _rows_rstd(x_ptr, u_ptr, ro_ptr, pid_m * BM, M, stride_xm, stride_um, stride_rom, n_cols, eps,
                          (pid_n == 0) & (split == 0), PROLOGUE == 3, BM, NBLOCK)
        if SWAP:
            rstd = rstd[None, :]
        else:
            rstd = rstd[:, None]
    CPL: tl.constexpr = (LEAF + BK - 1) // BK      # chunks per leaf
    EVEN: tl.constexpr = (LEAF % BK == 0) and (L % LEAF == 0)
    PUSH_DEPTH: tl.constexpr = DEPTH - 1 if SPILL_TOP else DEPTH
    acc = zero
    s0, s1, s2, s3, s4, s5 = zero, zero, zero, zero, zero, zero
    if UNROLL:   # leaves unrolled: the stack logic is resolved at compile time
        for g in tl.static_range(LEAVES):
            acc = zero
            for c in range(CPL):
                acc = _leaf_chunk(acc, x_rows, u_rows, w_ptr, sc_ptr, mn_ptr, rn, stride_xk, stride_wn, stride_wk,
                                  stride_sn, m_ok, n_ok, rk, split * LEAVES + g, c, L, LEAF, NLP, BK, BN,
                                  EVEN, PREC, UPCAST, QTYPE, ALIGNED, SWAP, PROLOGUE, nw_ptr, rstd)
            if g < LEAVES - 1:
                top, s0, s1, s2, s3, s4, s5 = _push(acc, g, s0, s1, s2, s3, s4, s5, PUSH_DEPTH)
                if SPILL_TOP:
                    if g == LEAVES // 2 - 1:
                        tl.store(ws_ptr + split * M * N + om * N + on, top, mask=(om < M) & (on < N))
    else:        # one flat loop over the chunks, pipelined across leaf boundaries
        for i in range(LEAVES * CPL):
            g = i // CPL                               # leaf within this program
            c = i - g * CPL                            # chunk within the leaf
            acc = _leaf_chunk(acc, x_rows, u_rows, w_ptr, sc_ptr, mn_ptr, rn, stride_xk, stride_wn, stride_wk,
                              stride_sn, m_ok, n_ok, rk, split * LEAVES + g, c, L, LEAF, NLP, BK, BN,
                              EVEN, PREC, UPCAST, QTYPE, ALIGNED, SWAP, PROLOGUE, nw_ptr, rstd)
            if (c == CPL - 1) & (g < LEAVES - 1):
                top, s0, s1, s2, s3, s4, s5 = _push(acc, g, s0, s1, s2, s3, s4, s5, PUSH_DEPTH)
                if SPILL_TOP:
                    if g == LEAVES // 2 - 1:           # left half of the program's tree is done
                        tl.store(ws_ptr + split * M * N + om * N + on, top, mask=(om < M) & (on < N))
                acc = zero
    root = _drain(acc, s0, s1, s2, s3, s4, s5, PUSH_DEPTH)
    out_mask = (om < M) & (on < N)
    ws_tile = ws_ptr + om * N + on
    if SPILL_TOP:
        root = tl.load(ws_tile + split * M * N, mask=out_mask, other=0.0) + root
    epi = (pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, q_width, kv_width, stride_c, stride_cslot, stride_ch)
    if SPLITS == 1:
        _store_out(root, out_ptr, rm, pid_n * BN, M, N, stride_om, stride_on, *epi, BN, SWAP, ROPE_KV, HEAD_DIM)
    else:
        tl.store(ws_tile + split * M * N, root, mask=out_mask)
        tl.debug_barrier()                         # every thread's store precedes the release
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:                  # last of the tile: combine in split order
            r = (tl.load(ws_tile, mask=out_mask, other=0.0, cache_modifier=".cg")
                 + tl.load(ws_tile + M * N, mask=out_mask, other=0.0, cache_modifier=".cg"))
            if SPLITS >= 4:
                r = r + (tl.load(ws_tile + 2 * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                         + tl.load(ws_tile + 3 * M * N, mask=out_mask, other=0.0, cache_modifier=".cg"))
            if SPLITS == 8:
                r = r + ((tl.load(ws_tile + 4 * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                          + tl.load(ws_tile + 5 * M * N, mask=out_mask, other=0.0, cache_modifier=".cg"))
                         + (tl.load(ws_tile + 6 * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                            + tl.load(ws_tile + 7 * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")))
            _store_out(r, out_ptr, rm, pid_n * BN, M, N, stride_om, stride_on, *epi, BN, SWAP, ROPE_KV, HEAD_DIM)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")   # ready for the next call


# ---- host side ---------------------------------------------------------------------------

_DEVICE_INFO: dict = {}
_COUNTERS: dict = {}


def _device_info(device: torch.device) -> "tuple[int, bool]":
    """(SM count, Hopper?) of a device, looked up once (host overhead per call)."""
    if device.type != "cuda":
        return 132, False
    info = _DEVICE_INFO.get(device.index)
    if info is None:
        info = _DEVICE_INFO[device.index] = (torch.cuda.get_device_properties(device).multi_processor_count,
                                             _is_hopper(device))
    return info


def _counters(device: torch.device) -> torch.Tensor:
    """Per-tile arrival counters of the split combine: zero between calls (the last program
    of each tile resets its own), allocated once per device.  Calls on one device must not run
    concurrently on two streams."""
    key = (device.type, device.index)
    c = _COUNTERS.get(key)
    if c is None:
        c = _COUNTERS[key] = torch.zeros(_N_COUNTERS, dtype=torch.int32, device=device)
    return c


FIXED_CONFIG = Config(64, 64, 4, 4)
DEQUANT_MIN_M = 256   # from this M on (Hopper) a quantized weight is dequantized first (same bits)


SMALL_M = 16                                  # up to this M (Hopper, bf16 x): SMALL_CONFIG
SMALL_CONFIG = Config(16, 128, 4, 4, swap=True)


def pick_config(M: int, N: int, K_local: int, local_leaves: int, qtype: "str | None" = None,
                fixed: bool = False, small_m: int = 0) -> Config:
    """Tile config by M bucket (any wgmma config gives the same bits, checked on H100 by
    bench/tbik_matmul.py; for quantized weights a 32-row mma.sync tile does not, so none is used).
    Large tiles need few stack levels in registers: 128x64 over 8 warps holds acc + 3 levels
    without spilling; 128x128 does not (measured 4-5x slower).  Q8_0 at M <= 64: 64x32 tiles
    (H100, M=1: 9-28 us vs 10-36 for 64x64 on TinyLlama's linears, tbik_matmul_quant.json).
    Up to ``small_m`` rows (SMALL_M on Hopper with bf16 x, else 0) the swapped tile (module
    docstring): same bits; H100, M=1, TinyLlama's 5 linears: Q8_0 137 -> 103 us, BF16 122 -> 118
    (bench/tbik_matmul.py --small; 16x128 over 4 warps the best single config of the 4 tried).
    ``fixed``: FIXED_CONFIG at every M (quantized weights off Hopper, where no GPU run has shown
    that the tiles stay in one bit class: the MMA family and the register layout of a weight
    dequantized in registers differ there)."""
    if fixed:
        return FIXED_CONFIG
    if M <= small_m:
        return SMALL_CONFIG
    if M <= 64:
        return Config(64, 32, 4, 4) if qtype == "q8_0" else FIXED_CONFIG
    return Config(128, 64, 8, 4)


def default_splits(M: int, N: int, cfg: Config, local_leaves: int, n_sm: int, fill: int = 1) -> int:
    """Programs per output tile (a power of two <= the rank's leaves): enough for ``fill``
    programs per SM (quantized weights: 4, more loads in flight; measured on H100 at M=1)."""
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    s = 1
    while s < min(local_leaves, MAX_SPLITS) and tiles * s * 2 <= fill * n_sm and tiles * s * 2 <= _N_COUNTERS:
        s *= 2
    return s


def _dense(w, dtype):
    return w if isinstance(w, torch.Tensor) else w.dequantize(dtype)  # QuantWeight


def _aligned(ts: TreeShape) -> bool:
    """Every K chunk of the tree starts on a 32-block (quantized weights are then read by block)."""
    return ts.piece_len % 32 == 0 and ts.leaf % 32 == 0 and ts.block_k % 32 == 0


@functools.lru_cache(maxsize=4096)
def _plan(M, N, K_local, parts, fp32, splits, config, n_sm, hopper, interpret, max_leaf, qtype, small_m):
    """Grid, kernel keywords and workspace shape of one call (cached: launch overhead;
    ``max_leaf`` is MAX_LEAF, a key only, so that changing the tree is never served stale;
    ``small_m``: rows up to which the swapped tile is picked, 0 where its bits are unchecked)."""
    ts = tree_shape(K_local, parts)
    cfg = config or pick_config(M, N, K_local, ts.local_leaves, qtype, fixed=qtype is not None and not hopper,
                                small_m=small_m)
    if splits is None:
        splits = default_splits(M, N, cfg, ts.local_leaves, n_sm, 1 if qtype is None else 4)
    if splits < 1 or splits & (splits - 1) or splits > min(ts.local_leaves, MAX_SPLITS):
        raise ValueError(f"splits={splits} must be a power of two <= min({ts.local_leaves}, {MAX_SPLITS})")
    leaves = ts.local_leaves // splits
    spill = cfg.spill_top and leaves > 1
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if splits > 1 and tiles > _N_COUNTERS:
        raise ValueError(f"{tiles} output tiles exceed the {_N_COUNTERS} split counters")
    kw = dict(L=ts.piece_len, LEAF=ts.leaf, NLP=ts.leaves_per_piece, LEAVES=leaves, DEPTH=_levels(leaves),
              SPLITS=splits, SPILL_TOP=spill, BM=cfg.block_m, BN=cfg.block_n, BK=ts.block_k, GROUP_M=8,
              PREC="ieee" if fp32 else "tf32", UPCAST=interpret, UNROLL=cfg.unroll,
              QTYPE=QCODES[qtype], ALIGNED=_aligned(ts), SWAP=cfg.swap, num_warps=cfg.num_warps,
              num_stages=cfg.num_stages)
    ws_shape = (splits, M, N) if (splits > 1 or spill) else (1,)
    return (tiles * splits,), kw, ws_shape, splits > 1


def _launch(x, w, parts, out_dtype, splits, config, up=None, rope_kv=None, norm=None):
    """One kernel launch; ``up``, ``rope_kv``: see tbik_matmul; ``norm`` = (residual or None, norm
    weight, eps, residual_out): the RMSNorm prologue (residual_out receives x + residual)."""
    M, K_local = x.shape
    N = w.shape[0]
    n_sm, hopper = _device_info(x.device)
    if isinstance(w, QuantWeight) and hopper and M >= DEQUANT_MIN_M:
        # large M: one dequantize pass (exactly W.dequantize(x.dtype), checked bitwise on H100 by
        # bench/tbik_matmul.py --quant) and the dense tree: the same bits, faster (H100, M=2048:
        # 0.6-0.7x the time of in-register dequantization for every tile of rows)
        w = dequantize(w, x.dtype)
    if isinstance(w, QuantWeight):
        if w.shape[1] != K_local:
            raise ValueError(f"x has K={K_local} but the weight {w.shape}")
        qtype, qs, sc = w.qtype, w.qs, w.scale
        mn = w.min if w.min is not None else sc
        strides = (qs.stride(0), 1, sc.stride(0))
    else:
        if w.dtype != x.dtype:
            raise TypeError(f"x is {x.dtype} but w is {w.dtype}")
        qtype, qs, sc, mn = None, w, w, w
        strides = (w.stride(0), w.stride(1), 0)
    grid, kw, ws_shape, counted = _plan_for(x, N, parts, splits, config, qtype)
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    ws = torch.empty(ws_shape, dtype=torch.float32, device=x.device)
    use_pdl = PDL and x.device.type == "cuda"
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype or up.stride(1) != x.stride(1)):
        raise ValueError(f"up {tuple(up.shape)} {up.dtype} must be laid out as x {tuple(x.shape)} {x.dtype}")
    if rope_kv is not None and kw["SWAP"] and not ROPE_SWAP:   # the rope_kv kernel after the tree
        out = _launch(x, w, parts, out_dtype, splits, config, up, None, norm)
        return rope_kv_qkv(out, rope_kv)
    head_dim, epi = rope_kv if rope_kv is not None else (0, (x,) * 6 + (0,) * 5)
    if rope_kv is not None and (out_dtype != x.dtype or parts != 1 or N != epi[6] + 2 * epi[7] or kw["BN"] % 2):
        raise ValueError("the rope_kv epilogue needs a whole qkv output in x's dtype and an even BLOCK_N")
    prologue, nw, ro, eps = (1 if up is not None else 0), x, x, 0.0
    if norm is not None:
        residual, nw, eps, ro = norm
        if up is not None or parts != 1 or (residual is not None and residual.shape != x.shape):
            raise ValueError("the RMSNorm prologue needs whole rows of x (and a residual shaped as x), no up")
        prologue, up = (2, None) if residual is None else (3, residual)
    _tbik_kernel[grid](x, x if up is None else up, qs, sc, mn, out, ws, _counters(x.device) if counted else ws,
                       M, N, x.stride(0), x.stride(1), 0 if up is None else up.stride(0), *strides, out.stride(0),
                       out.stride(1), *epi, nw, ro, ro.stride(0), K_local, eps, PDL=use_pdl, PROLOGUE=prologue,
                       ROPE_KV=rope_kv is not None, HEAD_DIM=head_dim, NBLOCK=triton.next_power_of_2(K_local), **kw,
                       **({"launch_pdl": True} if use_pdl else {}))
    return out


def _plan_for(x, N, parts, splits, config, qtype):
    n_sm, hopper = _device_info(x.device)
    return _plan(x.shape[0], N, x.shape[1], parts, x.dtype == torch.float32, splits, config, n_sm, hopper,
                 os.environ.get("TRITON_INTERPRET") == "1", MAX_LEAF, qtype,
                 SMALL_M if hopper and x.dtype == torch.bfloat16 else 0)


# The rope_kv epilogue on the swapped small-M tile: off. On the H100 (bench/invariant_fusion_gpu.py,
# 2026-11-23) it gave the bits of tree + rope_kv kernel for Q8_0 at M=1 and 5 and BF16 at M=1, but not
# for BF16 at M=5 (the q outputs; k and v caches equal); cause not found, so small M keeps the RoPE
# kernel.  The large-M tile (checked at M=17, 300) and the batch-invariant GEMM keep the epilogue.
ROPE_SWAP = False
NORM_MAX_M = 16   # the RMSNorm prologue up to this M (each program recomputes its rows' norms over all of K)


def tbik_norm_matmul(x: torch.Tensor, residual: "torch.Tensor | None", norm_weight: torch.Tensor, eps: float, w,
                     rope_kv: "tuple | None" = None, splits: "int | None" = None,
                     config: "Config | None" = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """rmsnorm_triton.rmsnorm(x [+ residual]) @ w.T along the TBIK tree, in x's dtype, and the new
    residual stream (x itself when residual is None); ``rope_kv`` as in tbik_matmul.  One kernel
    (the norm in its prologue) where that gives the RMSNorm kernel's bits: up to NORM_MAX_M rows, in
    a launch of the RMSNorm kernel's num_warps (rms_row reduces in the order of the kernel's layout);
    else the RMSNorm kernel, then tbik_matmul."""
    M, K = x.shape
    qtype = w.qtype if isinstance(w, QuantWeight) else None
    x_ = x if x.stride(1) == 1 else x.contiguous()
    if M <= NORM_MAX_M and (residual is None or residual.stride(1) == 1) and \
            _plan_for(x_, w.shape[0], 1, splits, config, qtype)[1]["num_warps"] == rmsnorm_warps(K):
        ro = x if residual is None else torch.empty_like(x_)
        return _launch(x_, w, 1, x.dtype, splits, config, rope_kv=rope_kv,
                       norm=(residual, norm_weight, eps, ro)), ro
    from exactllm.kernels.rmsnorm_triton import rmsnorm
    h, ro = (rmsnorm(x, norm_weight, eps), x) if residual is None else rmsnorm(x, norm_weight, eps, residual)
    return tbik_matmul(h, w, out_dtype=x.dtype, splits=splits, config=config, rope_kv=rope_kv), ro


def tbik_matmul_partial(x_local: torch.Tensor, w_local, parts: int = 1, splits: "int | None" = None,
                        config: "Config | None" = None, up: "torch.Tensor | None" = None) -> torch.Tensor:
    """This rank's subtree root (FP32 [M, N]) of x @ w.T where the global K is split into
    ``parts`` equal contiguous slices; x_local [M, K/parts], w_local [N, K/parts] (bf16, fp16 or
    fp32 in x's dtype, or a QuantWeight: Q4_0/Q4_1/Q8_0 planes read directly, each weight
    dequantized in registers to x's dtype, so the bits equal those of the dequantized weight).
    ``splits`` (programs per output tile)
    and ``config`` override the launch shape; no choice changes the bits.  ``up``: the input is
    silu(x) * up, as activation_triton.silu_mul gives it (SwiGLU fused into the down projection)."""
    return _launch(x_local, w_local, parts, torch.float32, splits, config, up)


def tbik_matmul(x: torch.Tensor, w, out_dtype: "torch.dtype | None" = None, splits: "int | None" = None,
                config: "Config | None" = None, up: "torch.Tensor | None" = None,
                rope_kv: "tuple | None" = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T along the TBIK tree; FP32 unless ``out_dtype`` (the kernel
    rounds its FP32 root to it on store).  ``up``: as in ``tbik_matmul_partial``.  ``rope_kv``
    (``rope_triton.rope_kv_args``, x 2-D, out_dtype x's): rope_kv in the epilogue of this qkv
    projection (q columns returned rotated, k and v written to the cache), the bits of
    ``rope_triton.rope_kv`` run on the unfused output."""
    lead = x.shape[:-1]
    if up is not None:
        up = up.reshape(-1, up.shape[-1])
    y = _launch(x.reshape(-1, x.shape[-1]), w, 1, out_dtype or torch.float32, splits, config, up, rope_kv)
    return y.reshape(*lead, y.shape[-1])


# ---- torch reference: same signature, same tree, plain matmul per leaf ---------------------

def tbik_matmul_partial_ref(x_local: torch.Tensor, w_local, parts: int = 1, splits: "int | None" = None,
                            config: "Config | None" = None, up: "torch.Tensor | None" = None) -> torch.Tensor:
    """Reference of ``tbik_matmul_partial``: each leaf is a float32 torch matmul over its K
    span, and the leaves are summed along the same tree.  Close to, not bit-equal to, the
    kernel (the order inside a leaf differs); ``splits`` and ``config`` have no effect."""
    x = (x_local if up is None else silu_mul_ref(x_local, up)).float()
    w = _dense(w_local, x_local.dtype).float()   # a quantized weight as the kernel sees it
    ts = tree_shape(x.shape[1], parts)
    L, leaf = ts.piece_len, ts.leaf
    roots = []
    for gl in range(ts.local_leaves):
        p, j = divmod(gl, ts.leaves_per_piece)
        lo, hi = p * L + j * leaf, p * L + min((j + 1) * leaf, L)
        roots.append(x[:, lo:hi] @ w[:, lo:hi].T)
    return combine_partials(roots)


def tbik_matmul_ref(x: torch.Tensor, w, out_dtype: "torch.dtype | None" = None, splits: "int | None" = None,
                    config: "Config | None" = None, up: "torch.Tensor | None" = None,
                    rope_kv: "tuple | None" = None) -> torch.Tensor:
    lead = x.shape[:-1]
    y = tbik_matmul_partial_ref(x.reshape(-1, x.shape[-1]), w, 1,
                                up=None if up is None else up.reshape(-1, up.shape[-1]))
    y = y.reshape(*lead, y.shape[-1])
    y = y if out_dtype is None else y.to(out_dtype)
    return y if rope_kv is None else qkv_rope_kv_ref(y, rope_kv)
