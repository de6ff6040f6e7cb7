"""End-to-end prefill of a multi-layer MoE model under expert parallelism: none vs realb vs eplb.

    # GPU (one process per GPU, NCCL): 8 layers of the Qwen3-VL-30B-A3B language model shape
    PYTHONPATH=. python bench/moe_e2e.py --ep 2 --layers 8 --tokens 8192,16384,32768 --out bench/results
    # CPU dry run of every code path at a tiny shape (gloo):
    PYTHONPATH=. python bench/moe_e2e.py --device cpu --tiny --ep 2 --tokens 512 --steps 2

The model is exactllm's MoEModel (models/moe.py) built as the engine builds it: attention
tensor-parallel over the EP ranks, MoE layers expert-parallel, random weights. A step is one
prefill forward of ``tokens`` rows: sequences of ``--seq-len`` tokens, each an image (vision
tokens, 60-90% of the sequence, drawn per step) followed by text tokens. ``imbalanced`` steps
put images of one kind in the whole batch (the kind changes from step to step, so the hot rank
of each layer moves); ``balanced`` steps give every sequence four images, one of each kind, with
the same vision share. Every mode runs the same batch; we time the model forward (embedding,
all layers, final norm, LM head on the proxy rows) between a barrier and a device sync, and
take the slowest rank. EPLB moves to the placement chosen from its window of past steps before
the timed forward (migration not timed; its cost is reported apart, and its memory).

Accuracy proxy: on the same batch, next-token distributions of ``--proxy-rows`` sampled rows per
step, realb vs none (BF16 experts): top-1 agreement and mean KL(none || realb), over all sampled
rows, over the text rows alone (the rows whose next token a VLM actually samples), and over the
rows whose reference top-1 margin is not a near-tie (> NEAR_TIE logit std; see there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exactllm.balance import ReaLB, ReaLBConfig  # noqa: E402
from exactllm.balance.realb import rank_loads  # noqa: E402
from exactllm.config import EngineConfig, preset  # noqa: E402
from exactllm.distributed import launch  # noqa: E402
from exactllm.engine.model_runner import StepInputs  # noqa: E402
from exactllm.layers.attention import AttnBatch  # noqa: E402
from exactllm.models.moe import N_IMAGE_KINDS, VISION_GAIN, MoEOptions, image_direction  # noqa: E402
from moe_layer import speedup_panel  # noqa: E402  (bench/ is on sys.path: this script runs from there)

MODES = ("none", "realb", "eplb")


def model_config(a):
    if a.tiny:
        return dataclasses.replace(preset("moe-mini"), n_layers=a.layers, n_experts=16, top_k=4,
                                   name="moe-tiny")
    return dataclasses.replace(preset("qwen3-vl-30b-a3b"), n_layers=a.layers)


def make_step(cfg, a, T: int, step: int, balanced: bool, dev, dtype):
    """StepInputs of one prefill batch (identical on every rank: seeded on the host)."""
    g = torch.Generator().manual_seed(a.seed * 100_003 + step * 7 + (1 if balanced else 0) * 50_000 + T)
    L = a.seq_len
    n = T // L
    vis_frac = 0.6 + 0.3 * float(torch.rand(1, generator=g))
    V = int(vis_frac * L) // N_IMAGE_KINDS * N_IMAGE_KINDS
    kind = int(torch.randint(0, N_IMAGE_KINDS, (1,), generator=g))
    dirs = torch.stack([image_direction(cfg.hidden, k) for k in range(N_IMAGE_KINDS)])
    if balanced:  # four images per sequence, one per kind
        kinds = torch.arange(N_IMAGE_KINDS).repeat_interleave(V // N_IMAGE_KINDS).repeat(n)
    else:
        kinds = torch.full((n * V,), kind)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))
    dg = torch.Generator(device=dev).manual_seed(seed)
    vision = torch.randn(n * V, cfg.hidden, generator=dg, device=dev) + VISION_GAIN * dirs.to(dev)[kinds.to(dev)]
    modality = torch.zeros(n, L, dtype=torch.int8)
    modality[:, :V] = 1
    ids = torch.randint(0, cfg.vocab, (T,), generator=g)
    rows = torch.randperm(T, generator=g)[:a.proxy_rows].sort().values
    rows = torch.unique(torch.cat([rows, torch.arange(1, n + 1) * L - 1]))  # + each sequence's last row
    bs = a.block_size
    i32 = torch.int32
    batch = AttnBatch(torch.arange(n + 1, dtype=i32) * L, torch.full((n,), L, dtype=i32),
                      torch.arange(T // bs, dtype=i32).view(n, L // bs), torch.arange(T))
    inp = StepInputs(ids, torch.arange(L).repeat(n), batch, rows, modality.flatten(), None).to(dev)
    inp.vision_embeds = vision.to(dtype)
    info = dict(vision_share=V / L, kind=None if balanced else kind, sequences=n)
    return inp, info


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _layer_stats(model, world: int) -> list[dict]:
    """Per layer, from the step's routing table: hot-rank load / mean, its vision share, decisions."""
    out = []
    for f in model.moe_layers:
        t = f.trace[-1]
        load, vision = rank_loads(t["table"], t["slots_per_rank"])
        out.append(dict(hot_rank_over_mean=float(load.max() / load.double().mean()), hot_rank=int(load.argmax()),
                        hot_vision_share=float(vision[load.argmax()]), low=t["decision"] or [False] * world))
    return out


def worker(rank, world, a):
    import torch.distributed as dist
    from exactllm.engine.llm_engine import build_model
    from exactllm.layers.parallel import TPContext
    from exactllm.models.llama import random_weights
    from exactllm.models.loader import ModelSource
    dev = torch.device(f"cuda:{rank}" if a.device == "cuda" else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = model_config(a)
    realb = ReaLBConfig(overload_threshold=a.overload, modality_threshold=a.modality)
    opts = {m: MoEOptions(enable_expert_parallel=True, load_balancer=m, realb=realb,
                          eplb_redundant_experts=a.eplb_redundant, eplb_window=a.eplb_window) for m in MODES}
    source = ModelSource(cfg.name, cfg, lambda d: random_weights(cfg, a.seed, None, d, dtype), None)
    ecfg = EngineConfig(device=str(dev), dtype=dtype, tensor_parallel_size=world,
                        extra={"model_kwargs": {"moe": opts["none"]}})
    t0 = time.perf_counter()
    tp = TPContext(rank, world, dist.group.WORLD)
    model = build_model(source, ecfg, tp)  # none and realb (both keep the plain expert shards)
    eplb_model = build_model(source, ecfg, tp)  # the same weights, with EPLB's redundant slots
    eplb_model.set_load_balancer(opts["eplb"])
    build_s = time.perf_counter() - t0
    kv = model.allocate_kv(max(a.tokens) // a.block_size, a.block_size, dtype, dev)
    for f in model.moe_layers + eplb_model.moe_layers:
        f.record = True
    records, proxy = [], []
    with torch.inference_mode():
        for workload in ("balanced", "imbalanced"):
            for T in a.tokens:
                eplb_model.set_load_balancer(opts["eplb"])  # fresh window of past loads per series
                for step in range(a.warmup + a.steps):
                    inp, info = make_step(cfg, a, T, step, workload == "balanced", dev, dtype)
                    rec = dict(workload=workload, tokens=T, step=step - a.warmup, **info)
                    logits = {}
                    for m in MODES:
                        net = eplb_model if m == "eplb" else model
                        if m == "eplb":  # move to the placement chosen after the last step (not timed)
                            _sync(dev)
                            t1 = time.perf_counter()
                            for f in net.moe_layers:
                                f.apply_pending_placement()
                            _sync(dev)
                            rec["eplb_migrate_ms"] = (time.perf_counter() - t1) * 1e3
                            rec["eplb_slots_per_rank"] = net.moe_layers[0].layer.placement.slots_per_rank
                        else:
                            net.set_load_balancer(opts[m])
                            if m == "realb" and a.force_low:  # every rank FP8 whatever its load
                                for f in net.moe_layers:
                                    f.layer.balancer = ReaLB(ReaLBConfig(-1.0, -1.0), f.layer.backend)
                        for f in net.moe_layers:
                            f.trace = []
                        dist.barrier()
                        _sync(dev)
                        t1 = time.perf_counter()
                        hidden = net(inp.input_ids, inp.positions, inp.batch, kv, **inp.model_kwargs())
                        lg = net.logits(hidden[inp.logit_rows])
                        _sync(dev)
                        rec[f"{m}_ms"] = (time.perf_counter() - t1) * 1e3
                        rec[f"{m}_layers"] = _layer_stats(net, world)
                        if m != "eplb":
                            logits[m] = lg.float()
                    if step >= a.warmup:
                        records.append(rec)
                        if rank == 0 and workload == "imbalanced":
                            proxy.append(_proxy(logits["none"], logits["realb"], inp, info))
    lay = model.moe_layers[0].layer
    red = MoEOptions(eplb_redundant_experts=a.eplb_redundant).redundant(cfg.n_experts, world)
    memory = dict(expert_bytes=lay.expert_bytes(), eplb_redundant_experts_per_layer=red,
                  bf16_expert_bytes_per_rank=cfg.n_layers * (cfg.n_experts // world) * lay.expert_bytes(),
                  eplb_extra_bytes_per_rank=cfg.n_layers * (red // world) * lay.expert_bytes(),
                  realb_transient_fp8_bytes_per_layer=(cfg.n_experts // world) * lay.expert_bytes() // lay.w13.element_size(),
                  realb_resident_bytes=0)
    return dict(records=records, proxy=proxy, build_s=build_s, memory=memory)


# Reference top-1 minus top-2 logit, in units of the position's logit std, under which a position
# counts as a near-tie: random-weight models have flat next-token distributions whose near-ties
# any rounding flips (bench/moe_accuracy.py: whole-model BF16 vs FP32 agrees on only ~96% there).
NEAR_TIE = 0.05


def _proxy(ref, test, inp, info):
    lr, lt = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    agree = (lr.argmax(-1) == lt.argmax(-1))
    kl = (lr.exp() * (lr - lt)).sum(-1)
    text = (inp.modality_ids[inp.logit_rows] == 0)
    top = ref.topk(2, -1).values
    clear = (top[:, 0] - top[:, 1]) / ref.std(-1) > NEAR_TIE
    return dict(positions=int(agree.numel()), agree=int(agree.sum()), kl_sum=float(kl.sum()),
                text_positions=int(text.sum()), text_agree=int(agree[text].sum()), text_kl_sum=float(kl[text].sum()),
                clear_positions=int(clear.sum()), clear_agree=int(agree[clear].sum()))


def summarize(results, a):
    rows = []
    recs0 = results[0]["records"]
    for workload in ("balanced", "imbalanced"):
        for T in a.tokens:
            steps = []
            for i, rec in enumerate(recs0):
                if rec["workload"] != workload or rec["tokens"] != T:
                    continue
                s = dict(step=rec["step"])
                for m in MODES:
                    s[f"{m}_ms"] = max(res["records"][i][f"{m}_ms"] for res in results)
                s["realb_low_layer_steps"] = sum(any(l["low"]) for l in rec["realb_layers"])
                s["hot_rank_over_mean"] = statistics.mean(l["hot_rank_over_mean"] for l in rec["none_layers"])
                s["hot_vision_share"] = statistics.mean(l["hot_vision_share"] for l in rec["none_layers"])
                s["eplb_hot_rank_over_mean"] = statistics.mean(l["hot_rank_over_mean"] for l in rec["eplb_layers"])
                s["eplb_migrate_ms"] = rec.get("eplb_migrate_ms", 0.0)
                steps.append(s)
            row = dict(workload=workload, tokens=T, steps=len(steps), layers=a.layers)
            for m in MODES:
                row[f"{m}_ms"] = statistics.median(s[f"{m}_ms"] for s in steps)
                row[f"{m}_tok_s"] = T / row[f"{m}_ms"] * 1e3
            row["realb_speedup"] = row["none_ms"] / row["realb_ms"]
            row["eplb_speedup"] = row["none_ms"] / row["eplb_ms"]
            row["realb_low_fraction"] = sum(s["realb_low_layer_steps"] for s in steps) / (len(steps) * a.layers)
            row["hot_rank_over_mean"] = statistics.mean(s["hot_rank_over_mean"] for s in steps)
            row["eplb_hot_rank_over_mean"] = statistics.mean(s["eplb_hot_rank_over_mean"] for s in steps)
            row["hot_vision_share"] = statistics.mean(s["hot_vision_share"] for s in steps)
            row["eplb_migrate_ms"] = statistics.median(s["eplb_migrate_ms"] for s in steps)
            row["per_step"] = steps
            rows.append(row)
    p = results[0]["proxy"]
    tot = {k: sum(x[k] for x in p) for k in p[0]} if p else {}
    proxy = dict(positions=tot.get("positions", 0),
                 top1_agreement=tot["agree"] / tot["positions"] if p else None,
                 mean_kl=tot["kl_sum"] / tot["positions"] if p else None,
                 text_positions=tot.get("text_positions", 0),
                 text_top1_agreement=tot["text_agree"] / max(1, tot["text_positions"]) if p else None,
                 text_mean_kl=tot["text_kl_sum"] / max(1, tot["text_positions"]) if p else None,
                 margin_gt_near_tie_positions=tot.get("clear_positions", 0),
                 margin_gt_near_tie_top1_agreement=tot["clear_agree"] / max(1, tot["clear_positions"]) if p else None)
    return dict(summary=rows, accuracy_realb_vs_bf16=proxy, memory=results[0]["memory"],
                build_s=[r["build_s"] for r in results])


def plot(summary, path, a):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    rows = summary["summary"]
    labels = [f"{r['workload'][:3]}\n{r['tokens'] // 1024}k" for r in rows]
    for i, m in enumerate(MODES):
        ax[0].bar([j + 0.27 * (i - 1) for j in range(len(rows))], [r[f"{m}_tok_s"] / 1e3 for r in rows],
                  width=0.27, label=m)
    ax[0].set_xticks(range(len(rows)), labels)
    ax[0].set_ylabel("prefill throughput (k tokens/s)")
    ax[0].set_title(f"{a.layers}-layer MoE, EP={a.ep}")
    ax[0].legend()
    big = [r for r in rows if r["workload"] == "imbalanced" and r["tokens"] == max(a.tokens)][0]
    for m in MODES:
        ax[1].plot([s["step"] for s in big["per_step"]], [s[f"{m}_ms"] for s in big["per_step"]], marker="o", label=m)
    ax[1].set_xlabel("step (image kind drawn per step)")
    ax[1].set_ylabel("forward latency, slowest rank (ms)")
    ax[1].set_title(f"imbalanced, {max(a.tokens)} tokens")
    ax[1].legend()
    speedup_panel(ax[2], rows, "prefill tokens per step", "end-to-end speedup over none")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny model shape (CPU dry run)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", default="8192,16384,32768")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overload", type=float, default=0.2)
    p.add_argument("--modality", type=float, default=0.7)
    p.add_argument("--eplb-redundant", type=int, default=None)
    p.add_argument("--eplb-window", type=int, default=4)
    p.add_argument("--proxy-rows", type=int, default=512, help="sampled rows per step for the accuracy proxy")
    p.add_argument("--force-low", action="store_true",
                   help="realb column runs every rank's experts in FP8 (the upper bound of ReaLB's error; "
                        "the only way to exercise FP8 at --ep 1)")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    a.tokens = [int(t) for t in a.tokens.split(",")]
    if a.tiny:
        a.seq_len = min(a.seq_len, 128)
    if any(t % a.seq_len for t in a.tokens) or a.seq_len % a.block_size:
        p.error("--tokens must be multiples of --seq-len, itself a multiple of --block-size")
    results = launch(worker, nprocs=a.ep, args=(a,), device=a.device, timeout=1800)
    summary = summarize(results, a)
    summary["meta"] = dict(args=vars(a), date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__,
                           device=torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu")
    os.makedirs(a.out, exist_ok=True)
    tag = f"moe_e2e_ep{a.ep}" + ("_tiny" if a.tiny else "") + ("_all_fp8" if a.force_low else "")
    with open(os.path.join(a.out, tag + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, os.path.join(a.out, tag + ".png"), a)
    print(f"model build s (per rank): {summary['build_s']}; memory: {summary['memory']}")
    print(f"\n{'workload':<11}{'tokens':>7}{'none tok/s':>12}{'realb tok/s':>12}{'eplb tok/s':>12}{'realb x':>8}"
          f"{'eplb x':>8}{'low':>6}{'hotR':>6}{'hotR eplb':>10}{'hot vis':>8}{'migr ms':>8}")
    for r in summary["summary"]:
        print(f"{r['workload']:<11}{r['tokens']:>7}{r['none_tok_s']:>12.0f}{r['realb_tok_s']:>12.0f}"
              f"{r['eplb_tok_s']:>12.0f}{r['realb_speedup']:>8.3f}{r['eplb_speedup']:>8.3f}"
              f"{r['realb_low_fraction']:>6.2f}{r['hot_rank_over_mean']:>6.2f}{r['eplb_hot_rank_over_mean']:>10.2f}"
              f"{r['hot_vision_share']:>8.2f}{r['eplb_migrate_ms']:>8.1f}")
    acc = summary["accuracy_realb_vs_bf16"]
    print(f"\naccuracy proxy, realb vs BF16 (imbalanced steps): {acc}")


if __name__ == "__main__":
    main()
