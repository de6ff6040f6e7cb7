"""exactllm vs llama.cpp on the same CPU cores, batch 1, the default model, side by side.

Same prompt for both (bench/llamacpp_cpu.PROMPT), 128 greedy tokens; runs alternate between
the engines, each in a fresh process (llama.cpp's spinning worker threads would otherwise steal
the cores from the next run); median of --runs. exactllm is timed through LLM.generate (prefill
+ decode, its whole engine loop); llama.cpp through llama-cpp-python's eval loop.

    python bench/cpu_generate.py [--threads 2] [--runs 3] [--tokens 128]

Writes bench/results/cpu_generate.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp_cpu import PROMPT, RESULTS, default_model_path, one_run  # noqa: E402

from exactllm import LLM, SamplingParams  # noqa: E402


def time_engine(engine: str, threads: int, tokens: int) -> float:
    """tok/s of one 128-token greedy generation (after a warm-up) in this process."""
    if engine == "exactllm":
        torch.set_num_threads(threads)
        llm = LLM()
        ids = llm.tokenizer.encode(PROMPT)
        llm.generate([ids], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        t0 = time.perf_counter()
        out = llm.generate([ids], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), use_tqdm=False)[0]
        return len(out.token_ids) / (time.perf_counter() - t0)
    from llama_cpp import Llama
    llm = Llama(model_path=default_model_path(), n_ctx=1024, n_threads=threads, verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    one_run(llm, ids, 4)
    return one_run(llm, ids, tokens)["e2e_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--engine", choices=["exactllm", "llamacpp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:  # worker: one timed run, printed for the parent
        print(json.dumps(time_engine(args.engine, args.threads, args.tokens)))
        return
    import importlib.util
    engines = ["exactllm"] + (["llamacpp"] if importlib.util.find_spec("llama_cpp") else [])
    results = {e: [] for e in engines}
    for _ in range(args.runs):  # alternate; each run in a fresh process so neither engine's threads linger
        for e in engines:
            out = subprocess.run([sys.executable, __file__, "--engine", e, "--threads", str(args.threads),
                                  "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
            results[e].append(float(out.stdout.strip().splitlines()[-1]))
    ours, theirs = results["exactllm"], results.get("llamacpp", [])
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads, "new_tokens": args.tokens, "load_average": os.getloadavg(),
        "exactllm_tok_s": ours, "llamacpp_tok_s": theirs,
        "exactllm_median": statistics.median(ours),
        "llamacpp_median": statistics.median(theirs) if theirs else None,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cpu_generate.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'engine':<10} {'tok/s (median)':>15}   runs")
    print(f"{'exactllm':<10} {result['exactllm_median']:>15.1f}   {', '.join(f'{v:.1f}' for v in ours)}")
    if theirs:
        print(f"{'llama.cpp':<10} {result['llamacpp_median']:>15.1f}   {', '.join(f'{v:.1f}' for v in theirs)}")
        print(f"ratio llama.cpp / exactllm: {result['llamacpp_median'] / result['exactllm_median']:.2f}x "
              f"(load average {result['load_average'][0]:.1f})")


if __name__ == "__main__":
    main()
