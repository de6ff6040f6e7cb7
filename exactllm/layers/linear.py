"""Linear layer over a dense or block-quantized weight, sharded for tensor parallelism.

The weight stays in its stored form (GGUF blocks for Q4_0/Q4_1/Q8_0); kernels dequantize
inside (GPU) or per call (CPU reference), so the model is never expanded to FP32 as a whole.
"""
from __future__ import annotations

import torch
from torch import nn

from exactllm.formats.quant import QuantWeight
from exactllm.layers.parallel import TPContext


def shard_weight(w: "torch.Tensor | QuantWeight", dim: int, tp: TPContext):
    """This rank's part of w along dim (0: output rows, column-parallel; 1: K, row-parallel)."""
    if tp.world == 1:
        return w
    if isinstance(w, QuantWeight):
        return w.shard(dim, tp.rank, tp.world)
    start, end = tp.shard_range(w.shape[dim])
    return w.narrow(dim, start, end - start).contiguous()


def concat_rows(weights: list) -> "torch.Tensor | QuantWeight":
    """Stack weights [N_i, K] into one [sum N_i, K] so several projections of the same input run
    as one matmul (q/k/v, gate/up). Each output element's arithmetic is unchanged."""
    if isinstance(weights[0], QuantWeight):
        mins = [w.min for w in weights]
        return QuantWeight(weights[0].qtype, (sum(w.shape[0] for w in weights), weights[0].shape[1]),
                           torch.cat([w.qs for w in weights]), torch.cat([w.scale for w in weights]),
                           None if mins[0] is None else torch.cat(mins))
    return torch.cat(weights)


class Linear(nn.Module):
    """Holds one weight [N, K]; dense weights are Parameters (so training can use them),
    quantized ones are buffers (their planes move with .to(device))."""

    def __init__(self, weight: "torch.Tensor | QuantWeight"):
        super().__init__()
        if isinstance(weight, QuantWeight):
            self.qtype = weight.qtype
            self.shape = weight.shape
            self.register_buffer("qs", weight.qs)
            self.register_buffer("scale", weight.scale)
            self.register_buffer("qmin", weight.min)
            self.weight = None
        else:
            self.qtype = None
            self.shape = tuple(weight.shape)
            self.weight = nn.Parameter(weight, requires_grad=False)
        self.compute_dtype = None  # set by hold_float32_master: the dtype the forward computes in
        self._quant = None  # the QuantWeight view of the buffers, built once per device move

    def hold_float32_master(self) -> None:
        """Training: keep a dense weight as a float32 master and compute with its rounding to the
        serving dtype. The rounding of a weight that came in that dtype is exact, so the forward's
        bits are the server's; optimizer steps accumulate in float32; and every trainable
        parameter is float32 like the RMSNorm gains, which FSDP needs (one dtype per unit)."""
        if self.weight is not None and self.weight.dtype != torch.float32:
            self.compute_dtype = self.weight.dtype
            self.weight = nn.Parameter(self.weight.detach().float(), requires_grad=self.weight.requires_grad)

    def _apply(self, fn, *args, **kwargs):
        self._quant = None  # buffers are replaced by .to()/.cuda(): rebuild the view
        return super()._apply(fn, *args, **kwargs)

    @property
    def value(self) -> "torch.Tensor | QuantWeight":
        if self.qtype is None:
            return self.weight if self.compute_dtype is None else self.weight.to(self.compute_dtype)
        if self._quant is None:
            self._quant = QuantWeight(self.qtype, self.shape, self.qs, self.scale, self.qmin)
        return self._quant

    def extra_repr(self) -> str:
        return f"shape={self.shape}, type={self.qtype or self.weight.dtype}"
