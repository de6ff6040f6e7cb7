"""Single-request latency: time to first token and inter-token latency (p50/p99), batch 1.

Each request runs alone through the engine, stepped by hand so every token's arrival is timed;
the first request is a warm-up (kernel compilation, CUDA-graph capture) and is not counted.

    python bench/latency.py --model random:llama-mini --device cpu --requests 5 --tokens 32

Prints a table and writes bench/results/latency_<tag>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from exactllm import LLM, SamplingParams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(llm: LLM, prompt_ids: list[int], tokens: int, device: str) -> tuple[float, list[float]]:
    """Seconds to the first token and between later tokens."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    seq = llm.engine.add_request(prompt_ids, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    sync()
    last = time.perf_counter()
    stamps = []
    while not seq.finished:
        before = len(seq.output_token_ids)
        llm.engine.step()
        sync()
        if len(seq.output_token_ids) > before:
            now = time.perf_counter()
            stamps.append(now - last)
            last = now
    return stamps[0], stamps[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--numerics", default="fast")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    llm = LLM(a.model, device=a.device, numerics=a.numerics)
    gen = torch.Generator().manual_seed(0)
    vocab = llm.source.config.vocab
    ttft, itl = [], []
    for i in range(a.requests + 1):
        prompt = torch.randint(3, vocab, (a.prompt_len,), generator=gen).tolist()  # fresh: no prefix hits
        first, rest = one_request(llm, prompt, a.tokens, a.device)
        if i:  # request 0 warms up
            ttft.append(first)
            itl.extend(rest)
    row = {"model": a.model or "default", "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "numerics": a.numerics, "date": time.strftime("%Y-%m-%d"), "prompt_len": a.prompt_len, "tokens": a.tokens,
           "requests": a.requests, "ttft_ms": {"p50": 1e3 * statistics.median(ttft), "p99": 1e3 * percentile(ttft, 0.99)},
           "itl_ms": {"p50": 1e3 * statistics.median(itl), "p99": 1e3 * percentile(itl, 0.99)},
           "decode_tok_s": 1.0 / statistics.median(itl)}
    print(f"{'model':<28} {'TTFT p50/p99 ms':>18} {'ITL p50/p99 ms':>16} {'tok/s':>7}")
    print(f"{row['model']:<28} {row['ttft_ms']['p50']:>8.1f} / {row['ttft_ms']['p99']:<7.1f} "
          f"{row['itl_ms']['p50']:>7.2f} / {row['itl_ms']['p99']:<6.2f} {row['decode_tok_s']:>7.1f}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"latency{a.tag}.json"), "w") as f:
        json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
