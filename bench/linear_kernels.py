"""GPU sweep of the Triton linear kernels (issues 3 and 4) at TinyLlama-1.1B shapes.

Sections (``--sections``, comma-separated):
- ``classes``: which GEMM tile configs give bit-identical outputs. For BF16, Q8_0 and Q4_0
  weights, every candidate config runs on x[:512], x[:17] and x[:1] and is compared element
  by element with the reference config (64, 64, 64, 4, 3); the MMA instruction each config
  compiled to (wgmma / mma.sync) is read from its PTX. cuBLAS (and for quantized weights the
  GEMV) are counted the same way, as configs that are expected to differ. Every config's
  ||y - ref64|| / ||ref64|| against float64 is recorded.
- ``time``: median time (CUDA graph of calls over weight copies rotated past 2x L2,
  triton.testing.do_bench) per shape and M for: the fast path's kernels (cuBLAS for BF16; GEMV
  configs at M <= 8 and dequantize + cuBLAS above for quantized weights) and every GEMM
  candidate config (the invariant candidates, and for quantized weights the fused fast path).
- ``small``: quantized weights at M = 1, 2, 4, 8: GEMV configs vs the fused GEMM's small tiles
  and the wgmma tiles; at M = 1024 the fused GEMM vs dequantize (+ cuBLAS).
- ``final``: the module's own choices, ``linear(x, w)`` vs ``linear(x, w, invariant=True)`` per
  shape and M, and bitwise batch invariance of both (rows of M = 1, 8, 17, 64, 256 vs the same
  rows inside M = 512), with the number of differing elements counted (no asserts).
- ``--derive SWEEP FINAL``: no GPU; the current tile tables' picks and fast-mode paths read off
  two earlier runs' per-config times.

Kernels are compiled ahead in parallel worker processes (``--jobs``) so compilation stays out of
the device time as far as it can.

  PYTHONPATH=. python bench/linear_kernels.py --sections classes,time --out bench/results/linear_sweep.json
  PYTHONPATH=. python bench/linear_kernels.py --sections classes,small,final --out bench/results/linear_final.json
  PYTHONPATH=. python bench/linear_kernels.py --derive bench/results/linear_sweep.json bench/results/linear_final.json
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

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import matmul_triton as mt
from exactllm.kernels import qgemv_triton
from exactllm.layers.ops import QGEMV_MAX_M
from ptx import launched_ptx  # bench/ is on sys.path: this script runs from there

SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632),
          "lm_head": (32000, 2048)}
EQ_SHAPES = {"qkv": (2560, 2048), "down": (2048, 5632), "tail": (1000, 2080)}
MS = (1, 8, 64, 256, 512)
FINAL_MS = (1, 2, 8, 16, 64, 256, 512)
WTYPES = ("bf16", "q8_0", "q4_0")
L2_BYTES = 50 << 20
DEV = "cuda"
REF = (64, 64, 64, 4, 3, True)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, natural K order for 4-bit weights)
SMALL = [(16, 16, 128, 1, 4, True), (16, 16, 256, 2, 4, True), (16, 32, 128, 2, 4, True), (16, 32, 256, 4, 3, True),
         (16, 64, 128, 4, 4, True), (16, 64, 256, 4, 3, True), (16, 128, 128, 4, 3, True), (32, 64, 128, 4, 4, True)]
LARGE = [REF, (64, 32, 128, 4, 4, True), (64, 64, 128, 4, 4, True), (64, 64, 256, 4, 3, True),
         (64, 128, 64, 4, 3, True), (64, 128, 128, 4, 3, True), (128, 128, 64, 8, 3, True), (128, 128, 64, 4, 4, True),
         (128, 256, 64, 8, 3, True), (64, 256, 64, 4, 3, True), (64, 64, 32, 4, 4, True),
         (64, 16, 128, 4, 4, True), (64, 16, 256, 4, 3, True), (64, 32, 256, 4, 4, True)]
TWO_DOT = [(64, 64, 64, 4, 3, False), (64, 64, 32, 4, 4, False), (16, 64, 128, 4, 4, False)]


def gemm_configs(wtype):
    return SMALL + LARGE + (TWO_DOT if wtype == "q4_0" else [])


def timed_configs(wtype, m):
    wg_small = [(64, 64, 128, 4, 4, True), (64, 64, 256, 4, 3, True), (64, 32, 128, 4, 4, True), REF]
    base = SMALL + wg_small if m <= 8 else gemm_configs(wtype) if m == 64 else LARGE + SMALL[4:5] + SMALL[7:]
    if wtype == "q4_0":
        base = base + [c for c in TWO_DOT if c not in base]
    return list(dict.fromkeys(base))


def weight(wtype, n, k):
    w = torch.randn(n, k, device=DEV) / math.sqrt(k)
    return w.to(torch.bfloat16) if wtype == "bf16" else QuantWeight.quantize(w, wtype)


def dense64(w):
    return w.dequantize(torch.float64) if isinstance(w, QuantWeight) else w.double()


def nbytes(w):
    return w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()


def gemm(x, w, c, out=None):
    return mt.gemm(x, w, c[:5], out=out, natural=c[5])


def mma_of(call):
    """The MMA instruction family in the PTX of the kernel that ``call`` launches."""
    ptx = launched_ptx(mt._gemm_kernel, call)
    return "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "other"


# ------------------------------------------------------------------------ compile ahead

def compile_jobs(sections):
    jobs = []
    for wtype in WTYPES:
        shapes = dict(EQ_SHAPES) if "classes" in sections else {}
        if {"time", "small", "final"} & set(sections):
            shapes.update(SHAPES)
        for name, (n, k) in shapes.items():
            cs = set(gemm_configs(wtype)) if "classes" in sections or "time" in sections else set()
            if "time" in sections and name in SHAPES:
                for m in MS:
                    cs |= set(timed_configs(wtype, m))
            jobs += [("gemm", wtype, n, k, c) for c in sorted(cs)]
            if wtype != "bf16":
                jobs += [("gemv", wtype, n, k, c) for c in GEMV_CONFIGS]
            if "final" in sections and name in SHAPES:
                tables = ["bf16"] if wtype == "bf16" else ["wgmma", "fast"]
                jobs += [("gemm", wtype, n, k, c + (True,)) for t in tables for _, cs in mt.TILE_TABLES[t] for c in cs]
            if "small" in sections and wtype != "bf16" and name in SHAPES:
                jobs += [("gemm", wtype, n, k, c) for c in FAST_SMALL + INV_SMALL + [(128, 128, 64, 8, 3, True)]]
    return jobs


def _compile_worker(args):
    jobs, wid = args
    torch.manual_seed(wid)
    weights = {}
    for kind, wtype, n, k, c in jobs:
        if (wtype, n, k) not in weights:
            weights[(wtype, n, k)] = weight(wtype, n, k)
        w = weights[(wtype, n, k)]
        try:
            if kind == "gemm":
                gemm(torch.randn(3, k, device=DEV, dtype=torch.bfloat16), w, c)
            else:
                qgemv_triton.gemv(torch.randn(1, k, device=DEV, dtype=torch.bfloat16), w, c)
        except Exception as e:  # reported; the main process records the failure again
            print(f"compile failed {kind} {wtype} {n}x{k} {c}: {type(e).__name__} {str(e)[:200]}", flush=True)
    torch.cuda.synchronize()
    return len(jobs)


def compile_ahead(sections, n_jobs):
    import multiprocessing as mp
    groups: dict = {}
    for j in compile_jobs(sections):  # one config's launches on one worker: it compiles them once
        groups.setdefault((j[0], j[1], j[4]), []).append(j)
    chunks = [[] for _ in range(n_jobs)]
    for g in sorted(groups.values(), key=len, reverse=True):
        min(chunks, key=len).extend(g)
    t = time.time()
    with mp.get_context("spawn").Pool(n_jobs) as pool:
        done = sum(pool.map(_compile_worker, [(c, i) for i, c in enumerate(chunks)]))
    print(f"compiled ahead: {done} launches in {time.time() - t:.0f} s", flush=True)


# ------------------------------------------------------------------------------ timing

def bench_us(fn, ws):
    """Median microseconds of one fn(w): a CUDA graph of fn over all copies in ws."""
    from triton.testing import do_bench

    def calls():
        for w in ws:
            fn(w)
    calls()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        calls()
    return do_bench(g.replay, warmup=5, rep=20, return_mode="median") * 1e3 / len(ws)


def copies(wtype, n, k):
    w0 = weight(wtype, n, k)
    return [w0] + [weight(wtype, n, k) for _ in range(min(8, math.ceil(2 * L2_BYTES / nbytes(w0))) - 1)]


def copy_bandwidth():
    from triton.testing import do_bench
    a = torch.empty(1 << 28, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    return 2 * a.numel() / (do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median") * 1e-3)


def fast_dequant(x, w):
    return F.linear(x, mt.dequantize(w, x.dtype))


def time_section(bw, only):
    out = []
    for wtype in WTYPES:
        for name, (n, k) in SHAPES.items():
            if only and name not in only:
                continue
            ws = copies(wtype, n, k)
            for m in MS:
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                rec = {"wtype": wtype, "shape": name, "N": n, "K": k, "M": m, "bytes": nbytes(ws[0])}
                if wtype == "bf16":
                    rec["cublas_us"] = bench_us(lambda w: F.linear(x, w), ws)
                else:
                    if m <= 8:
                        rec["gemv_us"] = {str(c): bench_us(lambda w, c=c: qgemv_triton.gemv(x, w, c), ws) for c in GEMV_CONFIGS}
                    rec["dequant_cublas_us"] = bench_us(lambda w: fast_dequant(x, w), ws)
                rec["gemm_us"] = {}
                for c in timed_configs(wtype, m):
                    try:
                        rec["gemm_us"][str(c)] = bench_us(lambda w, c=c: gemm(x, w, c), ws)
                    except Exception as e:
                        rec["gemm_us"][str(c)] = f"{type(e).__name__}: {str(e)[:100]}"
                out.append(rec)
                print(json.dumps(rec), flush=True)
            del ws
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------- small M, quantized

GEMV_CONFIGS = [(2, 64, 2), (4, 64, 2), (4, 32, 1), (2, 64, 4)]  # qgemv_triton (BLOCK_N, NB, num_warps)
FAST_SMALL = [(16, 16, 256, 2, 4, True), (16, 32, 256, 4, 3, True), (16, 32, 128, 2, 4, True), (16, 128, 128, 4, 3, True)]
INV_SMALL = [(64, 16, 128, 4, 4, True), (64, 16, 256, 4, 3, True), (64, 32, 256, 4, 4, True), (64, 32, 128, 4, 4, True),
             (64, 64, 128, 4, 4, True), (64, 64, 64, 4, 3, True)]


def small_section(bw, only):
    """Quantized weights at M = 1, 2, 4, 8: every GEMV config, the small-tile (mma.sync) fused GEMM
    of fast mode and the wgmma tiles open to the invariant mode; and at M = 1024 the fused GEMM
    against dequantize + cuBLAS (the rule for FUSED_MAX_M)."""
    out = []
    for wtype in ("q8_0", "q4_0"):
        for name, (n, k) in SHAPES.items():
            if only and name not in only:
                continue
            ws = copies(wtype, n, k)
            for m in (1, 2, 4, 8, 1024):
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                rec = {"wtype": wtype, "shape": name, "N": n, "K": k, "M": m, "floor_us": nbytes(ws[0]) / bw * 1e6}
                if m <= 8:
                    rec["gemv_us"] = {str(c): bench_us(lambda w, c=c: qgemv_triton.gemv(x, w, c), ws) for c in GEMV_CONFIGS}
                    cs = FAST_SMALL + INV_SMALL
                else:
                    rec["dequant_cublas_us"] = bench_us(lambda w: fast_dequant(x, w), ws)
                    rec["dequant_us"] = bench_us(lambda w: mt.dequantize(w, x.dtype), ws)
                    cs = [(128, 128, 64, 8, 3, True), (64, 64, 128, 4, 4, True)]
                rec["gemm_us"] = {str(c): bench_us(lambda w, c=c: gemm(x, w, c), ws) for c in cs}
                out.append(rec)
                print(json.dumps(rec), flush=True)
            del ws
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------ classes

def rel(a, b):
    a = a.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def diff(a, b):
    return int((a != b).sum().item())


def classes_section():
    out = []
    for wtype in WTYPES:
        for name, (n, k) in EQ_SHAPES.items():
            w = weight(wtype, n, k)
            x = torch.randn(512, k, device=DEV, dtype=torch.bfloat16)
            ref64 = x.double() @ dense64(w).T
            ref = gemm(x, w, REF)
            rows = {}
            for c in gemm_configs(wtype):
                try:
                    y = torch.full((512, n), float("nan"), device=DEV, dtype=x.dtype)
                    mma = mma_of(lambda: gemm(x, w, c, out=y))
                    rows[str(c)] = {"mma": mma, "err": rel(y, ref64), "diff_m512": diff(y, ref),
                                    "diff_m17": diff(gemm(x[:17], w, c), ref[:17]),
                                    "diff_m1": diff(gemm(x[:1], w, c), ref[:1]),
                                    "diff_rows_100_164": diff(gemm(x[100:164], w, c), ref[100:164])}
                except Exception as e:
                    rows[str(c)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            dense = w.dequantize(x.dtype) if wtype != "bf16" else w
            rows["cublas"] = {"err": rel(F.linear(x, dense), ref64), "diff_m512": diff(F.linear(x, dense), ref),
                              "diff_m1": diff(F.linear(x[:1], dense), ref[:1])}
            if wtype != "bf16":  # a candidate for the invariant mode at large M: dequantize, then BF16 tiles
                wd = mt.dequantize(w, x.dtype)
                for c in ((16, 16, 256, 2, 4), (64, 128, 128, 4, 3), (128, 128, 64, 8, 3)):
                    rows[f"dequant+{c}"] = {"diff_m512": diff(mt.gemm(x, wd, c), ref),
                                            "diff_m1": diff(mt.gemm(x[:1], wd, c), ref[:1])}
                g1 = qgemv_triton.gemv(x[:1], w)
                g8 = qgemv_triton.gemv(x[:8], w)
                rows["gemv"] = {"err": rel(g8, ref64[:8]), "diff_m1": diff(g1, ref[:1]), "diff_m8": diff(g8, ref[:8])}
            rec = {"wtype": wtype, "shape": name, "N": n, "K": k, "configs": rows}
            out.append(rec)
            print(json.dumps(rec), flush=True)
    return out


# ------------------------------------------------------------------------------ final

def final_section(bw, only):
    out = []
    for wtype in WTYPES:
        for name, (n, k) in SHAPES.items():
            if only and name not in only:
                continue
            ws = copies(wtype, n, k)
            xb = torch.randn(512, k, device=DEV, dtype=torch.bfloat16)
            ref64 = xb[:64].double() @ dense64(ws[0]).T
            full = mt.linear(xb, ws[0], invariant=True)
            inv_diff = {m: diff(mt.linear(xb[:m], ws[0], invariant=True), full[:m]) for m in (1, 8, 17, 64, 256)}
            fast_full = mt.linear(xb, ws[0])
            fast_diff = {m: diff(mt.linear(xb[:m], ws[0]), fast_full[:m]) for m in (1, 8, 17, 64, 256)}
            for m in FINAL_MS:
                x = xb[:m].contiguous()
                tf = bench_us(lambda w: mt.linear(x, w), ws)
                ti = bench_us(lambda w: mt.linear(x, w, invariant=True), ws)
                rec = {"wtype": wtype, "shape": name, "N": n, "K": k, "M": m, "fast_us": tf, "invariant_us": ti,
                       "inv_over_fast": ti / tf, "floor_us": nbytes(ws[0]) / bw * 1e6,
                       "fast_floor_frac": nbytes(ws[0]) / bw / (tf * 1e-6)}
                if m == 1:
                    rec.update(err_fast=rel(mt.linear(xb[:64], ws[0]), ref64),
                               err_invariant=rel(mt.linear(xb[:64], ws[0], invariant=True), ref64),
                               invariant_diff_vs_m512=inv_diff, fast_diff_vs_m512=fast_diff)
                out.append(rec)
                print(json.dumps(rec), flush=True)
            del ws
            torch.cuda.empty_cache()
    out.append({"tuned_tiles": {str(k): v for k, v in mt._tiles_best.items()}})
    return out


# ------------------------------------------------------------------------------ report

def print_tables(res):
    print(f"\n== {res['device']} {res['date']}, copy {res['copy_TBps']:.2f} TB/s")
    for r in res.get("classes", []):
        print(f"-- classes {r['wtype']} {r['shape']} (diff counts vs {REF}: m512 / m17 / m1 / rows 100-164)")
        for c, v in r["configs"].items():
            if "error" in v:
                print(f"   {c:32s} {v['error']}")
            else:
                d = " / ".join(str(v.get(key, "-")) for key in ("diff_m512", "diff_m17", "diff_m1", "diff_rows_100_164"))
                err = f"err {v['err']:.1e}" if "err" in v else " " * 11
                print(f"   {c:32s} {v.get('mma', ''):8s} {err}  diff {d}")
    for r in res.get("time", []):
        g = r["gemm_us"]
        best = min((v, c) for c, v in g.items() if isinstance(v, float))
        fast = r.get("cublas_us") or min(r.get("gemv_us", {"": r.get("dequant_cublas_us")}).values())
        extra = f" dq+cublas {r['dequant_cublas_us']:.1f}" if "dequant_cublas_us" in r else ""
        print(f"time {r['wtype']:5s} {r['shape']:8s} M={r['M']:4d} fast {fast:8.1f}us{extra} ref-gemm "
              f"{g.get(str(REF), float('nan')):8.1f} best-gemm {best[0]:8.1f} {best[1]}")
    for r in res.get("small", []):
        g = r["gemm_us"]
        best_gemm = min((v, c) for c, v in g.items())
        if "gemv_us" in r:
            bg = min((v, c) for c, v in r["gemv_us"].items())
            inv = min((v, c) for c, v in g.items() if str(c).startswith("(64"))
            print(f"small {r['wtype']} {r['shape']:8s} M={r['M']:4d} floor {r['floor_us']:5.1f} gemv {bg[0]:6.1f} "
                  f"({100 * r['floor_us'] / bg[0]:3.0f}%) {bg[1]} | gemm {best_gemm[0]:6.1f} {best_gemm[1]} | wgmma {inv[0]:6.1f} {inv[1]}")
        else:
            print(f"small {r['wtype']} {r['shape']:8s} M={r['M']:4d} dequant {r['dequant_us']:6.1f} dq+cublas "
                  f"{r['dequant_cublas_us']:6.1f} | gemm {best_gemm[0]:6.1f} {best_gemm[1]}")
    if res.get("final"):
        print("| weights | shape | M | fast us | invariant us | inv/fast | fast % of byte floor | "
              "elements differing, M=1/8/17/64/256 vs rows of M=512: invariant; fast |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in res["final"]:
            if "M" not in r:
                continue
            dd = ("/".join(str(v) for v in r["invariant_diff_vs_m512"].values()) + "; " +
                  "/".join(str(v) for v in r["fast_diff_vs_m512"].values())) if "invariant_diff_vs_m512" in r else ""
            print(f"| {r['wtype']} | {r['shape']} | {r['M']} | {r['fast_us']:.1f} | {r['invariant_us']:.1f} | "
                  f"{r['inv_over_fast']:.2f} | {100 * r['fast_floor_frac']:.0f}% | {dd} |")


def derive(sweep_path: str, final_path: str) -> list:
    """The current policy's times, read off two earlier runs instead of re-measured: for each shape
    and M, the invariant mode's pick (fastest candidate of its tile table and bucket, as linear()
    tunes it) and fast mode's path (cuBLAS; GEMV / fused GEMM / dequantize + cuBLAS by the rules in
    matmul_triton.linear), from the sweep's per-config times (sections time and small)."""
    sweep, final = json.load(open(sweep_path)), json.load(open(final_path))
    t = {(r["wtype"], r["shape"], r["M"]): r for r in sweep["time"]}
    small = {(r["wtype"], r["shape"], r["M"]): r for r in final.get("small", [])}
    cublas = {(r["shape"], r["M"]): r["cublas_us"] for r in sweep["time"] if r["wtype"] == "bf16"}

    def best(table, wtype, name, m, n):
        cands = mt._bucket(mt.TILE_TABLES[table], m)[1]
        got = {}
        for src in (t.get((wtype, name, m), {}), small.get((wtype, name, m), {})):
            for c in cands:
                v = src.get("gemm_us", {}).get(str(tuple(c) + (True,)))
                if isinstance(v, float):
                    got[c] = min(v, got.get(c, v))
        return min((v, c) for c, v in got.items()) if got else (float("nan"), None)

    rows = []
    for wtype in WTYPES:
        for name, (n, k) in SHAPES.items():
            dq = small.get((wtype, name, 1024), {}).get("dequant_us")
            for m in MS:
                inv, inv_c = best("bf16" if wtype == "bf16" else "wgmma", wtype, name, m, n)
                if wtype == "bf16":
                    fast, path = cublas[(name, m)], "cublas"
                elif m <= QGEMV_MAX_M:
                    fast, path = min(small[(wtype, name, m)]["gemv_us"].values()), "gemv"
                elif m <= mt.FUSED_MAX_M or (m <= mt.FUSED_MAX_M_WIDE and n >= mt.WIDE_N):
                    fast, path = best("fast", wtype, name, m, n)[0], "fused"
                else:
                    fast, path = dq + cublas[(name, m)], "dequant+cublas"
                rows.append({"wtype": wtype, "shape": name, "M": m, "fast_us": fast, "fast_path": path,
                             "invariant_us": inv, "invariant_tiles": inv_c, "inv_over_fast": inv / fast,
                             "floor_us": nbytes_of(wtype, n, k) / (sweep["copy_TBps"] * 1e12) * 1e6})
    print("| weights | shape | M | fast path | fast us | invariant us (tiles) | inv/fast |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['wtype']} | {r['shape']} | {r['M']} | {r['fast_path']} | {r['fast_us']:.1f} | "
              f"{r['invariant_us']:.1f} {r['invariant_tiles']} | {r['inv_over_fast']:.2f} |")
    return rows


def nbytes_of(wtype, n, k):
    return n * k * 2 if wtype == "bf16" else n * k // 32 * {"q8_0": 34, "q4_0": 18}[wtype]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="classes,time")
    ap.add_argument("--shapes", default="", help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--jobs", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--out", default="bench/results/linear_sweep.json")
    ap.add_argument("--derive", nargs=2, metavar=("SWEEP_JSON", "FINAL_JSON"),
                    help="print the current policy's times from two earlier runs (no GPU)")
    a = ap.parse_args()
    if a.derive:
        derive(*a.derive)
        return
    secs = a.sections.split(",")
    only = [s for s in a.shapes.split(",") if s]
    t0 = time.time()
    if a.jobs > 1 and {"classes", "time", "small", "final"} & set(secs):
        compile_ahead(secs, a.jobs)
    torch.manual_seed(int(time.time()))
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv,
           "copy_TBps": bw / 1e12, "triton": __import__("triton").__version__, "torch": torch.__version__}
    for sec, fn in (("classes", classes_section), ("time", lambda: time_section(bw, only)),
                    ("small", lambda: small_section(bw, only)),
                    ("final", lambda: final_section(bw, only))):
        if sec in secs:
            t = time.time()
            res[sec] = fn()
            print(f"section {sec}: {time.time() - t:.0f} s", flush=True)
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    print(f"total {time.time() - t0:.0f} s")
    print_tables(res)


if __name__ == "__main__":
    main()
