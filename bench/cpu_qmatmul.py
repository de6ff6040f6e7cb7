"""Per-layer CPU microbenchmark of the fused quantized matmul (kernels/cpu_qmatmul.py).

For the linear layers of SmolLM2-135M (hidden 576, intermediate 1536, 3 KV heads of 64;
LM head 49152 x 576 in Q8_0) and each row count M, times:
  fused     -- cpu_qmatmul.qmatmul (C kernel, weights stay quantized)
  deq+lin   -- linear_ref: QuantWeight.dequantize then F.linear (what the engine did)
  fp32      -- F.linear on a float32 copy of W (not allowed in the engine; a speed yardstick)
Reports the median and the best of --reps calls, and the effective bandwidth of the fused
kernel: bytes of the quantized weight / median time. The machine's load average is recorded
(other processes share the cores).

    python bench/cpu_qmatmul.py [--reps 30] [--threads 2] [--quick]

Writes bench/results/cpu_qmatmul_t<threads>.json and .png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import cpu_qmatmul as cq
from exactllm.kernels.matmul import linear_ref

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYERS = [  # name, N, K, qtype
    ("q/o_proj", 576, 576, "q4_1"),
    ("k/v_proj", 192, 576, "q4_1"),
    ("gate/up", 1536, 576, "q4_1"),
    ("down", 576, 1536, "q4_1"),
    ("gate/up q4_0", 1536, 576, "q4_0"),
    ("gate/up q8_0", 1536, 576, "q8_0"),
    ("lm_head", 49152, 576, "q8_0"),
]
MS = [1, 2, 4, 8, 16, 32, 64, 128]


def timeit(fn, reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="M in (1, 4, 16) and fewer reps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cq.available():
        raise SystemExit("fused kernel unavailable (no C compiler?)")
    ms = [1, 4, 16] if args.quick else MS
    reps = min(args.reps, 10) if args.quick else args.reps
    load0 = os.getloadavg()
    rows = []
    g = torch.Generator().manual_seed(0)
    print(f"{'layer':14} {'N':>6} {'K':>5} {'M':>4} {'fused us':>9} {'deq+lin us':>10} {'fp32 us':>8} "
          f"{'fused GB/s':>10} {'speedup':>8}")
    for name, n, k, qtype in LAYERS:
        w = QuantWeight.quantize(torch.randn(n, k, generator=g), qtype)
        wf = w.dequantize()
        for m in ms:
            x = torch.randn(m, k, generator=g)
            r = max(3, reps // 4) if n * k * m > 2e7 else reps  # the big ones are slow under linear_ref
            fused = timeit(lambda: cq.qmatmul(x, w), r)
            ref = timeit(lambda: linear_ref(x, w), max(3, r // 3))
            fp32 = timeit(lambda: F.linear(x, wf), r)
            row = dict(layer=name, N=n, K=k, qtype=qtype, M=m, weight_bytes=w.nbytes,
                       fused_med_us=fused[0] * 1e6, fused_min_us=fused[1] * 1e6,
                       deq_linear_med_us=ref[0] * 1e6, deq_linear_min_us=ref[1] * 1e6,
                       fp32_med_us=fp32[0] * 1e6, fp32_min_us=fp32[1] * 1e6,
                       fused_GBps=w.nbytes / fused[0] / 1e9, speedup_vs_deq_linear=ref[0] / fused[0])
            rows.append(row)
            print(f"{name:14} {n:6d} {k:5d} {m:4d} {row['fused_med_us']:9.0f} {row['deq_linear_med_us']:10.0f} "
                  f"{row['fp32_med_us']:8.0f} {row['fused_GBps']:10.2f} {row['speedup_vs_deq_linear']:7.1f}x")
    out = dict(bench="cpu_qmatmul", date=datetime.datetime.now().isoformat(timespec="seconds"),
               cpu=platform.processor() or platform.machine(), n_cpu=os.cpu_count(), threads=args.threads,
               torch=torch.__version__, loadavg_before=load0, loadavg_after=os.getloadavg(),
               max_fused_m=cq.MAX_FUSED_M, rows=rows)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"cpu_qmatmul_t{args.threads}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"load average before {load0}, after {out['loadavg_after']}; wrote {path}")
    plot(rows, path[:-len(".json")] + ".png")


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharey=False)
    for ax, name in zip(axes, names):
        rs = [r for r in rows if r["layer"] == name]
        ms = [r["M"] for r in rs]
        for key, label in (("fused_med_us", "fused"), ("deq_linear_med_us", "dequant+F.linear"),
                           ("fp32_med_us", "fp32 F.linear")):
            ax.plot(ms, [r[key] for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name} {rs[0]['N']}x{rs[0]['K']}", fontsize=9)
        ax.set_xlabel("M (rows)")
    axes[0].set_ylabel("median time (us)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
