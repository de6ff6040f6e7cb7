"""Greedy pick in Triton (as ``sampling.greedy_pick_ref``): one program per row, one pass over
the vocabulary in wide blocks (16 warps x 16 columns per thread, within the 128 registers a
thread may hold at 16 warps): a 32k vocabulary is four iterations, each a memory round trip.

Each lane keeps its running max, the first index where it occurred, and the sum of exp(x - max)
rescaled as the max grows (online softmax); lanes are merged at the end. The chosen token's
log-prob is x[tok] - logsumexp(x) = -log(sum exp(x - max)). One row per program, so a row's
bits do not depend on the batch; the summation order differs from torch.log_softmax's, so the
invariant modes pass torch's log-softmax in (``logprobs``) and only the argmax and gather run here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from exactllm.kernels import pdl


@triton.jit
def _greedy_kernel(x_ptr, lp_ptr, out_ptr, V, stride_x, stride_lp, HAS_LP: tl.constexpr, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    idx = tl.zeros((BLOCK,), tl.int32)
    s = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + offs
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        better = x > m
        if not HAS_LP:
            m_new = tl.maximum(m, x)
            ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # lanes with only masked columns add 0
            s = s * tl.exp(m - ref) + tl.exp(x - ref)
        m = tl.where(better, x, m)
        idx = tl.where(better, cols, idx)
    mx = tl.max(m, axis=0)
    tok = tl.min(tl.where(m == mx, idx, V), axis=0)
    if HAS_LP:
        lp = tl.load(lp_ptr + row * stride_lp + tok)
    else:
        lp = -tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    tl.store(out_ptr + row * 2, tok.to(tl.float64))
    tl.store(out_ptr + row * 2 + 1, lp.to(tl.float64))


def greedy_pick(logits: torch.Tensor, logprobs: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """[S, 2] float64 (argmax token, its log-prob) of logits [S, V] (last dim contiguous)."""
    S, V = logits.shape
    assert logits.stride(1) == 1 and (logprobs is None or logprobs.stride(1) == 1)
    out = torch.empty(S, 2, dtype=torch.float64, device=logits.device) if out is None else out
    if S:
        lp = logprobs if logprobs is not None else logits
        use_pdl = pdl.enabled(logits.device)
        _greedy_kernel[(S,)](logits, lp, out, V, logits.stride(0), lp.stride(0), HAS_LP=logprobs is not None,
                             BLOCK=min(8192, triton.next_power_of_2(V)), PDL=use_pdl, num_warps=16,
                             **pdl.launch_kwargs(use_pdl))
    return out
