"""Linear layers on dense or block-quantized weights: y = x @ w.T."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from exactllm.formats.quant import QuantWeight


def linear_ref(x: torch.Tensor, w: "torch.Tensor | QuantWeight") -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype; quantized weights are dequantized per call."""
    if isinstance(w, QuantWeight):
        w = w.dequantize(x.dtype)
    return F.linear(x, w.to(x.dtype))
