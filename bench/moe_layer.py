"""MoE layer benchmark: load balancing none vs realb vs eplb under expert parallelism.

    # EP layer benchmark (one process per GPU, NCCL), Qwen3-VL-30B-A3B layer shape:
    PYTHONPATH=. python bench/moe_layer.py layer --ep 2 --tokens 8192,16384,32768 --out bench/results
    # FP8 vs BF16 grouped expert GEMM on one GPU:
    PYTHONPATH=. python bench/moe_layer.py gemm --out bench/results
    # CPU dry run of every code path at a tiny shape (gloo):
    PYTHONPATH=. python bench/moe_layer.py layer --device cpu --tiny --ep 2 --tokens 256 --steps 2

Workloads: ``imbalanced`` steps bias the router so vision tokens (60-90% of each batch) prefer
16 experts, 90% of them on one rank that changes from step to step; ``balanced`` steps have
the same mix of modalities and no bias. ``--tokens`` is the global prefill batch (split evenly
over the EP ranks, each rank routing its own tokens). Per step and rank we time the whole layer
and its phases with CUDA events; the layer latency of a step is the slowest rank's. EPLB
re-places experts before every step from a sliding window of past steps' loads (its expert
migration cost is not counted, which favours it). Accuracy proxy (realb vs none, same batch):
relative L2 error of the layer output, and top-1 agreement / mean KL of a final RMSNorm + random
LM head (8192 words, logit std about 4) applied (a) to the MoE output alone (strict) and (b) to
the residual stream x + MoE(x) of this one layer (top1+x, KL+x; closer to a model, though a
real model's residual carries every earlier layer too).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exactllm.balance import EPLB, ReaLB, ReaLBConfig  # noqa: E402
from exactllm.balance.workload import (bias_router, make_batch, pick_vision_experts,  # noqa: E402
                                       vision_direction)
from exactllm.distributed import launch  # noqa: E402
from exactllm.layers.moe import MoELayer  # noqa: E402

QWEN3_VL = dict(hidden=2048, n_experts=128, top_k=8, expert_ffn_dim=768)
TINY = dict(hidden=64, n_experts=16, top_k=4, expert_ffn_dim=32)
MODES = ("none", "realb", "eplb")


def step_plan(step: int, n_ranks: int, n_experts: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed * 7919 + step)
    return dict(hot_rank=int(torch.randint(0, n_ranks, (1,), generator=g)),
                vision_frac=0.6 + 0.3 * float(torch.rand(1, generator=g)),
                experts_seed=seed * 131 + step)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _phases(layer) -> dict:
    ev = dict(layer.events)
    names = [n for n, _ in layer.events]
    out = {f"{a}->{b}": ev[a].elapsed_time(ev[b]) for a, b in zip(names[:-1], names[1:])}
    out["total"] = ev[names[0]].elapsed_time(ev[names[-1]])
    layer.events.clear()
    return out


def _table_stats(layer, world, vision_frac) -> dict:
    """Skew of the last step from the layer's routing table (all ranks' tokens)."""
    load = layer.expert_load()
    rank_load = load.view(world, -1).sum(1).double()
    vis = layer.last_table.sum(0)[:, 1].view(world, -1).sum(1).double()
    return dict(hot_expert_over_mean=float(load.max() / load.double().mean()),
                hot_rank_over_mean=float(rank_load.max() / rank_load.mean()),
                rank_load=rank_load.long().tolist(), rank_vision_share=(vis / rank_load.clamp_min(1)).tolist(),
                vision_token_share=vision_frac)


def _proxy(out_ref, out_test, head):
    """Top-1 agreement count, summed KL(ref || test), positions."""
    def logits(o):
        o = o.float()
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.log_softmax(o @ head.T, -1)
    lr, lt = logits(out_ref), logits(out_test)
    agree = int((lr.argmax(-1) == lt.argmax(-1)).sum())
    kl = float((lr.exp() * (lr - lt)).sum(-1).sum())
    return agree, kl, out_ref.shape[0]


def layer_worker(rank, world, a):
    dev = torch.device(f"cuda:{rank}" if a.device == "cuda" else "cpu")
    shape = TINY if a.tiny else QWEN3_VL
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    backend = "triton" if dev.type == "cuda" else "torch"
    group = torch.distributed.group.WORLD
    H, E = shape["hidden"], shape["n_experts"]
    realb = ReaLB(ReaLBConfig(overload_threshold=a.overload, modality_threshold=a.modality), backend)
    layers = {m: MoELayer(**shape, group=group, dtype=dtype, device=dev, backend=backend, seed=a.seed,
                          balancer=realb if m == "realb" else None) for m in MODES}
    base_router = layers["none"].router_w.clone()
    d = vision_direction(H, a.seed)
    head = torch.randn(8192, H, generator=torch.Generator().manual_seed(5)).to(dev) * (4.0 / H ** 0.5)
    for lay in layers.values():
        lay.profile = dev.type == "cuda"
    records = []
    for workload in ("balanced", "imbalanced"):
        for T in a.tokens:
            t_rank = T // world
            eplb = EPLB(E, world, a.eplb_redundant, window=a.eplb_window, period=1)
            layers["eplb"].set_placement(eplb.placement)
            for step in range(a.warmup + a.steps):
                plan = step_plan(step, world, E, a.seed)
                if workload == "imbalanced":
                    experts = pick_vision_experts(E, world, plan["hot_rank"], E // 8, 0.9, plan["experts_seed"])
                    router = bias_router(base_router, experts, d, a.strength)
                else:
                    router = base_router
                x, mod = make_batch(t_rank, H, plan["vision_frac"], d, seed=a.seed * 1000 + step * 97 + rank,
                                    device=dev, dtype=dtype)
                rec = dict(workload=workload, tokens=T, step=step - a.warmup, rank=rank)
                outs = {}
                for m in MODES:
                    lay = layers[m]
                    lay.router_w = router
                    times = []
                    for _ in range(a.reps):
                        torch.distributed.barrier()
                        _sync(dev)
                        t0 = time.perf_counter()
                        outs[m] = lay(x, mod)
                        _sync(dev)
                        wall = (time.perf_counter() - t0) * 1e3
                        times.append(_phases(lay) if lay.profile else {"total": wall})
                    rec[m] = {k: statistics.median(t[k] for t in times) for k in times[0]}
                    rec[m]["low_precision"] = lay.last_low_precision
                    if m == "eplb":  # history for the next step's placement
                        rec["eplb_slots_per_rank"] = lay.placement.slots_per_rank
                        layers["eplb"].set_placement(eplb.observe(lay.expert_load()))
                    if m == "none":
                        rec["routing"] = _table_stats(lay, world, plan["vision_frac"])
                n_proxy = min(t_rank, a.proxy_tokens)
                ref, test = outs["none"][:n_proxy], outs["realb"][:n_proxy]
                agree, kl, n = _proxy(ref, test, head)
                agree_res, kl_res, _ = _proxy(x[:n_proxy] + ref, x[:n_proxy] + test, head)
                rel = float((outs["realb"].float() - outs["none"].float()).norm() / outs["none"].float().norm())
                rec["realb_vs_none"] = dict(agree=agree, kl_sum=kl, agree_res=agree_res, kl_sum_res=kl_res,
                                            positions=n, rel_err=rel)
                if step >= a.warmup:
                    records.append(rec)
    conv = None
    if dev.type == "cuda":  # standalone cost of the per-step BF16 -> FP8 conversion of this rank
        lay = layers["none"]
        for _ in range(3):
            ReaLB.finish(realb.start_conversion(lay.w13, lay.w2))
        _sync(dev)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            ReaLB.finish(ReaLB(realb.cfg, backend).start_conversion(lay.w13, lay.w2))
        e.record()
        _sync(dev)
        conv = s.elapsed_time(e) / 10
    lay = layers["none"]
    mem = dict(expert_bytes=lay.expert_bytes(),
               bf16_expert_bytes_per_rank=lay.w13.numel() * lay.w13.element_size() + lay.w2.numel() * lay.w2.element_size(),
               eplb_extra_bytes_per_rank=eplb.extra_bytes_per_rank(lay.expert_bytes()),
               realb_transient_fp8_bytes=(lay.w13.numel() + lay.w2.numel()) * 1 + 4 * (lay.w13.shape[0] * (lay.w13.shape[1] + lay.w2.shape[1])),
               realb_resident_bytes=0)
    return dict(records=records, conversion_ms=conv, memory=mem)


def summarize(results, a) -> dict:
    world = len(results)
    by_key = {}
    for r in range(world):
        for rec in results[r]["records"]:
            by_key.setdefault((rec["workload"], rec["tokens"], rec["step"]), []).append(rec)
    rows, steps = [], {}
    for (wl, T, step), recs in sorted(by_key.items()):
        recs.sort(key=lambda r: r["rank"])
        entry = dict(workload=wl, tokens=T, step=step, routing=recs[0]["routing"])
        for m in MODES:
            entry[m] = dict(layer_ms=max(r[m]["total"] for r in recs),
                            rank_total_ms=[r[m]["total"] for r in recs],
                            rank_experts_ms=[r[m].get("dispatch->experts", float("nan")) for r in recs],
                            rank_phases=[{k: v for k, v in r[m].items()} for r in recs],
                            low_precision=[r[m]["low_precision"] for r in recs])
        acc = {k: sum(r["realb_vs_none"][k] for r in recs)
               for k in ("agree", "kl_sum", "agree_res", "kl_sum_res", "positions")}
        n = acc["positions"]
        entry["realb_vs_none"] = dict(top1_agreement=acc["agree"] / n, mean_kl=acc["kl_sum"] / n,
                                      top1_agreement_residual=acc["agree_res"] / n, mean_kl_residual=acc["kl_sum_res"] / n,
                                      positions=n, rel_err=max(r["realb_vs_none"]["rel_err"] for r in recs))
        steps.setdefault((wl, T), []).append(entry)
    for (wl, T), es in steps.items():
        row = dict(workload=wl, tokens=T, steps=len(es))
        for m in MODES:
            row[f"{m}_ms"] = statistics.median(e[m]["layer_ms"] for e in es)
        row["realb_speedup"] = row["none_ms"] / row["realb_ms"]
        row["eplb_speedup"] = row["none_ms"] / row["eplb_ms"]
        row["realb_steps_low"] = sum(any(e["realb"]["low_precision"]) for e in es)
        pos = sum(e["realb_vs_none"]["positions"] for e in es)
        for key in ("top1_agreement", "mean_kl", "top1_agreement_residual", "mean_kl_residual"):
            row[key] = sum(e["realb_vs_none"][key] * e["realb_vs_none"]["positions"] for e in es) / pos
        row["max_rel_err"] = max(e["realb_vs_none"]["rel_err"] for e in es)
        row["positions"] = pos
        row["hot_rank_over_mean"] = statistics.median(e["routing"]["hot_rank_over_mean"] for e in es)
        row["hot_expert_over_mean"] = statistics.median(e["routing"]["hot_expert_over_mean"] for e in es)
        rows.append(row)
    return dict(summary=rows, steps={f"{wl}/{T}": es for (wl, T), es in steps.items()},
                conversion_ms=[r["conversion_ms"] for r in results], memory=results[0]["memory"])



def speedup_panel(ax, rows: list[dict], xlabel: str, ylabel: str) -> None:
    """realb and eplb speedup over none against tokens per step, imbalanced and balanced workloads."""
    for wl, style in (("imbalanced", "-"), ("balanced", "--")):
        rs = [r for r in rows if r["workload"] == wl]
        for m in ("realb", "eplb"):
            ax.plot([r["tokens"] for r in rs], [r[f"{m}_speedup"] for r in rs], style, marker="o", label=f"{m} ({wl})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()

def plot(summary, path, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    T = max(a.tokens)
    es = summary["steps"][f"imbalanced/{T}"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    # (a) per-rank expert-phase latency at the most imbalanced step
    e = max(es, key=lambda e: e["routing"]["hot_rank_over_mean"])
    n = len(e["none"]["rank_experts_ms"])
    for i, m in enumerate(MODES):
        key = "rank_experts_ms" if a.device == "cuda" else "rank_total_ms"
        ax[0].bar([r + 0.27 * (i - 1) for r in range(n)], e[m][key], width=0.27, label=m)
    ax[0].set_xticks(range(n))
    ax[0].set_xlabel("EP rank")
    ax[0].set_ylabel("expert phase (ms)" if a.device == "cuda" else "layer (ms)")
    ax[0].set_title(f"per-rank MoE latency, imbalanced step {e['step']}, {T} tokens")
    ax[0].legend()
    # (b) layer latency over steps
    for m in MODES:
        ax[1].plot([x["step"] for x in es], [x[m]["layer_ms"] for x in es], marker="o", label=m)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("layer latency, slowest rank (ms)")
    ax[1].set_title(f"imbalanced batches, {T} tokens")
    ax[1].legend()
    # (c) speedup vs none by batch size
    speedup_panel(ax[2], summary["summary"], "prefill tokens (global)", "speedup over none (median step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_layer(a):
    results = launch(layer_worker, nprocs=a.ep, args=(a,), device=a.device, timeout=1800)
    summary = summarize(results, a)
    summary["meta"] = dict(args=vars(a), date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__,
                           device=torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu")
    os.makedirs(a.out, exist_ok=True)
    tag = f"moe_layer_ep{a.ep}" + ("_tiny" if a.tiny else "")
    with open(os.path.join(a.out, tag + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, os.path.join(a.out, tag + ".png"), a)
    print(f"\nconversion BF16->FP8 of local experts (ms, per rank): {summary['conversion_ms']}")
    print(f"memory: {summary['memory']}")
    print(f"\n{'workload':<11}{'tokens':>7}{'none ms':>9}{'realb ms':>9}{'eplb ms':>9}{'realb x':>8}{'eplb x':>8}"
          f"{'low':>5}{'hotR':>6}{'hotE':>6}{'top1':>8}{'KL':>9}{'top1+x':>8}{'KL+x':>9}{'relerr':>8}")
    for r in summary["summary"]:
        print(f"{r['workload']:<11}{r['tokens']:>7}{r['none_ms']:>9.3f}{r['realb_ms']:>9.3f}{r['eplb_ms']:>9.3f}"
              f"{r['realb_speedup']:>8.3f}{r['eplb_speedup']:>8.3f}{r['realb_steps_low']:>3}/{r['steps']:<2}"
              f"{r['hot_rank_over_mean']:>5.2f}{r['hot_expert_over_mean']:>6.1f}{r['top1_agreement']:>8.4f}"
              f"{r['mean_kl']:>9.2e}{r['top1_agreement_residual']:>8.4f}{r['mean_kl_residual']:>9.2e}"
              f"{r['max_rel_err']:>8.4f}")


def run_gemm(a):
    """FP8 vs BF16 grouped GEMM (Triton) at the Qwen3-VL expert shapes, imbalanced rows."""
    import triton.testing
    from exactllm.kernels import moe_gemm as mg
    dev = torch.device("cuda")
    E, H, Fd = 64, 2048, 768
    out = []
    for rows in a.gemm_rows:
        torch.manual_seed(rows)
        share = torch.distributions.Dirichlet(torch.full((E,), 0.5)).sample()
        counts = (share * rows).long()
        counts[0] += rows - counts.sum()
        off = torch.zeros(E + 1, dtype=torch.int64)
        off[1:] = counts.cumsum(0)
        off = off.to(dev)
        x = torch.randn(rows, H, device=dev, dtype=torch.bfloat16)
        w13 = torch.randn(E, 2 * Fd, H, device=dev, dtype=torch.bfloat16) * H ** -0.5
        w2 = torch.randn(E, H, Fd, device=dev, dtype=torch.bfloat16) * Fd ** -0.5
        q13, q2 = mg.quantize_expert_weights(w13, "triton"), mg.quantize_expert_weights(w2, "triton")
        xq, xs = mg.quantize_rows_fp8(x)
        # correctness at full size against the fp32 reference
        ref = mg.grouped_gemm_ref(x, w13, off, out_dtype=torch.float32)
        err_bf16 = float((mg.grouped_gemm(x, w13, off).float() - ref).norm() / ref.norm())
        ref8 = mg.grouped_gemm_ref(xq, q13[0], off, xs, q13[1], out_dtype=torch.float32)
        err_fp8 = float((mg.grouped_gemm(xq, q13[0], off, xs, q13[1]).float() - ref8).norm() / ref8.norm())
        ffn_ref = mg.expert_ffn(x.float(), off, w13.float(), w2.float())
        ffn_err = float((mg.expert_ffn(x, off, q13, q2, "fp8", "triton").float() - ffn_ref).norm() / ffn_ref.norm())
        flops = 2 * rows * H * 2 * Fd
        t = {}
        t["gemm_bf16"] = triton.testing.do_bench(lambda: mg.grouped_gemm(x, w13, off), return_mode="median")
        t["gemm_fp8"] = triton.testing.do_bench(lambda: mg.grouped_gemm(xq, q13[0], off, xs, q13[1]),
                                               return_mode="median")
        t["ffn_bf16"] = triton.testing.do_bench(lambda: mg.expert_ffn(x, off, w13, w2, "bf16", "triton"),
                                               return_mode="median")
        t["ffn_fp8"] = triton.testing.do_bench(lambda: mg.expert_ffn(x, off, q13, q2, "fp8", "triton"),
                                              return_mode="median")
        t["convert_w"] = triton.testing.do_bench(lambda: (mg.quantize_expert_weights(w13, "triton"),
                                                          mg.quantize_expert_weights(w2, "triton")),
                                                return_mode="median")
        rec = dict(rows=rows, experts=E, ms=t, tflops_bf16=flops / t["gemm_bf16"] * 1e-9,
                   tflops_fp8=flops / t["gemm_fp8"] * 1e-9, err_bf16=err_bf16, err_fp8_vs_dequant=err_fp8,
                   ffn_fp8_rel_err_vs_fp32=ffn_err)
        out.append(rec)
        print(f"rows {rows:>7}: w13 GEMM bf16 {t['gemm_bf16']:.3f} ms ({rec['tflops_bf16']:.0f} TF/s), "
              f"fp8 {t['gemm_fp8']:.3f} ms ({rec['tflops_fp8']:.0f} TF/s), x{t['gemm_bf16'] / t['gemm_fp8']:.2f}; "
              f"FFN bf16 {t['ffn_bf16']:.3f} fp8 {t['ffn_fp8']:.3f} x{t['ffn_bf16'] / t['ffn_fp8']:.2f}; "
              f"convert {t['convert_w']:.3f} ms; err bf16 {err_bf16:.1e} fp8 {err_fp8:.1e} ffn-fp8 {ffn_err:.3f}")
    os.makedirs(a.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(0), date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__)
    with open(os.path.join(a.out, "moe_gemm_fp8_vs_bf16.json"), "w") as f:
        json.dump(dict(meta=meta, results=out), f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("layer", "gemm"))
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny layer shape (CPU dry run)")
    p.add_argument("--tokens", default="8192,16384,32768")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=0.8, help="router bias towards vision experts")
    p.add_argument("--overload", type=float, default=0.2)
    p.add_argument("--modality", type=float, default=0.7)
    p.add_argument("--eplb-redundant", type=int, default=8)
    p.add_argument("--eplb-window", type=int, default=4)
    p.add_argument("--proxy-tokens", type=int, default=2048, help="positions per rank and step for the proxy")
    p.add_argument("--gemm-rows", default="32768,131072")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    a.tokens = [int(t) for t in a.tokens.split(",")]
    a.gemm_rows = [int(t) for t in a.gemm_rows.split(",")]
    if a.what == "gemm":
        run_gemm(a)
    else:
        run_layer(a)


if __name__ == "__main__":
    main()
