"""Fused CPU quantized matmul (kernels/cpu_qmatmul.py + csrc/qmatmul.c) against references.

Error bound: W is dequantized exactly (q * d is exact in float32), and each output is 32
lane chains of K/32 FMAs (one rounding each) added in a 5-level tree, so with u = 2^-24
|y - y64| <= gamma_{K/32 + 5} * sum_k |x_k w_k|, gamma_n = n u / (1 - n u),
where y64 is the float64 product of x and the dequantized W.
"""
import warnings

import pytest
import torch

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import cpu_qmatmul as cq
from exactllm.kernels.matmul import linear_ref

QTYPES = ["q4_0", "q4_1", "q8_0"]
U = 2.0 ** -24

needs_kernel = pytest.mark.skipif(not cq.available(), reason="no C compiler: fused kernel not built")


def _bound(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    n = w.shape[1] // 32 + 5
    gamma = n * U / (1 - n * U)
    return gamma * (x.double().abs() @ w.dequantize().double().abs().T)


def _random_planes(n: int, k: int, qtype: str, g: torch.Generator) -> QuantWeight:
    """Arbitrary planes (all byte values incl. int8 -128, signed scales and mins), not just quantizer output."""
    nb = k // 32
    scale = (torch.rand(n, nb, generator=g) * 0.1 + 1e-3) * (torch.randint(0, 2, (n, nb), generator=g) * 2 - 1)
    if qtype == "q8_0":
        qs = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        qs = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    mn = torch.randn(n, nb, generator=g).half() if qtype == "q4_1" else None
    return QuantWeight(qtype, (n, k), qs, scale.half(), mn)


@needs_kernel
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n,k", [(1, 32), (37, 96), (64, 288), (130, 576), (67, 1056)])
def test_matches_float64_within_bound(qtype, n, k):
    g = torch.Generator().manual_seed(QTYPES.index(qtype) * 10007 + n * 31 + k)
    for w in (QuantWeight.quantize(torch.randn(n, k, generator=g), qtype), _random_planes(n, k, qtype, g)):
        for m in (1, 2, 3, 4, 5, 7, 9, 16, 17):
            x = torch.randn(m, k, generator=g)
            y = cq.qmatmul(x, w)
            y64 = x.double() @ w.dequantize().double().T
            err = (y.double() - y64).abs()
            assert (err <= _bound(x, w)).all(), f"max err {err.max():.3g} ({qtype} m={m} n={n} k={k})"
            # and against the per-call reference the engine used so far (MKL adds its own K u error)
            assert torch.allclose(y, linear_ref(x, w), rtol=0, atol=float(2 * _bound(x, w).max() + 1e-6 * k))


@needs_kernel
@pytest.mark.parametrize("qtype", QTYPES)
def test_deterministic_and_independent_of_batch_and_threads(qtype):
    g = torch.Generator().manual_seed(7)
    n, k = 300, 800  # N spans several column chunks, so 2 threads really split it
    w = QuantWeight.quantize(torch.randn(n, k, generator=g), qtype)
    x = torch.randn(13, k, generator=g)
    y = cq.qmatmul(x, w, nthreads=2)
    assert torch.equal(y, cq.qmatmul(x, w, nthreads=2))
    assert torch.equal(y, cq.qmatmul(x, w, nthreads=1))
    rows = torch.cat([cq.qmatmul(x[i:i + 1], w) for i in range(x.shape[0])])
    assert torch.equal(y, rows)  # each M tile shape (4, 3, 2, 1 rows) gives the same bits
    for m in (2, 3, 5):
        assert torch.equal(y[:m], cq.qmatmul(x[:m], w))
    # The checks above can fail: summing the same products in another order (K blocks
    # reversed) changes the bits.
    nb = k // 32
    perm = torch.arange(nb - 1, -1, -1)
    per = w.qs.shape[1] // nb
    w_rev = QuantWeight(qtype, w.shape, w.qs.view(n, nb, per)[:, perm].reshape(n, -1).contiguous(),
                        w.scale[:, perm].contiguous(), None if w.min is None else w.min[:, perm].contiguous())
    x_rev = x.view(-1, nb, 32)[:, perm].reshape(x.shape).contiguous()
    y_rev = cq.qmatmul(x_rev, w_rev)
    assert torch.allclose(y, y_rev, atol=1e-3) and not torch.equal(y, y_rev)


@needs_kernel
def test_linear_cpu_contract(monkeypatch):
    g = torch.Generator().manual_seed(3)
    w = QuantWeight.quantize(torch.randn(96, 64, generator=g), "q4_1")
    x = torch.randn(2, 3, 64, generator=g, dtype=torch.bfloat16)
    y = cq.linear_cpu(x, w)
    assert y.shape == (2, 3, 96) and y.dtype == torch.bfloat16
    assert torch.equal(y, cq.qmatmul(x.reshape(6, 64).float(), w).to(torch.bfloat16).reshape(2, 3, 96))
    dense = torch.randn(96, 64, generator=g)
    assert torch.equal(cq.linear_cpu(x.float(), dense), linear_ref(x.float(), dense))
    # Above MAX_FUSED_M rows the call goes to linear_ref.
    calls = []
    monkeypatch.setattr(cq, "linear_ref", lambda a, b: calls.append(a.shape) or linear_ref(a, b))
    big = torch.randn(cq.MAX_FUSED_M + 1, 64, generator=g)
    cq.linear_cpu(big, w)
    cq.linear_cpu(big[:cq.MAX_FUSED_M], w)
    assert calls == [big.shape]


@needs_kernel
def test_rejects_bad_arguments():
    w = QuantWeight.quantize(torch.randn(8, 64), "q8_0")
    with pytest.raises(ValueError):
        cq.qmatmul(torch.randn(2, 32), w)
    y = cq.qmatmul(torch.randn(0, 64), w)
    assert y.shape == (0, 8)


def _fresh_state(monkeypatch, tmp_path):
    monkeypatch.setattr(cq, "_lib", None)
    monkeypatch.setattr(cq, "_failed", None)
    monkeypatch.setenv("EXACTLLM_CACHE", str(tmp_path))


@pytest.mark.parametrize("cc", ["exactllm-no-such-compiler", "false"])
def test_fallback_without_working_compiler(monkeypatch, tmp_path, cc):
    """A missing compiler, or one that fails, gives one warning and then linear_ref's results."""
    _fresh_state(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", cc)
    g = torch.Generator().manual_seed(5)
    w = QuantWeight.quantize(torch.randn(40, 64, generator=g), "q4_0")
    x = torch.randn(3, 64, generator=g)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        y = cq.linear_cpu(x, w)
    assert torch.equal(y, linear_ref(x, w))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cq.linear_cpu(x, w), linear_ref(x, w))  # no second warning
        assert not cq.available()
    with pytest.raises(RuntimeError, match="unavailable"):
        cq.qmatmul(x, w)


@needs_kernel
def test_build_is_cached(monkeypatch, tmp_path):
    _fresh_state(monkeypatch, tmp_path)
    assert cq.available()
    built = list(tmp_path.glob("qmatmul-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cq, "_lib", None)
    assert cq.available() and built[0].stat().st_mtime_ns == mtime
