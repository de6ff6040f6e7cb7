"""GPU check of the invariant linears' fusions: same bits as the separate kernels, and their cost.

For TinyLlama's qkv (N=2560, K=2048, head_dim 64) and down (N=2048, K=5632) projections, BF16 and
Q8_0 weights, both invariant linears (TBIK tree; batch-invariant GEMM via matmul_triton.linear) and
M in --ms: the fused call (rope_kv epilogue on qkv; SwiGLU prologue on down) is compared bitwise with
the unfused pair (linear then rope_triton.rope_kv; activation_triton.silu_mul then linear): output,
k cache and v cache. At M=1 both are timed (triton.testing.do_bench, median, same process).

    PYTHONPATH=. python bench/invariant_fusion_gpu.py --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from triton.testing import do_bench

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import activation_triton, matmul_triton, rope, rope_triton
from exactllm.kernels.rmsnorm_triton import rmsnorm
from exactllm.kernels.tree_matmul_triton import NORM_MAX_M, tbik_matmul, tbik_norm_matmul

D, QW, KVW, HIDDEN, FFN = 64, 2048, 256, 2048, 5632


def linears():
    return {"tbik": lambda x, w, **kw: tbik_matmul(x, w, out_dtype=x.dtype, **kw),
            "gemm": lambda x, w, **kw: matmul_triton.linear(x, w, invariant=True, **kw)}


def qkv_case(lin, x, w, caches, pos, cos, sin, slots, fused):
    kc, vc = (c.clone() for c in caches)
    if fused:
        qkv = lin(x, w, rope_kv=rope_triton.rope_kv_args(QW, KVW, D, pos, cos, sin, kc, vc, slots))
    else:
        qkv = lin(x, w)
        q, k, v = (p.view(x.shape[0], -1, D) for p in qkv.split((QW, KVW, KVW), dim=-1))
        rope_triton.rope_kv(q, k, v, pos, cos, sin, kc, vc, slots)
    return qkv, kc, vc


def down_case(lin, gate, up, w, fused):
    return lin(gate, w, up=up) if fused else lin(activation_triton.silu_mul(gate, up), w)


def norm_qkv_case(x, res, nw, w, caches, pos, cos, sin, slots, fused):
    """RMSNorm (+ residual) -> qkv -> rope_kv: one kernel (tbik_norm_matmul) or three."""
    kc, vc = (c.clone() for c in caches)
    rk = rope_triton.rope_kv_args(QW, KVW, D, pos, cos, sin, kc, vc, slots)
    if fused:
        qkv, new_res = tbik_norm_matmul(x, res, nw, 1e-5, w, rope_kv=rk)
    else:
        h, new_res = rmsnorm(x, nw, 1e-5, res)
        qkv = tbik_matmul(h, w, out_dtype=x.dtype, rope_kv=rk)
    return qkv, kc, vc, new_res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,5,16,17,64,300")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1, no timing")
    a = ap.parse_args()
    dev = a.device
    g = torch.Generator(device=dev).manual_seed(0)
    dense = {"qkv": torch.randn(QW + 2 * KVW, HIDDEN, device=dev, generator=g) / HIDDEN ** 0.5,
             "down": torch.randn(HIDDEN, FFN, device=dev, generator=g) / FFN ** 0.5}
    weights = {"bf16": {k: v.bfloat16() for k, v in dense.items()},
               "q8_0": {k: QuantWeight.quantize(v.cpu(), "q8_0").to(dev) for k, v in dense.items()}}
    cos, sin = (t.to(dev) for t in rope.rope_cache(D, 4096, 10000.0))
    rows, checks, timing = [], 0, []
    for wtype, ws in weights.items():
        for name, lin in linears().items():
            if name == "gemm" and wtype != "bf16":
                continue  # invariant quantized linears are TBIK in matmul_triton.linear too
            for m in (int(v) for v in a.ms.split(",")):
                x = torch.randn(m, HIDDEN, device=dev, generator=g).bfloat16()
                gate_up = torch.randn(m, 2 * FFN, device=dev, generator=g).bfloat16()
                gate, up = gate_up.chunk(2, dim=-1)
                pos = torch.randint(0, 4096, (m,), device=dev, generator=g)
                slots = torch.randperm(64 * 16, device=dev, generator=g)[:m]
                slots[m // 2] = -1
                caches = [torch.randn(64, 16, KVW // D, D, device=dev, generator=g).bfloat16() for _ in range(2)]
                qa = (lin, x, ws["qkv"], caches, pos, cos, sin, slots)
                fused_out, unfused_out = qkv_case(*qa, True), qkv_case(*qa, False)
                same_qkv = [torch.equal(f, u) for f, u in zip(fused_out, unfused_out)]
                if not same_qkv[0]:   # where: (row, column) of the first differing outputs
                    bad = (fused_out[0] != unfused_out[0]).nonzero().tolist()
                    print("differs at", len(bad), bad[:12], "slots", slots.tolist(), flush=True)
                same_down = torch.equal(down_case(lin, gate, up, ws["down"], True),
                                        down_case(lin, gate, up, ws["down"], False))
                rec = {"wtype": wtype, "linear": name, "M": m, "qkv_out_cache_k_cache_v_same": same_qkv,
                       "down_same": same_down}
                checks += (not all(same_qkv)) + (not same_down)
                if name == "tbik" and m <= NORM_MAX_M:   # the RMSNorm prologue (fused below NORM_MAX_M rows)
                    res = torch.randn(m, HIDDEN, device=dev, generator=g).bfloat16()
                    nw = 1.0 + 0.1 * torch.randn(HIDDEN, device=dev, generator=g)
                    na = (x, res, nw, ws["qkv"], caches, pos, cos, sin, slots)
                    rec["norm_qkv_out_caches_residual_same"] = [
                        torch.equal(f, u) for f, u in zip(norm_qkv_case(*na, True), norm_qkv_case(*na, False))]
                    checks += not all(rec["norm_qkv_out_caches_residual_same"])
                    if m == 1 and dev == "cuda":
                        for key, fused in (("norm_qkv_unfused_us", False), ("norm_qkv_fused_us", True)):
                            rec[key] = do_bench(lambda f=fused: norm_qkv_case(*na, f), warmup=10, rep=50,
                                                return_mode="median") * 1e3
                if m == 1 and dev == "cuda":
                    for key, fn in (("qkv_unfused_us", lambda: qkv_case(*qa, False)),
                                    ("qkv_fused_us", lambda: qkv_case(*qa, True)),
                                    ("down_unfused_us", lambda: down_case(lin, gate, up, ws["down"], False)),
                                    ("down_fused_us", lambda: down_case(lin, gate, up, ws["down"], True))):
                        rec[key] = do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
                    timing.append(rec)
                rows.append(rec)
                print(json.dumps(rec), flush=True)
    print(f"\n{dev}: fused vs unfused: {checks} checks differ")
    print(f"{'wtype':6} {'linear':5} {'qkv unfused':>11} {'fused':>7} {'down unfused':>12} {'fused':>7}  (us, M=1; "
          f"unfused timings include the cache clone of both)")
    for r in timing:
        print(f"{r['wtype']:6} {r['linear']:5} {r['qkv_unfused_us']:11.1f} {r['qkv_fused_us']:7.1f} "
              f"{r['down_unfused_us']:12.1f} {r['down_fused_us']:7.1f}  norm+qkv+rope "
              f"{r.get('norm_qkv_unfused_us', 0):.1f} -> {r.get('norm_qkv_fused_us', 0):.1f}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "invariant_fusion_gpu.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if dev == "cuda" else dev, "date": time.strftime("%Y-%m-%d"),
                   "differing_checks": checks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
