"""TBIK Triton matmul on GPU: bit-identity checks at full size, then TFLOP/s vs cuBLAS.

    PYTHONPATH=. python bench/tbik_matmul.py --out bench/results [--sweep] [--old FILE] [--jobs 12]

Checks (bf16 in): rows of M=512 vs the same rows computed alone or in batches of 1..511 (the
default config changes with M, so this also crosses tile configs); every config of the sweep
(incl. a 32-row tile, which runs mma.sync instead of wgmma) and every split 1/2/4/8 on the same
inputs, plain and with a wide exponent range; K split over 1/2/4/8 TP partials combined by
tree; reruns (the in-kernel split combine must not race); bf16 output == FP32 root rounded;
a different tree (MAX_LEAF 128) must differ; relative error vs float64.
--quant: the same for Q8_0/Q4_0/Q4_1 weights read from their planes, and timing against the
fast and batch-invariant linears (section "quantized weights" below; tbik_matmul_quant.json).
Bench: the model's linear shapes at M = 1, 8, 64, 256, 2048: cuBLAS (x @ w.T, bf16 out) vs
TBIK (bf16 out, what the engine calls) with the default config, each sweep config (--sweep)
and the previous kernel (--old: a copy of the old module, FP32 out plus a cast, as the engine
called it); medians of triton.testing.do_bench (eager, launch included),
do_bench_cudagraph (GPU time, as in the engine's captured decode) and the host time per call.  Kernels are compiled
first in --jobs parallel processes (Triton's disk cache).  Prints a table, writes
tbik_matmul.json and tbik_matmul.png.
--small: small-M variants (section "small M" below; tbik_small_m.json, leaf_probe.pt);
--fit-leaf leaf_probe.pt (CPU): the integer model of the MMA step (mma_step_model) against it.
--e2e MODEL: tp_invariant end to end with the small-M tile off and on, PDL off and on (E2E_RUNS).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import time

import torch
import triton
import triton.language as tl

import exactllm.kernels.tree_matmul_triton as tk
from exactllm.formats.quant import QuantWeight
from exactllm.kernels import matmul_triton as mt
from exactllm.kernels.tree import combine_partials
from exactllm.kernels.tree_matmul_triton import Config
from ptx import launched_ptx  # bench/ is on sys.path: this script runs from there

# TinyLlama-1.1B linears (N, K): qkv, o, gate_up, down, lm_head; plus k/v alone and the
# unfused FFN projections, for comparison with the earlier table.
SHAPES = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (32000, 2048), (256, 2048), (5632, 2048)]
MS = [1, 8, 64, 256, 2048]
SWEEP = {
    "small": [Config(64, 64, 4, 4), Config(32, 64, 4, 4), Config(64, 128, 4, 4), Config(64, 32, 4, 4)],
    "large": [Config(64, 64, 4, 4), Config(64, 128, 4, 4), Config(128, 64, 8, 4), Config(128, 64, 8, 3),
              Config(128, 128, 8, 4, True, True), Config(128, 128, 8, 4, False, True)],
}


CHECK_SHAPES = [(2048, 2048), (2048, 5632), (256, 2048)]
SLICES = [(0, 1), (77, 1), (511, 1), (3, 7), (9, 8), (100, 64), (5, 65), (5, 200), (300, 212), (0, 511)]


def cfg_name(c: Config) -> str:
    return f"{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages}" + ("S" if c.spill_top else "") + ("U" if c.unroll else "")


def sweep_configs(M):
    return SWEEP["small"] if M <= 64 else SWEEP["large"]


def all_configs():
    seen = []
    for c in SWEEP["small"] + SWEEP["large"]:
        if c not in seen:
            seen.append(c)
    return seen


def load_old(path):
    spec = importlib.util.spec_from_file_location("old_tbik", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inputs(M, N, K, dev, g=None, wide=False):
    x = torch.randn(M, K, device=dev, generator=g)
    w = torch.randn(N, K, device=dev, generator=g) / K ** 0.5
    if wide:   # per-column scales 2^-12..2^12: products of very different magnitude share a sum
        x = x * torch.exp2(torch.randint(-12, 13, (1, K), device=dev, generator=g).float())
    return x.bfloat16(), w.bfloat16()


def check(dev, old):
    g = torch.Generator(device=dev).manual_seed(0)
    out = []
    for N, K in CHECK_SHAPES:
        for wide in (False, True):
            x, w = _inputs(512, N, K, dev, g, wide)
            y = tk.tbik_matmul(x, w)
            ref = x.double() @ w.double().T
            row = dict(N=N, K=K, wide=wide, rel_err=((y.double() - ref).norm() / ref.norm()).item(),
                       cublas_rel_err=(((x @ w.T).double() - ref).norm() / ref.norm()).item())
            slices = SLICES
            row["batch_invariant"] = all(torch.equal(tk.tbik_matmul(x[s:s + m], w), y[s:s + m]) for s, m in slices)
            bad = []
            for c in all_configs():
                for s in (1, 2, 4, 8):
                    if not torch.equal(tk.tbik_matmul(x, w, splits=s, config=c), y):
                        bad.append(f"{cfg_name(c)}/split{s}")
                if not torch.equal(tk.tbik_matmul(x[5:6], w, config=c), y[5:6]):
                    bad.append(f"{cfg_name(c)}/M1")
            row["config_split_invariant"] = not bad
            row["config_split_differs"] = bad
            tp_ok = True
            for parts in (2, 4, 8):
                k = K // parts
                partials = [tk.tbik_matmul_partial(x[:, r * k:(r + 1) * k].contiguous(),
                                                   w[:, r * k:(r + 1) * k].contiguous(), parts) for r in range(parts)]
                tp_ok &= torch.equal(combine_partials(partials), y)
            row["tp_invariant"] = tp_ok
            row["rerun_identical"] = all(torch.equal(tk.tbik_matmul(x[:3], w, splits=8), y[:3]) for _ in range(20))
            row["bf16_out_is_rounded_root"] = torch.equal(tk.tbik_matmul(x, w, out_dtype=torch.bfloat16),
                                                          y.bfloat16())
            saved, tk.MAX_LEAF = tk.MAX_LEAF, 128
            row["other_tree_differs"] = not torch.equal(tk.tbik_matmul(x, w), y)
            tk.MAX_LEAF = saved
            row["cublas_batch_differs"] = not all(torch.equal(x[s:s + m] @ w.T, (x @ w.T)[s:s + m]) for s, m in slices)
            if old is not None:
                row["old_kernel_same_bits"] = torch.equal(old.tbik_matmul(x, w), y)
            print("check", row, flush=True)
            out.append(row)
    return out


def _calls(M, N, K, sweep):
    """(label, fn) pairs timed for one shape; the TBIK ones return bf16 like cuBLAS."""
    yield "default", lambda x, w: tk.tbik_matmul(x, w, out_dtype=torch.bfloat16)
    if sweep:
        for c in sweep_configs(M):
            yield cfg_name(c), (lambda c: lambda x, w: tk.tbik_matmul(x, w, out_dtype=torch.bfloat16, config=c))(c)


def _warm(job):
    """Worker: compile (run once) the kernel variants of one job so the timing run hits
    Triton's disk cache.  ("bench", M, N, K, sweep, old_path) or ("check", N, K, config)."""
    if job[0] == "bench":
        _, M, N, K, sweep, old_path = job
        x, w = _inputs(M, N, K, "cuda")
        for _, fn in _calls(M, N, K, sweep):
            fn(x, w)
        if old_path:
            load_old(old_path).tbik_matmul(x, w)
    elif job[3] is not None:
        _, N, K, c = job
        x, w = _inputs(512, N, K, "cuda")
        for s in (1, 2, 4, 8):
            tk.tbik_matmul(x, w, splits=s, config=c)
        tk.tbik_matmul(x[:1], w, config=c)
    else:      # the default-config calls of check()
        _, N, K, _ = job
        x, w = _inputs(512, N, K, "cuda")
        for s, m in SLICES:
            tk.tbik_matmul(x[s:s + m], w)
        for parts in (2, 4, 8):
            tk.tbik_matmul_partial(x[:, :K // parts].contiguous(), w[:, :K // parts].contiguous(), parts)
        tk.tbik_matmul(x[:3], w, splits=8)
        tk.tbik_matmul(x, w, out_dtype=torch.bfloat16)
        tk.MAX_LEAF = 128
        tk.tbik_matmul(x, w)
    torch.cuda.synchronize()
    return job[:3]


def compile_ahead(worker, work, jobs, label):
    """Run ``worker`` on every item of ``work`` in ``jobs`` spawned processes: their launches fill
    Triton's on-disk cache, so the timed runs in this process compile nothing."""
    t = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool:
        for _ in pool.imap_unordered(worker, work):
            pass
    print(f"{label}compiled in {time.time() - t:.0f} s", flush=True)


def warm_all(sweep, old_path, jobs):
    work = [("check", N, K, c) for N, K in CHECK_SHAPES for c in all_configs() + [None]]
    work += [("bench", M, N, K, sweep, old_path) for M in MS for N, K in SHAPES]
    compile_ahead(_warm, work, jobs, "")


def host_us(fn, n=200):
    """Host time per call (microseconds) of back-to-back launches, the GPU kept ahead."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return t


def bench(dev, sweep, old):
    rows = []
    for M in MS:
        for N, K in SHAPES:
            x, w = _inputs(M, N, K, dev)
            flop = 2.0 * M * N * K
            tf = lambda ms: flop / ms / 1e9  # noqa: E731
            row = dict(M=M, N=N, K=K)
            row["cublas_ms"] = triton.testing.do_bench(lambda: x @ w.T, warmup=10, rep=50)
            if old is not None:
                row["old_ms"] = triton.testing.do_bench(lambda: old.tbik_matmul(x, w).bfloat16(), warmup=10, rep=50)
            for label, fn in _calls(M, N, K, sweep):
                row[f"tbik_{label}_ms"] = triton.testing.do_bench(lambda: fn(x, w), warmup=10, rep=50)
            row["cublas_graph_ms"] = triton.testing.do_bench_cudagraph(lambda: x @ w.T, rep=50)
            row["tbik_default_graph_ms"] = triton.testing.do_bench_cudagraph(
                lambda: tk.tbik_matmul(x, w, out_dtype=torch.bfloat16), rep=50)
            row["cublas_host_us"] = host_us(lambda: x @ w.T)
            row["tbik_host_us"] = host_us(lambda: tk.tbik_matmul(x, w, out_dtype=torch.bfloat16))
            best = min((v, k[5:-3]) for k, v in row.items() if k.startswith("tbik_") and k.endswith("_ms") and "graph" not in k)
            row.update(cublas_tflops=tf(row["cublas_ms"]), tbik_tflops=tf(row["tbik_default_ms"]),
                       best_ms=best[0], best_cfg=best[1], best_tflops=tf(best[0]),
                       ratio=row["cublas_ms"] / row["tbik_default_ms"])
            if old is not None:
                row["old_tflops"] = tf(row["old_ms"])
            row["graph_ratio"] = row["cublas_graph_ms"] / row["tbik_default_graph_ms"]
            print("bench", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
    return rows


# ---- quantized weights (--quant) ------------------------------------------------------------
# Checks: TBIK on QuantWeight planes == TBIK on the dequantized BF16 weight (torch and Triton
# dequantizers), for Q8_0/Q4_0/Q4_1 at K=2048, 5632 (planes read by block) and 576 (per element);
# every config (wgmma, and a 32-row mma.sync tile: Triton lays a weight dequantized in registers out
# differently there, so it is recorded, not expected) x split; rows alone; K over TP shards; reruns;
# another tree differs; batch invariance of matmul_triton.linear(invariant=True).
# Timing (CUDA graphs over weight copies rotated past L2, bench/linear_kernels.bench_us): per
# TinyLlama shape and M: fast linear, the invariant GEMM, TBIK before (torch dequantize + TBIK),
# TBIK on the planes, Triton dequantize + dense TBIK; at M=1 two TBIK configs x splits.
Q_CHECK_SHAPES = [(2048, 2048), (2048, 5632), (1000, 576)]
Q_CONFIGS = [Config(64, 64, 4, 4), Config(64, 32, 4, 4), Config(64, 128, 4, 4), Config(128, 64, 8, 4)]
Q_MMA_SYNC = Config(32, 64, 4, 4)
Q_SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
            "lm_head": (32000, 2048)}
Q_MS = [1, 256, 2048]
Q_M1_SPLITS = [1, 2, 4, 8]


def _qinputs(M, N, K, qtype, dev, g=None):
    x = torch.randn(M, K, device=dev, generator=g).bfloat16()
    return x, QuantWeight.quantize(torch.randn(N, K, device=dev, generator=g) / K ** 0.5, qtype)


def _q_check_configs(qtype, K):
    return Q_CONFIGS + [Q_MMA_SYNC] if qtype != "q4_1" and K != 576 else Q_CONFIGS[:1]


def check_quant(dev):
    g = torch.Generator(device=dev).manual_seed(1)
    out = []
    for qtype in ("q8_0", "q4_0", "q4_1"):
        for N, K in Q_CHECK_SHAPES:
            x, w = _qinputs(512, N, K, qtype, dev, g)
            y = tk.tbik_matmul(x, w)
            ref = x.double() @ w.dequantize(torch.float64).T
            row = dict(qtype=qtype, N=N, K=K, aligned=tk._aligned(tk.tree_shape(K, 1)),
                       rel_err=((y.double() - ref).norm() / ref.norm()).item(),
                       same_as_torch_dequant=torch.equal(y, tk.tbik_matmul(x, w.dequantize(torch.bfloat16))),
                       same_as_triton_dequant=torch.equal(y, tk.tbik_matmul(x, mt.dequantize(w, torch.bfloat16))))
            row["batch_invariant"] = all(torch.equal(tk.tbik_matmul(x[s:s + m], w), y[s:s + m]) for s, m in SLICES)
            bad, mma_sync = [], None
            for c in _q_check_configs(qtype, K):
                same = all(torch.equal(tk.tbik_matmul(x, w, splits=s, config=c), y) for s in (1, 2, 8)) \
                    and torch.equal(tk.tbik_matmul(x[5:6], w, config=c), y[5:6])
                if c == Q_MMA_SYNC:
                    mma_sync = same
                elif not same:
                    bad.append(cfg_name(c))
            row["configs_differing"] = bad
            row["mma_sync_32row_same"] = mma_sync
            tp = {}
            for parts in (2, 4, 8):
                if (K // 32) % parts == 0:
                    k = K // parts
                    partials = [tk.tbik_matmul_partial(x[:, r * k:(r + 1) * k].contiguous(), w.shard(1, r, parts), parts)
                                for r in range(parts)]
                    tp[parts] = torch.equal(combine_partials(partials), y)
            row["tp_invariant"] = tp
            row["rerun_identical"] = all(torch.equal(tk.tbik_matmul(x[:3], w, splits=8), y[:3]) for _ in range(20))
            saved, tk.MAX_LEAF = tk.MAX_LEAF, 128
            row["other_tree_differs"] = not torch.equal(tk.tbik_matmul(x, w), y)
            tk.MAX_LEAF = saved
            full = mt.linear(x, w, invariant=True)
            row["linear_invariant_rows_same"] = all(torch.equal(mt.linear(x[s:s + m], w, invariant=True), full[s:s + m])
                                                    for s, m in SLICES)
            print("qcheck", {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            out.append(row)
    return out


def _q_timed(M):
    """(label, fn(x, w)) of the quantized timing at M rows."""
    yield "fast", lambda x, w: mt.linear(x, w)
    yield "inv_gemm", lambda x, w: mt.gemm(x, w, mt._tuned_tiles(x, w, "wgmma"))
    if M <= 256:
        yield "tbik_before", lambda x, w: tk.tbik_matmul(x, w.dequantize(x.dtype), out_dtype=x.dtype)
    yield "tbik_q", lambda x, w: tk.tbik_matmul(x, w, out_dtype=x.dtype)
    yield "tbik_dq", lambda x, w: tk.tbik_matmul(x, mt.dequantize(w, x.dtype), out_dtype=x.dtype)
    if M == 1:
        for c in Q_CONFIGS[:2]:
            for s in Q_M1_SPLITS:
                yield f"tbik_q_{cfg_name(c)}_s{s}", (lambda c, s: lambda x, w: tk.tbik_matmul(
                    x, w, out_dtype=x.dtype, config=c, splits=s))(c, s)


def _warm_quant(job):
    """Worker: compile the quantized variants of one (qtype, M, N, K) for the disk cache."""
    kind, qtype, M, N, K = job
    x, w = _qinputs(M, N, K, qtype, "cuda")
    if kind == "check":
        for c in _q_check_configs(qtype, K):
            for s in (1, 2, 8):
                tk.tbik_matmul(x, w, splits=s, config=c)
            tk.tbik_matmul(x[:1], w, config=c)
        tk.tbik_matmul(x, w.dequantize(torch.bfloat16))
        for parts in (2, 4, 8):
            if (K // 32) % parts == 0:
                tk.tbik_matmul_partial(x[:, :K // parts].contiguous(), w.shard(1, 0, parts), parts)
        tk.tbik_matmul(x[:3], w, splits=8)
        tk.MAX_LEAF = 128
        tk.tbik_matmul(x, w)
        tk.MAX_LEAF = 1024
    else:
        for _, fn in _q_timed(M):
            fn(x, w)
    torch.cuda.synchronize()
    return job


def warm_quant(jobs, timing=True):
    work = [("check", q, 512, N, K) for q in ("q8_0", "q4_0", "q4_1") for N, K in Q_CHECK_SHAPES]
    if timing:
        work += [("time", q, M, N, K) for q in ("q8_0", "q4_0") for M in Q_MS for N, K in Q_SHAPES.values()]
    compile_ahead(_warm_quant, work, jobs, "quant: ")


def bench_quant():
    from linear_kernels import bench_us, copies
    rows = []
    for qtype in ("q8_0", "q4_0"):
        for name, (N, K) in Q_SHAPES.items():
            ws = copies(qtype, N, K)
            for M in Q_MS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                row = dict(qtype=qtype, shape=name, M=M, N=N, K=K)
                for label, fn in _q_timed(M):
                    row[label + "_us"] = bench_us(lambda w, fn=fn: fn(x, w), ws)
                m1 = {k: v for k, v in row.items() if k.startswith("tbik_q_")}
                if m1:
                    row["tbik_q_best"] = min((v, k) for k, v in m1.items())
                print("qbench", qtype, name, M, " ".join(f"{k[:-3]}={v:.1f}" for k, v in row.items()
                                                      if k.endswith("_us") and not k.startswith("tbik_q_")),
                      "best_m1", row.get("tbik_q_best"), flush=True)
                rows.append(row)
            del ws
            torch.cuda.empty_cache()
    return rows


# ---- small M (--small) ------------------------------------------------------------------------
# 1. Leaf bits: one MMA step (K=16) and a 4-step chunk (K=64) on the same bf16 A, B and fp32 C as
#    a wgmma tile, the same wgmma with A and B exchanged (D.T = B.T @ A.T + C.T, the small-M
#    layout), a 16-row mma.sync tile, and a CUDA-core FMA chain in K order; A, B, C and every D
#    are saved (leaf_probe.pt) for models of the MMA's summation fitted off the GPU.
# 2. Bits: rows 1..16 through each swapped config x splits 1/2/4/8 and TP 2/4/8 partials == the
#    same rows inside M=512 through the default (large-M) path; BF16 and the three quantized types.
# 3. Time at M = 1, 8, 16 (CUDA graphs over weight copies rotated past L2): the fast linear, the
#    default TBIK with PDL off (the previous kernel) and on, and each swapped config x splits.
PROBE_MODES = {"wgmma": (64, False, False), "wgmma_swap": (64, True, False), "wgmma_swap16": (16, True, False),
               "mma_sync16": (16, False, False), "fma_chain": (64, False, True)}
SMALL_CONFIGS = [Config(16, 64, 4, 4, swap=True), Config(16, 128, 4, 4, swap=True),
                 Config(16, 128, 8, 4, swap=True), Config(16, 256, 8, 3, swap=True)]
SMALL_SLICES = [(0, 1), (77, 1), (511, 1), (3, 7), (9, 8), (100, 16), (5, 13)]
SMALL_CHECK = {"bf16": [(2048, 2048), (2048, 5632)], "q8_0": [(2048, 2048), (1000, 576)],
               "q4_0": [(2048, 5632)], "q4_1": [(2048, 2048), (1000, 576)]}
SMALL_TIME = {"bf16": Q_SHAPES, "q8_0": Q_SHAPES}
SMALL_MS = [1, 8]


@triton.jit
def _probe_kernel(a_ptr, b_ptr, c_ptr, d_ptr, BM: tl.constexpr, KD: tl.constexpr, SWAP: tl.constexpr,
                  FMA: tl.constexpr):
    """D[:BM] = A[:BM] @ B + C[:BM] for program p's A [64, KD] bf16, B [KD, 64] bf16, C [64, 64] fp32."""
    p = tl.program_id(0)
    rm = tl.arange(0, BM)
    rn = tl.arange(0, 64)
    rk = tl.arange(0, KD)
    a_ptr += p * 64 * KD
    b_ptr += p * KD * 64
    c_ptr += p * 64 * 64
    d_ptr += p * 64 * 64
    if SWAP:
        at = tl.load(a_ptr + rm[None, :] * KD + rk[:, None])
        bt = tl.load(b_ptr + rk[None, :] * 64 + rn[:, None])
        dt = tl.dot(bt, at, tl.load(c_ptr + rm[None, :] * 64 + rn[:, None]))
        tl.store(d_ptr + rm[None, :] * 64 + rn[:, None], dt)
    else:
        d = tl.load(c_ptr + rm[:, None] * 64 + rn[None, :])
        if FMA:
            for k in tl.static_range(KD):
                d = tl.fma(tl.broadcast_to(tl.load(a_ptr + rm * KD + k).to(tl.float32)[:, None], (BM, 64)),
                           tl.broadcast_to(tl.load(b_ptr + k * 64 + rn).to(tl.float32)[None, :], (BM, 64)), d)
        else:
            d = tl.dot(tl.load(a_ptr + rm[:, None] * KD + rk[None, :]),
                       tl.load(b_ptr + rk[:, None] * 64 + rn[None, :]), d)
        tl.store(d_ptr + rm[:, None] * 64 + rn[None, :], d)


def leaf_probe(out_dir, programs=256):
    g = torch.Generator(device="cuda").manual_seed(3)
    res, saved = {}, {}
    for KD in (16, 64):
        a = torch.randn(programs, 64, KD, device="cuda", generator=g)
        b = torch.randn(programs, KD, 64, device="cuda", generator=g)
        wide = torch.exp2(torch.randint(-12, 13, (programs // 2, 1, KD), device="cuda", generator=g).float())
        a[programs // 2:] *= wide                          # half the problems: products 2^-24..2^24 apart
        c = torch.randn(programs, 64, 64, device="cuda", generator=g) * torch.exp2(
            torch.randint(-8, 9, (programs, 1, 1), device="cuda", generator=g).float())
        c[::4] = 0                                         # a leaf's first step starts from zero
        a, b = a.bfloat16().contiguous(), b.bfloat16().contiguous()
        keep = torch.cat([torch.arange(16), torch.arange(programs // 2, programs // 2 + 16)])  # plain + wide
        ds = {}
        for name, (bm, swap, fma) in PROBE_MODES.items():
            d = torch.full((programs, 64, 64), float("nan"), device="cuda")
            _probe_kernel[(programs,)](a, b, c, d, BM=bm, KD=KD, SWAP=swap, FMA=fma, num_warps=4)
            ds[name] = d[:, :bm]
        ref = ds["wgmma"]
        res[KD] = {name: int((d != ref[:, :d.shape[1]]).sum()) for name, d in ds.items()}
        res[KD]["elements"] = ref.numel()
        saved[KD] = {n: t[keep].cpu() for n, t in dict(a=a, b=b, c=c, wgmma=ref, fma_chain=ds["fma_chain"]).items()}
        print("leaf probe K", KD, "differing from wgmma:", res[KD], flush=True)
    torch.save(saved, os.path.join(out_dir, "leaf_probe.pt"))
    return res


def mma_step_model(a, b, c, keep=25):
    """One bf16 k16 MMA step in exact integer arithmetic, a model fitted to the H100 (leaf_probe.pt:
    0 of 196,608 outputs differ over K=16 and K=64 chains): products exact with exponents taken
    unnormalized (ea + eb); the products and c aligned to the largest exponent emax, each
    truncated at 2**(emax - keep); summed exactly; the sum truncated (toward zero) to FP32.
    ``a``, ``b``: the 16 values (floats), ``c``: the accumulator.  Not an FMA chain: which is why
    a CUDA-core leaf would need this integer emulation (~10 integer ops per product) to match."""
    def lg(v):
        return math.frexp(v)[1] - 1
    terms = [(lg(x) + lg(y), x * y) for x, y in zip(a, b) if x != 0 and y != 0]
    if c != 0:
        terms.append((lg(c), c))
    if not terms:
        return 0.0
    lsb = max(e for e, _ in terms) - keep
    total = 0
    for _, v in terms:
        mant, e = math.frexp(v)
        iv, sh = int(math.ldexp(mant, 53)), lsb - (e - 53)     # v == iv * 2**(e - 53)
        total += (iv << -sh) if sh <= 0 else (abs(iv) >> sh) * (1 if iv > 0 else -1)
    if total == 0:
        return 0.0
    m, sh = abs(total), max(0, abs(total).bit_length() - 24)
    return math.copysign(math.ldexp(m >> sh, lsb + sh), total)


def fit_leaf(path):
    """Outputs of the saved leaf probe (wgmma, K=16 and 4-step K=64 chains) the model misses."""
    res = {}
    for KD, d in torch.load(path).items():
        a, b, c, g = (d[k].double().numpy() for k in ("a", "b", "c", "wgmma"))
        bad = n = 0
        for p in range(a.shape[0]):
            for i in range(64):
                for j in range(64):
                    acc = c[p, i, j]
                    for s in range(0, KD, 16):
                        acc = mma_step_model(a[p, i, s:s + 16], b[p, s:s + 16, j], acc)
                    bad += acc != g[p, i, j]
                    n += 1
        res[KD] = dict(outputs=n, model_differs=int(bad))
        print(f"leaf model K={KD}: {bad} of {n} outputs differ from the wgmma", flush=True)
    return res


def _sweight(wtype, N, K, dev="cuda", g=None):
    w = torch.randn(N, K, device=dev, generator=g) / K ** 0.5
    return w.bfloat16() if wtype == "bf16" else QuantWeight.quantize(w, wtype)


def _shard(w, r, parts):
    k = w.shape[1] // parts
    return w[:, r * k:(r + 1) * k].contiguous() if isinstance(w, torch.Tensor) else w.shard(1, r, parts)


def mma_line(call):
    """The first MMA instruction in the PTX of the TBIK kernel that ``call`` launches, shortened
    (wgmma with A from registers lists A's registers in braces; from shared memory, a descriptor)."""
    for line in launched_ptx(tk._tbik_kernel, call).splitlines():
        if "wgmma.mma_async" in line or "mma.sync" in line:
            return " ".join(line.split())[:160]
    return "none"


def _small_variants(K):
    """(config, splits, TP parts) checked: the first config at every split and TP size, the
    others at splits 1 and 8."""
    for i, c in enumerate(SMALL_CONFIGS):
        for s in ((1, 2, 4, 8) if i == 0 else (1, 8)):
            yield c, s, 1
        if i == 0:
            for parts in (2, 4, 8):
                if (K // 32) % parts == 0:
                    yield c, None, parts


def check_small(dev):
    g = torch.Generator(device=dev).manual_seed(4)
    out = []
    for wtype, shapes in SMALL_CHECK.items():
        for N, K in shapes:
            x = torch.randn(512, K, device=dev, generator=g).bfloat16()
            w = _sweight(wtype, N, K, dev, g)
            y = tk.tbik_matmul(x, w, config=Config(128, 64, 8, 4))
            row = dict(wtype=wtype, N=N, K=K, differing={})
            for c, s, parts in _small_variants(K):
                if parts == 1:
                    bad = sum(int((tk.tbik_matmul(x[a:a + m], w, splits=s, config=c) != y[a:a + m]).sum())
                              for a, m in SMALL_SLICES)
                else:
                    k = K // parts
                    partials = [tk.tbik_matmul_partial(x[3:19, r * k:(r + 1) * k].contiguous(), _shard(w, r, parts),
                                                       parts, config=c) for r in range(parts)]
                    bad = int((combine_partials(partials) != y[3:19]).sum())
                row["differing"][f"{cfg_name(c)}/split{s}/tp{parts}"] = bad
            row["mma"] = {cfg_name(c): mma_line(lambda: tk.tbik_matmul(x[:1], w, splits=1, config=c))
                          for c in SMALL_CONFIGS[:3:2]}
            row["mma"]["default_m512"] = mma_line(lambda: tk.tbik_matmul(x, w, config=Config(128, 64, 8, 4)))
            row["default_small_rows_differing"] = sum(int((tk.tbik_matmul(x[a:a + m], w) != y[a:a + m]).sum())
                                                      for a, m in SMALL_SLICES)
            tree, (saved, tk.MAX_LEAF) = tk.tree_shape(K, 1), (tk.MAX_LEAF, 128)
            if tk.tree_shape(K, 1) != tree:          # only where 128-element leaves are another tree
                row["other_tree_differs"] = not torch.equal(tk.tbik_matmul(x[:16], w, config=SMALL_CONFIGS[0]), y[:16])
            tk.MAX_LEAF = saved
            print("small check", row, flush=True)
            out.append(row)
    return out


OLD_SMALL = {"q8_0": Config(64, 32, 4, 4)}     # the M <= 64 tiles before the swapped one (else 64x64)


def _small_timed(M, wtype, all_variants=True):
    """(label, fn(x, w)) timed at M rows: the fast linear, the previous small-M tile ("before")
    and the default, each with PDL off and on (tk.PDL is read at launch, so set around calls),
    then every swapped config x splits."""
    def call(cfg, splits=None, pdl=True):
        def fn(x, w):
            saved, tk.PDL = tk.PDL, pdl
            try:
                return tk.tbik_matmul(x, w, out_dtype=x.dtype, config=cfg, splits=splits)
            finally:
                tk.PDL = saved
        return fn
    if M == 1:   # what fast mode runs (ops.GEMV_MAX_M): our GEMV for dense weights; the quantized linear
        from exactllm.kernels import gemv_triton
        yield "fast", lambda x, w: gemv_triton.gemv(x, w) if isinstance(w, torch.Tensor) else mt.linear(x, w)
    else:
        yield "fast", lambda x, w: x @ w.T if isinstance(w, torch.Tensor) else mt.linear(x, w)
    old = OLD_SMALL.get(wtype, tk.FIXED_CONFIG)
    yield "before", call(old, pdl=False)
    yield "before_pdl", call(old)
    yield "default_nopdl", call(None, pdl=False)
    yield "default", call(None)
    if all_variants:
        for c in SMALL_CONFIGS:
            for s in (None, 2, 8):
                yield f"{cfg_name(c)}_s{s or 'd'}", call(c, s)


def _warm_small(job):
    kind, wtype, M, N, K = job
    x = torch.randn(M, K, device="cuda").bfloat16()
    w = _sweight(wtype, N, K)
    if kind == "check":
        tk.tbik_matmul(x, w, config=Config(128, 64, 8, 4))
        for c, s, parts in _small_variants(K):
            if parts == 1:
                tk.tbik_matmul(x[:1], w, splits=s, config=c)
            else:
                tk.tbik_matmul_partial(x[:1, :K // parts].contiguous(), _shard(w, 0, parts), parts, config=c)
        tk.tbik_matmul(x[:1], w)
        tk.tbik_matmul(x[:16], w)
        tk.MAX_LEAF = 128
        tk.tbik_matmul(x[:1], w, config=SMALL_CONFIGS[0])
        tk.MAX_LEAF = 1024
    else:
        for m in SMALL_MS:
            for _, fn in _small_timed(m, wtype, m == 1):
                fn(x[:1].expand(m, K).contiguous(), w)
    torch.cuda.synchronize()
    return job


def warm_small(jobs, timing=True):
    work = [("check", q, 512, N, K) for q, shapes in SMALL_CHECK.items() for N, K in shapes]
    if timing:   # one M per compile class: the timed kernels do not specialize on M
        work += [("time", q, 1, N, K) for q, shapes in SMALL_TIME.items() for N, K in dict.fromkeys(shapes.values())]
    compile_ahead(_warm_small, work, jobs, "small: ")


def bench_small():
    from linear_kernels import bench_us, copies
    rows = []
    for wtype, shapes in SMALL_TIME.items():
        for name, (N, K) in shapes.items():
            ws = copies(wtype, N, K)
            for M in SMALL_MS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                row = dict(wtype=wtype, shape=name, M=M, N=N, K=K)
                for label, fn in _small_timed(M, wtype, M == 1):
                    row[label] = bench_us(lambda w, fn=fn: fn(x, w), ws)
                swapped = {k: v for k, v in row.items() if k.startswith("16x")}
                row["best_swap"] = min((v, k) for k, v in swapped.items()) if swapped else None
                print(f"small {wtype} {name} M={M} " + " ".join(f"{k}={row[k]:.1f}" for k in
                      ("fast", "before", "before_pdl", "default_nopdl", "default")), "best", row["best_swap"],
                      flush=True)
                rows.append(row)
            del ws
            torch.cuda.empty_cache()
    return rows


E2E_RUNS = [("small_off", 0, False), ("small_on", 16, False), ("small_on_pdl", 16, True), ("small_on_again", 16, False),
            ("small_off_again", 0, False)]   # ABBA-like order: drift over the process shows as off != off_again


def e2e(model, out_dir, tokens, batch_sizes):
    """End to end in one process (bench/invariance_gpu.run_mode: bit checks batch vs 1 and train ==
    serve, tok/s): fast once, then tp_invariant with the small-M tile off / on, PDL off / on."""
    from invariance_gpu import run_mode
    rows = {}
    for label, small_m, on in [("fast", tk.SMALL_M, False)] + E2E_RUNS:
        tk.SMALL_M, tk.PDL = small_m, on
        rows[label] = run_mode(model, "fast" if label == "fast" else "tp_invariant", batch_sizes, tokens, "cuda")
        print("e2e", label, json.dumps(rows[label], default=str), flush=True)
        with open(os.path.join(out_dir, "tbik_small_m_e2e.json"), "w") as f:
            json.dump(dict(model=model, device=torch.cuda.get_device_name(), runs=rows), f, indent=1, default=str)
    return rows


def print_quant_table(rows):
    print(f"\n{'q':5} {'shape':8} {'M':>5} {'fast':>7} {'invGEMM':>7} {'TBIKold':>7} {'TBIKq':>7} "
          f"{'TBIKdq':>7} best-M1 (us, CUDA graph, weights rotated past L2)")
    for r in rows:
        best = r.get("tbik_q_best", (float("nan"), ""))
        print(f"{r['qtype']:5} {r['shape']:8} {r['M']:>5} {r['fast_us']:7.1f} {r['inv_gemm_us']:7.1f} "
              f"{r.get('tbik_before_us', float('nan')):7.1f} {r['tbik_q_us']:7.1f} {r['tbik_dq_us']:7.1f} "
              f"{best[0]:.1f} {best[1]}")


def print_table(rows):
    print(f"\n{'M':>5} {'N':>6} {'K':>5} {'cuBLAS':>7} {'old':>6} {'TBIK':>6} {'TBIK/cuBLAS':>11} "
          f"{'best cfg':>16} {'best':>6} {'graph ratio':>11} {'host us cuBLAS/TBIK':>19}"
          "   (TFLOP/s eager; ratio = cuBLAS time / TBIK time; graph: CUDA-graph GPU time)")
    for r in rows:
        print(f"{r['M']:>5} {r['N']:>6} {r['K']:>5} {r['cublas_tflops']:>7.1f} {r.get('old_tflops', float('nan')):>6.1f} "
              f"{r['tbik_tflops']:>6.1f} {r['ratio']:>11.2f} {r['best_cfg']:>16} {r['best_tflops']:>6.1f} "
              f"{r['graph_ratio']:>11.2f} {r['cublas_host_us']:>9.1f}/{r['tbik_host_us']:<9.1f}")


def plot(result, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["bench"]
    labels = [f"{r['M']}x{r['N']}x{r['K']}" for r in rows]
    pos = range(len(labels))
    plt.figure(figsize=(14, 4))
    plt.bar([p - 0.27 for p in pos], [r["cublas_tflops"] for r in rows], 0.27, label="cuBLAS bf16")
    if "old_tflops" in rows[0]:
        plt.bar(list(pos), [r["old_tflops"] for r in rows], 0.27, label="TBIK before")
    plt.bar([p + 0.27 for p in pos], [r["tbik_tflops"] for r in rows], 0.27, label="TBIK now")
    plt.xticks(list(pos), labels, rotation=70, fontsize=6)
    plt.ylabel("TFLOP/s")
    plt.yscale("log")
    plt.legend()
    plt.title(f"TBIK matmul vs cuBLAS, {result['device']}")
    plt.tight_layout()
    plt.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--sweep", action="store_true", help="also time every config of SWEEP")
    ap.add_argument("--old", default=None, help="path of the previous tree_matmul_triton.py, timed alongside")
    ap.add_argument("--jobs", type=int, default=12, help="parallel compile processes (0: none)")
    ap.add_argument("--checks-only", action="store_true")
    ap.add_argument("--quant", action="store_true", help="quantized weights only (checks and timing)")
    ap.add_argument("--small", action="store_true", help="small-M variants only (leaf probe, checks, timing)")
    ap.add_argument("--fit-leaf", metavar="LEAF_PROBE_PT", help="no GPU: check the MMA model on a saved probe")
    ap.add_argument("--e2e", metavar="MODEL", help="end to end, tp_invariant with the small-M tile off/on (E2E_RUNS)")
    ap.add_argument("--e2e-tokens", type=int, default=128)
    ap.add_argument("--e2e-batch-sizes", default="1,8")
    args = ap.parse_args()
    if args.fit_leaf:
        fit_leaf(args.fit_leaf)
        return
    if args.e2e:
        os.makedirs(args.out, exist_ok=True)
        e2e(args.e2e, args.out, args.e2e_tokens, [int(b) for b in args.e2e_batch_sizes.split(",")])
        return
    os.makedirs(args.out, exist_ok=True)
    old = load_old(args.old) if args.old else None
    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d"), max_leaf=tk.MAX_LEAF)
    if args.small:
        result["leaf_probe"] = leaf_probe(args.out)
        if args.jobs:
            warm_small(args.jobs, not args.checks_only)
        result["small_checks"] = check_small("cuda")
        print(f"small checks done at {time.time() - t0:.0f} s", flush=True)
        if not args.checks_only:
            result["small_bench"] = bench_small()
        with open(os.path.join(args.out, "tbik_small_m.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"done at {time.time() - t0:.0f} s", flush=True)
        return
    if args.quant:
        if args.jobs:
            warm_quant(args.jobs, not args.checks_only)
        result["quant_checks"] = check_quant("cuda")
        print(f"quant checks done at {time.time() - t0:.0f} s", flush=True)
        if not args.checks_only:
            result["quant_bench"] = bench_quant()
            print_quant_table(result["quant_bench"])
        with open(os.path.join(args.out, "tbik_matmul_quant.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"done at {time.time() - t0:.0f} s", flush=True)
        return
    if args.jobs:
        warm_all(args.sweep, args.old, args.jobs)
    result["checks"] = check("cuda", old)
    print(f"checks done at {time.time() - t0:.0f} s", flush=True)
    if not args.checks_only:
        result["bench"] = bench("cuda", args.sweep, old)
        print_table(result["bench"])
        plot(result, os.path.join(args.out, "tbik_matmul.png"))
    with open(os.path.join(args.out, "tbik_matmul.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"done at {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
