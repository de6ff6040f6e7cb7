"""Programmatic dependent launch (PDL, Hopper and later) for the decode-step kernels.

A kernel launched with ``launch_pdl`` may start while the kernel before it in the stream is
still running, once every program of that kernel has called ``griddepcontrol.launch_dependents``
(or exited); it must then wait (``griddepcontrol.wait``: the previous kernel has finished and its
writes are visible) before it reads anything that kernel may have written. At batch 1 a decode
step is ~170 kernels of a few microseconds each, so the launch gap and the tail of each kernel
are a large share of the step: with PDL the next kernel's launch, and whatever it does before
its wait (the GEMVs load their first weight tile), hide under the previous kernel.

Kernels that take part call ``enter`` first thing: it lets the next kernel launch at once and
then waits for the previous one. That order is safe for any kernel: a dependent launched early
still waits for this kernel's completion before it reads. Only the schedule changes, never the
arithmetic, so results are the same bits with PDL on or off.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = True  # off: every kernel launches after the previous one has finished (for A/B timing)


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL (CUDA only; never under the interpreter)."""
    return ENABLED and device.type == "cuda"


@contextlib.contextmanager
def disabled():
    """Kernels launched inside the block go without PDL (A/B timing in the bench scripts)."""
    global ENABLED
    before, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = before


def launch_kwargs(pdl: bool) -> dict:
    """Extra launch arguments of a kernel whose PDL constexpr is ``pdl``."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def enter(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous kernel's writes (no-op without PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
