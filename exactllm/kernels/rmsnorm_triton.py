"""RMSNorm (optionally fused with the residual add) in Triton: one row per program.

One program owns one whole row and reduces it with a single ``tl.sum`` over a block of
next_pow2(hidden) lanes, so a row's bits depend only on that row: batch invariant in every
numerics mode. Same signature and float32 math as ``rmsnorm.rmsnorm_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from exactllm.kernels import pdl


@triton.jit
def rms_row(x_row, r_row, ro_row, n_cols, eps, HAS_RES: tl.constexpr, WRITE_RES, BLOCK: tl.constexpr):
    """One row's input (x, or x + residual rounded to x's dtype, stored to ``ro_row`` where
    WRITE_RES) in float32 [BLOCK], and its inverse RMS.  Shared with the invariant linears' norm
    prologue (tree_matmul_triton): the same code in a kernel of the same num_warps reduces in the
    same order (bench/invariant_fusion_gpu.py checks the bits on the GPU)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_row + cols, mask=mask, other=0.0)
        # the add rounds to the activation dtype first, as ``x + residual`` does in the reference
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_row.dtype.element_ty)
        if WRITE_RES:
            tl.store(ro_row + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / n_cols
    return xf, 1.0 / tl.sqrt_rn(mean_sq + eps)


def num_warps(n_cols: int) -> int:
    """The RMSNorm kernel's warps for rows of ``n_cols`` (a fused norm prologue must match them)."""
    return 4 if triton.next_power_of_2(n_cols) <= 2048 else 8


@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, ro_ptr, n_cols, stride_x, stride_r, stride_y, stride_ro,
                    eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    xf, rstd = rms_row(x_ptr + row * stride_x, r_ptr + row * stride_r, ro_ptr + row * stride_ro, n_cols, eps,
                       HAS_RES, True, BLOCK)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (xf * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """As ``rmsnorm_ref``: y, or (y, x + residual) when ``residual`` is given. x is [..., hidden].

    ``out`` / ``residual_out``: optional contiguous outputs shaped like x (tests poison them)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape
    y = torch.empty_like(x2) if out is None else out.view(rows, n)
    block = triton.next_power_of_2(n)
    warps = num_warps(n)
    use_pdl = pdl.enabled(x.device)
    launch = {"PDL": use_pdl, "num_warps": warps, **pdl.launch_kwargs(use_pdl)}
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_res = torch.empty_like(x2) if residual_out is None else residual_out.view(rows, n)
        if rows:
            _rmsnorm_kernel[(rows,)](x2, r2, weight, y, new_res, n, x2.stride(0), r2.stride(0), y.stride(0),
                                     new_res.stride(0), eps, HAS_RES=True, BLOCK=block, **launch)
        return y.view(shape), new_res.view(shape)
    if rows:
        _rmsnorm_kernel[(rows,)](x2, x2, weight, y, y, n, x2.stride(0), 0, y.stride(0), 0, eps,
                                 HAS_RES=False, BLOCK=block, **launch)
    return y.view(shape)
