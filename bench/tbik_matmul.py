"""TBIK Triton matmul on GPU: full-size invariance/accuracy checks, then TFLOP/s vs cuBLAS.

    PYTHONPATH=. python bench/tbik_matmul.py --out bench/results [--configs 64x128x8,64x64x4]

Checks (bf16, default config): rows of M=512 vs the same rows computed at M in 1..511;
K split over 1/2/4/8 TP partials combined by tree; every split of the top levels across
programs; relative error vs float64.  Bench: TinyLlama shapes, bf16 in, FP32 accumulate
(TBIK returns FP32, cuBLAS bf16), median of triton.testing.do_bench.
Prints a table, writes tbik_matmul.json (and .png when matplotlib is present).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton

import exactllm.kernels.tree_matmul_triton as tk
from exactllm.kernels.tree import combine_partials

SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (32000, 2048)]
MS = [1, 256, 2048]


def check(dev):
    g = torch.Generator(device=dev).manual_seed(0)
    out = []
    for N, K in [(2048, 2048), (2048, 5632), (256, 2048)]:
        x = torch.randn(512, K, device=dev, generator=g).bfloat16()
        w = (torch.randn(N, K, device=dev, generator=g) / K ** 0.5).bfloat16()
        y = tk.tbik_matmul(x, w)
        ref = x.double() @ w.double().T
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        batch_ok = all(torch.equal(tk.tbik_matmul(x[s:s + m], w), y[s:s + m])
                       for s, m in [(0, 1), (77, 1), (511, 1), (3, 7), (100, 64), (5, 200), (0, 511)])
        split_ok = all(torch.equal(tk.tbik_matmul(x, w, splits=s), y) for s in (1, 2, 4, 8))
        tp_ok = True
        for parts in (2, 4, 8):
            k = K // parts
            partials = [tk.tbik_matmul_partial(x[:, r * k:(r + 1) * k].contiguous(),
                                               w[:, r * k:(r + 1) * k].contiguous(), parts) for r in range(parts)]
            tp_ok &= torch.equal(combine_partials(partials), y)
        rerun_ok = torch.equal(tk.tbik_matmul(x, w), y)
        cublas_batch_diff = not all(torch.equal((x[s:s + m] @ w.T), (x @ w.T)[s:s + m])
                                    for s, m in [(0, 1), (77, 1), (3, 7), (100, 64), (5, 200)])
        cublas_rel = (((x @ w.T).double() - ref).norm() / ref.norm()).item()
        row = dict(N=N, K=K, rel_err=rel, cublas_rel_err=cublas_rel, batch_invariant=batch_ok,
                   split_invariant=split_ok, tp_invariant=tp_ok, rerun_identical=rerun_ok,
                   cublas_batch_differs=cublas_batch_diff)
        print("check", row, flush=True)
        out.append(row)
    return out


def bench(dev, configs):
    rows = []
    for M in MS:
        for N, K in SHAPES:
            x = torch.randn(M, K, device=dev).bfloat16()
            w = (torch.randn(N, K, device=dev) / K ** 0.5).bfloat16()
            flop = 2.0 * M * N * K
            t_cublas = triton.testing.do_bench(lambda: x @ w.T, warmup=25, rep=100)
            row = dict(M=M, N=N, K=K, cublas_ms=t_cublas, cublas_tflops=flop / t_cublas / 1e9)
            for cfg in configs:
                tk.BLOCK_M, tk.BLOCK_N, tk.NUM_WARPS = cfg
                t = triton.testing.do_bench(lambda: tk.tbik_matmul(x, w), warmup=25, rep=100)
                row[f"tbik_{cfg[0]}x{cfg[1]}x{cfg[2]}_ms"] = t
            best = min((v, k) for k, v in row.items() if k.startswith("tbik_"))
            row.update(tbik_best_ms=best[0], tbik_best_cfg=best[1][5:-3], tbik_tflops=flop / best[0] / 1e9,
                       ratio_tbik_over_cublas_time=best[0] / t_cublas)
            print("bench", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--configs", default="64x64x4,64x128x8,128x128x8")
    ap.add_argument("--checks-only", action="store_true")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda"
    t0 = time.time()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d"), default_config=(tk.BLOCK_M, tk.BLOCK_N, tk.NUM_WARPS))
    result["checks"] = check(dev)
    print(f"checks done in {time.time() - t0:.0f} s", flush=True)
    if args.checks_only:
        return
    result["bench"] = bench(dev, configs)
    with open(os.path.join(args.out, "tbik_matmul.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'M':>5} {'N':>6} {'K':>5} {'cuBLAS TF/s':>11} {'TBIK TF/s':>9} {'TBIK/cuBLAS time':>16} best cfg")
    for r in result["bench"]:
        print(f"{r['M']:>5} {r['N']:>6} {r['K']:>5} {r['cublas_tflops']:>11.1f} {r['tbik_tflops']:>9.1f} "
              f"{r['ratio_tbik_over_cublas_time']:>16.2f} {r['tbik_best_cfg']}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{r['M']}x{r['N']}x{r['K']}" for r in result["bench"]]
    pos = range(len(labels))
    plt.figure(figsize=(12, 4))
    plt.bar([p - 0.2 for p in pos], [r["cublas_tflops"] for r in result["bench"]], 0.4, label="cuBLAS bf16")
    plt.bar([p + 0.2 for p in pos], [r["tbik_tflops"] for r in result["bench"]], 0.4, label="TBIK Triton")
    plt.xticks(list(pos), labels, rotation=60, fontsize=7)
    plt.ylabel("TFLOP/s")
    plt.yscale("log")
    plt.legend()
    plt.title(f"TBIK matmul vs cuBLAS, {result['device']}")
    plt.tight_layout()
    plt.savefig(os.path.join(args.out, "tbik_matmul.png"), dpi=120)


if __name__ == "__main__":
    main()
