"""Where do the training forward and serving part ways on the GPU? A stage-by-stage diagnosis.

For one prompt: serve it (greedy), rescore the sequence with the training forward, then
isolate suspects: CUDA graphs vs eager serving; log_softmax over all rows vs row by row;
the model's last hidden state for position p from one long prefill vs a prefill of the prefix.

    PYTHONPATH=. python bench/train_serve_gpu.py --model random:llama-mini --numerics tp_invariant
"""
from __future__ import annotations

import argparse
import os

import torch

from exactllm import LLM, SamplingParams
from exactllm.train import TrainModel
from exactllm.train.logprobs import _packed_batch


def serve(model, numerics, prompt, n, graphs):
    os.environ["EXACTLLM_CUDA_GRAPHS"] = "1" if graphs else "0"
    out = LLM(model, device="cuda", numerics=numerics).generate(
        [prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    return out


def hidden_last(model, seq):
    ids, pos, batch, n_blocks = _packed_batch([seq], 16, "cuda")
    kv = model.allocate_kv(n_blocks, 16, model.dtype, "cuda")
    return model(ids, pos, batch, kv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-mini")
    ap.add_argument("--numerics", default="tp_invariant")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt-words", type=int, default=24)
    a = ap.parse_args()
    prompt = " ".join(f"w{j}" for j in range(a.prompt_words))
    g = serve(a.model, a.numerics, prompt, a.tokens, True)
    e = serve(a.model, a.numerics, prompt, a.tokens, False)
    n = len(g.token_ids)
    print("graphs vs eager serving: differing logprobs", sum(x != y for x, y in zip(g.logprobs, e.logprobs)))
    tm = TrainModel(a.model, numerics=a.numerics, device="cuda")
    seq = g.prompt_token_ids + g.token_ids
    with torch.no_grad():
        train = tm([seq])[0][-n:].tolist()
        print("train vs serve (graphs): differing", sum(x != y for x, y in zip(train, g.logprobs)),
              "first at", next((i for i, (x, y) in enumerate(zip(train, g.logprobs)) if x != y), None))
        print("train vs serve (eager):  differing", sum(x != y for x, y in zip(train, e.logprobs)))
        p0 = len(g.prompt_token_ids)
        print("prompt tokens", p0, "differing context lengths:",
              [p0 + i for i, (x, y) in enumerate(zip(train, g.logprobs)) if x != y][:20])
        model = tm.model
        h_all = hidden_last(model, seq)
        logits = model.logits(h_all)
        full = torch.log_softmax(logits.float(), -1)
        rows = torch.cat([torch.log_softmax(logits[i:i + 1].float(), -1) for i in range(logits.shape[0])])
        print("log_softmax all rows vs row by row: differing elements", (full != rows).sum().item())
        lg_rows = torch.cat([model.logits(h_all[i:i + 1]) for i in range(h_all.shape[0])])
        print("lm head all rows vs row by row: differing elements", (lg_rows != logits).sum().item())
        p0 = len(g.prompt_token_ids)
        diff_h = 0
        for p in range(p0 - 1, len(seq) - 1, max(1, n // 8)):
            h_pre = hidden_last(model, seq[:p + 1])[-1]
            diff_h += int(not torch.equal(h_pre, h_all[p]))
        print("final hidden of position p, long prefill vs prefix prefill: positions differing", diff_h, "of",
              len(range(p0 - 1, len(seq) - 1, max(1, n // 8))))


if __name__ == "__main__":
    main()
