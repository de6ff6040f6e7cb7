"""The fused decode-step kernels vs their torch references, under the Triton interpreter on CPU:
RoPE + KV-cache write in one kernel, SwiGLU on the strided halves of a fused gate/up output, and
the greedy pick (argmax + its log-prob). Fresh random inputs each run (seed in the message);
outputs are poisoned with NaN first where the kernel writes a fresh tensor.

Bounds: relative error ||out - ref64|| / ||ref64|| against float64 of 1e-5 (float32 data) and
2e-3 (float16: one rounding of the output); the greedy log-prob within 1e-5 absolute of the
float64 log-softmax (a float32 sum over a few hundred terms).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from exactllm.engine.sampler import select_on_device
from exactllm.kernels import activation, activation_triton, rope, rope_triton, sampling, sampling_triton
from exactllm.sampling_params import SamplingParams
from kernel_testing import BOUND, DTYPES, fresh_gen, rel


def rope64(x, pos, d, max_pos=64, base=10000.0):
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * (1.0 / base ** (torch.arange(0, d, 2) / d))
    c, s = ang.cos()[pos][:, None], ang.sin()[pos][:, None]
    xd = x.double()
    return torch.stack((xd[..., 0::2] * c - xd[..., 1::2] * s, xd[..., 0::2] * s + xd[..., 1::2] * c), -1).flatten(-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(6, 2), (5, 5), (9, 3)])
def test_rope_kv_matches_reference(dtype, heads):
    """q rotated in place; rotated k and v land in their cache slots, padding rows (slot -1)
    store nothing, and no other slot changes. q/k/v are views of one fused QKV output."""
    gen, seed = fresh_gen()
    hq, hkv = heads
    T, D = 7, 32
    cos, sin = rope.rope_cache(D, 64, 10000.0)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, generator=gen).to(dtype)
    q, k, v = (part.reshape(T, -1, D) for part in qkv.split((hq * D, hkv * D, hkv * D), dim=-1))
    pos = torch.randint(0, 64, (T,), generator=gen)
    slots = torch.randperm(24, generator=gen)[:T]
    slots[2] = -1
    kc = torch.randn(6, 4, hkv, D, generator=gen).to(dtype)
    vc = torch.randn(6, 4, hkv, D, generator=gen).to(dtype)
    kc_ref, vc_ref, q_in = kc.clone(), vc.clone(), q.clone()
    q_ref = rope.rope_kv_ref(q_in, k, v, pos, cos, sin, kc_ref, vc_ref, slots)
    k_before = k.clone()
    out = rope_triton.rope_kv(q, k, v, pos, cos, sin, kc, vc, slots)
    assert out.data_ptr() == q.data_ptr(), "q is rotated in place"
    assert torch.equal(k, k_before), "k itself is left as it was"
    keep = slots >= 0
    bound = BOUND[dtype]
    for got, ref, ref64 in ((out, q_ref, rope64(q_in, pos, D)),
                            (kc.view(-1, hkv, D)[slots[keep]], kc_ref.view(-1, hkv, D)[slots[keep]],
                             rope64(k[keep], pos[keep], D))):
        assert rel(ref, ref64) <= bound and rel(got, ref64) <= bound, f"seed {seed}"
        assert rel(got, ref) <= 2 * bound, f"seed {seed}"
    assert torch.equal(vc.view(-1, hkv, D)[slots[keep]], v[keep]), f"v copied exactly (seed {seed})"
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots[keep]] = False
    for cache, before in ((kc, kc_ref), (vc, vc_ref)):
        assert torch.equal(cache.view(-1, hkv, D)[untouched], before.view(-1, hkv, D)[untouched]), f"seed {seed}"


def test_apply_rope_is_rope_kv_without_cache():
    """The cache-free entry point rotates exactly as the fused one (one kernel, one arithmetic)."""
    gen, seed = fresh_gen()
    cos, sin = rope.rope_cache(16, 32, 10000.0)
    x = torch.randn(5, 3, 16, generator=gen)
    pos = torch.randint(0, 32, (5,), generator=gen)
    kv = torch.randn(5, 1, 16, generator=gen)
    cache = torch.zeros(2, 4, 1, 16)
    a = rope_triton.apply_rope(x.clone(), pos, cos, sin)
    b = rope_triton.rope_kv(x.clone(), kv, kv, pos, cos, sin, cache, cache.clone(), torch.arange(5))
    assert torch.equal(a, b), f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_on_fused_gate_up_halves(dtype):
    gen, seed = fresh_gen()
    gu = torch.randn(6, 2 * 300, generator=gen).to(dtype) * 3
    gate, up = gu.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    out = activation_triton.silu_mul(gate, up, out=torch.full((6, 300), float("nan"), dtype=dtype))
    gd = gate.double()
    ref64 = gd * torch.sigmoid(gd) * up.double()
    ref = activation.silu_mul_ref(gate, up)
    assert rel(ref, ref64) <= BOUND[dtype] and rel(out, ref64) <= BOUND[dtype], f"seed {seed}"
    assert rel(out, ref) <= 2 * BOUND[dtype], f"seed {seed}"


def random_logits(gen, rows=5, vocab=10000):
    """Two column blocks of 8192 in the kernel: the second partly masked."""
    x = torch.randn(rows, vocab, generator=gen) * 4
    x[1, 17] = x[1, 17 + 8192] = x[1].max() + 1.0  # a tie in one lane: the lowest id wins, as torch.argmax
    x[2, -1] = x[2].max() + 2.0  # the max in the last, partly masked, block
    return x


def test_greedy_pick_matches_reference():
    gen, seed = fresh_gen()
    x = random_logits(gen)
    got = sampling_triton.greedy_pick(x, out=torch.full((5, 2), float("nan"), dtype=torch.float64))
    ref = sampling.greedy_pick_ref(x)
    lp64 = torch.log_softmax(x.double(), -1).gather(1, ref[:, :1].long())[:, 0]
    assert torch.equal(got[:, 0], ref[:, 0]) and got[1, 0] == 17 and got[2, 0] == x.shape[1] - 1, f"seed {seed}"
    assert (ref[:, 1] - lp64).abs().max() <= 1e-5, f"seed {seed}"
    assert (got[:, 1] - lp64).abs().max() <= 1e-5, f"seed {seed}"


def test_greedy_pick_with_given_logprobs_keeps_their_bits():
    """The invariant modes pass the Ops' own log-softmax: the pick only gathers from it, so the
    serving log-prob is that log-softmax's value bit for bit (as the training forward gets it)."""
    gen, seed = fresh_gen()
    x = random_logits(gen)
    lp = torch.log_softmax(x, -1)
    got = sampling_triton.greedy_pick(x, lp)
    assert torch.equal(got, sampling.greedy_pick_ref(x, lp)), f"seed {seed}"
    assert torch.equal(got[:, 1].float(), lp.gather(1, got[:, :1].long())[:, 0]), f"seed {seed}"


def test_select_mixes_greedy_picks_and_sampled_rows():
    """Greedy rows take the pick; sampled rows draw from the logits with their own generator and
    take the log-prob of the drawn token from the given log_softmax."""
    from exactllm.engine.sampler import SeqRandom
    gen, seed = fresh_gen()
    x = random_logits(gen, rows=3)
    picks = sampling.greedy_pick_ref(x)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=0)]
    got = select_on_device(x, picks, params, [SeqRandom(1), SeqRandom(3), SeqRandom(2)],
                           lambda z: torch.log_softmax(z, -1)).tolist()
    assert [got[0][0], got[2][0]] == [int(picks[0, 0]), int(picks[2, 0])]
    assert got[0][1] == picks[0, 1].item()
    tok, lp = int(got[1][0]), got[1][1]
    assert lp == torch.log_softmax(x[1:2], -1)[0, tok].item(), f"seed {seed}"
    again = select_on_device(x, picks, params, [SeqRandom(1), SeqRandom(3), SeqRandom(2)],
                             lambda z: torch.log_softmax(z, -1)).tolist()
    assert again == got, "seeded sampling is reproducible"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_decode_attention_combines_in_kernel(dtype):
    """Fast-mode decode merges its KV splits inside the attention kernel (the last split program
    of each sequence and KV head to arrive): outputs match the reference across many splits,
    a padding row (context 0, as CUDA graphs pad) gets zeros, the arrival counters are back to
    zero after each call, and a second call gives the same bits."""
    from exactllm.kernels import attention, attention_triton
    gen, seed = fresh_gen()
    hq, hkv, d, page = 6, 2, 16, 4
    ctx = [9, 70, 0, 33]
    n_pages = sum(-(-c // page) for c in ctx) + 2
    kc = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    vc = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    free = torch.randperm(n_pages, generator=gen).tolist()
    width = 20  # max_ctx 80: the split from the shapes is 16 keys, up to 5 splits per sequence
    tables = torch.tensor([[free.pop() for _ in range(-(-c // page))] + [0] * (width - -(-c // page)) for c in ctx],
                          dtype=torch.int32)
    q = torch.randn(len(ctx), hq, d, generator=gen).to(dtype)
    cu = torch.arange(len(ctx) + 1, dtype=torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32)
    args = (q, kc, vc, cu, lens, tables, 0.3)
    out = attention_triton.paged_attention(*args, tiles=(16, 16, 4), out=torch.full_like(q, float("nan")))
    assert torch.equal(attention_triton._counters(q.device, 1), torch.zeros_like(attention_triton._counters(q.device, 1)))
    real = [0, 1, 3]
    up = [t.double() if t.is_floating_point() else t for t in args[:6]]
    ref64 = attention.paged_attention_ref(up[0][real], up[1], up[2], torch.arange(4, dtype=torch.int32),
                                          up[4][real], up[5][real], 0.3)
    ref = attention.paged_attention_ref(q[real], kc, vc, torch.arange(4, dtype=torch.int32), lens[real], tables[real], 0.3)
    assert rel(ref, ref64) <= BOUND[dtype] and rel(out[real], ref64) <= BOUND[dtype], f"seed {seed}"
    assert torch.equal(out[2], torch.zeros_like(out[2])), "padding row"
    again = attention_triton.paged_attention(*args, tiles=(16, 16, 4))
    assert torch.equal(again, out), f"seed {seed}"


def test_fast_mode_split_sizes_are_few():
    """SPLIT is a compile-time constant of the attention kernel: fast-mode decode takes powers of
    two and prefill one constant, so new context lengths or batch sizes do not compile new kernels
    (the server's mixed steps did); each split still covers its share of the longest context."""
    from exactllm.kernels.attention_triton import _fast_decode_split
    seen = set()
    for n_seqs in range(1, 300, 7):
        for max_ctx in range(16, 4097, 48):
            split = _fast_decode_split(n_seqs, 4, max_ctx, 64)
            want = max(1, -(-264 // (n_seqs * 4)))
            assert split >= 64 and split & (split - 1) == 0 and split * want >= max_ctx
            seen.add(split)
    assert len(seen) <= 7, seen
