"""Rotary embedding in Triton (GGUF adjacent-pair layout, as ``rope.apply_rope_ref``), optionally
fused with the KV-cache write.

``rope_kv`` does in one launch what a decoder layer needs between the QKV projection and
attention: q rotated in place, k rotated and stored with v at their cache slots (negative
slots, CUDA-graph padding rows, store nothing). ``apply_rope`` is the same kernel with no
cache. Program (t, j) owns BLOCK_H heads of token t: j < the number of q head blocks means q
heads, the rest are K/V heads. Pairs (2i, 2i+1) turn by the angle positions[t] * theta_i read
from the float32 cos/sin tables. Elementwise with one arithmetic (``_rotate``) for every head,
token and call, so invariant in every numerics mode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from exactllm.kernels import pdl


@triton.jit
def _rotate(src, dst, c, s, mask):
    x0 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x0 * c - x1 * s).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + 1, (x0 * s + x1 * c).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def rope_kv_tile(y, rows, n0, M, pos_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr, q_width, kv_width, stride_c,
                 stride_cslot, stride_ch, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``rope_kv`` as the epilogue of a qkv linear: y [BLOCK_M, BLOCK_N] is the output tile (rounded to
    the activation dtype) of rows ``rows`` [BLOCK_M, 1] and columns n0 .. n0 + BLOCK_N (n0 and BLOCK_N
    even; the tile may span heads and the q | k | v sections).  Returns the tile to store: q columns
    rotated, k and v columns unchanged (rope_kv leaves k unrotated); k columns rotated into k_cache,
    v columns copied into v_cache at each row's slot (rows >= M or with a negative slot: none).  The
    rotation is ``_rotate``'s float32 arithmetic on the same rounded inputs, so the bits are those of
    the linear followed by the rope_kv kernel."""
    BM: tl.constexpr = y.shape[0]
    HALF_N: tl.constexpr = BLOCK_N // 2
    row_ok = rows < M
    col0 = n0 + 2 * tl.arange(0, HALF_N)[None, :]                   # first column of each pair
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    i = (col0 % HEAD_DIM) // 2
    rot_ok = row_ok & (col0 < q_width + kv_width)
    c = tl.load(cos_ptr + pos * stride_c + i, mask=rot_ok, other=0.0)
    s = tl.load(sin_ptr + pos * stride_c + i, mask=rot_ok, other=0.0)
    x0, x1 = tl.split(tl.reshape(y, (BM, HALF_N, 2)))
    x0 = x0.to(tl.float32)
    x1 = x1.to(tl.float32)
    r0 = x0 * c - x1 * s
    r1 = x0 * s + x1 * c
    cols = n0 + tl.arange(0, BLOCK_N)[None, :]
    is_q = cols < q_width
    out = tl.where(is_q, tl.reshape(tl.join(r0.to(y.dtype), r1.to(y.dtype)), (BM, BLOCK_N)), y)
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    n_kv = (cols - q_width) % kv_width
    dst = slot * stride_cslot + (n_kv // HEAD_DIM) * stride_ch + n_kv % HEAD_DIM
    keep = row_ok & (slot >= 0) & (cols >= q_width)
    is_k = cols < q_width + kv_width
    k_rot = tl.reshape(tl.join(r0.to(kc_ptr.dtype.element_ty), r1.to(kc_ptr.dtype.element_ty)), (BM, BLOCK_N))
    tl.store(kc_ptr + dst, k_rot, mask=keep & is_k)
    tl.store(vc_ptr + dst, y.to(vc_ptr.dtype.element_ty), mask=keep & (cols < q_width + 2 * kv_width) & ~is_k)
    return out


def rope_kv_args(q_width: int, kv_width: int, head_dim: int, positions, cos, sin, k_cache, v_cache,
                 slot_mapping) -> "tuple[int, tuple]":
    """(HEAD_DIM, the runtime arguments of ``rope_kv_tile`` from pos_ptr to stride_ch) for a qkv output
    of [q_width | kv_width | kv_width] columns, checked as ``rope_kv`` checks them."""
    assert q_width % head_dim == 0 and kv_width % head_dim == 0 and head_dim % 2 == 0
    assert k_cache.stride(1) == k_cache.stride(2) * (kv_width // head_dim) and k_cache.stride(3) == 1
    assert v_cache.stride() == k_cache.stride() and cos.stride(1) == 1 and cos.stride() == sin.stride()
    return head_dim, (positions, cos, sin, slot_mapping, k_cache, v_cache, q_width, kv_width, cos.stride(0),
                      k_cache.stride(1), k_cache.stride(2))


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                    n_q, n_kv, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
                    stride_cslot, stride_ch, HALF: tl.constexpr, BLOCK_H: tl.constexpr, WRITE_KV: tl.constexpr,
                    PDL: tl.constexpr):
    pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    q_blocks = tl.cdiv(n_q, BLOCK_H)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_c + i)[None, :]
    s = tl.load(sin_ptr + pos * stride_c + i)[None, :]
    if j < q_blocks:
        h = j * BLOCK_H + tl.arange(0, BLOCK_H)
        src = q_ptr + t * stride_qt + h[:, None] * stride_qh + 2 * i[None, :]
        _rotate(src, src, c, s, (h < n_q)[:, None])
    elif WRITE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            h = (j - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = (h < n_kv)[:, None]
            dst = slot * stride_cslot + h[:, None] * stride_ch + 2 * i[None, :]
            _rotate(k_ptr + t * stride_kt + h[:, None] * stride_kh + 2 * i[None, :], kc_ptr + dst, c, s, mask)
            d = tl.arange(0, 2 * HALF)
            v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
            tl.store(vc_ptr + slot * stride_cslot + h[:, None] * stride_ch + d[None, :],
                     v.to(vc_ptr.dtype.element_ty), mask=mask)


def _block_h(d: int) -> int:
    return max(1, 256 // d)  # ~128 pairs per program


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    d = x.shape[-1]
    assert x.stride(-1) == 1 and d % 2 == 0 and d & (d - 1) == 0, "head_dim must be a contiguous power of two"
    assert cos.stride(1) == 1 and cos.stride() == sin.stride()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] in place (last dim contiguous) and return it."""
    _check(x, cos, sin)
    t, h, d = x.shape
    if t:
        bh = _block_h(d)
        _rope_kv_kernel[(t, triton.cdiv(h, bh))](
            x, x, x, positions, cos, sin, x, x, positions, h, 0, x.stride(0), x.stride(1), 0, 0, 0, 0,
            cos.stride(0), 0, 0, HALF=d // 2, BLOCK_H=bh, WRITE_KV=False, PDL=False, num_warps=1)
    return x


def rope_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """As ``rope.rope_kv_ref``: rotate q [T, Hq, D] in place and return it; store rotated k and v
    [T, Hkv, D] at their cache slots (rows with a negative slot are skipped). k itself is left
    unrotated. q, k, v may be strided views (of one fused QKV output)."""
    _check(q, cos, sin)
    t, hq, d = q.shape
    hkv = k.shape[1]
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k.shape == v.shape and k.shape[2] == d
    assert k_cache.stride(1) == k_cache.stride(2) * hkv and k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride()
    if t:
        bh = _block_h(d)
        use_pdl = pdl.enabled(q.device)
        _rope_kv_kernel[(t, triton.cdiv(hq, bh) + triton.cdiv(hkv, bh))](
            q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, hq, hkv, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), k_cache.stride(1), k_cache.stride(2),
            HALF=d // 2, BLOCK_H=bh, WRITE_KV=True, PDL=use_pdl, num_warps=1, **pdl.launch_kwargs(use_pdl))
    return q


def rope_kv_qkv(qkv: torch.Tensor, args: tuple) -> torch.Tensor:
    """``rope_kv`` on a qkv output [T, q_width + 2 kv_width] (q rotated in place, k and v to the
    caches), its arguments given as ``rope_kv_args`` returns them: what the ``rope_kv_tile``
    epilogue does, as a kernel of its own (where a linear runs without that epilogue)."""
    d, (positions, cos, sin, slot_mapping, k_cache, v_cache, q_width, kv_width) = args[0], args[1][:8]
    t = qkv.shape[0]
    q, k, v = (p.view(t, -1, d) for p in qkv.split((q_width, kv_width, kv_width), dim=-1))
    rope_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    return qkv
