"""The one place that decides the numerics mode.

Kernels never read this module's state: layers receive a ``Numerics`` value and pass
explicit arguments (tile sizes, whether to use the fixed reduction tree) down to kernels.

Modes:
- ``fast``: whatever is fastest (cuBLAS / MKL, batch-size-dependent tiles).
- ``batch_invariant``: every reduction order is independent of the batch size and of
  which other requests share the batch.
- ``tp_invariant`` (TBIK): implies batch_invariant; every K reduction follows one fixed
  binary tree over fixed K tiles, so that a row-parallel layer split over 2^p ranks
  combines the same subtrees in the same order as one rank does.
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("fast", "batch_invariant", "tp_invariant")


@dataclass(frozen=True)
class Numerics:
    mode: str = "fast"
    # Fixed KV split size of attention in the invariant modes (tokens).
    kv_split: int = 64

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"numerics must be one of {', '.join(MODES)}; got {self.mode!r}")

    @property
    def invariant(self) -> bool:
        """True when results must not depend on batch composition."""
        return self.mode != "fast"

    @property
    def tree(self) -> bool:
        """True when K reductions follow the fixed TBIK tree."""
        return self.mode == "tp_invariant"


def resolve(mode: "str | Numerics | None") -> Numerics:
    if isinstance(mode, Numerics):
        return mode
    return Numerics(mode or "fast")
