"""Our few-row BF16 GEMV (exactllm/kernels/gemv_triton.py) vs cuBLAS (F.linear) on TinyLlama-1.1B's
decode linears, at M = 1, 2, 4, 8 rows, and with the RMSNorm / SwiGLU fused in front of it.

Floor (printed before measuring): bytes / 2.9 TB/s, bytes = weight + x + y in BF16, read or
written once. Timing: each variant is captured in a CUDA graph of n calls that walk through
copies of the weight totalling > 2 x L2 (every call reads its weight from HBM, as a decode step
does), median replay time / n (so the graph's launch gaps are in, as in the model).
Sections:
- linear: cuBLAS vs ours (the module's config, with and without programmatic dependent launch),
  and a sweep of configs at M = 1, per shape and M.
- fused: norm + residual add + linear (qkv, gate_up) and SwiGLU + linear (down, also at larger
  BLOCK_N, which recomputes SwiGLU fewer times), each vs the unfused kernels of the model path
  before this change (rmsnorm_triton / silu_mul + cuBLAS).
- layer: the 4 linears (and the norm / SwiGLU kernels) of one decoder layer over 22 layers of
  weights: before (norms, SwiGLU, cuBLAS), ours everywhere (with and without PDL; Ops' policy at
  M = 1), and mixed (norms fused into qkv / gate_up, cuBLAS for o and down): the per-layer cost a
  decode step pays, attention and RoPE left out.
- checks: relative error vs float64 for cuBLAS, ours and the fused kernels; repeated launches give
  the same bits; the fused residual stream equals the reference's. Exits 1 when a check fails.

  PYTHONPATH=. python bench/gemv_bf16.py --outdir bench/results
  PYTHONPATH=. TRITON_INTERPRET=1 python bench/gemv_bf16.py --device cpu   # checks only, tiny sizes
Writes gemv_bf16.json and gemv_bf16.png under --outdir.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from exactllm.kernels import activation_triton, gemv, gemv_triton, pdl, rmsnorm_triton

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
          "lm_head": (32000, 2048)}
CPU_SHAPES = {"qkv": (40, 256), "o": (24, 256), "gate_up": (48, 256), "down": (24, 352), "lm_head": (72, 256)}
SWEEP_M1 = [(4, 512, 4, 1), (2, 1024, 2, 1), (2, 512, 2, 1), (8, 512, 4, 1), (8, 1024, 8, 1), (4, 512, 4, 3)]
SILU_CONFIGS = [(8, 512, 4, 1), (16, 512, 8, 1)]
BOUND = 4e-3  # ||y - y64|| / ||y64||: BF16 output rounding (~1e-3) with margin
EPS = 1e-5
LAYERS = 22


def floor_us(N: int, K: int, M: int, bw: float) -> float:
    return (N * K + M * K + M * N) * 2 / bw * 1e6


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def rand(gen, *shape, dev, scale=1.0):
    """BF16 on the GPU; float16 under the CPU interpreter, whose bf16 conversions are not IEEE."""
    return (torch.randn(*shape, generator=gen, device=dev) * scale).to(torch.bfloat16 if dev == "cuda" else torch.float16)


def weight_pool(gen, N, K, dev, total_bytes=160e6) -> list:
    return [rand(gen, N, K, dev=dev, scale=K ** -0.5) for _ in range(max(2, math.ceil(total_bytes / (N * K * 2))))]


def graph_us(fn, pool: list) -> float:
    """GPU microseconds per fn(w) call, in a graph of >= 16 calls walking through pool."""
    from throughput import graph_replay_seconds  # bench/ is on sys.path: this script runs from there
    fn(pool[0])  # compiles (and tunes, for config None) outside the capture
    torch.cuda.synchronize()
    n = max(16, len(pool))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            fn(pool[i % len(pool)])
    us = graph_replay_seconds(graph) * 1e6 / n
    del graph
    return us


def configs_for(M: int, sweep: bool) -> list:
    return [None] + (SWEEP_M1 if (sweep and M == 1) else [])


def check_linear(gen, N, K, M, dev, sweep) -> dict:
    x, w = rand(gen, M, K, dev=dev), rand(gen, N, K, dev=dev, scale=K ** -0.5)
    y64 = x.double() @ w.double().T
    outs = [gemv_triton.gemv(x, w, c, out=torch.full((M, N), float("nan"), dtype=x.dtype, device=dev))
            for c in configs_for(M, sweep)]
    again = [gemv_triton.gemv(x, w) for _ in range(5)]
    return {"rel_ours": max(rel(o, y64) for o in outs), "rel_cublas": rel(F.linear(x, w), y64),
            "repeat_identical": all(torch.equal(o, outs[0]) for o in again)}


def check_fused(gen, N, K, M, dev, kind) -> dict:
    x, r = rand(gen, M, K, dev=dev), rand(gen, M, K, dev=dev)
    w = rand(gen, N, K, dev=dev, scale=K ** -0.5)
    cands = [None] if kind == "norm" else [None] + SILU_CONFIGS
    if kind == "norm":
        nw = 1.0 + 0.1 * torch.randn(K, generator=gen, device=dev)
        ref, ref_res = gemv.norm_gemv_ref(x, r, nw, EPS, w)
        runs = [gemv_triton.norm_gemv(x, r, nw, EPS, w, c) for c in cands]
        h, res = rmsnorm_triton.rmsnorm(x, nw, EPS, r)
        unfused = gemv_triton.gemv(h, w)
        y64 = (h.double() @ w.double().T)
        out = {"residual_identical": all(torch.equal(rr, ref_res) for _, rr in runs)}
    else:
        ref = gemv.silu_gemv_ref(x, r, w)
        runs = [(gemv_triton.silu_gemv(x, r, w, c), None) for c in cands]
        h = activation_triton.silu_mul(x, r)
        unfused = gemv_triton.gemv(h, w)
        y64 = (h.double() @ w.double().T)
        out = {}
    ys = [y for y, _ in runs]
    out.update({"rel_fused_vs_ref": max(rel(y, ref) for y in ys), "rel_fused_vs_f64_of_unfused_input": rel(ys[0], y64),
                "share_equal_to_unfused": (ys[0] == unfused).double().mean().item()})
    return out


def time_linear(gen, N, K, M, dev, sweep) -> dict:
    pool, x = weight_pool(gen, N, K, dev), rand(gen, M, K, dev=dev)
    y = torch.empty(M, N, dtype=x.dtype, device=dev)
    res = {"cublas": graph_us(lambda w: F.linear(x, w), pool)}
    res["sweep"] = {str(c): graph_us(lambda w, c=c: gemv_triton.gemv(x, w, c, out=y), pool) for c in configs_for(M, sweep)}
    res["ours"] = res["sweep"]["None"]
    with pdl.disabled():
        res["ours_no_pdl"] = graph_us(lambda w: gemv_triton.gemv(x, w, out=y), pool)
    return res


def time_fused(gen, N, K, M, dev, kind) -> dict:
    pool, x, r = weight_pool(gen, N, K, dev), rand(gen, M, K, dev=dev), rand(gen, M, K, dev=dev)
    y, ro = torch.empty(M, N, dtype=x.dtype, device=dev), torch.empty_like(x)
    if kind == "norm":
        nw = 1.0 + 0.1 * torch.randn(K, generator=gen, device=dev)
        today = graph_us(lambda w: F.linear(rmsnorm_triton.rmsnorm(x, nw, EPS, r)[0], w), pool)
        unfused = graph_us(lambda w: gemv_triton.gemv(rmsnorm_triton.rmsnorm(x, nw, EPS, r)[0], w), pool)
        fused = graph_us(lambda w: gemv_triton.norm_gemv(x, r, nw, EPS, w, out=y, residual_out=ro), pool)
    else:
        today = graph_us(lambda w: F.linear(activation_triton.silu_mul(x, r), w), pool)
        unfused = graph_us(lambda w: gemv_triton.gemv(activation_triton.silu_mul(x, r), w), pool)
        fused = graph_us(lambda w: gemv_triton.silu_gemv(x, r, w, out=y), pool)
        for c in SILU_CONFIGS:
            us = graph_us(lambda w, c=c: gemv_triton.silu_gemv(x, r, w, c, out=y), pool)
            if us < fused:
                fused = us
                print(f"  silu_gemv {c}: {us:.2f}")
    return {"today": today, "unfused_ours": unfused, "fused": fused}


def time_layers(gen, M, dev) -> dict:
    """One decoder layer's linears (+ the norms and SwiGLU around them) over LAYERS layers of weights."""
    hid = SHAPES["o"][0]
    ws = [{k: rand(gen, *SHAPES[k], dev=dev, scale=SHAPES[k][1] ** -0.5) for k in ("qkv", "o", "gate_up", "down")}
          for _ in range(LAYERS)]
    x, nw = rand(gen, M, hid, dev=dev), 1.0 + 0.1 * torch.randn(hid, generator=gen, device=dev)
    attn_out = rand(gen, M, SHAPES["o"][1], dev=dev)

    def today(w):
        h, res = rmsnorm_triton.rmsnorm(x, nw, EPS, x)
        F.linear(h, w["qkv"])
        o = F.linear(attn_out, w["o"])
        h, res = rmsnorm_triton.rmsnorm(o, nw, EPS, res)
        gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
        return F.linear(activation_triton.silu_mul(gate, up), w["down"])

    def ours(w):
        _, res = gemv_triton.norm_gemv(x, x, nw, EPS, w["qkv"])
        o = gemv_triton.gemv(attn_out, w["o"])
        gu, res = gemv_triton.norm_gemv(o, res, nw, EPS, w["gate_up"])
        gate, up = gu.chunk(2, dim=-1)
        return gemv_triton.silu_gemv(gate, up, w["down"])

    def mixed(w):  # norms fused into qkv and gate/up, cuBLAS for o and down
        _, res = gemv_triton.norm_gemv(x, x, nw, EPS, w["qkv"])
        o = F.linear(attn_out, w["o"])
        gu, res = gemv_triton.norm_gemv(o, res, nw, EPS, w["gate_up"])
        gate, up = gu.chunk(2, dim=-1)
        return F.linear(activation_triton.silu_mul(gate, up), w["down"])

    floor = sum(floor_us(*SHAPES[k], M, 2.9e12) for k in ("qkv", "o", "gate_up", "down"))
    out = {"today": graph_us(today, ws), "ours": graph_us(ours, ws), "mixed": graph_us(mixed, ws), "floor": floor}
    with pdl.disabled():
        out["ours_no_pdl"] = graph_us(ours, ws)
        out["mixed_no_pdl"] = graph_us(mixed, ws)
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(SHAPES)
    lin = {(r["shape"], r["M"]): r for r in res["linear"]}
    for i, M in enumerate(res["ms"]):
        for j, key in enumerate(("cublas", "ours")):
            vals = [100 * lin[n, M]["floor_us"] / lin[n, M][key] for n in names]
            a.bar([k + (2 * i + j) * 0.1 for k in range(len(names))], vals, 0.1,
                  label=f"{'cuBLAS' if j == 0 else 'ours'} M={M}", color=f"C{j}", alpha=1.0 - 0.2 * i)
    a.set_xticks([k + 0.35 for k in range(len(names))], names)
    a.set_ylabel("% of byte floor (2.9 TB/s)")
    a.set_title(f"linear alone ({res['device']})")
    a.legend(fontsize=7, ncol=2)
    layers = res["layer"]
    ms = [r["M"] for r in layers]
    for key, label in (("today", "norm/SwiGLU kernels + cuBLAS"), ("ours", "fused GEMVs (PDL)"),
                       ("ours_no_pdl", "fused GEMVs (no PDL)"), ("mixed", "norm-fused GEMVs, cuBLAS o/down"),
                       ("floor", "byte floor")):
        b.plot(ms, [r[key] for r in layers], "o-", label=label)
    b.set_xlabel("rows M")
    b.set_ylabel("us per decoder layer (linears only)")
    b.set_xscale("log", base=2)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--no-sweep", action="store_true", help="only the tuning candidates at M = 1")
    ap.add_argument("--bandwidth", type=float, default=2.9e12)
    ap.add_argument("--outdir", default="bench/results")
    args = ap.parse_args()
    dev, ms, sweep = args.device, [int(m) for m in args.ms.split(",")], not args.no_sweep
    gen = torch.Generator(device=dev).manual_seed(0)
    timing = dev == "cuda"
    shapes = SHAPES if timing else CPU_SHAPES
    print("predicted floors (us): " + "; ".join(
        f"{n} {N}x{K}: " + ", ".join(f"M={m} {floor_us(N, K, m, args.bandwidth):.2f}" for m in ms)
        for n, (N, K) in shapes.items()), flush=True)
    res = {"device": torch.cuda.get_device_name() if timing else "cpu (interpreter)",
           "date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "bandwidth": args.bandwidth, "ms": ms,
           "linear": [], "fused": [], "layer": [], "checks": []}
    fused_cases = [("qkv", "norm"), ("gate_up", "norm"), ("down", "silu")]
    for M in ms:
        for name, (N, K) in shapes.items():
            res["checks"].append({"section": "linear", "shape": name, "M": M, **check_linear(gen, N, K, M, dev, sweep)})
        for name, kind in fused_cases:
            N, K = shapes[name]
            res["checks"].append({"section": kind, "shape": name, "M": M, **check_fused(gen, N, K, M, dev, kind)})
    if timing:
        for M in ms:
            for name, (N, K) in shapes.items():
                t = time_linear(gen, N, K, M, dev, sweep)
                res["linear"].append({"shape": name, "M": M, "floor_us": floor_us(N, K, M, args.bandwidth), **t})
                r = res["linear"][-1]
                best = min(t["sweep"].items(), key=lambda kv: kv[1])
                print(f"{name:8s} M={M} floor {r['floor_us']:6.2f}  cuBLAS {t['cublas']:6.2f}  ours "
                      f"{t['ours']:6.2f} (no PDL {t['ours_no_pdl']:6.2f})  best {best[1]:6.2f} {best[0]}", flush=True)
            for name, kind in fused_cases:
                N, K = shapes[name]
                t = time_fused(gen, N, K, M, dev, kind)
                res["fused"].append({"shape": name, "kind": kind, "M": M, **t})
                print(f"fused {kind} {name} M={M}: today {t['today']:.2f}  unfused ours {t['unfused_ours']:.2f}  "
                      f"fused {t['fused']:.2f}", flush=True)
            res["layer"].append({"M": M, **time_layers(gen, M, dev)})
            print(f"layer M={M}: {res['layer'][-1]}", flush=True)
            torch.cuda.empty_cache()
    bad = [c for c in res["checks"] if any(v is False for v in c.values())
           or any(k.startswith("rel") and not v <= BOUND for k, v in c.items())]
    res["failed_checks"] = bad
    print("checks:", len(res["checks"]), "failed:", bad)
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, "gemv_bf16.json"), "w") as f:
        json.dump(res, f, indent=1)
    if timing:
        plot(res, os.path.join(args.outdir, "gemv_bf16.png"))
        print(f"\n{'shape':8s} {'M':>2s} {'floor':>7s} {'cuBLAS':>7s} {'ours':>7s} {'ours %floor':>11s}")
        for r in res["linear"]:
            print(f"{r['shape']:8s} {r['M']:2d} {r['floor_us']:7.2f} {r['cublas']:7.2f} {r['ours']:7.2f} "
                  f"{100 * r['floor_us'] / r['ours']:10.0f}%")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
