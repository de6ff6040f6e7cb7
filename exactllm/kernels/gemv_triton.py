"""Few-row linears on dense 16-bit weights (decode at small batch), with the op before them fused in.

Same signatures and rounding points as kernels/gemv.py:
- gemv(x, w): y = x @ w.T.
- norm_gemv(x, residual, norm_weight, eps, w): RMSNorm (and the residual add) in the prologue; each
  program recomputes the inverse RMS of its rows (a 2048-wide row is 4 KB, read from L2 then L1),
  program 0 writes the new residual stream (exactly once, to a tensor distinct from x and residual),
  so the norm kernel before qkv and before gate/up disappears.
- silu_gemv(gate, up, w): SwiGLU in the prologue of the down projection (no silu_mul kernel).

Why: at M = 1 a decode linear reads 8-131 MB of weights once, so its floor is bytes / 2.9 TB/s
(3-45 us on an H100); cuBLAS reaches ~50% of it on the 2048-row matrices and needs a second kernel
for its split-K, and the norm / SwiGLU before it are kernels of their own. Here a program owns
BLOCK_N whole rows of the weight and streams them in [BLOCK_N, BLOCK_K] tiles with 128-bit loads,
the next tile loaded while the current one is summed; N / BLOCK_N programs (512-8000 on
TinyLlama's matrices at BLOCK_N = 4) fill the 132 SMs without splitting K, so there are no partial
sums to combine.

Programmatic dependent launch (Hopper; PDL below): the weights never change during decode, so a
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

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MAX_BLOCK_M = 8
PLAIN, NORM, NORM_ADD, SILU = 0, 1, 2, 3
# (BLOCK_N, BLOCK_K, num_warps, num_stages) per BLOCK_M, from the H100 sweep of bench/gemv_bf16.py.
CONFIGS = {1: (4, 1024, 4, 1), 2: (4, 512, 4, 1), 4: (4, 256, 4, 1), 8: (4, 256, 4, 1)}
PDL = True  # programmatic dependent launch on CUDA (Hopper and later)


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


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, r_ptr, nw_ptr, w_ptr, y_ptr, ro_ptr, M, N, K,
                 stride_xm, stride_rm, stride_wn, stride_ym, stride_om, eps,
                 PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)[:, None, None]
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :, None]
    ks = tl.arange(0, BLOCK_K)[None, None, :]
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    r_rows = r_ptr + offs_m.to(tl.int64) * stride_rm
    w_rows = w_ptr + offs_n * stride_wn
    dt = y_ptr.dtype.element_ty
    w = tl.load(w_rows + ks, mask=mask_n & (ks < K), other=0.0)  # first tile: needs no activation
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
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
        xk = _input(x_rows, r_rows, kk, mask_m & kmask, PROLOGUE)
        if PROLOGUE == 2:
            if pid_n == 0:
                tl.store(ro_ptr + offs_m.to(tl.int64) * stride_om + kk, xk, mask=mask_m & kmask)
        if PROLOGUE == 1 or PROLOGUE == 2:
            nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
            xk = (xk.to(tl.float32) * rstd * nw).to(dt)
        acc += w.to(tl.float32) * xk.to(tl.float32)
        w = w_next
    y = tl.sum(acc, axis=2)
    rows = m0 + tl.arange(0, BLOCK_M)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(y_ptr + rows.to(tl.int64) * stride_ym + cols, y.to(dt), mask=(rows < M) & (cols < N))


def _block_m(M: int) -> int:
    return min(MAX_BLOCK_M, triton.next_power_of_2(max(M, 1)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(prologue: int, x, r, nw, w, eps: float, config: tuple | None, out, residual_out):
    """y = prologue(x, r) @ w.T into ``out`` (and x + r into ``residual_out`` for NORM_ADD)."""
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K or w.stride(1) != 1:
        raise ValueError(f"weight {tuple(w.shape)} (contiguous rows) does not match x {tuple(x.shape)}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0:
        return y
    block_m = _block_m(M)
    bn, bk, warps, stages = CONFIGS[block_m] if config is None else config
    ro = residual_out if residual_out is not None else y
    pdl = PDL and x.device.type == "cuda"
    extra = {"launch_pdl": True} if pdl else {}
    _gemv_kernel[(triton.cdiv(N, bn), triton.cdiv(M, block_m))](
        x, r, nw, w, y, ro, M, N, K, x.stride(0), r.stride(0), w.stride(0), y.stride(0), ro.stride(0), eps,
        PROLOGUE=prologue, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl,
        num_warps=warps, num_stages=stages, **extra)
    return y


def gemv(x: torch.Tensor, w: torch.Tensor, config: tuple | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """As ``gemv.gemv_ref``: x [M, K] @ w[N, K].T in x's dtype (float32 accumulation)."""
    x = _rows(x)
    return _launch(PLAIN, x, x, x, w, 0.0, config, out, None)


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              w: torch.Tensor, config: tuple | None = None, out: torch.Tensor | None = None,
              residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``gemv.norm_gemv_ref``: (rmsnorm(x [+ residual]) @ w.T, the new residual stream).
    ``residual_out`` (NORM_ADD only) must not overlap x or residual: other programs still read them."""
    x = _rows(x)
    if residual is None:
        return _launch(NORM, x, x, norm_weight, w, eps, config, out, None), x
    r = _rows(residual)
    new_res = torch.empty_like(x) if residual_out is None else residual_out
    return _launch(NORM_ADD, x, r, norm_weight, w, eps, config, out, new_res), new_res


def silu_gemv(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor, config: tuple | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """As ``gemv.silu_gemv_ref``: (silu(gate) * up) @ w.T; gate and up may be strided row views
    (the halves of one gate/up output)."""
    if gate.shape != up.shape:
        raise ValueError("gate and up differ in shape")
    return _launch(SILU, _rows(gate), _rows(up), gate, w, 0.0, config, out, None)
