"""GPU check of the fused decode kernels at TinyLlama sizes (the CPU tests run them only under
the interpreter): each against its torch reference on fresh random inputs (the qkv GEMV with RoPE +
KV write in its epilogue also against the unfused GEMV + RoPE kernels, bit for bit; the gate/up GEMV
with SwiGLU in its epilogue against the GEMV + SwiGLU kernel, likewise), and the fast-mode decode
attention, whose split programs merge through an arrival counter, launched many times on the same
input: every launch must give the same bits (a lost or early merge would not).

  PYTHONPATH=. python bench/decode_fusion_gpu.py --out bench/results
Writes decode_fusion_gpu.json; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from exactllm.kernels import activation, activation_triton, attention, attention_triton, gemv, gemv_triton
from exactllm.kernels import rope, rope_triton
from exactllm.kernels import sampling, sampling_triton

DEV = "cuda"
DT = torch.bfloat16


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - b).norm() / b.norm()).item()


def check_rope_kv(gen, T, hq=32, hkv=4, d=64) -> dict:
    cos, sin = rope.rope_cache(d, 4096, 10000.0, device=DEV)
    qkv = torch.randn(T, (hq + 2 * hkv) * d, generator=gen, device=DEV).to(DT)
    q, k, v = (p.reshape(T, -1, d) for p in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    pos = torch.randint(0, 4096, (T,), generator=gen, device=DEV)
    slots = torch.randperm(T * 2, generator=gen, device=DEV)[:T]
    kc = torch.randn(T * 2 // 16 + 1, 16, hkv, d, generator=gen, device=DEV).to(DT)
    vc = kc.clone()
    kc_ref, vc_ref, q_in = kc.clone(), vc.clone(), q.clone()
    q_ref = rope.rope_kv_ref(q_in, k, v, pos, cos, sin, kc_ref, vc_ref, slots)
    out = rope_triton.rope_kv(q, k, v, pos, cos, sin, kc, vc, slots)
    return {"T": T, "q_rel": rel(out, q_ref), "k_cache_rel": rel(kc, kc_ref), "v_cache_equal": bool(torch.equal(vc, vc_ref))}


def check_qkv_rope(gen, M, hidden=2048, hq=32, hkv=4, d=64) -> dict:
    """norm_gemv_rope_kv vs norm_gemv then rope_kv (bits) and vs the float64 reference (rel. error)."""
    cos, sin = rope.rope_cache(d, 4096, 10000.0, device=DEV)
    x, r = (torch.randn(M, hidden, generator=gen, device=DEV).to(DT) for _ in range(2))
    w = (torch.randn((hq + 2 * hkv) * d, hidden, generator=gen, device=DEV) / hidden ** 0.5).to(DT)
    nw = 1.0 + 0.1 * torch.randn(hidden, generator=gen, device=DEV)
    pos = torch.randint(0, 4096, (M,), generator=gen, device=DEV)
    slots = torch.randperm(64, generator=gen, device=DEV)[:M]
    caches = [torch.randn(4, 16, hkv, d, generator=gen, device=DEV).to(DT) for _ in range(2)]
    fused_c, unfused_c, ref_c = ([c.clone() for c in caches] for _ in range(3))
    spec = gemv_triton.RopeKV(hq * d, hkv * d, d, pos, cos, sin, fused_c[0], fused_c[1], slots)
    y, _ = gemv_triton.norm_gemv_rope_kv(x, r, nw, 1e-5, w, spec)
    qkv, _ = gemv_triton.norm_gemv(x, r, nw, 1e-5, w)
    q, k, v = (p.view(M, -1, d) for p in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    rope_triton.rope_kv(q, k, v, pos, cos, sin, unfused_c[0], unfused_c[1], slots)
    ref_c = [c.double() for c in ref_c]
    ref, _ = rope.norm_gemv_rope_kv_ref(x.double(), r.double(), nw, 1e-5, w.double(),
                                        gemv_triton.RopeKV(hq * d, hkv * d, d, pos, cos.double(), sin.double(),
                                                           ref_c[0], ref_c[1], slots))
    return {"M": M, "qkv_same_bits_as_unfused": bool(torch.equal(y, qkv)),
            "caches_same_bits_as_unfused": all(torch.equal(a, b) for a, b in zip(fused_c, unfused_c)),
            "rel_vs_f64": rel(y, ref), "k_cache_rel_vs_f64": rel(fused_c[0], ref_c[0])}


def check_swiglu_gemv(gen, M, hidden=2048, ffn=5632) -> dict:
    """norm_gemv_swiglu vs norm_gemv then silu_mul (bits) and vs the float64 reference (rel. error)."""
    x, r = (torch.randn(M, hidden, generator=gen, device=DEV).to(DT) for _ in range(2))
    w = (torch.randn(2 * ffn, hidden, generator=gen, device=DEV) / hidden ** 0.5).to(DT)
    nw = 1.0 + 0.1 * torch.randn(hidden, generator=gen, device=DEV)
    h, res = gemv_triton.norm_gemv_swiglu(x, r, nw, 1e-5, w)
    gate_up, res_unfused = gemv_triton.norm_gemv(x, r, nw, 1e-5, w)
    unfused = activation_triton.silu_mul(*gate_up.chunk(2, dim=-1))
    ref, _ = gemv.norm_gemv_swiglu_ref(x.double(), r.double(), nw, 1e-5, w.double())
    return {"M": M, "same_bits_as_unfused": bool(torch.equal(h, unfused)) and bool(torch.equal(res, res_unfused)),
            "rel_vs_f64": rel(h, ref)}


def check_attention(gen, B, max_ctx=2048, hq=32, hkv=4, d=64, page=16, launches=100) -> dict:
    ctx = torch.randint(1, max_ctx + 1, (B,), generator=gen)
    n_pages = int(sum(-(-c // page) for c in ctx.tolist())) + 1
    kc = torch.randn(n_pages, page, hkv, d, generator=gen).to(DEV, DT)
    vc = torch.randn(n_pages, page, hkv, d, generator=gen).to(DEV, DT)
    perm = torch.randperm(n_pages, generator=gen).tolist()
    width = max_ctx // page
    tables = torch.zeros(B, width, dtype=torch.int32)
    for i, c in enumerate(ctx.tolist()):
        n = -(-c // page)
        tables[i, :n] = torch.tensor([perm.pop() for _ in range(n)])
    q = torch.randn(B, hq, d, generator=gen).to(DEV, DT)
    args = (q, kc, vc, torch.arange(B + 1, dtype=torch.int32, device=DEV), ctx.to(torch.int32).to(DEV), tables.to(DEV), d ** -0.5)
    out = attention_triton.paged_attention(*args)
    ref = attention.paged_attention_ref(q.double(), kc.double(), vc.double(), *args[3:])
    same = all(torch.equal(attention_triton.paged_attention(*args), out) for _ in range(launches))
    counters_zero = int(attention_triton._counters(q.device, 1).abs().sum().item()) == 0
    return {"batch": B, "rel_vs_f64": rel(out, ref), "same_bits_over_launches": same, "counters_zero": counters_zero}


def check_pick(gen, S, V=32000) -> dict:
    x = torch.randn(S, V, generator=gen, device=DEV) * 3
    got = sampling_triton.greedy_pick(x)
    ref = sampling.greedy_pick_ref(x)
    lp64 = torch.log_softmax(x.double(), -1).gather(1, ref[:, :1].long())[:, 0]
    lp = torch.log_softmax(x, -1)
    with_lp = sampling_triton.greedy_pick(x, lp)
    return {"rows": S, "tokens_equal": bool(torch.equal(got[:, 0], ref[:, 0])),
            "max_abs_lp_err": (got[:, 1] - lp64).abs().max().item(),
            "torch_max_abs_lp_err": (ref[:, 1] - lp64).abs().max().item(),
            "given_logprobs_bitwise": bool(torch.equal(with_lp, sampling.greedy_pick_ref(x, lp)))}


def check_silu(gen, M, F=5632) -> dict:
    gu = torch.randn(M, 2 * F, generator=gen, device=DEV).to(DT)
    g, u = gu.chunk(2, dim=-1)
    return {"M": M, "rel": rel(activation_triton.silu_mul(g, u), activation.silu_mul_ref(g, u))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    gen = torch.Generator(device=DEV).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    res = {"device": torch.cuda.get_device_name(),
           "rope_kv": [check_rope_kv(gen, T) for T in (1, 64, 4096)],
           "qkv_rope_gemv": [check_qkv_rope(gen, M) for M in (1, 2, 8)],
           "swiglu_gemv": [check_swiglu_gemv(gen, M) for M in (1, 2, 8)],
           "attention_fast_decode": [check_attention(cpu_gen, B) for B in (1, 8, 64, 256)],
           "greedy_pick": [check_pick(gen, S) for S in (1, 64)],
           "silu_mul": [check_silu(gen, M) for M in (1, 64)]}
    ok = (all(r["q_rel"] < 1e-2 and r["k_cache_rel"] < 1e-2 and r["v_cache_equal"] for r in res["rope_kv"])
          and all(r["rel_vs_f64"] < 1e-2 and r["k_cache_rel_vs_f64"] < 1e-2 for r in res["qkv_rope_gemv"])
          and all(r["same_bits_as_unfused"] and r["rel_vs_f64"] < 1e-2 for r in res["swiglu_gemv"])
          and all(r["rel_vs_f64"] < 1e-2 and r["same_bits_over_launches"] and r["counters_zero"]
                  for r in res["attention_fast_decode"])
          and all(r["tokens_equal"] and r["max_abs_lp_err"] < 1e-4 and r["given_logprobs_bitwise"] for r in res["greedy_pick"])
          and all(r["rel"] < 1e-2 for r in res["silu_mul"]))
    res["ok"] = ok
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode_fusion_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    for k, rows in res.items():
        if isinstance(rows, list):
            for r in rows:
                print(k, r)
    print("decode fusion GPU checks:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
