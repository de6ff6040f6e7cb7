"""The few-row GEMV of kernels/gemv_triton.py (plain, with RMSNorm + residual add, with SwiGLU, with
RoPE + KV-cache write after the qkv projection) vs its torch references (kernels/gemv.py, rope.py) and
float64, under the Triton interpreter on CPU, and the fast-mode CUDA dispatch in Ops that routes the
decoder's linears to it.

Fresh random inputs each run (seed in the message); outputs poisoned with NaN first. float16 stands
in for the 16-bit path (the interpreter's bf16 conversions are not IEEE roundings). Bounds: the
relative error ||y - y64|| / ||y64|| against float64 is at most 2e-3 (one float16 rounding of the
output, ~3e-4 in norm, plus the rounding of the normed / SwiGLU input, as the unfused ops round it);
kernel vs reference at most 2x that. The residual stream a fused norm writes is x + residual rounded
once, so it must equal the reference bitwise.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from exactllm.config import ModelConfig
from exactllm.kernels import activation_triton, gemv, gemv_triton, rmsnorm_triton, rope, rope_triton
from exactllm.layers import ops as ops_module
from exactllm.layers.attention import Attention, AttnBatch
from exactllm.layers.ops import Ops
from exactllm.layers.parallel import TPContext
from exactllm.models.llama import MLP
from exactllm.numerics import Numerics
from kernel_testing import BOUND, fresh_gen, poison, rel

DT = torch.float16
EPS = 1e-5
# N = 40 is no multiple of BLOCK_N 16 (masked rows); K = 600 no multiple of any BLOCK_K (masked
# tail; the prefetched next tile runs past K); M = 11 needs two row blocks of BLOCK_M = 8.
N, K = 40, 600
CONFIGS = [None, (4, 256, 4, 1), (16, 512, 8, 1), (2, 64, 2, 1)]  # None: the module's CONFIGS


def inputs(gen, M):
    x = torch.randn(M, K, generator=gen).to(DT)
    r = torch.randn(M, K, generator=gen).to(DT)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(DT)
    nw = 1.0 + 0.1 * torch.randn(K, generator=gen)
    return x, r, w, nw


def norm64(s, nw):
    s = s.double()
    return s / (s.pow(2).mean(-1, keepdim=True) + EPS).sqrt() * nw.double()


@pytest.mark.parametrize("M", [1, 3, 11])
def test_gemv_matches_reference(M):
    gen, seed = fresh_gen()
    x, _, w, _ = inputs(gen, M)
    y64 = x.double() @ w.double().T
    ref = gemv.gemv_ref(x, w)
    assert rel(ref, y64) <= BOUND[DT], f"reference (seed {seed})"
    for c in CONFIGS:
        y = gemv_triton.gemv(x, w, c, out=poison((M, N), DT))
        assert rel(y, y64) <= BOUND[DT], f"kernel off (seed {seed})"
        assert rel(y, ref) <= 2 * BOUND[DT], f"kernel vs reference (seed {seed})"


@pytest.mark.parametrize("M", [1, 11])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_gemv_matches_reference_and_the_unfused_ops(M, with_residual):
    gen, seed = fresh_gen()
    x, r, w, nw = inputs(gen, M)
    x_in, r_in = x.clone(), r.clone()
    residual = r if with_residual else None
    ref, ref_res = gemv.norm_gemv_ref(x, residual, nw, EPS, w)
    s = (x.float() + r.float()).to(DT) if with_residual else x
    y64 = norm64(s, nw) @ w.double().T
    assert rel(ref, y64) <= BOUND[DT], f"reference (seed {seed})"
    for c in CONFIGS:
        y, res = gemv_triton.norm_gemv(x, residual, nw, EPS, w, c, out=poison((M, N), DT),
                                       residual_out=poison((M, K), DT) if with_residual else None)
        assert rel(y, y64) <= BOUND[DT], f"kernel off (seed {seed})"
        assert rel(y, ref) <= 2 * BOUND[DT], f"kernel vs reference (seed {seed})"
        assert torch.equal(res, ref_res), f"residual stream (seed {seed})"
    assert torch.equal(x, x_in) and torch.equal(r, r_in), "inputs must not be written"
    if with_residual:
        h, res = rmsnorm_triton.rmsnorm(x, nw, EPS, r)
        assert torch.equal(res, ref_res)
    else:
        h = rmsnorm_triton.rmsnorm(x, nw, EPS)
    unfused = gemv_triton.gemv(h, w)
    assert rel(y, unfused) <= 2 * BOUND[DT], f"fused vs rmsnorm kernel + GEMV (seed {seed})"


@pytest.mark.parametrize("M", [1, 6])
def test_silu_gemv_on_the_halves_of_one_gate_up_output(M):
    gen, seed = fresh_gen()
    gate_up = torch.randn(M, 2 * K, generator=gen).to(DT)
    gate, up = gate_up.chunk(2, dim=-1)  # strided views
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(DT)
    ref = gemv.silu_gemv_ref(gate, up, w)
    g64 = gate.double()
    y64 = (g64 * torch.sigmoid(g64) * up.double()) @ w.double().T
    assert rel(ref, y64) <= BOUND[DT], f"reference (seed {seed})"
    unfused = gemv_triton.gemv(activation_triton.silu_mul(gate, up), w)
    for c in CONFIGS:
        y = gemv_triton.silu_gemv(gate, up, w, c, out=poison((M, N), DT))
        assert rel(y, y64) <= BOUND[DT], f"kernel off (seed {seed})"
        assert rel(y, ref) <= 2 * BOUND[DT], f"kernel vs reference (seed {seed})"
        assert rel(y, unfused) <= 2 * BOUND[DT], f"fused vs SwiGLU kernel + GEMV (seed {seed})"


@pytest.mark.parametrize("M,with_residual", [(1, False), (11, True)])
def test_norm_gemv_swiglu_equals_the_unfused_kernels_and_matches_the_reference(M, with_residual):
    """SwiGLU in the gate/up GEMV's epilogue (w = [gate; up], N / 2 = 20 outputs: no multiple of the
    8 outputs of a BLOCK_N 16 program): the bits of norm_gemv with the same config then the SwiGLU
    kernel on its halves; the float64 bound (roundings of gate, up and the output); the same
    residual stream as the reference, bitwise."""
    gen, seed = fresh_gen()
    x, r, w, nw = inputs(gen, M)
    residual = r if with_residual else None
    F = N // 2
    ref, ref_res = gemv.norm_gemv_swiglu_ref(x, residual, nw, EPS, w)
    s = (x.float() + r.float()).to(DT) if with_residual else x
    gate_up64 = norm64(s, nw) @ w.double().T
    g64, u64 = gate_up64[:, :F], gate_up64[:, F:]
    h64 = g64 * torch.sigmoid(g64) * u64
    assert rel(ref, h64) <= BOUND[DT], f"reference (seed {seed})"
    for c in CONFIGS:
        h, res = gemv_triton.norm_gemv_swiglu(x, residual, nw, EPS, w, c, out=poison((M, F), DT))
        assert rel(h, h64) <= BOUND[DT], f"kernel off (seed {seed})"
        assert rel(h, ref) <= 2 * BOUND[DT], f"kernel vs reference (seed {seed})"
        assert torch.equal(res, ref_res), f"residual stream (seed {seed})"
        gate_up, _ = gemv_triton.norm_gemv(x, residual, nw, EPS, w, c)
        unfused = activation_triton.silu_mul(*gate_up.chunk(2, dim=-1))
        assert torch.equal(h, unfused), f"epilogue vs GEMV + SwiGLU kernel, config {c} (seed {seed})"


def test_swiglu_epilogue_refuses_odd_row_blocks_and_odd_weights():
    gen, _ = fresh_gen()
    x, r, w, nw = inputs(gen, 1)
    with pytest.raises(ValueError, match="BLOCK_N"):
        gemv_triton.norm_gemv_swiglu(x, r, nw, EPS, w, (3, 64, 2, 1))
    with pytest.raises(ValueError, match="even"):
        gemv_triton.norm_gemv_swiglu(x, r, nw, EPS, w[:-1])


def mlp_weights(gen, hidden, ffn, dtype):
    return {f"blk.0.ffn_{n}.weight": (torch.randn(*shape, generator=gen) / shape[1] ** 0.5).to(dtype)
            for n, shape in (("gate", (ffn, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn)))}


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls into gemv_triton's entry points."""
    counts = {"gemv": 0, "norm_gemv": 0, "silu_gemv": 0, "norm_gemv_rope_kv": 0, "norm_gemv_swiglu": 0}
    for name in counts:
        real = getattr(gemv_triton, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(gemv_triton, name, counted)
    return counts


@pytest.fixture
def gemv_everywhere(monkeypatch):
    """The fast-mode CUDA policy with our GEMV for every few-row dense linear, SwiGLU fused too (in
    the down projection's prologue: the gate/up epilogue of Ops.norm_mlp off)."""
    monkeypatch.setattr(ops_module, "GEMV_MAX_M", 8)
    monkeypatch.setattr(ops_module, "GEMV_SWIGLU", True)
    monkeypatch.setattr(ops_module, "GEMV_SWIGLU_EPILOGUE", False)


@pytest.mark.parametrize("M", [1, 3])
def test_fast_cuda_mlp_runs_fused_and_agrees_with_the_unfused_cpu_ops(M, calls, gemv_everywhere):
    """Ops for CUDA in fast mode (run here on CPU tensors through the interpreter) sends the
    norm + gate/up and SwiGLU + down of the MLP to the fused GEMVs; the CPU ops run the norm,
    the linears and SwiGLU separately. Same result within the bound."""
    gen, seed = fresh_gen()
    hidden, ffn = 256, 320
    weights = mlp_weights(gen, hidden, ffn, DT)
    x, r = torch.randn(M, hidden, generator=gen).to(DT), torch.randn(M, hidden, generator=gen).to(DT)
    nw = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
    fused = MLP(weights, "blk.0", Ops("cuda", Numerics("fast")), TPContext())
    plain = MLP(weights, "blk.0", Ops("cpu", Numerics("fast")), TPContext())
    y, res = fused.forward_norm(x, r, nw, EPS)
    assert calls == {"gemv": 0, "norm_gemv": 1, "silu_gemv": 1, "norm_gemv_rope_kv": 0, "norm_gemv_swiglu": 0}
    y_ref, res_ref = plain.forward_norm(x, r, nw, EPS)
    assert torch.equal(res, res_ref)
    s = (x.float() + r.float()).to(DT).double()
    h = norm64(s, nw)
    gate, up = (h @ weights["blk.0.ffn_gate.weight"].double().T), (h @ weights["blk.0.ffn_up.weight"].double().T)
    y64 = (gate * torch.sigmoid(gate) * up) @ weights["blk.0.ffn_down.weight"].double().T
    # two chained linears and three roundings of intermediates: twice the one-linear bound
    assert rel(y_ref, y64) <= 2 * BOUND[DT], f"cpu ops (seed {seed})"
    assert rel(y, y64) <= 2 * BOUND[DT], f"fused cuda ops (seed {seed})"


@pytest.mark.parametrize("M", [2])
def test_fast_cuda_norm_mlp_runs_swiglu_in_the_gate_up_epilogue(M, calls, monkeypatch):
    """Ops.norm_mlp for CUDA in fast mode (CPU tensors through the interpreter) runs the norm, gate/up
    and SwiGLU as one GEMV (norm_gemv_swiglu) and the down projection as a plain GEMV, with the bits
    of its unfused fast path (GEMV_SWIGLU_EPILOGUE off: norm GEMV, SwiGLU kernel, GEMV) and within
    the bound of the CPU ops (norm, linears and SwiGLU separately)."""
    monkeypatch.setattr(ops_module, "GEMV_MAX_M", 8)
    gen, seed = fresh_gen()
    hidden, ffn = 256, 320
    wt = mlp_weights(gen, hidden, ffn, DT)
    w_gate_up = torch.cat((wt["blk.0.ffn_gate.weight"], wt["blk.0.ffn_up.weight"]))
    w_down = wt["blk.0.ffn_down.weight"]
    x, r = torch.randn(M, hidden, generator=gen).to(DT), torch.randn(M, hidden, generator=gen).to(DT)
    nw = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
    fast = Ops("cuda", Numerics("fast"))
    y, res = fast.norm_mlp(x, r, nw, EPS, w_gate_up, w_down, TPContext())
    assert calls == {"gemv": 1, "norm_gemv": 0, "silu_gemv": 0, "norm_gemv_rope_kv": 0, "norm_gemv_swiglu": 1}
    monkeypatch.setattr(ops_module, "GEMV_SWIGLU_EPILOGUE", False)
    y_unfused, res_unfused = fast.norm_mlp(x, r, nw, EPS, w_gate_up, w_down, TPContext())
    assert calls == {"gemv": 2, "norm_gemv": 1, "silu_gemv": 0, "norm_gemv_rope_kv": 0, "norm_gemv_swiglu": 1}
    assert torch.equal(y, y_unfused) and torch.equal(res, res_unfused), f"seed {seed}"
    y_cpu, res_cpu = Ops("cpu", Numerics("fast")).norm_mlp(x, r, nw, EPS, w_gate_up, w_down, TPContext())
    assert torch.equal(res, res_cpu)
    assert rel(y, y_cpu) <= 2 * BOUND[DT], f"seed {seed}"


def test_gemv_is_used_only_in_fast_mode_for_few_rows_of_16_bit_dense_weights(calls, monkeypatch):
    gen, _ = fresh_gen()
    w = (torch.randn(24, 64, generator=gen) / 8).to(DT)
    fast, inv = Ops("cuda", Numerics("fast")), Ops("cuda", Numerics("batch_invariant"))
    m = ops_module.GEMV_MAX_M

    def x(rows, dtype=DT):
        return torch.randn(rows, 64, generator=gen).to(dtype)
    fast.norm_linear(x(m), x(m), torch.ones(64), EPS, w)
    fast.linear(x(m), w)
    monkeypatch.setattr(ops_module, "GEMV_SWIGLU", False)
    fast.swiglu_linear(torch.randn(m, 128, generator=gen).to(DT), w, TPContext())  # SwiGLU kernel + GEMV
    assert calls == {"gemv": 2, "norm_gemv": 1, "silu_gemv": 0, "norm_gemv_rope_kv": 0, "norm_gemv_swiglu": 0}
    monkeypatch.setattr(ops_module, "GEMV_SWIGLU", True)
    fast.swiglu_linear(torch.randn(m, 128, generator=gen).to(DT), w, TPContext())
    assert calls == {"gemv": 2, "norm_gemv": 1, "silu_gemv": 1, "norm_gemv_rope_kv": 0, "norm_gemv_swiglu": 0}
    inv.linear(x(1), w)  # invariant: the fixed-tile GEMM
    inv.norm_linear(x(1), None, torch.ones(64), EPS, w)
    fast.linear(x(m + 1), w)  # too many rows
    fast.norm_linear(x(m + 1), None, torch.ones(64), EPS, w)
    fast.linear(x(1, torch.float32), w.float())  # float32
    assert calls == {"gemv": 2, "norm_gemv": 1, "silu_gemv": 1, "norm_gemv_rope_kv": 0, "norm_gemv_swiglu": 0}


# qkv with RoPE + KV write: 3 q heads and 1 kv head of 16 (N = 80 rows), K = 96; 24 cache slots.
HQ, HKV, HD, QK, SLOTS = 3, 1, 16, 96, 24


def rope_kv_case(gen, M):
    x = torch.randn(M, QK, generator=gen).to(DT)
    r = torch.randn(M, QK, generator=gen).to(DT)
    w = (torch.randn((HQ + 2 * HKV) * HD, QK, generator=gen) / QK ** 0.5).to(DT)
    nw = 1.0 + 0.1 * torch.randn(QK, generator=gen)
    cos, sin = rope.rope_cache(HD, 64, 10000.0)
    positions = torch.randint(0, 64, (M,), generator=gen)
    slots = torch.randperm(SLOTS, generator=gen)[:M]
    if M > 1:
        slots[1] = -1  # a CUDA-graph padding row: stores nothing
    caches = [torch.randn(SLOTS // 4, 4, HKV, HD, generator=gen).to(DT) for _ in range(2)]
    return x, r, w, nw, cos, sin, positions, slots, caches


def rope_spec(cos, sin, positions, slots, caches):
    return gemv_triton.RopeKV(HQ * HD, HKV * HD, HD, positions, cos, sin, caches[0], caches[1], slots)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_gemv_rope_kv_equals_the_unfused_kernels_and_matches_the_reference(M, with_residual):
    """RoPE and the KV write in the qkv GEMV's epilogue: the same bits as norm_gemv then rope_kv (the
    rotation is the same float32 arithmetic on the same rounded outputs), caches included; close to the
    torch reference; padding rows and other slots untouched."""
    gen, seed = fresh_gen()
    x, r, w, nw, cos, sin, positions, slots, caches = rope_kv_case(gen, M)
    residual = r if with_residual else None
    ref_caches = [c.clone() for c in caches]
    ref, ref_res = rope.norm_gemv_rope_kv_ref(x, residual, nw, EPS, w, rope_spec(cos, sin, positions, slots, ref_caches))
    unfused_caches = [c.clone() for c in caches]
    qkv, res_unfused = gemv_triton.norm_gemv(x, residual, nw, EPS, w)
    q, k, v = (p.view(M, -1, HD) for p in qkv.split((HQ * HD, HKV * HD, HKV * HD), dim=-1))
    rope_triton.rope_kv(q, k, v, positions, cos, sin, *unfused_caches, slots)
    fused_caches = [c.clone() for c in caches]
    y, res = gemv_triton.norm_gemv_rope_kv(x, residual, nw, EPS, w, rope_spec(cos, sin, positions, slots, fused_caches),
                                           out=poison(qkv.shape, DT))
    assert torch.equal(y, qkv), f"qkv output (seed {seed})"
    assert torch.equal(res, res_unfused) and torch.equal(res, ref_res), f"residual stream (seed {seed})"
    for fused, unfused, before, ref_cache in zip(fused_caches, unfused_caches, caches, ref_caches):
        assert torch.equal(fused, unfused), f"cache (seed {seed})"
        keep = slots[slots >= 0]
        untouched = torch.ones(SLOTS, dtype=torch.bool)
        untouched[keep] = False
        assert torch.equal(fused.view(SLOTS, -1)[untouched], before.view(SLOTS, -1)[untouched]), f"seed {seed}"
        assert rel(fused.view(SLOTS, -1)[keep], ref_cache.view(SLOTS, -1)[keep]) <= 2 * BOUND[DT], f"seed {seed}"
    assert rel(y, ref) <= 2 * BOUND[DT], f"kernel vs reference (seed {seed})"


def test_rope_kv_epilogue_refuses_blocks_that_split_a_head_or_a_pair():
    gen, _ = fresh_gen()
    x, r, w, nw, cos, sin, positions, slots, caches = rope_kv_case(gen, 1)
    with pytest.raises(ValueError, match="BLOCK_N"):
        gemv_triton.norm_gemv_rope_kv(x, r, nw, EPS, w, rope_spec(cos, sin, positions, slots, caches), (3, 64, 2, 1))
    bad = gemv_triton.RopeKV(HQ * HD, HKV * HD - 2, HD, positions, cos, sin, *caches, slots)
    with pytest.raises(ValueError, match="whole heads"):
        gemv_triton.norm_gemv_rope_kv(x, r, nw, EPS, w, bad)


class QKNormAttention(Attention):
    """Stands for a model that normalizes q and k between the projection and RoPE (Qwen3)."""

    def normalize_qk(self, q, k):
        return q, k


def attention_layer(seed, ops, cls=Attention):
    gen = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(arch="llama", vocab=64, hidden=QK, n_layers=1, n_heads=HQ, n_kv_heads=HKV, ffn=32,
                      head_dim=HD, max_context=64)
    weights = {f"blk.0.attn_{n}.weight": (torch.randn(rows, QK, generator=gen) / QK ** 0.5).to(DT)
               for n, rows in (("q", HQ * HD), ("k", HKV * HD), ("v", HKV * HD))}
    weights["blk.0.attn_output.weight"] = (torch.randn(QK, HQ * HD, generator=gen) / (HQ * HD) ** 0.5).to(DT)
    return cls(cfg, weights, "blk.0", ops, TPContext())


def test_fast_cuda_attention_fuses_rope_into_the_qkv_gemv_and_agrees_with_the_cpu_ops(calls):
    """Attention.forward_norm on the fast CUDA ops (run on CPU tensors through the interpreter) makes
    one norm_gemv_rope_kv call instead of norm_gemv + rope_kv, and gives what the CPU ops give (which
    run norm, linear and RoPE separately) within the bound, caches included. A model with a q/k norm
    between projection and RoPE takes the step-by-step path (norm_gemv, then RoPE)."""
    gen, seed = fresh_gen()
    x, r, _, nw, cos, sin, _, slots, caches = rope_kv_case(gen, 1)
    positions = torch.tensor([5])
    batch = AttnBatch(torch.tensor([0, 1]), positions + 1, torch.arange(SLOTS // 4)[None, :], torch.tensor([5]))
    for c in caches:
        c.view(SLOTS, -1)[:5] = torch.randn(5, HKV * HD, generator=gen).to(DT)
    fast = attention_layer(seed, Ops("cuda", Numerics("fast")))
    plain = attention_layer(seed, Ops("cpu", Numerics("fast")))
    cpu_caches = [c.clone() for c in caches]
    y, res = fast.forward_norm(x, r, nw, EPS, positions, batch, caches, (cos, sin))
    assert calls["norm_gemv_rope_kv"] == 1 and calls["norm_gemv"] == 0
    y_ref, res_ref = plain.forward_norm(x, r, nw, EPS, positions, batch, cpu_caches, (cos, sin))
    assert torch.equal(res, res_ref), f"seed {seed}"
    assert rel(y, y_ref) <= 4 * BOUND[DT], f"attention output (seed {seed})"
    for got, want in zip(caches, cpu_caches):
        assert rel(got, want) <= 2 * BOUND[DT], f"caches (seed {seed})"
    qk_norm = attention_layer(seed, Ops("cuda", Numerics("fast")), QKNormAttention)
    y_steps, _ = qk_norm.forward_norm(x, r, nw, EPS, positions, batch, [c.clone() for c in caches], (cos, sin))
    assert calls["norm_gemv_rope_kv"] == 1 and calls["norm_gemv"] == 1
    assert torch.equal(y_steps, y), f"the step-by-step kernels give the fused path's bits (seed {seed})"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops_module, "GEMV_ROPE", False)  # the policy switch: norm GEMV, then the RoPE kernel
        y_off, _ = fast.forward_norm(x, r, nw, EPS, positions, batch, [c.clone() for c in caches], (cos, sin))
    assert calls["norm_gemv_rope_kv"] == 1 and calls["norm_gemv"] == 2
    assert torch.equal(y_off, y), f"seed {seed}"
