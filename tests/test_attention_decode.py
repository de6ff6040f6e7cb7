"""Fast-mode decode attention (kernels/attention_triton.py) where its schedule is unusual: each
program loads its first chunk of keys and values before waiting for the previous kernel and
patches the newest key (position context - 1) in afterwards, and the last split program merges
the partials four at a time. Under the Triton interpreter on CPU, against the float64 reference.

Cases: the newest key at the start, inside and at the end of a first chunk, and in a later chunk
of a split of several chunks; 1 to 9 splits per sequence (two merge groups of four); a padding
row (context 0). Fresh random inputs each run (seed in the message), outputs poisoned with NaN.
Bound: BOUND[dtype] relative error (one rounding of the output in float16).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from exactllm.kernels import attention, attention_triton
from kernel_testing import BOUND, DTYPES, fresh_gen, poison, rel

HQ, HKV, D, PAGE = 6, 2, 16, 4


def decode_case(gen, ctx, width, dtype):
    """q [B, HQ, D] of B decode rows with contexts ``ctx`` over shuffled pages, tables ``width`` wide."""
    n_pages = sum(-(-c // PAGE) for c in ctx) + 2
    kc = torch.randn(n_pages, PAGE, HKV, D, generator=gen).to(dtype)
    vc = torch.randn(n_pages, PAGE, HKV, D, generator=gen).to(dtype)
    free = torch.randperm(n_pages, generator=gen).tolist()
    tables = torch.tensor([[free.pop() for _ in range(-(-c // PAGE))] + [0] * (width - -(-c // PAGE)) for c in ctx],
                          dtype=torch.int32)
    q = torch.randn(len(ctx), HQ, D, generator=gen).to(dtype)
    return q, kc, vc, torch.arange(len(ctx) + 1, dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32), tables


# (contexts, table width, tiles, split): with BLOCK_N 16 and width 40 (max_ctx 160) a split is one
# chunk of 16 keys, up to 9 splits; with BLOCK_N 8 and width 100 (max_ctx 400) a split is 32 keys =
# 4 chunks, up to 7 splits.
CASES = {
    "one_chunk_splits": ([1, 16, 17, 31, 80, 81, 144, 0], 40, (16, 16, 4), 16),
    "four_chunk_splits": ([1, 8, 9, 31, 32, 33, 70, 200], 100, (16, 8, 4), 32),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_decode_attention_matches_reference(dtype, case):
    ctx, width, tiles, split = CASES[case]
    gen, seed = fresh_gen()
    args = decode_case(gen, ctx, width, dtype)
    assert attention_triton._fast_decode_split(len(ctx), HKV, width * PAGE, tiles[1]) == split
    out = attention_triton.paged_attention(*args, 0.3, tiles=tiles, out=poison(args[0].shape, dtype))
    real = [i for i, c in enumerate(ctx) if c > 0]
    up = [t.double() if t.is_floating_point() else t for t in args]
    sel = torch.tensor(real)
    cu = torch.arange(len(real) + 1, dtype=torch.int32)
    ref64 = attention.paged_attention_ref(up[0][sel], up[1], up[2], cu, up[4][sel], up[5][sel], 0.3)
    assert rel(out[sel], ref64) <= BOUND[dtype], f"seed {seed}"
    for i, c in enumerate(ctx):
        if c == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i])), "padding row"
    counters = attention_triton._counters(args[0].device, 1)
    assert torch.equal(counters, torch.zeros_like(counters)), "arrival counters left set"


def test_newest_key_is_read_from_the_cache_after_the_projection_stores_it():
    """The newest key and value of each sequence enter the result (a program that kept a stale
    copy of them would not see a change made to them alone), in every chunk position."""
    gen, seed = fresh_gen()
    ctx, width, tiles, _ = CASES["four_chunk_splits"]
    ctx = [c for c in ctx if c > 0]
    q, kc, vc, cu, lens, tables = decode_case(gen, ctx, width, torch.float32)
    before = attention_triton.paged_attention(q, kc, vc, cu, lens, tables, 0.3, tiles=tiles)
    for s, c in enumerate(ctx):  # the newest slot of every sequence
        page, off = int(tables[s, (c - 1) // PAGE]), (c - 1) % PAGE
        kc[page, off] = torch.randn(HKV, D, generator=gen) * 3
        vc[page, off] = torch.randn(HKV, D, generator=gen) * 3
    after = attention_triton.paged_attention(q, kc, vc, cu, lens, tables, 0.3, tiles=tiles,
                                             out=poison(q.shape, torch.float32))
    ref64 = attention.paged_attention_ref(q.double(), kc.double(), vc.double(), cu, lens, tables, 0.3)
    assert rel(after, ref64) <= BOUND[torch.float32], f"seed {seed}"
    assert all(not torch.allclose(after[s], before[s]) for s in range(len(ctx))), f"seed {seed}"
