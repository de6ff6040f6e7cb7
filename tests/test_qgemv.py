"""The quantized few-row GEMV of kernels/qgemv_triton.py (plain, with RMSNorm [+ residual add], with
SwiGLU) on Q4_0 / Q4_1 / Q8_0 weights vs its torch references (kernels/gemv.py, which dequantize the
QuantWeight to float32) and float64, under the Triton interpreter on CPU; and the fast-mode CUDA
routing in Ops that sends few-row quantized linears to it.

Fresh random inputs each run (seed in the message); outputs poisoned with NaN first. float16 stands in
for the 16-bit path (the interpreter's bf16 conversions are not IEEE roundings). Bounds: ||y - y64|| /
||y64|| against float64 on the dequantized weight at most 2e-3 (one float16 rounding of the output,
~3e-4 in norm, plus the rounding of the normed / SwiGLU input as the unfused ops round it); kernel vs
reference at most 2x that; float32 activations 1e-5. The residual stream of a fused norm is x + residual
rounded once, so it equals the reference bitwise. The interpreter runs the kernel's portable unpacking
(shifts, masks, bitcast); on CUDA the same exact values come from prmt (bench/gemv_quant.py checks it).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import activation_triton, gemv, qgemv_triton, rmsnorm_triton
from exactllm.layers import ops as ops_module
from exactllm.layers.ops import Ops
from exactllm.layers.parallel import TPContext
from exactllm.numerics import Numerics
from kernel_testing import BOUND, fresh_gen, poison, rel

QTYPES = ["q4_0", "q4_1", "q8_0"]
DT = torch.float16
EPS = 1e-5
# N = 10 is no multiple of BLOCK_N 4 (masked weight rows); K = 224 is 7 blocks, no multiple of NB 2 or 4
# (masked blocks; the prefetched next tile runs past K); M = 3 fills 3 of a 4-row block.
N, K = 10, 224
# None: the module's CONFIGS; (BLOCK_N, NB, num_warps) several tiles per row, one tile per row
CONFIGS = [None, (4, 2, 1), (2, 8, 1)]


def weight(gen, qtype, n=N, k=K):
    return QuantWeight.quantize(torch.randn(n, k, generator=gen), qtype)


def acts(gen, M, dtype=DT):
    return torch.randn(M, K, generator=gen).to(dtype), torch.randn(M, K, generator=gen).to(dtype)


def norm64(s, nw):
    s = s.double()
    return s / (s.pow(2).mean(-1, keepdim=True) + EPS).sqrt() * nw.double()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("M", [1, 3])
def test_gemv_matches_reference(qtype, M):
    gen, seed = fresh_gen()
    W, (x, _) = weight(gen, qtype), acts(gen, M)
    y64 = x.double() @ W.dequantize(torch.float64).T
    ref = gemv.gemv_ref(x, W)
    assert rel(ref, y64) <= BOUND[DT], f"reference (seed {seed})"
    for c in CONFIGS:
        y = qgemv_triton.gemv(x, W, c, out=poison((M, N), DT))
        assert rel(y, y64) <= BOUND[DT], f"{c}: kernel off (seed {seed})"
        assert rel(y, ref) <= 2 * BOUND[DT], f"{c}: kernel vs reference (seed {seed})"


@pytest.mark.parametrize("qtype", QTYPES)
def test_float32_activations(qtype):
    gen, seed = fresh_gen()
    W, (x, _) = weight(gen, qtype), acts(gen, 2, torch.float32)
    y = qgemv_triton.gemv(x, W, out=poison((2, N), torch.float32))
    assert rel(y, x.double() @ W.dequantize(torch.float64).T) <= BOUND[torch.float32], f"seed {seed}"


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_gemv_matches_reference_and_the_unfused_ops(qtype, with_residual):
    gen, seed = fresh_gen()
    M = 3
    W, (x, r) = weight(gen, qtype), acts(gen, M)
    nw = 1.0 + 0.1 * torch.randn(K, generator=gen)
    x_in, r_in = x.clone(), r.clone()
    residual = r if with_residual else None
    ref, ref_res = gemv.norm_gemv_ref(x, residual, nw, EPS, W)
    s = (x.float() + r.float()).to(DT) if with_residual else x
    y64 = norm64(s, nw) @ W.dequantize(torch.float64).T
    assert rel(ref, y64) <= BOUND[DT], f"reference (seed {seed})"
    for c in CONFIGS:
        y, res = qgemv_triton.norm_gemv(x, residual, nw, EPS, W, c, out=poison((M, N), DT),
                                        residual_out=poison((M, K), DT) if with_residual else None)
        assert rel(y, y64) <= BOUND[DT], f"{c}: kernel off (seed {seed})"
        assert rel(y, ref) <= 2 * BOUND[DT], f"{c}: kernel vs reference (seed {seed})"
        assert torch.equal(res, ref_res), f"{c}: residual stream (seed {seed})"
    assert torch.equal(x, x_in) and torch.equal(r, r_in), "inputs must not be written"
    h = rmsnorm_triton.rmsnorm(x, nw, EPS, r)[0] if with_residual else rmsnorm_triton.rmsnorm(x, nw, EPS)
    assert rel(y, qgemv_triton.gemv(h, W)) <= 2 * BOUND[DT], f"fused vs rmsnorm kernel + GEMV (seed {seed})"


@pytest.mark.parametrize("qtype", QTYPES)
def test_silu_gemv_on_the_halves_of_one_gate_up_output(qtype):
    gen, seed = fresh_gen()
    M = 2
    gate_up = torch.randn(M, 2 * K, generator=gen).to(DT)
    gate, up = gate_up.chunk(2, dim=-1)  # strided views
    W = weight(gen, qtype)
    ref = gemv.silu_gemv_ref(gate, up, W)
    g64 = gate.double()
    y64 = (g64 * torch.sigmoid(g64) * up.double()) @ W.dequantize(torch.float64).T
    assert rel(ref, y64) <= BOUND[DT], f"reference (seed {seed})"
    unfused = qgemv_triton.gemv(activation_triton.silu_mul(gate, up), W)
    for c in CONFIGS:
        y = qgemv_triton.silu_gemv(gate, up, W, c, out=poison((M, N), DT))
        assert rel(y, y64) <= BOUND[DT], f"{c}: kernel off (seed {seed})"
        assert rel(y, ref) <= 2 * BOUND[DT], f"{c}: kernel vs reference (seed {seed})"
        assert rel(y, unfused) <= 2 * BOUND[DT], f"{c}: fused vs SwiGLU kernel + GEMV (seed {seed})"


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_each_row_depends_only_on_its_own_input_row(qtype):
    """Rows of one block are computed independently: changing the other rows of x (same M, so the
    same BLOCK_M and config) leaves a row's output bits unchanged, with and without the fused norm."""
    gen, seed = fresh_gen()
    M = 3
    W, (x, r) = weight(gen, qtype), acts(gen, M)
    nw = 1.0 + 0.1 * torch.randn(K, generator=gen)
    x2, r2 = acts(gen, M)
    x2[1], r2[1] = x[1], r[1]
    assert torch.equal(qgemv_triton.gemv(x, W)[1], qgemv_triton.gemv(x2, W)[1]), f"seed {seed}"
    y, res = qgemv_triton.norm_gemv(x, r, nw, EPS, W)
    y2, res2 = qgemv_triton.norm_gemv(x2, r2, nw, EPS, W)
    assert torch.equal(y[1], y2[1]) and torch.equal(res[1], res2[1]), f"seed {seed}"
    assert not torch.equal(y[0], y2[0]), "the other rows did change"


@pytest.fixture
def calls(monkeypatch):
    counts = {"gemv": 0, "norm_gemv": 0, "silu_gemv": 0}
    for name in counts:
        real = getattr(qgemv_triton, name)

        def counted(*a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(qgemv_triton, name, counted)
    return counts


def test_routing_sends_few_row_quantized_linears_in_fast_mode_only(calls, monkeypatch):
    gen, _ = fresh_gen()
    W = weight(gen, "q4_0", 24, 64)
    fast, inv = Ops("cuda", Numerics("fast")), Ops("cuda", Numerics("batch_invariant"))
    m = ops_module.QGEMV_MAX_M

    def x(rows):
        return torch.randn(rows, 64, generator=gen).to(DT)
    y = fast.linear(x(m), W)
    assert y.shape == (m, 24)
    fast.norm_linear(x(m), x(m), torch.ones(64), EPS, W)  # QGEMV_NORM off: the RMSNorm kernel + GEMV
    fast.swiglu_linear(torch.randn(m, 64, generator=gen).to(DT), weight(gen, "q8_0", 24, 32), TPContext())
    assert calls == {"gemv": 3, "norm_gemv": 0, "silu_gemv": 0}  # QGEMV_SWIGLU off: SwiGLU kernel + GEMV
    monkeypatch.setattr(ops_module, "QGEMV_NORM", True)
    monkeypatch.setattr(ops_module, "QGEMV_SWIGLU", True)
    fast.norm_linear(x(m), x(m), torch.ones(64), EPS, W)
    fast.swiglu_linear(torch.randn(m, 64, generator=gen).to(DT), weight(gen, "q8_0", 24, 32), TPContext())
    assert calls == {"gemv": 3, "norm_gemv": 1, "silu_gemv": 1}
    inv.linear(x(1), W)  # invariant: the TBIK tree
    inv.norm_linear(x(1), None, torch.ones(64), EPS, W)
    fast.linear(x(m + 1), W)  # too many rows: the dequantizing GEMM
    fast.norm_linear(x(m + 1), None, torch.ones(64), EPS, W)
    Ops("cpu", Numerics("fast")).linear(x(1), W)  # CPU
    assert calls == {"gemv": 3, "norm_gemv": 1, "silu_gemv": 1}
