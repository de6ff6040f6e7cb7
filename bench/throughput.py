"""End-to-end generation throughput vs batch size (the offline ``LLM.generate`` path).

For each batch size B: B random prompts of --prompt-len tokens, --gen new tokens each
(greedy, EOS ignored). One untimed warm-up run at B (Triton compilation, CUDA-graph capture),
then a timed run; a run with max_tokens=1 gives the prefill time, so decode tokens/s is
B * (gen - 1) / (total - prefill). Batch 1 also times one captured decode graph replay alone
(GPU time of a decode step without the Python engine around it), to set against the roofline:
bytes of weights + KV read per token / measured copy bandwidth.

The engine runs with its default async scheduling (engine/llm_engine.py); --sync-too times each
batch again with it off (same process, same compiled kernels: the side-by-side figure), and
--check runs mixed requests (greedy, seeded sampling, stop tokens, aborts none) both ways on a
cleared prefix cache and counts the requests whose token ids and log-probs agree bitwise.

  PYTHONPATH=. python bench/throughput.py --model 'random:tinyllama-1.1b' --tag bf16 --sync-too --check
Writes bench/results/throughput_<tag>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from exactllm import LLM, SamplingParams
from exactllm.engine.block_manager import BlockManager
from exactllm.engine.scheduler import Scheduler

HF_H100 = {1: 16, 64: 685, 256: 3330, 512: 6554}  # HF transformers 5.17 generate, BF16 (issue 3)


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the model: every linear except the embedding table (one row)."""
    total = 0
    for name, mod in model.named_modules():
        if hasattr(mod, "qtype") and name != "embed":
            v = mod.value
            total += v.nbytes if hasattr(v, "nbytes") and not isinstance(v, torch.Tensor) else v.numel() * v.element_size()
    return total


def timed_generate(llm, prompts, params):
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t, outs


def graph_replay_seconds(graph) -> float:
    """GPU time of one replay of a captured CUDA graph: median of 50 after 5 warm-up replays."""
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(50):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median_high(times)


def graph_step_seconds(llm) -> float | None:
    graphs = llm.engine.runner.graphs
    if graphs is None or 1 not in graphs.graphs:
        return None
    return graph_replay_seconds(graphs.graphs[1][0])


def timed_batch(llm, b: int, a, fresh) -> dict:
    """Seconds of B prompts x gen tokens and of their prefill alone (max_tokens=1), tokens/s."""
    full = SamplingParams(max_tokens=a.gen, temperature=0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    t_pre, _ = timed_generate(llm, fresh(), one)
    t_all, outs = timed_generate(llm, fresh(), full)
    assert all(len(o.token_ids) == a.gen for o in outs)
    return {"seconds": t_all, "tokens_per_s": b * a.gen / t_all, "prefill_s": t_pre,
            "decode_tokens_per_s": b * (a.gen - 1) / max(t_all - t_pre, 1e-9)}


def clear_cache(engine) -> None:
    """A fresh KV pool bookkeeping (no cached prefixes), so two runs of the same prompts compute alike."""
    bm = engine.block_manager
    engine.block_manager = BlockManager(bm.num_blocks, bm.block_size)
    sched = engine.scheduler
    engine.scheduler = Scheduler(engine.block_manager, sched.max_num_seqs, sched.max_tokens)


def async_check(llm, vocab: int, n: int = 96, gen: int = 48) -> dict:
    """The same mixed requests with async scheduling on and off: how many agree bitwise. Three in
    four requests stop on a token: one their first run (sync, no stops) picked a third of the way."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in torch.randint(8, 200, (n,), generator=g)]
    params = [SamplingParams(max_tokens=gen - i % 17, temperature=0.0 if i % 3 == 0 else 0.8, top_k=50 * (i % 2),
                             seed=i, ignore_eos=True) for i in range(n)]
    engine, outs = llm.engine, {}
    flag = engine.async_scheduling
    for mode in ("pick", True, False):
        clear_cache(engine)
        engine.async_scheduling = mode is True
        got = llm.generate(prompts, params, use_tqdm=False)
        if mode == "pick":
            for i, (p, o) in enumerate(zip(params, got)):
                p.stop_token_ids = [o.token_ids[len(o.token_ids) // 3]] if i % 4 else []
        else:
            outs[mode] = [(o.token_ids, o.logprobs, o.finish_reason) for o in got]
    engine.async_scheduling = flag
    same = sum(x == y for x, y in zip(outs[True], outs[False]))
    return {"requests": n, "identical": same, "stopped": sum(o[2] == "stop" for o in outs[False]),
            "ride_along_tokens": engine.stats["ride_along_tokens"], "redone_steps": engine.stats["redone_steps"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:tinyllama-1.1b")
    ap.add_argument("--tag", default="bf16")
    ap.add_argument("--batches", default="1,16,64,256,512")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--numerics", default="fast")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--bandwidth", type=float, default=2.9e12, help="measured copy bandwidth, bytes/s")
    ap.add_argument("--outdir", default="bench/results")
    ap.add_argument("--sync-too", action="store_true", help="time every batch with async scheduling off too")
    ap.add_argument("--check", action="store_true", help="compare async and sync outputs on mixed requests")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    t0 = time.perf_counter()
    llm = LLM(a.model, device="cuda", numerics=a.numerics, max_num_seqs=max(batches),
              max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.prompt_len + a.gen + 16)
    load_s = time.perf_counter() - t0
    model = llm.engine.runner.model
    cfg = model.cfg
    wbytes = weight_bytes(model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        # fresh prompts for every run: the prefix cache would otherwise skip the prefill
        fresh = lambda: torch.randint(0, cfg.vocab, (b, a.prompt_len), generator=gen).tolist()
        timed_generate(llm, fresh(), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
        rec = {"batch": b, "async_scheduling": llm.engine.async_scheduling, **timed_batch(llm, b, a, fresh)}
        if a.sync_too:
            flag, llm.engine.async_scheduling = llm.engine.async_scheduling, False
            rec.update({f"sync_{k}": v for k, v in timed_batch(llm, b, a, fresh).items()})
            llm.engine.async_scheduling = flag
        if b in HF_H100:
            rec["x_hf_h100"] = rec["tokens_per_s"] / HF_H100[b]
        if b == 1:
            ctx = a.prompt_len + a.gen // 2
            kv = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * ctx * 2
            floor = (wbytes + kv) / a.bandwidth
            step = graph_step_seconds(llm)
            rec.update(bytes_per_token=wbytes + kv, roofline_tokens_per_s=1 / floor,
                       decode_frac_of_roofline=rec["decode_tokens_per_s"] * floor,
                       graph_step_us=step and step * 1e6, graph_frac_of_roofline=step and floor / step)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_batch1"] = r["tokens_per_s"] / base
        if a.sync_too:
            r["sync_ratio_to_batch1"] = r["sync_tokens_per_s"] / rows[0]["sync_tokens_per_s"]
    check = async_check(llm, cfg.vocab) if a.check else None
    res = {"model": a.model, "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
           "argv": sys.argv, "numerics": a.numerics, "prompt_len": a.prompt_len, "gen": a.gen, "load_s": load_s,
           "weight_bytes": wbytes, "rows": rows, "async_check": check}
    os.makedirs(a.outdir, exist_ok=True)
    path = os.path.join(a.outdir, f"throughput_{a.tag}")
    with open(path + ".json", "w") as f:
        json.dump(res, f, indent=1)
    plot(res, path + ".png")
    print(f"\n== {a.model} {res['device']} {res['date']} numerics={a.numerics} weights {wbytes / 1e9:.3f} GB")
    print(f"{'batch':>6} {'tok/s':>9} {'x batch1':>8} {'decode tok/s':>12} {'prefill s':>9} {'x HF':>6}"
          + (f" | {'sync tok/s':>10} {'x batch1':>8} {'sync decode':>11}" if a.sync_too else ""))
    for r in rows:
        print(f"{r['batch']:6d} {r['tokens_per_s']:9.0f} {r['ratio_to_batch1']:8.1f} {r['decode_tokens_per_s']:12.0f} "
              f"{r['prefill_s']:9.3f} {r.get('x_hf_h100', float('nan')):6.1f}"
              + (f" | {r['sync_tokens_per_s']:10.0f} {r['sync_ratio_to_batch1']:8.1f} {r['sync_decode_tokens_per_s']:11.0f}"
                 if a.sync_too else ""))
    if check:
        print(f"async vs sync, mixed requests: {check['identical']}/{check['requests']} identical "
              f"({check['stopped']} stopped on a token; {check['ride_along_tokens']} ride-along tokens dropped, "
              f"{check['redone_steps']} steps redone)")
    r = rows[0]
    if "roofline_tokens_per_s" in r:
        print(f"batch 1: roofline {r['roofline_tokens_per_s']:.0f} tok/s; engine decode {r['decode_frac_of_roofline']*100:.0f}%;"
              f" graph step {r['graph_step_us']} us = {100 * (r['graph_frac_of_roofline'] or 0):.0f}% of roofline")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog([r["batch"] for r in rows], [r["tokens_per_s"] for r in rows], "o-",
              label=f"exactllm ({res['numerics']}{', async' if rows[0].get('async_scheduling') else ''})")
    if "sync_tokens_per_s" in rows[0]:
        ax.loglog([r["batch"] for r in rows], [r["sync_tokens_per_s"] for r in rows], "o:",
                  label=f"exactllm ({res['numerics']}, sync)")
    ax.loglog(list(HF_H100), list(HF_H100.values()), "s--", label="HF transformers (H100, BF16)")
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"{res['model']} on {res['device']}\n{res['prompt_len']}-token prompts, {res['gen']} new tokens", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
