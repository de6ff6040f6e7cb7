"""ReaLB: real-time, per-layer, per-step precision balancing of expert-parallel ranks.

From the routing table of this step (every rank has it after the count exchange), each rank's
load is the number of (token, expert) rows its experts must process, and its vision share is
the fraction of those rows that come from vision tokens. A rank whose load exceeds the mean by
more than ``overload_threshold`` and whose vision share exceeds ``modality_threshold`` (paper:
0.7) runs this layer's experts in low precision (FP8 e4m3 on Hopper) for this step: text-heavy
hot ranks are left in BF16 to protect accuracy. No expert moves, nothing is replicated.

``low_precision`` picks the format: "fp8" (e4m3 weights with per-channel scales, activations
quantized per token, FP8 tensor-core GEMMs), "fp4" (weight-only MXFP4 as gguf defines it,
dequantized inside the GEMM kernel, BF16 activations and BF16 tensor-core math) or "nvfp4"
(weight-only NVFP4: gguf's block layout, UE4M3 scales per 16 weights, plus one fp32 scale per
expert; same kernel). Hopper has no FP4 tensor cores, so the FP4 formats only read fewer weight
bytes (4.25 / 4.5 bits per weight); they are less accurate than "fp8" and, on compute-bound
prefill GEMMs, not faster than BF16.

The BF16 -> FP8 (or FP4) weight conversion is issued on a side CUDA stream as soon as the
counts are known, so it runs under the dispatch all-to-all; the expert GEMMs wait on its event.
With ``resident=True`` the low-precision copy is kept between steps instead (costs memory;
reported).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from exactllm.kernels.moe_gemm import LOW_PRECISION_FORMATS, quantize_expert_weights


@dataclass(frozen=True)
class ReaLBConfig:
    overload_threshold: float = 0.2  # overloaded: load > (1 + t) * mean load over ranks
    modality_threshold: float = 0.7  # ... and vision share of its rows > this
    low_precision: str = "fp8"
    resident: bool = False  # keep a low-precision copy of the weights resident
    min_load: int = 0  # rows; below it a rank is launch-bound and low precision buys nothing

    def __post_init__(self):
        if self.low_precision not in LOW_PRECISION_FORMATS:
            raise ValueError(f"low_precision {self.low_precision!r}: use 'fp8', 'fp4' (weight-only MXFP4) "
                             "or 'nvfp4' (weight-only NVFP4); no FP4 tensor cores on Hopper")


def rank_loads(table: torch.Tensor, slots_per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank rows and vision share from a routing table [src ranks, slots, 2 (text, vision)]
    (or [slots, 2]). Returns (load [R] int64, vision_share [R] float64; 0 for an idle rank)."""
    per_slot = table.reshape(-1, table.shape[-2], 2).sum(0).to(torch.int64).cpu()
    per_rank = per_slot.view(-1, slots_per_rank, 2).sum(1)  # [R, 2]
    load = per_rank.sum(1)
    vision = per_rank[:, 1].double() / load.clamp_min(1).double()
    return load, vision


def decide(load: torch.Tensor, vision_share: torch.Tensor, cfg: ReaLBConfig) -> list[bool]:
    """Which ranks run low precision this step."""
    mean = load.double().mean()
    low = ((load.double() > (1.0 + cfg.overload_threshold) * mean)
           & (vision_share > cfg.modality_threshold) & (load >= cfg.min_load))
    return low.tolist()


class ReaLB:
    """The balancer a MoE layer consults once per step (see layers/moe.py)."""

    name = "realb"

    def __init__(self, cfg: ReaLBConfig | None = None, backend: str = "torch"):
        self.cfg = cfg or ReaLBConfig()
        self.backend = backend
        self._side: torch.cuda.Stream | None = None
        self._resident: dict[int, tuple] = {}
        self.last_decision: list[bool] | None = None

    def plan(self, table: torch.Tensor, slots_per_rank: int) -> list[bool]:
        load, vision = rank_loads(table, slots_per_rank)
        self.last_decision = decide(load, vision, self.cfg)
        return self.last_decision

    def start_conversion(self, w13: torch.Tensor, w2: torch.Tensor):
        """Begin BF16 -> FP8 / MXFP4 (``cfg.low_precision``) conversion of this rank's expert
        weights; returns a handle for :meth:`finish`. On CUDA the work goes to a side stream
        and overlaps what the caller issues next (the dispatch all-to-all)."""
        key = id(w13)
        if self.cfg.resident and key in self._resident:
            return self._resident[key], None
        if w13.device.type != "cuda":
            out = self._convert(w13, w2)
            if self.cfg.resident:
                self._resident[key] = out
            return out, None
        main = torch.cuda.current_stream(w13.device)
        if self._side is None:
            self._side = torch.cuda.Stream(w13.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            out = self._convert(w13, w2)
            done = torch.cuda.Event()
            done.record(self._side)
        for t in (*out[0], *out[1]):
            t.record_stream(main)  # freed tensors must not be reused before the GEMMs finish
        if self.cfg.resident:
            self._resident[key] = out
        return out, done

    def _convert(self, w13: torch.Tensor, w2: torch.Tensor):
        fmt = self.cfg.low_precision
        return tuple(quantize_expert_weights(w, self.backend, fmt) for w in (w13, w2))

    @staticmethod
    def finish(handle):
        weights, done = handle
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        return weights

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self._resident.values() for pair in w for t in pair)
