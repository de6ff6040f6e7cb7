"""TBIK matmul in Triton: y = x @ w.T with the K reduction along one fixed binary tree.

The tree is the one of kernels/tree.py at tile granularity: K is cut into P = k_pieces(K)
equal pieces (P <= 8, the deepest TP split); each piece into T = ceil(L / BLOCK_K) tiles
(BLOCK_K a function of the piece length L only).  A leaf is one ``tl.dot`` of a tile into a
fresh FP32 accumulator.  Inside a program, leaves are merged like a binary counter: a stack of
log2 levels of FP32 partials, where pushing leaf t merges it with the stored partial of every
level whose bit of t is set.  A piece with T < 2^levels tiles is padded with (skipped) zero
leaves: its root folds the remaining stack from the lowest level up.  Piece roots are pushed
on a second counter of log2(P) levels.

Nothing depends on M: tile sizes are fixed, so a row's bits do not depend on the batch.
The top levels of the tree over pieces may be cut at any power of two: across programs
(``splits``, chosen from the grid size to fill the GPU at small M) or across TP ranks
(``parts``); each cut's roots are combined by ``combine_partials`` in order, which is the
same sequence of FP32 additions as the in-program counter.  So TP=1/2/4/8 and every split
give identical bits.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from exactllm.kernels.tree import combine_partials, k_pieces

# Fixed tiles (never chosen by M); 64x64 / 4 warps was fastest on most TinyLlama shapes (H100).
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 64, 4, 3
MAX_TILE_LEVELS = 5   # up to 32 tiles per piece


@triton.jit
def _push(c, i, s0, s1, s2, s3, s4, DEPTH: tl.constexpr):
    """Push node ``c`` as node ``i`` (0-based) of a counter over 2**DEPTH nodes.  Returns the
    carry (the full root after the last push) and the updated stack."""
    if DEPTH > 0:
        if i % 2 == 0:
            s0 = c
        else:
            c = s0 + c
            if DEPTH > 1:
                if (i // 2) % 2 == 0:
                    s1 = c
                else:
                    c = s1 + c
                    if DEPTH > 2:
                        if (i // 4) % 2 == 0:
                            s2 = c
                        else:
                            c = s2 + c
                            if DEPTH > 3:
                                if (i // 8) % 2 == 0:
                                    s3 = c
                                else:
                                    c = s3 + c
                                    if DEPTH > 4:
                                        if (i // 16) % 2 == 0:
                                            s4 = c
                                        else:
                                            c = s4 + c
    return c, s0, s1, s2, s3, s4


@triton.jit
def _fold(c, s0, s1, s2, s3, s4, T: tl.constexpr, DEPTH: tl.constexpr):
    """Root of a counter over 2**DEPTH nodes after T pushes, the missing ones being zeros."""
    if T == (1 << DEPTH):
        r = c
    else:
        r = c   # overwritten below: the lowest set bit of T starts the fold
        if T % 2 == 1:
            r = s0
        if (T // 2) % 2 == 1:
            if T % 2 != 0:
                r = s1 + r
            else:
                r = s1
        if (T // 4) % 2 == 1:
            if T % 4 != 0:
                r = s2 + r
            else:
                r = s2
        if (T // 8) % 2 == 1:
            if T % 8 != 0:
                r = s3 + r
            else:
                r = s3
        if (T // 16) % 2 == 1:
            if T % 16 != 0:
                r = s4 + r
            else:
                r = s4
    return r


@triton.jit
def _tbik_kernel(x_ptr, w_ptr, out_ptr, M, N,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om, stride_on,
                 L: tl.constexpr, T: tl.constexpr, TILE_LEVELS: tl.constexpr,
                 PIECES: tl.constexpr, PIECE_LEVELS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    zero = tl.zeros((BM, BN), dtype=tl.float32)
    s0, s1, s2, s3, s4 = zero, zero, zero, zero, zero
    p0, p1, p2, p3, p4 = zero, zero, zero, zero, zero
    c = zero
    root = zero
    for p in range(PIECES):
        k0 = (pid_s * PIECES + p) * L
        for t in range(T):
            k = t * BK + rk
            if L % BK == 0:
                a_mask = m_ok[:, None]
                b_mask = n_ok[None, :]
            else:
                a_mask = m_ok[:, None] & (k < L)[None, :]
                b_mask = n_ok[None, :] & (k < L)[:, None]
            a = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + k)[None, :] * stride_xk, mask=a_mask, other=0.0)
            b = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + k)[:, None] * stride_wk, mask=b_mask, other=0.0)
            if UPCAST:   # the interpreter's bf16 dot is broken (triton 3.9); bf16 -> fp32 is exact
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            leaf = tl.dot(a, b, input_precision=PREC)
            c, s0, s1, s2, s3, s4 = _push(leaf, t, s0, s1, s2, s3, s4, TILE_LEVELS)
        piece = _fold(c, s0, s1, s2, s3, s4, T, TILE_LEVELS)
        root, p0, p1, p2, p3, p4 = _push(piece, p, p0, p1, p2, p3, p4, PIECE_LEVELS)
    out = out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, root, mask=m_ok[:, None] & n_ok[None, :])


def _levels(n: int) -> int:
    return (n - 1).bit_length()


def block_k_for(piece_len: int) -> int:
    """Leaf tile size along K: the largest of 128/64/32/16 dividing the piece (no masked tail),
    else 64.  A function of K alone, never of M or of the TP split."""
    for bk in (128, 64, 32, 16):
        if piece_len % bk == 0:
            return bk
    return 64


def default_splits(M: int, N: int, local_pieces: int, n_sm: int) -> int:
    """Programs per output tile (a power of two <= local_pieces): enough to fill the GPU."""
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    s = 1
    while s < local_pieces and tiles * s * 2 <= 2 * n_sm:
        s *= 2
    return s


def _tree_shape(K_local: int, parts: int):
    K = K_local * parts
    pieces = k_pieces(K)
    if parts < 1 or parts & (parts - 1) or parts > pieces:
        raise ValueError(f"K={K} cannot be split into {parts} subtrees (tree has {pieces} pieces)")
    L = K // pieces
    bk = block_k_for(L)
    T = triton.cdiv(L, bk)
    if _levels(T) > MAX_TILE_LEVELS:
        raise ValueError(f"K={K}: {T} tiles per piece exceed the {2 ** MAX_TILE_LEVELS} supported")
    return pieces // parts, L, bk, T


def _dense(w, dtype):
    return w if isinstance(w, torch.Tensor) else w.dequantize(dtype)  # QuantWeight


def tbik_matmul_partial(x_local: torch.Tensor, w_local, parts: int = 1, splits: "int | None" = None) -> torch.Tensor:
    """This rank's subtree root (FP32 [M, N]) of x @ w.T where the global K is split into
    ``parts`` equal contiguous slices; x_local [M, K/parts], w_local [N, K/parts] (bf16, fp16 or
    fp32; a QuantWeight is dequantized to x's dtype).  ``splits`` overrides the number of
    programs that share one output tile (any choice gives the same bits)."""
    w_local = _dense(w_local, x_local.dtype)
    if w_local.dtype != x_local.dtype:
        raise TypeError(f"x is {x_local.dtype} but w is {w_local.dtype}")
    M, K_local = x_local.shape
    N = w_local.shape[0]
    local_pieces, L, bk, T = _tree_shape(K_local, parts)
    if splits is None:
        n_sm = (torch.cuda.get_device_properties(x_local.device).multi_processor_count
                if x_local.is_cuda else 132)
        splits = default_splits(M, N, local_pieces, n_sm)
    if splits < 1 or local_pieces % splits or splits & (splits - 1):
        raise ValueError(f"splits={splits} must be a power of two dividing {local_pieces}")
    per_prog = local_pieces // splits
    out = torch.empty((splits, M, N), dtype=torch.float32, device=x_local.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), splits)
    _tbik_kernel[grid](
        x_local, w_local, out, M, N,
        x_local.stride(0), x_local.stride(1), w_local.stride(0), w_local.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        L=L, T=T, TILE_LEVELS=_levels(T), PIECES=per_prog, PIECE_LEVELS=_levels(per_prog),
        BM=BLOCK_M, BN=BLOCK_N, BK=bk, PREC="ieee" if x_local.dtype == torch.float32 else "tf32",
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out[0] if splits == 1 else combine_partials(out)


def tbik_matmul(x: torch.Tensor, w, out_dtype: "torch.dtype | None" = None, splits: "int | None" = None) -> torch.Tensor:
    """x [..., K] @ w[N, K].T along the TBIK tile tree; FP32 unless ``out_dtype``."""
    lead = x.shape[:-1]
    y = tbik_matmul_partial(x.reshape(-1, x.shape[-1]), w, 1, splits)
    y = y.reshape(*lead, y.shape[-1])
    return y if out_dtype is None else y.to(out_dtype)


# ---- torch reference: same signature, same tile tree, plain matmul per tile -------------

def tbik_matmul_partial_ref(x_local: torch.Tensor, w_local, parts: int = 1, splits: "int | None" = None) -> torch.Tensor:
    """Reference of ``tbik_matmul_partial``: each leaf tile is a float32 torch matmul, and the
    tiles and pieces are summed along the same tree (zero tiles padding each piece).  Close to,
    not bit-equal to, the kernel (tile-internal order differs); ``splits`` has no effect."""
    x = x_local.float()
    w = _dense(w_local, torch.float32).float()
    local_pieces, L, bk, T = _tree_shape(x.shape[1], parts)
    Tp = 1 << _levels(T)
    roots = []
    for p in range(local_pieces):
        tiles = [x[:, p * L + t * bk: min(p * L + (t + 1) * bk, (p + 1) * L)]
                 @ w[:, p * L + t * bk: min(p * L + (t + 1) * bk, (p + 1) * L)].T for t in range(T)]
        tiles += [torch.zeros_like(tiles[0])] * (Tp - T)
        roots.append(combine_partials(tiles))
    return combine_partials(roots)


def tbik_matmul_ref(x: torch.Tensor, w, out_dtype: "torch.dtype | None" = None, splits: "int | None" = None) -> torch.Tensor:
    lead = x.shape[:-1]
    y = tbik_matmul_partial_ref(x.reshape(-1, x.shape[-1]), w, 1, splits)
    y = y.reshape(*lead, y.shape[-1])
    return y if out_dtype is None else y.to(out_dtype)
