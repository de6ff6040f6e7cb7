"""Does the training forward of one sequence depend on how many sequences are packed with it?

Scores N random sequences packed in one forward and each alone, and counts differing log-probs;
then repeats with one op at a time swapped for its plain-torch reference, to find the culprit.

    PYTHONPATH=. python bench/train_batch_gpu.py --model random:llama-mini --numerics batch_invariant
"""
from __future__ import annotations

import argparse

import torch

from exactllm.kernels import attention, rope
from exactllm.layers import ops as ops_mod
from exactllm.train import TrainModel


def count(tm, seqs):
    with torch.no_grad():
        packed = tm(seqs)
        alone = [tm([s])[0] for s in seqs]
    return sum(int((a != b).sum()) for a, b in zip(packed, alone))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-mini")
    ap.add_argument("--numerics", default="batch_invariant")
    ap.add_argument("--sizes", default="8,64,256")
    a = ap.parse_args()
    tm = TrainModel(a.model, numerics=a.numerics, device="cuda")
    gen = torch.Generator().manual_seed(0)
    for n in [int(v) for v in a.sizes.split(",")]:
        seqs = [torch.randint(3, 30000, (int(torch.randint(150, 300, (1,), generator=gen)),), generator=gen).tolist()
                for _ in range(n)]
        base = count(tm, seqs)
        orig_attn, orig_rope = ops_mod.Ops.attention, ops_mod.Ops.rope
        ops_mod.Ops.attention = lambda self, *args: attention.paged_attention_ref(*args)
        ref_attn = count(tm, seqs)
        ops_mod.Ops.attention = orig_attn
        ops_mod.Ops.rope = lambda self, x, positions, cos, sin: rope.apply_rope_ref(x, positions, cos, sin)
        ref_rope = count(tm, seqs)
        ops_mod.Ops.rope = orig_rope
        tokens = sum(len(s) - 1 for s in seqs)
        print(f"N={n:4d} tokens={tokens:6d} differing: as is {base}, attention=ref {ref_attn}, rope=ref {ref_rope}")


if __name__ == "__main__":
    main()
