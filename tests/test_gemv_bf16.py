"""The few-row GEMV of kernels/gemv_triton.py (plain, with RMSNorm + residual add, with SwiGLU) vs
its torch references (kernels/gemv.py) and float64, under the Triton interpreter on CPU, and the
fast-mode CUDA dispatch in Ops that routes the decoder's linears to it.

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

from exactllm.kernels import activation_triton, gemv, gemv_triton, rmsnorm_triton
from exactllm.layers import ops as ops_module
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


def mlp_weights(gen, hidden, ffn, dtype):
    return {f"blk.0.ffn_{n}.weight": (torch.randn(*shape, generator=gen) / shape[1] ** 0.5).to(dtype)
            for n, shape in (("gate", (ffn, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn)))}


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls into gemv_triton's entry points."""
    counts = {"gemv": 0, "norm_gemv": 0, "silu_gemv": 0}
    for name in counts:
        real = getattr(gemv_triton, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(gemv_triton, name, counted)
    return counts


@pytest.fixture
def gemv_everywhere(monkeypatch):
    """The fast-mode CUDA policy with our GEMV for every few-row dense linear, SwiGLU fused too."""
    monkeypatch.setattr(ops_module, "GEMV_MAX_M", 8)
    monkeypatch.setattr(ops_module, "GEMV_SWIGLU", True)


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
    assert calls == {"gemv": 0, "norm_gemv": 1, "silu_gemv": 1}
    y_ref, res_ref = plain.forward_norm(x, r, nw, EPS)
    assert torch.equal(res, res_ref)
    s = (x.float() + r.float()).to(DT).double()
    h = norm64(s, nw)
    gate, up = (h @ weights["blk.0.ffn_gate.weight"].double().T), (h @ weights["blk.0.ffn_up.weight"].double().T)
    y64 = (gate * torch.sigmoid(gate) * up) @ weights["blk.0.ffn_down.weight"].double().T
    # two chained linears and three roundings of intermediates: twice the one-linear bound
    assert rel(y_ref, y64) <= 2 * BOUND[DT], f"cpu ops (seed {seed})"
    assert rel(y, y64) <= 2 * BOUND[DT], f"fused cuda ops (seed {seed})"


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
    assert calls == {"gemv": 2, "norm_gemv": 1, "silu_gemv": 0}
    monkeypatch.setattr(ops_module, "GEMV_SWIGLU", True)
    fast.swiglu_linear(torch.randn(m, 128, generator=gen).to(DT), w, TPContext())
    assert calls == {"gemv": 2, "norm_gemv": 1, "silu_gemv": 1}
    inv.linear(x(1), w)  # invariant: the fixed-tile GEMM
    inv.norm_linear(x(1), None, torch.ones(64), EPS, w)
    fast.linear(x(m + 1), w)  # too many rows
    fast.norm_linear(x(m + 1), None, torch.ones(64), EPS, w)
    fast.linear(x(1, torch.float32), w.float())  # float32
    assert calls == {"gemv": 2, "norm_gemv": 1, "silu_gemv": 1}
