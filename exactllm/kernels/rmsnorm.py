"""RMSNorm, optionally fused with the residual add."""
from __future__ import annotations

import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32.

    With ``residual``: first x = x + residual; returns (y, x) so the caller keeps the new
    residual stream. Without: returns y.
    """
    if residual is not None:
        x = x + residual
        new_residual = x
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (y * weight.float()).to(x.dtype)
    return (y, new_residual) if residual is not None else y
