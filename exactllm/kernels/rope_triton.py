"""Rotary embedding applied in place (GGUF adjacent-pair layout, as ``rope.apply_rope_ref``).

One program per token rotates every head of that token: pairs (2i, 2i+1) by the angle
positions[t] * theta_i, read from the float32 cos/sin tables. Elementwise, so invariant.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, n_heads, stride_t, stride_h, stride_c,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * stride_c + i)[None, :]
    s = tl.load(sin_ptr + pos * stride_c + i)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None]
        base = x_ptr + t * stride_t + h[:, None] * stride_h + 2 * i[None, :]
        x0 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
        tl.store(base, (x0 * c - x1 * s).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(base + 1, (x0 * s + x1 * c).to(x_ptr.dtype.element_ty), mask=mask)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] in place (last dim contiguous) and return it."""
    t, h, d = x.shape
    assert x.stride(2) == 1 and d % 2 == 0 and d & (d - 1) == 0, "head_dim must be a contiguous power of two"
    assert cos.stride(1) == 1 and cos.stride() == sin.stride()
    if t:
        block_h = min(triton.next_power_of_2(h), max(1, 2048 // d))
        _rope_kernel[(t,)](x, positions, cos, sin, h, x.stride(0), x.stride(1), cos.stride(0),
                           HALF=d // 2, BLOCK_H=block_h, num_warps=4)
    return x
