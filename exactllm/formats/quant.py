"""GGUF block quantization (Q4_0, Q4_1, Q8_0) in plain torch.

Bit-exact with ``gguf.quants.quantize`` / ``gguf.quants.dequantize`` (and so with
llama.cpp's reference quantizers), vectorized over all blocks, on CPU or CUDA tensors.
No gguf import here: this module must load on machines without the gguf package.

Block layouts (32 weights per block, little-endian fp16 fields first):
- Q4_0, 18 bytes: fp16 d, 16 bytes of nibbles. d = m / -8 with m the value of largest
  magnitude (first one on ties, with its sign); q = clamp(trunc(x/d + 8.5), 0, 15);
  x' = (q - 8) d.
- Q4_1, 20 bytes: fp16 d, fp16 min, 16 bytes of nibbles. d = (max - min) / 15;
  q = clamp(trunc((x - min)/d + 0.5), 0, 15); x' = q d + min.
- Q8_0, 34 bytes: fp16 d, 32 int8. d = max|x| / 127; q = round_half_away(x/d); x' = q d.
In every nibble block, byte j holds weight j in its low nibble and weight j+16 in its high
nibble. One documented difference from gguf's bytes: Q4_1 stores a zero min (and d) as
+0.0 where gguf may store -0.0 (it depends on numpy's reduction order); dequantized values
are the same. The quantizer computes d and 1/d in float32 and only then rounds d to fp16; a
scale beyond the fp16 range (e.g. Q4_0 with |m| > 8 * 65504) is stored as +-inf, as gguf
and llama.cpp do, and dequantizes to +-inf / NaN (0 * inf).

Inputs must be finite. For blocks so small that 1/d overflows float32 (max|x| < ~1e-37)
the quants come from a NaN-to-integer cast, which is platform-defined (it matches gguf
on x86 CPUs).

Dequantization is float32 math (as gguf): the result is cast to ``dtype`` afterwards.
Every product and sum is a separate torch op, so no FMA contraction can change bits.

MXFP4 (qtype "mxfp4", GGML type 39, OCP microscaling) is handled by ``quantize`` /
``dequantize`` too, and by the plane functions ``quantize_mxfp4`` / ``dequantize_mxfp4`` that
the MoE kernels use; it is an expert-weight format only, not a ``QuantWeight`` qtype (not in
``LAYOUTS``: the dense engine's linear kernels do not read it). 17 bytes per 32-block: one E8M0
exponent byte e, then 16 bytes of E2M1 nibbles in the same order as Q4_0 (byte j: weight j low,
weight j+16 high). As in gguf the nibble values are stored doubled, {0,1,2,3,4,6,8,12} with the
sign in bit 3, and the scale halved: x' = kvalue * 2^(e-128). Quantization: m = max|x|,
e = floor(log2 m) - 2 + 127 (log2 rounded to float32, as numpy computes it: just below a power
of two it rounds up), or 0 for an all-zero block; each weight takes the nibble that minimizes
the float32 |d*kvalue - x| (first nibble on ties, so ties go to the smaller magnitude and zero
is nibble 0, not 8); values past the grid's end clip to +-12*2^(e-128). For m below 2^-125
gguf's exponent is negative and wraps modulo 256 on the cast to uint8; this does the same.

NVFP4 (qtype "nvfp4", GGML type 40), likewise an expert-weight format only: 36 bytes per 64
weights, four UE4M3 scale bytes (one per 16 weights) then 32 bytes of E2M1 nibbles, 8 per
16-block (byte j: weight j low, weight j+8 high); x' = kvalue * ue4m3(s) / 2 with the doubled
kvalues above. gguf defines its dequantization (matched bit for bit) but no quantizer; see
``quantize_nvfp4``. Both FP4 quantizers are vectorized torch (no loop over blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32


@dataclass(frozen=True)
class BlockLayout:
    qtype: str
    block_size: int
    type_size: int  # bytes per block
    ggml_type: int  # GGMLQuantizationType value

    @property
    def has_min(self) -> bool:
        return self.qtype == "q4_1"

    @property
    def header_bytes(self) -> int:
        """fp16 fields before the quants: d (and min for Q4_1)."""
        return 4 if self.has_min else 2

    @property
    def qs_bytes(self) -> int:
        return self.type_size - self.header_bytes


LAYOUTS: dict[str, BlockLayout] = {
    "q4_0": BlockLayout("q4_0", BLOCK, 2 + BLOCK // 2, 2),
    "q4_1": BlockLayout("q4_1", BLOCK, 2 + 2 + BLOCK // 2, 3),
    "q8_0": BlockLayout("q8_0", BLOCK, 2 + BLOCK, 8),
}


MXFP4_TYPE_SIZE = 17  # bytes per 32-block: E8M0 exponent + 16 bytes of nibbles
MXFP4_GGML_TYPE = 39
E2M1_X2 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # doubled E2M1 values
NVFP4_BLOCK = 16  # weights per UE4M3 scale
NVFP4_SUPER = 64  # weights per GGUF block: 4 scale bytes, then 32 bytes of nibbles
NVFP4_TYPE_SIZE = 36
NVFP4_GGML_TYPE = 40


def layout(qtype: str) -> BlockLayout:
    try:
        return LAYOUTS[qtype]
    except KeyError:
        raise ValueError(f"unknown qtype {qtype!r}; known: {sorted(LAYOUTS)}") from None


# ----------------------------------------------------------------------------- quantize


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d in float32 (a true IEEE division), 0 where d == 0, as gguf does."""
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C roundf without the a + 0.5 double rounding (0.49999997 + 0.5 rounds to 1.0)."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [..., nb, 32] in 0..15 -> [..., nb, 16]: low = weight j, high = weight j+16."""
    return q[..., :16] | (q[..., 16:] << 4)


def _quantize_planes(blocks: torch.Tensor, qtype: str):
    """float32 blocks [..., nb, 32] -> (qs, scale fp16 [..., nb], min fp16 or None).

    qs is uint8 [..., nb, 16] for the 4-bit types and int8 [..., nb, 32] for Q8_0.
    """
    if qtype == "q4_0":
        imax = blocks.abs().argmax(dim=-1, keepdim=True)  # first maximum on ties, like numpy
        m = blocks.gather(-1, imax)
        d = m / -8
        v = torch.trunc(blocks * _inverse(d) + 8.5)
        q = v.to(torch.uint8).clamp_(max=15)
        return _pack_nibbles(q), d.squeeze(-1).to(torch.float16), None
    if qtype == "q4_1":
        # "+ 0.0" turns a -0.0 extreme into +0.0: which signed zero a min/max reduction
        # returns is unspecified (numpy's SIMD order, torch's CPU vs CUDA); values are unaffected.
        mx = blocks.amax(dim=-1, keepdim=True) + 0.0
        mn = blocks.amin(dim=-1, keepdim=True) + 0.0
        d = (mx - mn) / 15
        v = torch.trunc((blocks - mn) * _inverse(d) + 0.5)
        q = v.to(torch.uint8).clamp_(max=15)
        return _pack_nibbles(q), d.squeeze(-1).to(torch.float16), mn.squeeze(-1).to(torch.float16)
    if qtype == "q8_0":
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_half_away(blocks * _inverse(d)).to(torch.int8)
        return q, d.squeeze(-1).to(torch.float16), None
    raise ValueError(f"unknown qtype {qtype!r}; known: {sorted(LAYOUTS)}")


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK != 0:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block size {BLOCK}")
    return x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def _fp16_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp16 [..., nb] -> uint8 [..., nb, 2] (little-endian, as in the file)."""
    return t.unsqueeze(-1).contiguous().view(torch.uint8)


def _assemble(qs: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor | None) -> torch.Tensor:
    """Planes with block dim (qs [..., nb, qs_bytes]) -> raw uint8 [..., nb * type_size]."""
    parts = [_fp16_bytes(scale)]
    if mn is not None:
        parts.append(_fp16_bytes(mn))
    parts.append(qs.view(torch.uint8))
    raw = torch.cat(parts, dim=-1)
    return raw.reshape(*raw.shape[:-2], -1)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """E8M0 byte -> 2^(e-128) in float32 (gguf's e8m0_to_fp32_half; 2^-128 and 2^-127 are subnormal)."""
    e32 = e.to(torch.int32)
    bits = torch.where(e32 < 2, torch.full_like(e32, 0x00200000) << e32, (e32 - 1) << 23)
    return bits.view(torch.float32)


def _nearest_e2m1(flat: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Nibble of the doubled-E2M1 grid value d*kvalue nearest each x (flat [n, B] float32, d [n]):
    gguf's argmin over all 16 nibbles of the float32 |d*kvalue - x|, first nibble on ties, in
    O(n*B) memory. Why it is the same: the error of the mirrored nibble is |d*kvalue + x| (a
    float32 negation is exact), so only the nibbles of x's own sign can beat nibble 0 (error |x|),
    and a tie with nibble 0 goes to nibble 0; among magnitudes 0..7 the scan below keeps the first
    minimum, as argmin does."""
    a = flat.abs()
    d = d[:, None]
    best_err = a.clone()  # magnitude 0: |d*0 - |x|| = |x|
    best = torch.zeros(flat.shape, dtype=torch.uint8, device=flat.device)
    for j in range(1, 8):
        err = (d * float(E2M1_X2[j]) - a).abs()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, j), best)
    return torch.where((flat < 0) & (best > 0), best + 8, best)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> planes (qs uint8 [..., K//2] in GGUF nibble order, e uint8 [..., K//32]).

    Vectorized torch (no loop over blocks), so it runs per step on the GPU as well."""
    blocks = _blocks(x)
    lead, nb = blocks.shape[:-2], blocks.shape[-2]
    flat = blocks.reshape(-1, BLOCK)
    m = flat.abs().amax(-1)
    log2m = torch.log2(m.double()).float()  # correctly rounded to float32 (numpy's float32 log2)
    e = torch.where(m > 0, torch.floor(log2m) - 2 + 127, torch.zeros_like(m))
    e = (e.to(torch.int32) & 0xFF).to(torch.uint8)  # wraps a negative exponent as gguf's cast does
    q = _nearest_e2m1(flat, e8m0_half(e))
    qs = _pack_nibbles(q).reshape(*lead, nb * (BLOCK // 2))
    return qs, e.reshape(*lead, nb)


def dequantize_mxfp4(qs: torch.Tensor, e: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Planes of :func:`quantize_mxfp4` -> [..., K]: kvalue * 2^(e-128) in float32, then cast."""
    lead, nb = e.shape[:-1], e.shape[-1]
    q = _unpack_nibbles(qs, lead, nb)  # [..., nb, 2, 16]
    kv = torch.tensor(E2M1_X2, dtype=torch.float32, device=qs.device)
    out = kv[q.long()] * e8m0_half(e)[..., None, None]
    out = out.reshape(*lead, nb * BLOCK)
    return out if dtype == torch.float32 else out.to(dtype)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e in float32 for integer e in [-126, 127], built from its bits (exact)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def ue4m3_from_fp32(x: torch.Tensor) -> torch.Tensor:
    """float32 >= 0 -> unsigned E4M3 byte, bit-exact with gguf's NVFP4.fp32_to_ue4m3 (ggml's
    ggml_fp32_to_ue4m3): clip to [0, 448]; normal values round the 3-bit mantissa half-up;
    below 2^-6 the subnormal code is trunc(x*512 + 0.5) clipped to 0..7; <= 0 gives 0."""
    x = x.to(torch.float32).clamp(0.0, 448.0)
    bits = x.view(torch.int32)
    ue_exp = ((bits >> 23) & 0xFF) - 127 + 7
    sub = (x * 512.0 + 0.5).to(torch.int32).clamp(0, 7)
    man = ((bits >> 20) & 7) + ((bits >> 19) & 1)
    carry = man > 7
    exp = torch.where(carry, ue_exp + 1, ue_exp)
    normal = torch.where(exp >= 15, torch.full_like(exp, 0x7E), (exp << 3) | torch.where(carry, 0, man))
    out = torch.where(ue_exp <= 0, sub, torch.where(ue_exp >= 15, torch.full_like(exp, 0x7E), normal))
    return torch.where(x <= 0, torch.zeros_like(out), out).to(torch.uint8)


def ue4m3_half(b: torch.Tensor) -> torch.Tensor:
    """Unsigned E4M3 byte -> half its value in float32, as gguf's NVFP4.ue4m3_to_fp32 (the half
    goes with the doubled E2M1 kvalues): exponent bits 3-6 (bit 7 ignored), bias 7, subnormal
    man * 2^-9; 0x00 and 0x7F give 0. Every value is exact in float32."""
    b32 = b.to(torch.int32)
    exp, man = (b32 >> 3) & 0xF, b32 & 7
    normal = (8 + man).to(torch.float32) * _pow2(exp - 11)
    sub = man.to(torch.float32) * 2.0 ** -10
    val = torch.where(exp == 0, sub, normal)
    return torch.where((b32 == 0) | (b32 == 0x7F), torch.zeros_like(val), val)


def quantize_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K a multiple of 64) -> NVFP4 planes as gguf lays them out: qs uint8 [..., K//2]
    (per 16-block 8 bytes, byte j = weight j low nibble, weight j+8 high) and UE4M3 scales uint8
    [..., K//16]. x' = ue4m3(s) * E2M1 value.

    gguf defines NVFP4's block layout and dequantization (gguf.quants.NVFP4) but no quantizer;
    this one takes s = ue4m3(max|x| / 6) with gguf's own fp32 -> UE4M3 rounding and the nearest
    grid value per weight (first on ties, as gguf's MXFP4). NVFP4's per-tensor fp32 scale is not
    part of the block format: callers divide by it first (kernels/moe_gemm.py does, per expert)."""
    if x.shape[-1] % NVFP4_SUPER:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the NVFP4 block size {NVFP4_SUPER}")
    lead, K = x.shape[:-1], x.shape[-1]
    flat = x.to(torch.float32).reshape(-1, NVFP4_BLOCK)
    sc = ue4m3_from_fp32(flat.abs().amax(-1) / 6.0)
    q = _nearest_e2m1(flat, ue4m3_half(sc))
    qs = q[:, :8] | (q[:, 8:] << 4)
    return qs.reshape(*lead, K // 2), sc.reshape(*lead, K // NVFP4_BLOCK)


def dequantize_nvfp4(qs: torch.Tensor, sc: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Planes of :func:`quantize_nvfp4` -> [..., K]: kvalue * ue4m3_half(s) in float32, then cast."""
    lead, n = sc.shape[:-1], sc.shape[-1]
    b = qs.reshape(*lead, n, 8)
    q = torch.cat((b & 0xF, b >> 4), dim=-1)
    kv = torch.tensor(E2M1_X2, dtype=torch.float32, device=qs.device)
    out = (kv[q.long()] * ue4m3_half(sc)[..., None]).reshape(*lead, n * NVFP4_BLOCK)
    return out if dtype == torch.float32 else out.to(dtype)


def quantize(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """x [..., K] (any float dtype; computed in float32) -> raw GGUF bytes uint8 [..., K//32*type_size]."""
    if qtype == "mxfp4":
        qs, e = quantize_mxfp4(x)
        raw = torch.cat((e.unsqueeze(-1), qs.reshape(*e.shape, BLOCK // 2)), dim=-1)
        return raw.reshape(*raw.shape[:-2], -1)
    if qtype == "nvfp4":
        qs, sc = quantize_nvfp4(x)
        n = sc.shape[-1] // 4
        raw = torch.cat((sc.reshape(*sc.shape[:-1], n, 4), qs.reshape(*qs.shape[:-1], n, 32)), dim=-1)
        return raw.reshape(*raw.shape[:-2], -1)
    return _assemble(*_quantize_planes(_blocks(x), qtype))


# --------------------------------------------------------------------------- dequantize


def _split(raw: torch.Tensor, qtype: str):
    """raw uint8 [..., nb*type_size] -> (qs [..., nb*qs_bytes], scale fp16 [..., nb], min or None).

    qs is uint8 (4-bit types, packed) or int8 (Q8_0); the planes are contiguous copies.
    """
    lay = layout(qtype)
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw must be uint8, got {raw.dtype}")
    if raw.shape[-1] % lay.type_size != 0:
        raise ValueError(f"row of {raw.shape[-1]} bytes is not a multiple of {lay.type_size} ({qtype})")
    lead = raw.shape[:-1]
    nb = raw.shape[-1] // lay.type_size
    b = raw.reshape(*lead, nb, lay.type_size)
    scale = b[..., 0:2].contiguous().view(torch.float16).reshape(*lead, nb)
    mn = b[..., 2:4].contiguous().view(torch.float16).reshape(*lead, nb) if lay.has_min else None
    qs = b[..., lay.header_bytes:].contiguous().reshape(*lead, nb * lay.qs_bytes)
    if qtype == "q8_0":
        qs = qs.view(torch.int8)
    return qs, scale, mn


def _unpack_nibbles(qs: torch.Tensor, lead, nb: int) -> torch.Tensor:
    """Packed uint8 [..., nb*16] -> uint8 [..., nb, 2, 16] (weights 0..15, then 16..31).

    Works on 32-bit words (4 bytes at a time): the mask 0x0F0F0F0F keeps each byte's low
    nibble, and after ``>> 4`` each byte's high nibble; the bits shifted in from the
    neighbouring byte (or the sign) land in the masked-off half, so byte order is irrelevant.
    """
    if not qs.is_contiguous() or qs.storage_offset() % 4:
        qs = qs.clone(memory_format=torch.contiguous_format)
    w = qs.view(torch.int32).reshape(*lead, nb, 1, 4)
    q = torch.cat((w, w >> 4), dim=-2)
    q &= 0x0F0F0F0F
    return q.view(torch.uint8)


def _dequantize_planes(qs, scale, mn, qtype: str, dtype: torch.dtype, out: torch.Tensor | None = None):
    """Planes as in ``_split`` -> [..., K] in ``dtype`` (float32 math, then a cast).

    Steps: small integer work on bytes, one int->float32 conversion into the output,
    then an in-place float32 multiply (and add for Q4_1) -- the same IEEE ops as gguf.
    ``out`` (float32, contiguous, [..., K]) skips the allocation: on CPU most of the time
    of a fresh result goes to first-touch page faults of the new buffer.
    """
    lead = qs.shape[:-1]
    nb = scale.shape[-1]
    if out is None:
        out = torch.empty(*lead, nb * BLOCK, dtype=torch.float32, device=qs.device)
    elif dtype != torch.float32 or out.dtype != torch.float32 or not out.is_contiguous() \
            or tuple(out.shape) != (*lead, nb * BLOCK):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {(*lead, nb * BLOCK)} "
                         f"with dtype=float32; got {tuple(out.shape)} {out.dtype}")
    d = scale.to(torch.float32)
    if qtype == "q8_0":
        o = out.view(*lead, nb, BLOCK)
        o.copy_(qs.reshape(*lead, nb, BLOCK)).mul_(d.unsqueeze(-1))
    elif qtype in ("q4_0", "q4_1"):
        o = out.view(*lead, nb, 2, BLOCK // 2)
        q = _unpack_nibbles(qs, lead, nb)
        if qtype == "q4_0":
            o.copy_(q.view(torch.int8).sub_(8)).mul_(d[..., None, None])
        else:
            o.copy_(q).mul_(d[..., None, None]).add_(mn.to(torch.float32)[..., None, None])
    else:
        raise ValueError(f"unknown qtype {qtype!r}; known: {sorted(LAYOUTS)}")
    return out if dtype == torch.float32 else out.to(dtype)


def dequantize(raw: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """raw GGUF bytes uint8 [..., nbytes] -> values [..., K] (K = nbytes // type_size * 32).

    ``out``: optional preallocated float32 [..., K] to write into (then dtype must be float32).
    """
    if qtype == "mxfp4":
        if raw.dtype != torch.uint8 or raw.shape[-1] % MXFP4_TYPE_SIZE:
            raise ValueError(f"raw must be uint8 rows of whole {MXFP4_TYPE_SIZE}-byte mxfp4 blocks, "
                             f"got {raw.dtype} {tuple(raw.shape)}")
        b = raw.reshape(*raw.shape[:-1], -1, MXFP4_TYPE_SIZE)
        vals = dequantize_mxfp4(b[..., 1:].reshape(*raw.shape[:-1], -1), b[..., 0], dtype)
        return vals if out is None else out.copy_(vals)
    if qtype == "nvfp4":
        if raw.dtype != torch.uint8 or raw.shape[-1] % NVFP4_TYPE_SIZE:
            raise ValueError(f"raw must be uint8 rows of whole {NVFP4_TYPE_SIZE}-byte nvfp4 blocks, "
                             f"got {raw.dtype} {tuple(raw.shape)}")
        lead = raw.shape[:-1]
        b = raw.reshape(*lead, -1, NVFP4_TYPE_SIZE)
        vals = dequantize_nvfp4(b[..., 4:].reshape(*lead, -1), b[..., :4].reshape(*lead, -1), dtype)
        return vals if out is None else out.copy_(vals)
    return _dequantize_planes(*_split(raw, qtype), qtype, dtype, out)


# -------------------------------------------------------------------------- QuantWeight


@dataclass
class QuantWeight:
    """A 2-D weight [N, K] in block form, split into the planes kernels read.

    qs: uint8 [N, K//2] (q4_0/q4_1, GGUF nibble order within each 32-block) or int8 [N, K] (q8_0).
    scale: float16 [N, K//32]. min: float16 [N, K//32] for q4_1, else None.
    """

    qtype: str
    shape: tuple[int, int]
    qs: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None = None

    def __post_init__(self):
        if self.qtype in ("mxfp4", "nvfp4"):
            raise ValueError(f"{self.qtype} is an expert-weight format (quantize_mxfp4 / kernels.moe_gemm), "
                             "not a QuantWeight qtype: the dense linear kernels do not read it")
        lay = layout(self.qtype)
        n, k = self.shape
        if k % BLOCK != 0:
            raise ValueError(f"K={k} is not a multiple of {BLOCK}")
        qs_dtype = torch.int8 if self.qtype == "q8_0" else torch.uint8
        want = {"qs": ((n, k // BLOCK * lay.qs_bytes), qs_dtype), "scale": ((n, k // BLOCK), torch.float16)}
        if lay.has_min:
            want["min"] = ((n, k // BLOCK), torch.float16)
        elif self.min is not None:
            raise ValueError(f"{self.qtype} has no min plane")
        for name, (shp, dt) in want.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != shp or t.dtype != dt:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"{self.qtype} plane {name}: expected {shp} {dt}, got {got}")

    @classmethod
    def from_raw(cls, raw: torch.Tensor, qtype: str) -> "QuantWeight":
        """raw uint8 [N, K//32*type_size] (GGUF tensor data) -> planes."""
        if raw.dim() != 2:
            raise ValueError(f"raw must be 2-D [N, row_bytes], got shape {tuple(raw.shape)}")
        qs, scale, mn = _split(raw, qtype)
        return cls(qtype, (raw.shape[0], scale.shape[1] * BLOCK), qs, scale, mn)

    @classmethod
    def quantize(cls, w: torch.Tensor, qtype: str) -> "QuantWeight":
        if w.dim() != 2:
            raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
        qs, scale, mn = _quantize_planes(_blocks(w), qtype)
        n, k = w.shape
        return cls(qtype, (n, k), qs.reshape(n, -1), scale, mn)

    def to_raw(self) -> torch.Tensor:
        n, k = self.shape
        nb = k // BLOCK
        return _assemble(self.qs.reshape(n, nb, -1), self.scale, self.min)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, K] in dtype; ``out`` as in the module-level ``dequantize`` (reuse it per layer)."""
        return _dequantize_planes(self.qs, self.scale, self.min, self.qtype, dtype, out)

    def _map(self, fn) -> "QuantWeight":
        return QuantWeight(self.qtype, self.shape, fn(self.qs), fn(self.scale),
                           None if self.min is None else fn(self.min))

    def to(self, device) -> "QuantWeight":
        return self._map(lambda t: t.to(device))

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        """Bytes of all planes; equals the GGUF tensor size N * K/32 * type_size."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scale, self.min) if t is not None)

    def shard(self, dim: int, index: int, parts: int) -> "QuantWeight":
        """Part ``index`` of ``parts`` equal pieces: dim 0 splits rows, dim 1 splits K in whole blocks."""
        n, k = self.shape
        if not 0 <= index < parts:
            raise ValueError(f"shard index {index} not in [0, {parts})")
        if dim == 0:
            if n % parts:
                raise ValueError(f"cannot split N={n} rows into {parts} equal parts")
            r = n // parts
            return QuantWeight(self.qtype, (r, k), *(
                None if t is None else t[index * r:(index + 1) * r]
                for t in (self.qs, self.scale, self.min)))
        if dim == 1:
            nb = k // BLOCK
            if nb % parts:
                raise ValueError(f"cannot split K={k} ({nb} blocks of {BLOCK}) into {parts} parts of whole blocks")
            c = nb // parts
            per = self.qs.shape[1] // nb  # qs bytes (or int8 values) per block
            qs = self.qs[:, index * c * per:(index + 1) * c * per].contiguous()
            cut = lambda t: None if t is None else t[:, index * c:(index + 1) * c].contiguous()
            return QuantWeight(self.qtype, (n, c * BLOCK), qs, cut(self.scale), cut(self.min))
        raise ValueError(f"dim must be 0 or 1, got {dim}")
