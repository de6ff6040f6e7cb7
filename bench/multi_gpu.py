"""Same bits across tensor-parallel sizes on real GPUs (NCCL, one process per GPU), the cost of the
invariant modes at each TP size, and the FSDP training forward vs serving.

For each numerics mode and TP size: bench/invariance_gpu.py's 8 target prompts generate --tokens
tokens each, alone (batch 1) and inside batches filled with other prompts; every log-prob is compared
bitwise with the same mode's TP=1, batch-1 run. Throughput (generated tok/s, the second of two runs
so graph capture and compilation stay out) is recorded for the cost comparison, all in one process.
With --fsdp N, the training forward (exactllm.train) sharded with FSDP2 over N ranks (one per GPU)
rescores the largest-batch sequences served at TP=N and counts log-probs that differ.

    PYTHONPATH=. python bench/multi_gpu.py --model random:tinyllama-1.1b --tps 1,2 --fsdp 2 --tag _bf16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from exactllm import LLM
from exactllm.distributed.launch import launch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from invariance_gpu import TARGETS, release, timed_runs  # noqa: E402


def serve(model: str, mode: str, tp: int, batch_sizes: list[int], tokens: int, device: str,
          repeats: int = 2) -> tuple[dict, dict]:
    """{batch size: the targets' outputs}, {batch size: generated tok/s} at one TP size."""
    llm = LLM(model, device=device, numerics=mode, tensor_parallel_size=tp, max_num_seqs=max(batch_sizes))
    try:
        runs, speed = timed_runs(llm, batch_sizes, tokens, device, repeats)
    finally:
        llm.close()
        del llm
        release(device)
    return runs, speed


def differing(outs, base) -> tuple[int, int]:
    """(differing log-probs, differing token ids) of outs vs base, target by target."""
    logp = sum(a != b for o, r in zip(outs, base) for a, b in zip(o.logprobs, r.logprobs))
    tok = sum(a != b for o, r in zip(outs, base) for a, b in zip(o.token_ids, r.token_ids))
    return logp, tok


def _fsdp_scores(rank: int, world: int, model: str, mode: str, seqs: list[list[int]], device: str):
    from exactllm.train import TrainModel
    trainer = TrainModel(model, numerics=mode, device=device).fully_shard()
    with torch.no_grad():
        return [lp.detach() for lp in trainer(seqs)]


def fsdp_differing(model: str, mode: str, ranks: int, outs, device: str) -> list[int]:
    """Per rank: how many served log-probs the FSDP-sharded training forward does not reproduce."""
    seqs = [o.prompt_token_ids + o.token_ids for o in outs]
    per_rank = launch(_fsdp_scores, ranks, args=(model, mode, seqs, device), device=device, timeout=600)
    return [sum(a != b for o, lp in zip(outs, scores) for a, b in zip(lp[-len(o.token_ids):].tolist(), o.logprobs))
            for scores in per_rank]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:tinyllama-1.1b")
    ap.add_argument("--modes", default="fast,batch_invariant,tp_invariant")
    ap.add_argument("--tps", default="1,2")
    ap.add_argument("--batch-sizes", default="1,8,64,256")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--fsdp", type=int, default=0, help="FSDP ranks for the train-vs-serve check (0: skip)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda", help="cpu: gloo ranks, for a smoke test")
    ap.add_argument("--repeats", type=int, default=2, help="runs per batch size (tok/s of the last)")
    a = ap.parse_args()
    tps = [int(v) for v in a.tps.split(",")]
    sizes = [int(v) for v in a.batch_sizes.split(",")]
    gpus = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if a.device == "cuda" else "cpu"
    report = {"model": a.model, "device": gpus,
              "date": time.strftime("%Y-%m-%d"), "tokens_per_target": a.tokens, "targets": len(TARGETS),
              "rows": [], "fsdp": []}
    path = os.path.join(a.out, f"multi_gpu{a.tag}.json")
    os.makedirs(a.out, exist_ok=True)

    def save() -> None:  # after every step, so a cut-off run keeps what it measured
        with open(path, "w") as f:
            json.dump(report, f, indent=2)

    print(f"{'mode':<16} {'tp':>3} {'bs':>4} {'diff logp':>10} {'diff tok':>9} {'tok/s':>9} {'vs fast':>8}", flush=True)
    fast_speed = {}
    for mode in a.modes.split(","):
        base = None
        for tp in tps:
            runs, speed = serve(a.model, mode, tp, sizes, a.tokens, a.device, a.repeats)
            base = base or runs[sizes[0]]
            for bs in sizes:
                logp, tok = differing(runs[bs], base)
                if mode == "fast":
                    fast_speed[(tp, bs)] = speed[bs]
                rel = speed[bs] / fast_speed[(tp, bs)] if (tp, bs) in fast_speed else None
                report["rows"].append({"mode": mode, "tp": tp, "batch_size": bs, "differing_logprobs": logp,
                                       "differing_tokens": tok, "tok_s": speed[bs], "vs_fast": rel})
                print(f"{mode:<16} {tp:>3} {bs:>4} {logp:>10} {tok:>9} {speed[bs]:>9.0f} "
                      f"{'' if rel is None else f'{rel:.2f}':>8}", flush=True)
            save()
            if a.fsdp and tp == a.fsdp:
                per_rank = fsdp_differing(a.model, mode, a.fsdp, runs[sizes[-1]], a.device)
                report["fsdp"].append({"mode": mode, "ranks": a.fsdp, "served_tp": tp, "batch_size": sizes[-1],
                                       "logprobs": sum(len(o.logprobs) for o in runs[sizes[-1]]),
                                       "differing_logprobs_per_rank": per_rank})
                print(f"{mode:<16} FSDP {a.fsdp} ranks vs serving at TP={tp}, batch {sizes[-1]}: "
                      f"differing log-probs per rank {per_rank}", flush=True)
                save()
    save()


if __name__ == "__main__":
    main()
