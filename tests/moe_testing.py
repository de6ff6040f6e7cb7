"""Helpers shared by the MoE kernel tests."""
from __future__ import annotations

import torch

COUNTS = [5, 0, 23, 1, 17]  # rows per expert: an empty expert, a one-row expert, rows across tile boundaries


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def offsets(counts: list[int]) -> torch.Tensor:
    """Expert row offsets [E + 1] from per-expert row counts."""
    o = torch.zeros(len(counts) + 1, dtype=torch.int64)
    o[1:] = torch.tensor(counts).cumsum(0)
    return o


def expert_weights(E: int, H: int, Fd: int, seed: int | None = None, dtype=torch.float32):
    """Random SwiGLU expert weights w13 [E, 2 Fd, H] and w2 [E, H, Fd], scaled by 1/sqrt(fan-in);
    seed None draws from the global generator."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * Fd, H, generator=g).to(dtype) * H ** -0.5,
            torch.randn(E, H, Fd, generator=g).to(dtype) * Fd ** -0.5)
