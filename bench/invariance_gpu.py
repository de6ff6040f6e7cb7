"""Same bits on one GPU: batch invariance, train == serve, and the cost of the invariant modes.

For each numerics mode and model: 8 target prompts generate --tokens tokens each, alone (batch 1)
and inside batches of 8, 64, 256 filled with other prompts; every log-prob is compared bitwise
with the batch-1 run. The training forward (exactllm.train, one pass over each whole sequence)
rescores the batch-256 sequences and is compared bitwise with what serving reported. Throughput
(generated tok/s) of each batch size is recorded for the cost comparison, in the same process.

    PYTHONPATH=. python bench/invariance_gpu.py --model random:tinyllama-1.1b --out bench/results
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from exactllm import LLM, SamplingParams
from exactllm.train import TrainModel

TARGETS = [f"Target prompt {i}: " + " ".join(f"w{i * 7 + j}" for j in range(16 + 9 * i)) for i in range(8)]


def filler(i: int) -> str:
    return f"filler {i} " + "x y z " * (i % 13 + 1)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Give a dropped engine's GPU memory back before the next one sizes its KV pool from free memory:
    otherwise a later mode got a smaller pool and preempted at batch 256 (H100: Q8_0 batch_invariant
    13,366 tok/s after the fast mode in one process, 33,554 alone)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def timed_runs(llm, batch_sizes: list[int], tokens: int, device: str, repeats: int = 2) -> tuple[dict, dict]:
    """{batch size: the targets' outputs}, {batch size: generated tok/s}: the targets alone (batch 1)
    or inside batches filled with other prompts; tok/s of the last of ``repeats`` runs (the first
    captures CUDA graphs and compiles)."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(TARGETS[:2], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
    runs, speed = {}, {}
    for bs in batch_sizes:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            if bs == 1:
                outs = [llm.generate([p], params, use_tqdm=False)[0] for p in TARGETS]
                n_tok = tokens * len(TARGETS)
            else:
                batch = TARGETS + [filler(i) for i in range(bs - len(TARGETS))]
                outs = llm.generate(batch, params, use_tqdm=False)[:len(TARGETS)]
                n_tok = tokens * bs
            sync(device)
            speed[bs] = n_tok / (time.perf_counter() - t0)
        runs[bs] = outs
    return runs, speed


def run_mode(model: str, mode: str, batch_sizes: list[int], tokens: int, device: str) -> dict:
    llm = LLM(model, device=device, numerics=mode, max_num_seqs=max(batch_sizes))
    runs, speed = timed_runs(llm, batch_sizes, tokens, device)
    base = runs[batch_sizes[0]]
    diffs = {bs: sum(a != b for o, r in zip(outs, base) for a, b in zip(o.logprobs, r.logprobs))
             for bs, outs in runs.items()}
    tok_diffs = {bs: sum(a != b for o, r in zip(outs, base) for a, b in zip(o.token_ids, r.token_ids))
                 for bs, outs in runs.items()}
    del llm
    release(device)
    trainer = TrainModel(model, numerics=mode, device=device)
    served = runs[batch_sizes[-1]]
    with torch.no_grad():
        scored = trainer([o.prompt_token_ids + o.token_ids for o in served])
    train_diff = sum(a != b for o, lp in zip(served, scored)
                     for a, b in zip(lp[-len(o.token_ids):].tolist(), o.logprobs))
    del trainer
    release(device)
    return {"mode": mode, "generated_per_run": tokens * len(TARGETS), "differing_logprobs_vs_batch1": diffs,
            "differing_tokens_vs_batch1": tok_diffs, "train_vs_serve_differing_logprobs": train_diff,
            "tok_s": speed}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:tinyllama-1.1b")
    ap.add_argument("--modes", default="fast,batch_invariant,tp_invariant")
    ap.add_argument("--batch-sizes", default="1,8,64,256")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    sizes = [int(v) for v in a.batch_sizes.split(",")]
    rows = []
    for m in a.modes.split(","):
        rows.append(run_mode(a.model, m, sizes, a.tokens, a.device))
        print("mode done", json.dumps(rows[-1], default=str), flush=True)   # kept if a later mode is cut off
    fast = next((r for r in rows if r["mode"] == "fast"), None)
    print(f"model {a.model}, {device_name(a.device)}, {a.tokens} tokens x {len(TARGETS)} target prompts")
    print(f"{'mode':<16} {'bs':>4} {'diff logp':>10} {'diff tok':>9} {'tok/s':>9} {'vs fast':>8}")
    for r in rows:
        for bs in sizes:
            rel = r["tok_s"][bs] / fast["tok_s"][bs] if fast else float("nan")
            print(f"{r['mode']:<16} {bs:>4} {r['differing_logprobs_vs_batch1'][bs]:>10} "
                  f"{r['differing_tokens_vs_batch1'][bs]:>9} {r['tok_s'][bs]:>9.0f} {rel:>8.2f}")
        print(f"{r['mode']:<16} train vs serve differing log-probs: {r['train_vs_serve_differing_logprobs']}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"invariance_gpu{a.tag}.json"), "w") as f:
        json.dump({"model": a.model, "device": device_name(a.device), "date": time.strftime("%Y-%m-%d"),
                   "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
