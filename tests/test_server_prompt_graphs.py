"""The padded layout of prompt-step CUDA graphs (exactllm/engine/prompt_graphs.py), on CPU.

The graphs themselves need a GPU (bench/prompt_step.py checks them there: graph vs eager
logits); here the layout they replay is checked with the Triton attention kernel under the
interpreter: a step's real rows get the same bits padded to a bucket as unpadded, in fast and
invariant attention, and the padding rows come out as zeros.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
import torch

from exactllm.engine.prompt_graphs import BUCKETS, bucket_for, pack
from exactllm.kernels import attention_triton
from kernel_testing import fresh_gen, poison

i32 = torch.int32


def test_bucket_for():
    assert [bucket_for(t) for t in (1, 16, 17, 2048)] == [16, 16, 32, 2048]
    assert bucket_for(2049) is None
    assert list(BUCKETS) == sorted(BUCKETS) and all(b % 16 == 0 for b in BUCKETS)


def test_pack_layout():
    """Two chunks (a 3-token prompt at positions 0..2, one decode row at position 7) in bucket 8:
    real rows first, sequences 2..7 empty, sequence 8 holds padding rows 4..7 (no context, no slot)."""
    tok, seq = pack([5, 6, 7, 9], [0, 1, 2, 7], [32, 33, 34, 71], [0, 3, 4], [3, 8], 8)
    assert tok.dtype == seq.dtype == np.int32
    assert tok.tolist() == [[5, 6, 7, 9, 0, 0, 0, 0], [0, 1, 2, 7, 0, 0, 0, 0], [32, 33, 34, 71, -1, -1, -1, -1]]
    assert seq[0].tolist() == [0, 3, 4, 4, 4, 4, 4, 4, 4, 8]  # cu_seqlens over 9 sequences
    assert seq[1, :9].tolist() == [3, 8, 0, 0, 0, 0, 0, 0, 0]  # context lengths
    with pytest.raises(AssertionError):
        pack([1] * 9, [0] * 9, [0] * 9, [0, 9], [9], 8)  # more tokens than the bucket


def _case(gen, ctx, q_lens, hq=4, hkv=2, d=16, page=4, dtype=torch.float16):
    n_pages = sum(-(-c // page) for c in ctx) + 2
    kc = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    free = torch.randperm(n_pages, generator=gen).tolist()
    width = max(-(-c // page) for c in ctx)
    tables = [[free.pop() for _ in range(-(-c // page))] for c in ctx]
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=i32)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    q = torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype)
    return q, kc, vc, cu, np.array(ctx), tables


@pytest.mark.parametrize("kw", [{"tiles": (16, 16, 4)}, {"kv_split": 8, "tiles": (16, 16, 4)}])
def test_padded_attention_rows_match(kw):
    """A mixed step (prompt chunks and decode rows) padded as the graphs pad it: real rows
    bitwise equal to the unpadded step, padding rows zero. The check can fail: the same padding
    rows appended to the last real sequence instead move that sequence's rows."""
    gen, seed = fresh_gen()
    q, kc, vc, cu, ctx, tables = _case(gen, [11, 6, 20], [11, 1, 5])
    T, b, n = q.shape[0], 32, len(ctx)
    plain = attention_triton.paged_attention(q, kc, vc, torch.from_numpy(cu).to(i32), torch.from_numpy(ctx).to(i32),
                                             tables, 0.3, out=poison(q.shape, q.dtype), **kw)
    _, seq = pack([0] * T, [0] * T, [0] * T, cu, ctx, b)
    q_pad = torch.cat((q, torch.randn(b - T, *q.shape[1:], generator=gen).to(q.dtype)))
    tables_pad = torch.cat((tables, torch.randint(0, kc.shape[0], (b + 1 - n, tables.shape[1]), generator=gen,
                                                  dtype=i32)))  # stale rows: never read
    padded = attention_triton.paged_attention(q_pad, kc, vc, torch.from_numpy(seq[0]), torch.from_numpy(seq[1, :b + 1]),
                                              tables_pad, 0.3, out=poison(q_pad.shape, q.dtype), **kw)
    assert torch.equal(padded[:T], plain), f"seed {seed}"
    assert not padded[T:].any(), f"seed {seed}"
    # the wrong layout: padding rows as more query rows of the last sequence
    cu_bad = cu.copy()
    cu_bad[-1] += b - T
    bad = attention_triton.paged_attention(q_pad, kc, vc, torch.from_numpy(cu_bad).to(i32),
                                           torch.from_numpy(ctx).to(i32), tables, 0.3, **kw)
    assert not torch.equal(bad[:T], plain), f"seed {seed}: the test cannot tell layouts apart"
