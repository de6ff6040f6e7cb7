"""SwiGLU silu(gate) * up in one pass (torch eager needs four kernels and three temporaries).

gate and up may be strided row views, e.g. the two halves of one fused gate/up projection
output [M, 2F]: rows are addressed by stride, so no copy is made to make them contiguous.
Program (m, j) owns BLOCK columns of row m. Elementwise, so invariant in every numerics mode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from exactllm.kernels import pdl


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, n, stride_g, stride_u, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    silu = g / (1.0 + tl.exp(-g))
    tl.store(o_ptr + row * stride_o + offs, (silu * u).to(o_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """As ``activation.silu_mul_ref``: (silu(gate) * up) in float32, cast to gate's dtype; a new
    contiguous tensor shaped like gate (or ``out``)."""
    assert gate.shape == up.shape
    g2, u2 = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    o2 = out.view(-1, gate.shape[-1])
    rows, n = g2.shape
    if rows and n:
        block = min(1024, triton.next_power_of_2(n))
        use_pdl = pdl.enabled(gate.device)
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](g2, u2, o2, n, g2.stride(0), u2.stride(0), o2.stride(0),
                                                       BLOCK=block, PDL=use_pdl, num_warps=4,
                                                       **pdl.launch_kwargs(use_pdl))
    return out
