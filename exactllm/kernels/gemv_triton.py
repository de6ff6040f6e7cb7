"""Few-row linears on dense 16-bit weights (decode at small batch), with the op before them fused in.

Same signatures and rounding points as kernels/gemv.py:
- gemv(x, w): y = x @ w.T.
- norm_gemv(x, residual, norm_weight, eps, w): RMSNorm (and the residual add) in the prologue; each
  program recomputes the inverse RMS of its rows (a 2048-wide row is 4 KB, read from L2 then L1),
  program 0 writes the new residual stream (exactly once, to a tensor distinct from x and residual),
  so the norm kernel before qkv and before gate/up disappears.
- silu_gemv(gate, up, w): SwiGLU in the prologue of the down projection (no silu_mul kernel).
- norm_gemv_rope_kv(..., rope_kv): norm_gemv of the qkv projection with RoPE and the KV-cache
  write in its epilogue (reference: rope.norm_gemv_rope_kv_ref), so no RoPE kernel either.
- norm_gemv_swiglu(x, residual, norm_weight, eps, w): norm_gemv of the gate/up projection with the
  SwiGLU in its epilogue (a program owns gate row j and up row j), so no SwiGLU kernel.

Why: at M = 1 a decode linear reads 8-131 MB of weights once, so its floor is bytes / 2.9 TB/s
(3-45 us on an H100); cuBLAS reaches ~50% of it on the 2048-row matrices and needs a second kernel
for its split-K, and the norm / SwiGLU before it are kernels of their own. Here a program owns
BLOCK_N whole rows of the weight and streams them in [BLOCK_N, BLOCK_K] tiles with 128-bit loads,
the next tile loaded while the current one is summed; N / BLOCK_N programs (512-8000 on
TinyLlama's matrices at BLOCK_N = 4) fill the 132 SMs without splitting K, so there are no partial
sums to combine.

Programmatic dependent launch (Hopper; kernels/pdl.py): the weights never change during decode, so a
program loads its first weight tile, lets the next kernel launch, and only then waits for the
previous kernel (griddepcontrol.wait) before it reads x: the weight stream starts under the
previous kernel's tail, and a chain of these GEMVs overlaps its launch gaps. Everything that reads
activations or writes memory comes after the wait.

Numerics: float32 accumulation; a [BLOCK_M, BLOCK_N, BLOCK_K] accumulator summed over K at the end,
so the bits depend on the config (BLOCK_K and the layout Triton picks), which is therefore fixed per
BLOCK_M (CONFIGS), never chosen by timing: fast mode stays deterministic from run to run. Each row's
output depends only on that row (padding rows of a CUDA-graph bucket change nothing), but BLOCK_M
follows M, so this is not a batch-invariant kernel (the invariant modes never call it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from exactllm.kernels import pdl

MAX_BLOCK_M = 8
PLAIN, NORM, NORM_ADD, SILU = 0, 1, 2, 3
# (BLOCK_N, BLOCK_K, num_warps, num_stages) per BLOCK_M, from the H100 sweep of bench/gemv_bf16.py.
CONFIGS = {1: (4, 1024, 4, 1), 2: (4, 512, 4, 1), 4: (4, 256, 4, 1), 8: (4, 256, 4, 1)}


@triton.jit
def _input(x_rows, r_rows, kk, mask, PROLOGUE: tl.constexpr):
    """The linear's input before the norm scaling, in x's dtype: x, x + residual (rounded as the
    norm kernel rounds it) or silu(gate) * up (rounded as the SwiGLU kernel rounds it)."""
    x = tl.load(x_rows + kk, mask=mask, other=0.0)
    if PROLOGUE == 2:
        r = tl.load(r_rows + kk, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    elif PROLOGUE == 3:
        g = x.to(tl.float32)
        u = tl.load(r_rows + kk, mask=mask, other=0.0).to(tl.float32)
        x = (g / (1.0 + tl.exp(-g)) * u).to(x.dtype)
    return x


@triton.jit
def _normed_input(x_rows, r_rows, nw_ptr, ro_rows, kk, mask, nw_mask, rstd, write_res, PROLOGUE: tl.constexpr,
                  dt: tl.constexpr):
    """The linear's input at columns kk in dt: ``_input``, then for NORM / NORM_ADD scaled by rstd and
    the norm weight (loaded under nw_mask) and rounded as the norm kernel rounds it; NORM_ADD stores
    the new residual stream x + r where ``write_res`` (one program column does it)."""
    xk = _input(x_rows, r_rows, kk, mask, PROLOGUE)
    if PROLOGUE == 2:
        if write_res:
            tl.store(ro_rows + kk, xk, mask=mask)
    if PROLOGUE == 1 or PROLOGUE == 2:
        nw = tl.load(nw_ptr + kk, mask=nw_mask, other=0.0).to(tl.float32)
        xk = (xk.to(tl.float32) * rstd * nw).to(dt)
    return xk


@triton.jit
def _rope_kv_inputs(rows, n0, M, pos_ptr, cos_ptr, sin_ptr, slot_ptr, stride_c, BLOCK_N: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
    """cos, sin [BLOCK_M, BLOCK_N // 2] of the pairs in rows n0 .. n0 + BLOCK_N at each row's position,
    and each row's cache slot [BLOCK_M, 1]. Loaded before the weight stream, which hides their two
    dependent memory round trips (position, then table), instead of at the program's tail."""
    row_ok = rows < M
    i = (n0 % HEAD_DIM) // 2 + tl.arange(0, BLOCK_N // 2)[None, :]  # pair index within the head
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_c + i)
    s = tl.load(sin_ptr + pos * stride_c + i)
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    return c, s, slot


@triton.jit
def _rope_kv_epilogue(y, c, s, slot, rows, n0, M, q_width, kv_width, kc_ptr, vc_ptr, stride_cslot, stride_ch,
                      BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The qkv outputs y [BLOCK_M, BLOCK_N] (rows of one head: n0 .. n0 + BLOCK_N, in the activation
    dtype) as ``rope_triton.rope_kv`` treats them: q rows come back rotated (to be stored as the
    output), k rows rotated into k_cache and v rows into v_cache at each row's slot (negative:
    none). Same float32 arithmetic on the same rounded inputs as rope_triton's ``_rotate``."""
    out = y
    if n0 < q_width + kv_width:  # q or k: rotate
        x0, x1 = tl.split(tl.reshape(y, (y.shape[0], BLOCK_N // 2, 2)))
        x0 = x0.to(tl.float32)
        x1 = x1.to(tl.float32)
        out = tl.reshape(tl.join((x0 * c - x1 * s).to(y.dtype), (x0 * s + x1 * c).to(y.dtype)), y.shape)
    if n0 >= q_width:  # k or v: to the cache; the output keeps them unrotated, as rope_kv leaves them
        n_kv = (n0 - q_width) % kv_width + tl.arange(0, BLOCK_N)[None, :]
        dst = slot * stride_cslot + (n_kv // HEAD_DIM) * stride_ch + n_kv % HEAD_DIM
        keep = (rows < M) & (slot >= 0)
        if n0 < q_width + kv_width:
            tl.store(kc_ptr + dst, out.to(kc_ptr.dtype.element_ty), mask=keep)
        else:
            tl.store(vc_ptr + dst, out.to(vc_ptr.dtype.element_ty), mask=keep)
        out = y
    return out


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, r_ptr, nw_ptr, w_ptr, y_ptr, ro_ptr, M, N, K,
                 stride_xm, stride_rm, stride_wn, stride_ym, stride_om, eps,
                 pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, q_width, kv_width,
                 stride_c, stride_cslot, stride_ch,
                 PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ROPE_KV: tl.constexpr, HEAD_DIM: tl.constexpr, SWIGLU: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)[:, None, None]
    if SWIGLU:  # weight rows [gate j, up j] pairs for the BLOCK_N // 2 outputs j of this program
        half = N // 2
        j = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) // 2
        offs_n = (j + (tl.arange(0, BLOCK_N) % 2) * half).to(tl.int64)[None, :, None]
        mask_n = (j < half)[None, :, None]
    else:
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :, None]
        mask_n = offs_n < N
    ks = tl.arange(0, BLOCK_K)[None, None, :]
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    r_rows = r_ptr + offs_m.to(tl.int64) * stride_rm
    ro_rows = ro_ptr + offs_m.to(tl.int64) * stride_om
    w_rows = w_ptr + offs_n * stride_wn
    dt = y_ptr.dtype.element_ty
    w = tl.load(w_rows + ks, mask=mask_n & (ks < K), other=0.0)  # first tile: needs no activation
    pdl.enter(PDL)
    if ROPE_KV:
        rope_c, rope_s, slot = _rope_kv_inputs(m0 + tl.arange(0, BLOCK_M)[:, None], pid_n * BLOCK_N, M, pos_ptr,
                                               cos_ptr, sin_ptr, slot_ptr, stride_c, BLOCK_N, HEAD_DIM)
    rstd = 1.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        ss = tl.zeros([BLOCK_M, 1, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            s = _input(x_rows, r_rows, kk, mask_m & (kk < K), PROLOGUE).to(tl.float32)
            ss += s * s
        rstd = 1.0 / tl.sqrt_rn(tl.sum(ss, axis=2, keep_dims=True) / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        kmask = kk < K
        w_next = tl.load(w_rows + kk + BLOCK_K, mask=mask_n & (kk + BLOCK_K < K), other=0.0)
        xk = _normed_input(x_rows, r_rows, nw_ptr, ro_rows, kk, mask_m & kmask, kmask, rstd, pid_n == 0, PROLOGUE,
                           dt)
        acc += w.to(tl.float32) * xk.to(tl.float32)
        w = w_next
    y = tl.sum(acc, axis=2).to(dt)
    rows = m0 + tl.arange(0, BLOCK_M)[:, None]
    if SWIGLU:  # silu(gate) * up of the rounded gate and up outputs, as activation_triton.silu_mul
        g, u = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N // 2, 2)))
        g = g.to(tl.float32)
        cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)[None, :]
        tl.store(y_ptr + rows.to(tl.int64) * stride_ym + cols, (g / (1.0 + tl.exp(-g)) * u.to(tl.float32)).to(dt),
                 mask=(rows < M) & (cols < N // 2))
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        if ROPE_KV:
            y = _rope_kv_epilogue(y, rope_c, rope_s, slot, rows, pid_n * BLOCK_N, M, q_width, kv_width, kc_ptr,
                                  vc_ptr, stride_cslot, stride_ch, BLOCK_N, HEAD_DIM)
        tl.store(y_ptr + rows.to(tl.int64) * stride_ym + cols, y, mask=(rows < M) & (cols < N))


@dataclass(frozen=True)
class RopeKV:
    """What the rope_kv epilogue needs: as the arguments of ``rope_triton.rope_kv`` for the q, k, v
    heads of one qkv output row block [q_width | kv_width | kv_width]."""
    q_width: int
    kv_width: int
    head_dim: int
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor

    def check(self, y: torch.Tensor, block_n: int) -> None:
        d, kc = self.head_dim, self.k_cache
        if y.shape[1] != self.q_width + 2 * self.kv_width or self.q_width % d or self.kv_width % d:
            raise ValueError(f"qkv width {y.shape[1]} is not q {self.q_width} + 2 x kv {self.kv_width} whole heads")
        if d % block_n or block_n % 2:
            raise ValueError(f"BLOCK_N {block_n} must be even and divide head_dim {d}")
        if kc.stride(1) != kc.stride(2) * (self.kv_width // d) or kc.stride(3) != 1 or self.v_cache.stride() != kc.stride():
            raise ValueError("caches must be [blocks, page, kv_heads, head_dim] with contiguous slots")
        if self.cos.stride(1) != 1 or self.cos.stride() != self.sin.stride():
            raise ValueError("cos/sin tables must have contiguous rows of the same strides")

    def kernel_args(self) -> tuple:
        return (self.positions, self.cos, self.sin, self.k_cache, self.v_cache, self.slot_mapping,
                self.q_width, self.kv_width, self.cos.stride(0), self.k_cache.stride(1), self.k_cache.stride(2))


def _block_m(M: int) -> int:
    return min(MAX_BLOCK_M, triton.next_power_of_2(max(M, 1)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(prologue: int, x, r, nw, w, eps: float, config: tuple | None, out, residual_out, rope_kv=None,
            swiglu: bool = False):
    """y = prologue(x, r) @ w.T into ``out`` (and x + r into ``residual_out`` for NORM_ADD);
    ``rope_kv`` (RopeKV): the rope_kv epilogue on y's q/k/v rows; ``swiglu``: w is [gate; up]
    (halves of N / 2 rows) and y = silu(gate) * up [M, N / 2]."""
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or w.stride(1) != 1:
        raise ValueError(f"weight {tuple(w.shape)} (contiguous rows) does not match x {tuple(x.shape)}")
    if swiglu and N % 2:
        raise ValueError(f"a [gate; up] weight has an even number of rows, not {N}")
    y = torch.empty(M, N // 2 if swiglu else N, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0:
        return y
    block_m = _block_m(M)
    bn, bk, warps, stages = CONFIGS[block_m] if config is None else config
    if swiglu and bn % 2:
        raise ValueError(f"BLOCK_N {bn} must be even: a program owns gate/up row pairs")
    ro = residual_out if residual_out is not None else y
    use_pdl = pdl.enabled(x.device)
    if rope_kv is not None:
        rope_kv.check(y, bn)
    epilogue_args = rope_kv.kernel_args() if rope_kv is not None else (y,) * 6 + (0,) * 5
    _gemv_kernel[(triton.cdiv(N // 2, bn // 2) if swiglu else triton.cdiv(N, bn), triton.cdiv(M, block_m))](
        x, r, nw, w, y, ro, M, N, K, x.stride(0), r.stride(0), w.stride(0), y.stride(0), ro.stride(0), eps,
        *epilogue_args, PROLOGUE=prologue, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, ROPE_KV=rope_kv is not None,
        HEAD_DIM=rope_kv.head_dim if rope_kv is not None else 0, SWIGLU=swiglu, PDL=use_pdl,
        num_warps=warps, num_stages=stages, **pdl.launch_kwargs(use_pdl))
    return y


class EntryPoints:
    """gemv / norm_gemv / silu_gemv (kernels/gemv.py's signatures) around one kernel launcher
    ``launch(prologue, x, r, nw, w, eps, config, out, residual_out, **epilogue)``: the dense GEMV's
    here, the quantized GEMV's in qgemv_triton."""

    def __init__(self, launch):
        self.launch = launch

    def gemv(self, x: torch.Tensor, w, config: tuple | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """As ``gemv.gemv_ref``: x [M, K] @ w[N, K].T in x's dtype (float32 accumulation)."""
        x = _rows(x)
        return self.launch(PLAIN, x, x, x, w, 0.0, config, out, None)

    def norm_gemv(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  w, config: tuple | None = None, out: torch.Tensor | None = None,
                  residual_out: torch.Tensor | None = None, **epilogue) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``gemv.norm_gemv_ref``: (rmsnorm(x [+ residual]) @ w.T, the new residual stream).
        ``residual_out`` (NORM_ADD only) must not overlap x or residual: other programs still read them."""
        x = _rows(x)
        if residual is None:
            return self.launch(NORM, x, x, norm_weight, w, eps, config, out, None, **epilogue), x
        r = _rows(residual)
        new_res = torch.empty_like(x) if residual_out is None else residual_out
        return self.launch(NORM_ADD, x, r, norm_weight, w, eps, config, out, new_res, **epilogue), new_res

    def silu_gemv(self, gate: torch.Tensor, up: torch.Tensor, w, config: tuple | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """As ``gemv.silu_gemv_ref``: (silu(gate) * up) @ w.T; gate and up may be strided row views
        (the halves of one gate/up output)."""
        if gate.shape != up.shape:
            raise ValueError("gate and up differ in shape")
        return self.launch(SILU, _rows(gate), _rows(up), gate, w, 0.0, config, out, None)


_DENSE = EntryPoints(_launch)
gemv, norm_gemv, silu_gemv = _DENSE.gemv, _DENSE.norm_gemv, _DENSE.silu_gemv


def norm_gemv_rope_kv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      w: torch.Tensor, rope_kv: RopeKV, config: tuple | None = None,
                      out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``rope.norm_gemv_rope_kv_ref``: ``norm_gemv`` of the qkv projection, then ``rope_kv`` on its
    output: returns (qkv with its q rows rotated, k and v as projected; the new residual stream) and
    stores rotated k and v at their cache slots. The rotation runs in the GEMV's epilogue (pairs of
    adjacent output rows sit in one program), so no RoPE kernel is launched."""
    return _DENSE.norm_gemv(x, residual, norm_weight, eps, w, config, out, rope_kv=rope_kv)


def norm_gemv_swiglu(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                     w: torch.Tensor, config: tuple | None = None,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``gemv.norm_gemv_swiglu_ref``: ``norm_gemv`` of the gate/up projection (w = [gate; up]),
    then silu(gate) * up: returns ([M, N / 2], the new residual stream). A program owns pairs of
    gate row j and up row j, so the SwiGLU runs in its epilogue on the rounded outputs, each
    activation computed once (a SwiGLU prologue in the down projection recomputes all of them in
    each of its programs); no SwiGLU kernel, and gate/up is never written."""
    return _DENSE.norm_gemv(x, residual, norm_weight, eps, w, config, out, swiglu=True)
