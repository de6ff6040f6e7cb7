"""exactllm vs llama.cpp on the same CPU cores, batch 1, the default model, side by side.

Same prompt for both (the tokens of bench/llamacpp_cpu.PROMPT), 128 greedy tokens, runs
alternating between the engines, median of --runs. exactllm is timed through LLM.generate
(prefill + decode, its whole engine loop); llama.cpp through llama-cpp-python's eval loop.

    python bench/cpu_generate.py [--threads 2] [--runs 3] [--tokens 128]

Writes bench/results/cpu_generate.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp_cpu import PROMPT, RESULTS, default_model_path, one_run  # noqa: E402

from exactllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ours = LLM()
    prompt_ids = ours.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    ours.generate([prompt_ids], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
    try:
        from llama_cpp import Llama
        theirs = Llama(model_path=default_model_path(), n_ctx=1024, n_threads=args.threads, verbose=False)
    except ImportError:
        theirs = None
        print("llama-cpp-python is not installed: timing exactllm alone", file=sys.stderr)
    ours_tps, theirs_tps = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = ours.generate([prompt_ids], params, use_tqdm=False)[0]
        ours_tps.append(len(out.token_ids) / (time.perf_counter() - t0))
        if theirs is not None:
            theirs_tps.append(one_run(theirs, prompt_ids, args.tokens)["e2e_tok_s"])
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads, "prompt_tokens": len(prompt_ids), "new_tokens": args.tokens,
        "load_average": os.getloadavg(), "exactllm_tok_s": ours_tps, "llamacpp_tok_s": theirs_tps,
        "exactllm_median": statistics.median(ours_tps),
        "llamacpp_median": statistics.median(theirs_tps) if theirs_tps else None,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cpu_generate.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'engine':<10} {'tok/s (median)':>15}   runs")
    print(f"{'exactllm':<10} {result['exactllm_median']:>15.1f}   {', '.join(f'{v:.1f}' for v in ours_tps)}")
    if theirs_tps:
        print(f"{'llama.cpp':<10} {result['llamacpp_median']:>15.1f}   {', '.join(f'{v:.1f}' for v in theirs_tps)}")
        print(f"ratio llama.cpp / exactllm: {result['llamacpp_median'] / result['exactllm_median']:.2f}x "
              f"(load average {result['load_average'][0]:.1f})")


if __name__ == "__main__":
    main()
