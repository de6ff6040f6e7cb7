"""Which GPU kernels a batch-B decode step runs, how many, how long each takes, and what a step costs.

For each model and batch size: B random prompts of --prompt-len tokens are prefilled, then
1. eager (CUDA graphs off, so the profiler sees every kernel): --steps decode steps of the
   engine are profiled; kernels are listed by GPU time per step with their count per step,
   and summed by kind (matmul = cuBLAS/our GEMV/GEMM; everything else is launch overhead
   that fusion can remove);
2. graphs on: the captured decode graph of bucket B is replayed alone (CUDA events, median
   of 50: the GPU time of a step) and the whole engine step (host scheduling, graph input
   copies, sampling) is timed by wall clock: --steps calls of engine.step() back to back, one
   device sync after them, divided by --steps (with async scheduling a call returns while the
   device still runs; a sync per call would undo the overlap). Once with the engine's async
   scheduling, once without (sync_engine_step_us).
Launch count per step is what bounds batch-1 decode once the weights are read near bandwidth.

  PYTHONPATH=. python bench/profile_decode.py --models 'random:tinyllama-1.1b,random:tinyllama-1.1b?quant=q4_0' \
      --batches 1,64 --tag before
Writes bench/results/profile_decode_<tag>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from exactllm import LLM, SamplingParams
from throughput import graph_replay_seconds  # bench/ is on sys.path: this script runs from there

MATMUL = re.compile(r"gemm|gemv|nvjet|xmma|cutlass|splitk|cublas", re.IGNORECASE)


def kernel_table(prof, steps: int) -> list[dict]:
    """GPU activities (kernels, memcpy, memset) grouped by name, per decode step."""
    count, total = defaultdict(int), defaultdict(float)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        count[ev.name] += 1
        total[ev.name] += ev.time_range.elapsed_us()
    rows = [{"kernel": k[:100], "matmul": bool(MATMUL.search(k)), "per_step": count[k] / steps,
             "us_per_step": total[k] / steps, "us_each": total[k] / count[k]} for k in count]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def run_case(llm, batch: int, args) -> dict:
    engine = llm.engine
    runner = engine.runner
    graphs, runner.graphs = runner.graphs, None  # eager first, for the profiler
    params = SamplingParams(temperature=0.0, max_tokens=4 * args.steps + 16, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    vocab = llm.source.config.vocab
    seqs = [engine.add_request(torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist(), params)
            for _ in range(batch)]
    while min(len(s.output_token_ids) for s in seqs) < 3:  # prefill + warm-up decode steps (compilation)
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    rows = kernel_table(prof, args.steps)
    rec = {"batch": batch, "kernels_per_step": sum(r["per_step"] for r in rows),
           "gpu_us_per_step": sum(r["us_per_step"] for r in rows),
           "matmul_kernels_per_step": sum(r["per_step"] for r in rows if r["matmul"]),
           "matmul_us_per_step": sum(r["us_per_step"] for r in rows if r["matmul"]), "kernels": rows}
    runner.graphs = graphs
    if graphs is not None:
        engine.step()  # captures the bucket's graph
        flag = engine.async_scheduling
        for key, mode in (("engine_step_us", flag), ("sync_engine_step_us", False)):
            engine.async_scheduling = mode
            engine.step()  # the first step of a mode sends a step ahead (async) or finishes one
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
            rec[key] = (time.perf_counter() - t) / args.steps * 1e6
        engine.async_scheduling = flag
        bucket = graphs._bucket(batch)
        rec.update(graph_step_us=graph_replay_seconds(graphs.graphs[bucket][0]) * 1e6)
    for s in seqs:
        engine.abort(s)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="random:tinyllama-1.1b")
    ap.add_argument("--numerics", default="fast")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25, help="kernels listed per case")
    ap.add_argument("--tag", default="bf16")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cases = []
    for model in args.models.split(","):
        llm = LLM(model, device="cuda", numerics=args.numerics, max_num_seqs=max(batches),
                  max_model_len=args.prompt_len + 4 * args.steps + 64)
        for b in batches:
            rec = {"model": model, **run_case(llm, b, args)}
            cases.append(rec)
            print(f"\n== {model} {args.numerics} batch {b}: {rec['kernels_per_step']:.0f} kernels/step "
                  f"({rec['matmul_kernels_per_step']:.0f} matmul), eager GPU time {rec['gpu_us_per_step']:.0f} us/step "
                  f"(matmul {rec['matmul_us_per_step']:.0f} us); graph step {rec.get('graph_step_us', 0):.0f} us, "
                  f"engine step {rec.get('engine_step_us', 0):.0f} us (sync {rec.get('sync_engine_step_us', 0):.0f} us)")
            print(f"{'us/step':>9} {'n/step':>7} {'us each':>8}  kernel")
            for r in rec["kernels"][:args.top]:
                print(f"{r['us_per_step']:9.1f} {r['per_step']:7.1f} {r['us_each']:8.2f}  {r['kernel']}")
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile_decode_{args.tag}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "argv": sys.argv,
                   "numerics": args.numerics, "prompt_len": args.prompt_len, "cases": cases}, f, indent=1)
    print(f"\n{'model':40} {'batch':>5} {'kern/step':>9} {'matmul':>6} {'eager us':>8} {'mm us':>7} "
          f"{'graph us':>8} {'engine us':>9} {'sync us':>8}")
    for c in cases:
        print(f"{c['model']:40} {c['batch']:5d} {c['kernels_per_step']:9.0f} {c['matmul_kernels_per_step']:6.0f} "
              f"{c['gpu_us_per_step']:8.0f} {c['matmul_us_per_step']:7.0f} {c.get('graph_step_us', 0):8.0f} "
              f"{c.get('engine_step_us', 0):9.0f} {c.get('sync_engine_step_us', 0):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
