"""What the Triton-kernel tests share: error bounds per dtype, fresh seeded generators, the
relative error against a float64 reference, NaN-poisoned outputs."""
import random

import torch

# ||out - ref64|| / ||ref64||: float32 data; float16, one rounding of the output (~3e-4 in norm)
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float16]


def fresh_gen():
    """A generator with a fresh seed, and the seed (for the failure message)."""
    seed = random.randrange(1 << 31)
    return torch.Generator().manual_seed(seed), seed


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (an element left unwritten?)"
    return ((a - b).norm() / b.norm()).item()


def poison(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)
