"""Our quantized few-row GEMV (exactllm/kernels/qgemv_triton.py) vs the GEMV it replaces and vs cuBLAS on
the dequantized BF16 weight, on TinyLlama-1.1B's decode linears, Q4_0 / Q4_1 / Q8_0.

Floor (printed before measuring): bytes / 2.9 TB/s, bytes = qs + scales (+ mins) + x + y, each read or
written once. Timing as bench/gemv_bf16.py: each variant captured in a CUDA graph of n calls that walk
through copies of the weight totalling > 2 x L2 (every call reads its weight from HBM, as a decode step
does); median replay time / n, so launch gaps (and what PDL hides of them) are in.
Sections:
- linear (M = 1): old (the previous quantized GEMV, loaded from --old, a copy of the previous
  exactllm/kernels/matmul_triton.py; its configs timed here, the best kept: what its first-use tuning
  picked at best), new (CONFIGS of qgemv_triton), new without PDL, cuBLAS on the BF16 dequantized
  weight; with --sweep, every config of SWEEP, so the fixed table can be chosen from it.
- rows (--ms above 1): new vs the fused dequantizing GEMM (matmul_triton.gemm, FAST_TILES' first
  small-M tile) and the old GEMV, for the routing's largest M.
- fused (M = 1): RMSNorm + residual + linear (qkv, gate_up) and SwiGLU + linear (down), fused vs the
  rmsnorm / silu_mul kernel + our GEMV.
- checks: rel. error vs float64 of every variant and prologue (M = 1 and 3), the residual stream bit
  equal to the reference's, repeated launches bit-identical. Exits 1 when a check fails.

  PYTHONPATH=. python bench/gemv_quant.py --old /path/to/old/matmul_triton.py --sweep --outdir bench/results
  PYTHONPATH=. TRITON_INTERPRET=1 python bench/gemv_quant.py --device cpu   # checks only, tiny sizes
Writes gemv_quant<tag>.json and .png under --outdir.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import activation_triton, gemv, matmul_triton, pdl, qgemv_triton, rmsnorm_triton
from gemv_bf16 import CPU_SHAPES, SHAPES, graph_us, rel  # bench/ is on sys.path: this script runs from there

QTYPES = ("q4_0", "q4_1", "q8_0")
SWEEP = [(2, 64, 2), (4, 64, 2), (2, 64, 4), (2, 32, 1), (4, 32, 1), (2, 16, 1), (4, 16, 1)]
OLD_CONFIGS = [(8, 16, 4, 3), (4, 8, 2, 3), (8, 8, 4, 3)]   # the old GEMV_CONFIGS that won its H100 tuning
SMALL_GEMM = matmul_triton.FAST_TILES[0][1][0]
BOUND = 4e-3  # ||y - y64|| / ||y64||: BF16 output rounding (~1e-3) with margin
EPS = 1e-5


def floor_us(w: QuantWeight, M: int, bw: float) -> float:
    N, K = w.shape
    return (w.nbytes + 2 * M * (K + N)) / bw * 1e6


def rand(gen, *shape, dev, scale=1.0):
    """BF16 on the GPU; float16 under the CPU interpreter, whose bf16 conversions are not IEEE."""
    return (torch.randn(*shape, generator=gen, device=dev) * scale).to(torch.bfloat16 if dev == "cuda" else torch.float16)


def qpool(w: QuantWeight, total_bytes=160e6) -> list:
    """Copies of w's planes totalling > 2 x L2."""
    return [w] + [w._map(torch.clone) for _ in range(max(1, math.ceil(total_bytes / w.nbytes)) - 1)]


def load_old(path: str | None):
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("old_matmul_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check(gen, qtype, N, K, M, dev) -> dict:
    """Every prologue of the new kernel vs its reference and float64 (and the old kernel, if given)."""
    W = QuantWeight.quantize(torch.randn(N, K, generator=gen, device=dev), qtype)
    w64 = W.dequantize(torch.float64)
    x, r = rand(gen, M, K, dev=dev), rand(gen, M, K, dev=dev)
    nw = 1.0 + 0.1 * torch.randn(K, generator=gen, device=dev)
    nan = lambda *s: torch.full(s, float("nan"), dtype=x.dtype, device=dev)
    y = qgemv_triton.gemv(x, W, out=nan(M, N))
    out = {"rel_plain": rel(y, x.double() @ w64.T), "rel_plain_vs_ref": rel(y, gemv.gemv_ref(x, W)),
           "repeat_identical": all(torch.equal(qgemv_triton.gemv(x, W), y) for _ in range(3))}
    with pdl.disabled():
        out["pdl_off_identical"] = torch.equal(qgemv_triton.gemv(x, W), y)
    yn, res = qgemv_triton.norm_gemv(x, r, nw, EPS, W, out=nan(M, N), residual_out=nan(M, K))
    ref, ref_res = gemv.norm_gemv_ref(x, r, nw, EPS, W)
    h, _ = rmsnorm_triton.rmsnorm(x, nw, EPS, r)
    out.update(rel_norm_add=rel(yn, h.double() @ w64.T), rel_norm_add_vs_ref=rel(yn, ref),
               residual_identical=torch.equal(res, ref_res))
    yn1, _ = qgemv_triton.norm_gemv(x, None, nw, EPS, W, out=nan(M, N))
    out["rel_norm_vs_ref"] = rel(yn1, gemv.norm_gemv_ref(x, None, nw, EPS, W)[0])
    ys = qgemv_triton.silu_gemv(x, r, W, out=nan(M, N))
    hs = activation_triton.silu_mul(x, r)
    out.update(rel_silu=rel(ys, hs.double() @ w64.T), rel_silu_vs_ref=rel(ys, gemv.silu_gemv_ref(x, r, W)))
    if M > 1:  # each row alone (a 1-row block) agrees with the row computed among the others
        out["rel_row0_alone"] = rel(qgemv_triton.gemv(x[:1], W), y[:1])
    return out


def time_linear(gen, qtype, N, K, dev, old, sweep, bw) -> dict:
    W = QuantWeight.quantize(torch.randn(N, K, generator=gen, device=dev) * K ** -0.5, qtype)
    pool, x = qpool(W), rand(gen, 1, K, dev=dev)
    y = torch.empty(1, N, dtype=x.dtype, device=dev)
    res = {"floor_us": floor_us(W, 1, bw), "new": graph_us(lambda w: qgemv_triton.gemv(x, w, out=y), pool)}
    with pdl.disabled():
        res["new_no_pdl"] = graph_us(lambda w: qgemv_triton.gemv(x, w, out=y), pool)
    if sweep:
        res["sweep"] = {str(c): graph_us(lambda w, c=c: qgemv_triton.gemv(x, w, c, out=y), pool) for c in SWEEP}
    if old is not None:
        res["old_sweep"] = {str(c): graph_us(lambda w, c=c: old.gemv(x, w, c, out=y), pool) for c in OLD_CONFIGS}
        res["old"] = min(res["old_sweep"].values())
    dense = [W.dequantize(torch.bfloat16)]
    dense += [dense[0].clone() for _ in range(max(1, math.ceil(160e6 / dense[0].nbytes)) - 1)]
    res["cublas_bf16"] = graph_us(lambda w: F.linear(x, w), dense)
    return res


def time_rows(gen, qtype, N, K, M, dev, old, bw) -> dict:
    W = QuantWeight.quantize(torch.randn(N, K, generator=gen, device=dev) * K ** -0.5, qtype)
    pool, x = qpool(W), rand(gen, M, K, dev=dev)
    y = torch.empty(M, N, dtype=x.dtype, device=dev)
    res = {"floor_us": floor_us(W, M, bw), "new": graph_us(lambda w: qgemv_triton.gemv(x, w, out=y), pool),
           "fused_gemm": graph_us(lambda w: matmul_triton.gemm(x, w, SMALL_GEMM, out=y), pool)}
    if old is not None:
        res["old"] = graph_us(lambda w: old.gemv(x, w, OLD_CONFIGS[0], out=y), pool)
    return res


def time_fused(gen, qtype, N, K, dev, kind) -> dict:
    W = QuantWeight.quantize(torch.randn(N, K, generator=gen, device=dev) * K ** -0.5, qtype)
    pool, x, r = qpool(W), rand(gen, 1, K, dev=dev), rand(gen, 1, K, dev=dev)
    y, ro = torch.empty(1, N, dtype=x.dtype, device=dev), torch.empty_like(x)
    if kind == "norm":
        nw = 1.0 + 0.1 * torch.randn(K, generator=gen, device=dev)
        unfused = graph_us(lambda w: qgemv_triton.gemv(rmsnorm_triton.rmsnorm(x, nw, EPS, r)[0], w, out=y), pool)
        fused = graph_us(lambda w: qgemv_triton.norm_gemv(x, r, nw, EPS, w, out=y, residual_out=ro), pool)
    else:
        unfused = graph_us(lambda w: qgemv_triton.gemv(activation_triton.silu_mul(x, r), w, out=y), pool)
        fused = graph_us(lambda w: qgemv_triton.silu_gemv(x, r, w, out=y), pool)
    return {"unfused": unfused, "fused": fused}


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res["qtypes"]), figsize=(5 * len(res["qtypes"]), 4.5), squeeze=False)
    keys = [k for k in ("old", "new", "cublas_bf16") if all(k in r for r in res["linear"])]
    for ax, qtype in zip(axes[0], res["qtypes"]):
        rows = [r for r in res["linear"] if r["qtype"] == qtype]
        for j, key in enumerate(keys):
            ax.bar([i + 0.27 * j for i in range(len(rows))], [100 * r["floor_us"] / r[key] for r in rows], 0.27,
                   label={"old": "old GEMV", "new": "new GEMV", "cublas_bf16": "cuBLAS, BF16 weight"}[key])
        ax.set_xticks([i + 0.27 for i in range(len(rows))], [r["shape"] for r in rows])
        ax.axhline(75, color="gray", lw=0.8, ls="--")
        ax.set_title(f"{qtype}, M = 1 ({res['device']})")
        ax.set_ylabel("% of the quantized byte floor (2.9 TB/s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--qtypes", default=",".join(QTYPES), help="checked")
    ap.add_argument("--time-qtypes", help="timed (default: --qtypes)")
    ap.add_argument("--ms", default="1", help="rows; M > 1 runs the rows section")
    ap.add_argument("--old", help="path of the previous matmul_triton.py (its gemv is the baseline)")
    ap.add_argument("--sweep", action="store_true", help="time every config of SWEEP at M = 1")
    ap.add_argument("--no-fused", action="store_true")
    ap.add_argument("--bandwidth", type=float, default=2.9e12)
    ap.add_argument("--outdir", default="bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    dev, qtypes, ms = args.device, args.qtypes.split(","), [int(m) for m in args.ms.split(",")]
    time_qtypes = (args.time_qtypes or args.qtypes).split(",")
    gen = torch.Generator(device=dev).manual_seed(0)
    timing = dev == "cuda"
    shapes = SHAPES if timing else CPU_SHAPES
    old = load_old(args.old)
    res = {"device": torch.cuda.get_device_name() if timing else "cpu (interpreter)", "date": time.strftime("%Y-%m-%d"),
           "argv": sys.argv, "bandwidth": args.bandwidth, "qtypes": time_qtypes, "configs": {str(k): v for k, v in qgemv_triton.CONFIGS.items()},
           "linear": [], "rows": [], "fused": [], "checks": []}
    for qtype in qtypes:
        print(f"{qtype} floors at M=1 (us): " + ", ".join(
            f"{n} {floor_us(QuantWeight.quantize(torch.zeros(N, K), qtype), 1, args.bandwidth):.2f}"
            for n, (N, K) in shapes.items()), flush=True)
        for name, (N, K) in shapes.items():  # M = 3: a 4-row block with a masked row
            for M in (1, 3) if name in ("qkv", "down") else (1,):
                res["checks"].append({"qtype": qtype, "shape": name, "M": M, **check(gen, qtype, N, K, M, dev)})
    if timing:
        for qtype in time_qtypes:
            for name, (N, K) in shapes.items():
                t = time_linear(gen, qtype, N, K, dev, old, args.sweep, args.bandwidth)
                res["linear"].append({"qtype": qtype, "shape": name, "N": N, "K": K, **t})
                best = min(t.get("sweep", {"table": t["new"]}).items(), key=lambda kv: kv[1])
                print(f"{qtype} {name:8s} floor {t['floor_us']:5.2f}  old {t.get('old', float('nan')):6.2f}  new "
                      f"{t['new']:6.2f} (no PDL {t['new_no_pdl']:6.2f})  cuBLAS bf16 {t['cublas_bf16']:6.2f}  "
                      f"best {best[1]:6.2f} {best[0]}", flush=True)
                for M in ms:
                    if M > 1:
                        res["rows"].append({"qtype": qtype, "shape": name, "M": M, **time_rows(gen, qtype, N, K, M, dev, old, args.bandwidth)})
                        print(f"   M={M}: {res['rows'][-1]}", flush=True)
            if not args.no_fused:
                for name, kind in (("qkv", "norm"), ("gate_up", "norm"), ("down", "silu")):
                    N, K = shapes[name]
                    res["fused"].append({"qtype": qtype, "shape": name, "kind": kind, **time_fused(gen, qtype, N, K, dev, kind)})
                    print(f"   fused {kind} {name}: {res['fused'][-1]}", flush=True)
            torch.cuda.empty_cache()
    bad = [c for c in res["checks"] if any(v is False for v in c.values())
           or any(k.startswith("rel") and not v <= (2 * BOUND if k.endswith(("vs_ref", "alone")) else BOUND)
                  for k, v in c.items())]
    res["failed_checks"] = bad
    print("checks:", len(res["checks"]), "failed:", bad)
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, f"gemv_quant{args.tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    if timing:
        plot(res, os.path.join(args.outdir, f"gemv_quant{args.tag}.png"))
        print(f"\n{'qtype':5s} {'shape':8s} {'floor':>6s} {'old':>6s} {'new':>6s} {'cuBLAS':>7s} {'old%':>5s} {'new%':>5s}")
        for r in res["linear"]:
            o = r.get("old", float("nan"))
            print(f"{r['qtype']:5s} {r['shape']:8s} {r['floor_us']:6.2f} {o:6.2f} {r['new']:6.2f} {r['cublas_bf16']:7.2f} "
                  f"{100 * r['floor_us'] / o:4.0f}% {100 * r['floor_us'] / r['new']:4.0f}%")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
