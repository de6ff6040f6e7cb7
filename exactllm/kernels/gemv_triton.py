"""Few-row linears on dense 16-bit weights (decode at small batch), with the op before them fused in.

Same signatures and rounding points as kernels/gemv.py:
- gemv(x, w): y = x @ w.T, for the projections with no fusable prologue (attention output).
- norm_gemv(x, residual, norm_weight, eps, w): RMSNorm (and the residual add) in the prologue; each
  program recomputes the inverse RMS of its rows (a 2048-wide row is 4 KB, read from L2 then L1),
  program 0 writes the new residual stream (exactly once, to a tensor distinct from x and residual),
  so the norm kernel before qkv and before gate/up disappears.
- silu_gemv(gate, up, w): SwiGLU in the prologue of the down projection (no silu_mul kernel).

Why not cuBLAS: at M = 1 a decode linear reads 8-46 MB of weights once, so its floor is bytes /
2.9 TB/s (3-16 us on an H100); cuBLAS reaches ~50% of that on the 2048-row matrices and needs a
second kernel for its split-K. Here a program owns BLOCK_N whole rows of the weight and streams
them with 128-bit loads; N / BLOCK_N programs (256-640 on TinyLlama's matrices at BLOCK_N 4-8) fill
the 132 SMs without splitting K, so no partial sums and no combine step are needed.

Summation order. A program keeps a [BLOCK_M, BLOCK_N, LANES] float32 accumulator: lane j of a row
adds the products of k = j, j + LANES, j + 2 LANES, ... in increasing k (UNROLL sub-tiles of a loop
step are added one after the other), and one ``tl.sum`` over the LANES lanes ends it. That order
does not depend on BLOCK_N, UNROLL, num_warps or num_stages, so every config gives the same bits
(checked on the GPU by bench/gemv_bf16.py) and picking the fastest by timing keeps fast mode
deterministic from run to run. Each row's output depends only on that row (padding rows of a CUDA
graph bucket change nothing), but BLOCK_M follows M, so this is not a batch-invariant kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LANES = 256
MAX_BLOCK_M = 8
PLAIN, NORM, NORM_ADD, SILU = 0, 1, 2, 3
# (BLOCK_N, UNROLL, num_warps, num_stages) candidates per BLOCK_M; the first is the default
# where none can be timed (CPU, CUDA-graph capture).
CANDIDATES = {1: [(4, 2, 4, 1), (8, 2, 4, 1), (4, 4, 4, 1), (8, 4, 8, 1)],
              2: [(4, 2, 4, 1), (8, 2, 8, 1), (4, 4, 4, 1)],
              4: [(4, 1, 4, 1), (8, 1, 8, 1), (4, 2, 4, 1)],
              8: [(4, 1, 4, 1), (8, 1, 8, 1), (2, 2, 2, 1)]}


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
                 PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                 LANES: tl.constexpr):
    pid_n = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)[:, None, None]
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :, None]
    lanes = tl.arange(0, LANES)[None, None, :]
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    r_rows = r_ptr + offs_m.to(tl.int64) * stride_rm
    w_rows = w_ptr + offs_n * stride_wn
    dt = y_ptr.dtype.element_ty
    if PROLOGUE == 1 or PROLOGUE == 2:
        ss = tl.zeros([BLOCK_M, 1, LANES], dtype=tl.float32)
        for k0 in range(0, K, LANES):
            kk = k0 + lanes
            s = _input(x_rows, r_rows, kk, mask_m & (kk < K), PROLOGUE).to(tl.float32)
            ss += s * s
        rstd = 1.0 / tl.sqrt_rn(tl.sum(ss, axis=2, keep_dims=True) / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N, LANES], dtype=tl.float32)
    for k0 in range(0, K, LANES * UNROLL):
        for u in tl.static_range(UNROLL):
            kk = k0 + u * LANES + lanes
            kmask = kk < K
            w = tl.load(w_rows + kk, mask=mask_n & kmask, other=0.0)
            xk = _input(x_rows, r_rows, kk, mask_m & kmask, PROLOGUE)
            if PROLOGUE == 2:
                if pid_n == 0:
                    tl.store(ro_ptr + offs_m.to(tl.int64) * stride_om + kk, xk, mask=mask_m & kmask)
            if PROLOGUE == 1 or PROLOGUE == 2:
                nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
                xk = (xk.to(tl.float32) * rstd * nw).to(dt)
            acc += w.to(tl.float32) * xk.to(tl.float32)
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
    if config is None:
        config = tuned_config(prologue, x, r, nw, w, eps, residual_out)
    bn, unroll, warps, stages = config
    ro = residual_out if residual_out is not None else y
    _gemv_kernel[(triton.cdiv(N, bn), triton.cdiv(M, block_m))](
        x, r, nw, w, y, ro, M, N, K, x.stride(0), r.stride(0), w.stride(0), y.stride(0), ro.stride(0), eps,
        PROLOGUE=prologue, BLOCK_M=block_m, BLOCK_N=bn, UNROLL=unroll, LANES=LANES,
        num_warps=warps, num_stages=stages)
    return y


_best: dict = {}


def tuned_config(prologue: int, x, r, nw, w, eps: float, residual_out) -> tuple:
    """The fastest of CANDIDATES[BLOCK_M], timed once per (prologue, N, K, dtype, BLOCK_M) on the
    GPU with these very tensors; every candidate gives the same bits (module docstring), so which
    one wins changes the speed only."""
    block_m = _block_m(x.shape[0])
    cands = CANDIDATES[block_m]
    key = (prologue, tuple(w.shape), x.dtype, block_m)
    if key in _best:
        return _best[key]
    if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return cands[0]
    from triton.testing import do_bench
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    times = [(do_bench(lambda c=c: _launch(prologue, x, r, nw, w, eps, c, y, residual_out),
                       warmup=5, rep=20, return_mode="median"), i) for i, c in enumerate(cands)]
    _best[key] = cands[min(times)[1]]
    return _best[key]


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
