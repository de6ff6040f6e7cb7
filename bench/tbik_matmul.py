"""TBIK Triton matmul on GPU: bit-identity checks at full size, then TFLOP/s vs cuBLAS.

    PYTHONPATH=. python bench/tbik_matmul.py --out bench/results [--sweep] [--old FILE] [--jobs 12]

Checks (bf16 in): rows of M=512 vs the same rows computed alone or in batches of 1..511 (the
default config changes with M, so this also crosses tile configs); every config of the sweep
(incl. a 32-row tile, which runs mma.sync instead of wgmma) and every split 1/2/4/8 on the same
inputs, plain and with a wide exponent range; K split over 1/2/4/8 TP partials combined by
tree; reruns (the in-kernel split combine must not race); bf16 output == FP32 root rounded;
a different tree (MAX_LEAF 128) must differ; relative error vs float64.
Bench: the model's linear shapes at M = 1, 8, 64, 256, 2048: cuBLAS (x @ w.T, bf16 out) vs
TBIK (bf16 out, what the engine calls) with the default config, each sweep config (--sweep)
and the previous kernel (--old: a copy of the old module, FP32 out plus a cast, as the engine
called it); medians of triton.testing.do_bench (eager, launch included),
do_bench_cudagraph (GPU time, as in the engine's captured decode) and the host time per call.  Kernels are compiled
first in --jobs parallel processes (Triton's disk cache).  Prints a table, writes
tbik_matmul.json and tbik_matmul.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import time

import torch
import triton

import exactllm.kernels.tree_matmul_triton as tk
from exactllm.kernels.tree import combine_partials
from exactllm.kernels.tree_matmul_triton import Config

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


def warm_all(sweep, old_path, jobs):
    t = time.time()
    work = [("check", N, K, c) for N, K in CHECK_SHAPES for c in all_configs() + [None]]
    work += [("bench", M, N, K, sweep, old_path) for M in MS for N, K in SHAPES]
    with mp.get_context("spawn").Pool(jobs) as pool:
        for _ in pool.imap_unordered(_warm, work):
            pass
    print(f"compiled in {time.time() - t:.0f} s", flush=True)


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
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    old = load_old(args.old) if args.old else None
    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d"), max_leaf=tk.MAX_LEAF)
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
