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
