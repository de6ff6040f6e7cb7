"""Few-row linears, alone or with the op before them fused in: the torch references of
kernels/gemv_triton.py (dense 16-bit weights) and kernels/qgemv_triton.py (a QuantWeight, which
is dequantized to float32 first), same signatures.

- gemv_ref: y = x @ w.T.
- norm_gemv_ref: RMSNorm (with the residual add when ``residual`` is given) then the linear;
  returns the linear's output and the new residual stream (x itself when ``residual`` is None).
- silu_gemv_ref: SwiGLU silu(gate) * up then the linear (the MLP's down projection).
- norm_gemv_swiglu_ref: norm_gemv_ref of the gate/up projection (w = [gate; up]), then SwiGLU of its
  two halves (the MLP's first half, the SwiGLU after the linear instead of before the next one).

Each intermediate is rounded to the activation dtype exactly where the unfused ops round it
(rmsnorm_ref, silu_mul_ref), so the fused kernels compute the same inputs to the product.
"""
from __future__ import annotations

import torch

from exactllm.formats.quant import QuantWeight
from exactllm.kernels.activation import silu_mul_ref
from exactllm.kernels.rmsnorm import rmsnorm_ref


def gemv_ref(x: torch.Tensor, w) -> torch.Tensor:
    """x [M, K] @ w[N, K].T in float32, rounded once to x's dtype (w dense or a QuantWeight)."""
    wf = w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float()
    return (x.float() @ wf.T).to(x.dtype)


def norm_gemv_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  w) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        return gemv_ref(rmsnorm_ref(x, norm_weight, eps), w), x
    h, residual = rmsnorm_ref(x, norm_weight, eps, residual)
    return gemv_ref(h, w), residual


def silu_gemv_ref(gate: torch.Tensor, up: torch.Tensor, w) -> torch.Tensor:
    return gemv_ref(silu_mul_ref(gate, up), w)


def norm_gemv_swiglu_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                         w) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up, residual = norm_gemv_ref(x, residual, norm_weight, eps, w)
    gate, up = gate_up.chunk(2, dim=-1)
    return silu_mul_ref(gate, up), residual
