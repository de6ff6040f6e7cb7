"""GPU check and timing of the Triton kernels at TinyLlama-1.1B sizes.

For each kernel: correctness against a float64 reference on fresh random inputs (output
poisoned with NaN first), bitwise batch invariance of the invariant mode, then the median time
(triton.testing.do_bench) against its floor: bytes / measured copy bandwidth for the
bytes-bound kernels, and torch's own kernel (cuBLAS, SDPA flash) on the same shapes.
Weights are rotated over > 2x L2 so that GEMV timings read HBM, not L2.

  PYTHONPATH=. python bench/kernels.py --out bench/results/kernels.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import attention, matmul_triton, rmsnorm_triton, rope, rope_triton, activation_triton
from exactllm.kernels import attention_triton

DEV = "cuda"
SHAPES = {"qkv_q/o": (2048, 2048), "k/v": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632),
          "lm_head": (32000, 2048)}
L2_BYTES = 50 << 20


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def bench(fn, calls: int = 1):
    """Median GPU seconds of one call: ``fn`` makes ``calls`` calls and is captured in a CUDA
    graph (after a warm-up), so the host's launch overhead is out of the figure."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e-3 / calls


def copy_bandwidth():
    a = torch.empty(1 << 28, dtype=torch.uint8, device=DEV)  # 256 MiB
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median") * 1e-3
    return 2 * a.numel() / t


def weight(n, k, qtype):
    w = torch.randn(n, k, device=DEV) / math.sqrt(k)
    return QuantWeight.quantize(w, qtype) if qtype else w.to(torch.bfloat16)


def nbytes(w):
    return w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()


def linear_section(bw, rows):
    out = []
    for qtype in ("q4_0", "q4_1", "q8_0", None):
        for name, (n, k) in SHAPES.items():
            ws = [weight(n, k, qtype)]
            copies = max(1, math.ceil(2 * L2_BYTES / nbytes(ws[0])))
            ws += [weight(n, k, qtype) for _ in range(min(copies, 16) - 1)]
            w64 = ws[0].dequantize(torch.float64) if qtype else ws[0].double()
            rec = {"kernel": "linear", "qtype": qtype or "bf16", "shape": name, "N": n, "K": k}
            for m in (1, 256):
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                ref = x.double() @ w64.T
                for mode in ("fast", "invariant"):
                    y = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
                    matmul_triton.linear(x, ws[0], invariant=mode == "invariant", out=y)
                    rec[f"err_m{m}_{mode}"] = rel(y, ref)
            xb = torch.randn(512, k, device=DEV, dtype=torch.bfloat16)
            full = matmul_triton.linear(xb, ws[0], invariant=True)
            rec["invariant_bitwise"] = all(torch.equal(matmul_triton.linear(xb[r:r + 1], ws[0], invariant=True)[0],
                                                       full[r]) for r in (0, 100, 511))
            fast_full = matmul_triton.linear(xb, ws[0])
            rec["fast_differs"] = any(not torch.equal(matmul_triton.linear(xb[r:r + 1], ws[0])[0], fast_full[r])
                                      for r in (0, 100, 511))
            x1 = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
            t1 = bench(lambda: [matmul_triton.linear(x1, w) for w in ws], len(ws))
            rec["m1_us"] = t1 * 1e6
            rec["m1_GBps"] = nbytes(ws[0]) / t1 / 1e9
            rec["m1_roofline_frac"] = nbytes(ws[0]) / t1 / bw
            if qtype:
                rec["m1_invariant_us"] = bench(lambda: [matmul_triton.linear(x1, w, invariant=True) for w in ws], len(ws)) * 1e6
                x8 = torch.randn(8, k, device=DEV, dtype=torch.bfloat16)
                t8 = bench(lambda: [matmul_triton.linear(x8, w) for w in ws], len(ws))
                rec["m8_us"] = t8 * 1e6
                rec["m8_roofline_frac"] = nbytes(ws[0]) / t8 / bw
            for m in rows:
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                t = bench(lambda: matmul_triton.linear(x, ws[0]))
                rec[f"m{m}_TFLOPs"] = 2 * m * n * k / t / 1e12
                rec[f"m{m}_invariant_TFLOPs"] = 2 * m * n * k / bench(lambda: matmul_triton.linear(x, ws[0], invariant=True)) / 1e12
            out.append(rec)
            print(json.dumps(rec), flush=True)
    return out


def paged(batch, ctx, q_len, hq=32, hkv=4, d=64, page=16, dtype=torch.bfloat16):
    n_pages = batch * -(-ctx // page)
    kc = torch.randn(n_pages, page, hkv, d, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    tables = torch.randperm(n_pages, device=DEV).view(batch, -1).to(torch.int32)
    cu = torch.arange(batch + 1, device=DEV, dtype=torch.int32) * q_len
    ctx_t = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
    q = torch.randn(batch * q_len, hq, d, device=DEV, dtype=dtype)
    return q, kc, vc, cu, ctx_t, tables


def attention_section(bw):
    out = []
    scale = 64 ** -0.5
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for batch, L in ((32, 128), (512, 128), (8, 512), (4, 2048), (1, 2048)):
        args = paged(batch, L, L)
        q, kc, vc, cu, ctx, tables = args
        rec = {"kernel": "attention_prefill", "batch": batch, "seq": L}
        sub = paged(2, L, L)
        ref = attention.paged_attention_ref(*[t.double() if t.is_floating_point() else t for t in sub], scale)
        for mode, split in (("fast", None), ("invariant", 64)):
            y = torch.full_like(sub[0], float("nan"))
            attention_triton.paged_attention(*sub, scale, kv_split=split, out=y)
            rec[f"err_{mode}"] = rel(y, ref)
        t = bench(lambda: attention_triton.paged_attention(*args, scale))
        ti = bench(lambda: attention_triton.paged_attention(*args, scale, kv_split=64))
        # SDPA flash on the same shapes: contiguous [B, H, L, D], K/V expanded to all heads
        qs = q.view(batch, L, 32, 64).transpose(1, 2).contiguous()
        kd = torch.randn(batch, 32, L, 64, device=DEV, dtype=torch.bfloat16)
        vd = torch.randn_like(kd)
        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qs, kd, vd, is_causal=True)
        ts = bench(sdpa)
        flops = 4 * batch * 32 * L * L * 64 / 2
        rec.update(ours_us=t * 1e6, invariant_us=ti * 1e6, sdpa_flash_us=ts * 1e6, ours_TFLOPs=flops / t / 1e12,
                   sdpa_TFLOPs=flops / ts / 1e12, ratio_vs_sdpa=ts / t)
        out.append(rec)
        print(json.dumps(rec), flush=True)
    for batch, ctx in ((1, 256), (1, 2048), (64, 256), (256, 256), (512, 256)):
        args = paged(batch, ctx, 1)
        rec = {"kernel": "attention_decode", "batch": batch, "ctx": ctx}
        kv_bytes = 2 * batch * ctx * 4 * 64 * 2
        t = bench(lambda: attention_triton.paged_attention(*args, scale))
        ti = bench(lambda: attention_triton.paged_attention(*args, scale, kv_split=64))
        rec.update(ours_us=t * 1e6, invariant_us=ti * 1e6, GBps=kv_bytes / t / 1e9, roofline_frac=kv_bytes / t / bw)
        out.append(rec)
        print(json.dumps(rec), flush=True)
    # invariant mode: prefill row == decode row == batched decode row, bitwise
    q, kc, vc, cu, ctx, tables = paged(3, 300, 300)
    pre = attention_triton.paged_attention(q, kc, vc, cu, ctx, tables, scale, kv_split=64)
    last = cu[1:] - 1
    dec = attention_triton.paged_attention(q[last], kc, vc, torch.arange(4, device=DEV, dtype=torch.int32), ctx, tables,
                                           scale, kv_split=64)
    one = attention_triton.paged_attention(q[last[:1]], kc, vc, torch.tensor([0, 1], device=DEV, dtype=torch.int32),
                                           ctx[:1], tables[:1], scale, kv_split=64)
    fpre = attention_triton.paged_attention(q, kc, vc, cu, ctx, tables, scale)
    fdec = attention_triton.paged_attention(q[last], kc, vc, torch.arange(4, device=DEV, dtype=torch.int32), ctx, tables, scale)
    rec = {"kernel": "attention_invariance", "prefill_eq_decode": torch.equal(pre[last], dec),
           "batched_eq_alone": torch.equal(dec[:1], one), "fast_prefill_eq_decode": torch.equal(fpre[last], fdec)}
    out.append(rec)
    print(json.dumps(rec), flush=True)
    return out


def small_section(bw):
    out = []
    for rows in (1, 512):
        x = torch.randn(rows, 2048, device=DEV, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.randn(2048, device=DEV)
        t = bench(lambda: rmsnorm_triton.rmsnorm(x, w, 1e-5, r))
        g = torch.randn(rows, 5632, device=DEV, dtype=torch.bfloat16)
        u = torch.randn_like(g)
        ts = bench(lambda: activation_triton.silu_mul(g, u))
        tt = bench(lambda: F.silu(g.float()).mul(u.float()).to(torch.bfloat16))
        cos, sin = rope.rope_cache(64, 2048, 10000.0, device=DEV)
        qv = torch.randn(rows, 32, 64, device=DEV, dtype=torch.bfloat16)
        pos = torch.randint(0, 2048, (rows,), device=DEV)
        tr = bench(lambda: rope_triton.apply_rope(qv, pos, cos, sin))
        rec = {"kernel": "small", "rows": rows, "rmsnorm_res_us": t * 1e6, "rmsnorm_GBps": 4 * x.numel() * 2 / t / 1e9,
               "silu_mul_us": ts * 1e6, "silu_mul_torch_us": tt * 1e6, "rope_us": tr * 1e6}
        out.append(rec)
        print(json.dumps(rec), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/kernels.json")
    ap.add_argument("--sections", default="linear,attention,small")
    ap.add_argument("--rows", default="64,4096", help="M values timed as TFLOP/s")
    a = ap.parse_args()
    torch.manual_seed(int(time.time()))
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}", flush=True)
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv,
           "copy_TBps": bw / 1e12}
    secs = a.sections.split(",")
    if "small" in secs:
        res["small"] = small_section(bw)
    if "attention" in secs:
        res["attention"] = attention_section(bw)
    if "linear" in secs:
        res["linear"] = linear_section(bw, [int(m) for m in a.rows.split(",")])
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res)


def print_table(res):
    print(f"\n== {res['device']} {res['date']}, copy {res['copy_TBps']:.2f} TB/s")
    for r in res.get("linear", []):
        tf = " ".join(f"{k[:-7]}={v:.0f}" for k, v in r.items() if k.endswith("_TFLOPs") and "invariant" not in k)
        m8 = f"m8 {r['m8_us']:6.1f}us {r['m8_roofline_frac']*100:4.0f}%" if "m8_us" in r else ""
        print(f"linear {r['qtype']:5s} {r['shape']:8s} m1 {r['m1_us']:6.1f}us {r['m1_roofline_frac']*100:5.1f}% {m8} "
              f"err {r['err_m1_fast']:.1e}/{r['err_m256_invariant']:.1e} inv={r['invariant_bitwise']} TFLOP/s {tf}")
    for r in res.get("attention", []):
        print("attention", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "kernel"})
    for r in res.get("small", []):
        print("small", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "kernel"})


if __name__ == "__main__":
    main()
