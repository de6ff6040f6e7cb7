"""What a step with prompt tokens costs on the GPU, eager vs replayed from a prompt-step CUDA graph.

    PYTHONPATH=. python bench/prompt_step.py [--model random:tinyllama-1.1b] [--reps 20] [--out PATH]

For each step shape (prompts of P tokens, optionally with decode rows riding along, as the
server's mixed steps) it times ModelRunner.launch + results() in both modes: host time to
enqueue the step, wall time to its tokens, and the GPU kernel time of one step (torch.profiler;
with the kernel count and the host ops that cost most). The first call of each shape is timed
apart (Triton compiles for new shapes, GEMM tile tuning). A pure-decode step (CUDA graph) is the
reference. Bits: the graph's logits against the eager step's, in fast mode (counted) and in
batch_invariant mode (must be equal). Medians; writes JSON (default bench/results/prompt_step.json).
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

from exactllm import LLM, SamplingParams  # noqa: E402
from exactllm.engine.model_runner import build_inputs  # noqa: E402
from exactllm.engine.scheduler import ScheduledChunk  # noqa: E402

SHAPES = {  # name: (prompt lengths, decode rows riding along)
    "1x17": ([17], 0), "1x128": ([128], 0), "8x17": ([17] * 8, 0), "64x17": ([17] * 64, 0),
    "63 decode + 1x17": ([17], 63), "40 decode + 24x17": ([17] * 24, 40), "4x512": ([512] * 4, 0),
}


def make_chunks(engine, prompts: list[int], decode: int, gen: torch.Generator) -> list[ScheduledChunk]:
    """Sequences with random prompts: `decode` of them take one row (their last prompt token,
    as a decode step would), the others their whole prompt."""
    vocab = engine.model_config.vocab
    seqs = [engine.add_request(torch.randint(0, vocab, (n,), generator=gen).tolist(),
                               SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            for n in [17] * decode + prompts]
    engine.scheduler.schedule()  # allocates their blocks
    return [ScheduledChunk(s, len(s.prompt_token_ids) - 1, 1) if i < decode else
            ScheduledChunk(s, 0, len(s.prompt_token_ids)) for i, s in enumerate(seqs)]


def release(engine, chunks) -> None:
    for ch in chunks:
        engine.abort(ch.seq)


def time_step(runner, chunks, randoms, reps: int) -> dict:
    t0 = time.perf_counter()
    runner.step(chunks, randoms)
    first = time.perf_counter() - t0
    for _ in range(3):
        runner.step(chunks, randoms)
    host, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        launched = runner.launch(chunks, randoms)
        t1 = time.perf_counter()
        launched.results()
        t2 = time.perf_counter()
        host.append(t1 - t0)
        wall.append(t2 - t0)
    row = {"first_ms": first * 1e3, "host_ms": statistics.median(host) * 1e3, "wall_ms": statistics.median(wall) * 1e3}
    try:
        row.update(profile_step(runner, chunks, randoms))
    except Exception as exc:  # the timings stand without the profile
        row.update(kernels=-1, kernel_ms=float("nan"), top_host_ops_ms=[f"profile failed: {exc!r}"])
    return row


def profile_step(runner, chunks, randoms) -> dict:
    """Kernel count and summed kernel time of one step, and the host ops with most self time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.step(chunks, randoms)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    top_cpu = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)[:8]
    return {"kernels": sum(e.count for e in kernels),
            "kernel_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
            "top_host_ops_ms": [(e.key[:60], e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in top_cpu]}


@torch.inference_mode()
def logits_diff(runner, chunks) -> dict:
    inputs = build_inputs(chunks, runner.block_size, runner.tables)
    eager = runner.forward_logits(inputs)
    graph = runner.prompt_graph_logits(inputs)
    return {"rows": eager.shape[0], "equal": bool(torch.equal(eager, graph)),
            "differing": int((eager != graph).sum()),
            "max_abs": float((eager - graph).abs().max()),
            "same_argmax": bool(torch.equal(eager.argmax(-1), graph.argmax(-1)))}


def run_mode(llm, shapes: dict, reps: int, timings: bool) -> dict:
    engine = llm.engine
    runner, graphs = engine.runner, engine.runner.prompt_graphs
    gen = torch.Generator().manual_seed(0)
    out = {}
    if timings:  # else graphs are captured as shapes need them (invariant mode: each capture tunes tiles)
        t0 = time.perf_counter()
        out["capture"] = {"buckets": runner.capture_prompt_graphs(engine.cfg.max_num_batched_tokens),
                          "seconds": time.perf_counter() - t0}
    for name, (prompts, decode) in shapes.items():
        chunks = make_chunks(engine, prompts, decode, gen)
        row = {"tokens": sum(ch.length for ch in chunks), "bits": logits_diff(runner, chunks)}
        if timings:
            for mode in ("eager", "graph"):
                runner.prompt_graphs = graphs if mode == "graph" else None
                row[mode] = time_step(runner, chunks, engine._randoms, reps)
            runner.prompt_graphs = graphs
        release(engine, chunks)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    if timings:  # the reference: a decode step of 64 sequences (CUDA graph)
        chunks = make_chunks(engine, [], 64, gen)
        out["decode 64 (graph)"] = time_step(runner, chunks, engine._randoms, reps)
        release(engine, chunks)
        print("decode 64", json.dumps(out["decode 64 (graph)"]), flush=True)
    return out


def report(fast: dict) -> None:
    print(f"\n{'shape':>20} {'tokens':>6} | {'eager host/wall/kernel ms':>26} {'kernels':>7} {'first':>7} | "
          f"{'graph host/wall/kernel ms':>26} {'first':>7} | fast logits equal (differing)")
    for name, r in fast.items():
        if name in ("capture", "decode 64 (graph)"):
            continue
        e, g, b = r["eager"], r["graph"], r["bits"]
        print(f"{name:>20} {r['tokens']:>6} | {e['host_ms']:>8.2f}/{e['wall_ms']:>7.2f}/{e['kernel_ms']:>7.2f} "
              f"{e['kernels']:>7} {e['first_ms']:>7.1f} | {g['host_ms']:>8.2f}/{g['wall_ms']:>7.2f}/{g['kernel_ms']:>7.2f} "
              f"{g['first_ms']:>7.1f} | {b['equal']} ({b['differing']}, argmax same {b['same_argmax']})")
    d = fast["decode 64 (graph)"]
    print(f"decode 64 (graph): host {d['host_ms']:.2f} wall {d['wall_ms']:.2f} kernel {d['kernel_ms']:.2f} ms")
    print("capture:", fast.get("capture"))
    print("eager 1x17 top host ops (name, calls, self ms):", fast["1x17"]["eager"]["top_host_ops_ms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:tinyllama-1.1b")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--num-kv-blocks", type=int, default=4096)
    ap.add_argument("--modes", default="fast,batch_invariant", help="numerics modes, in order (fast: timings too)")
    ap.add_argument("--out", default=os.path.join("bench", "results", "prompt_step.json"))
    args = ap.parse_args()
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "torch": torch.__version__}
    if os.path.exists(args.out):  # one file for both modes, run one after another
        result = {**json.load(open(args.out)), **{k: v for k, v in result.items() if k not in ("date",)}}
    for mode in args.modes.split(","):
        llm = LLM(model=args.model, device="cuda", numerics=mode, num_kv_blocks=args.num_kv_blocks)
        if mode == "fast":
            result[mode] = run_mode(llm, SHAPES, args.reps, timings=True)
        else:  # a bit check only (tile tuning and compiles make its first steps slow)
            result[mode] = run_mode(llm, {k: SHAPES[k] for k in ("1x17", "63 decode + 1x17")}, args.reps, timings=False)
        del llm
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if "fast" in result:
        report(result["fast"])
    if "batch_invariant" in result:
        print("batch_invariant graph == eager logits:",
              {k: v["bits"]["equal"] for k, v in result["batch_invariant"].items() if k != "capture"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
