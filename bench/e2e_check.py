"""End-to-end GPU checks of the paged engine (greedy, token ids in, token ids out).

1. GPU vs CPU: the same weights (made on the CPU, then moved) and mixed-length prompts give the
   same greedy tokens in float32; bf16 on the GPU is reported as agreement only.
2. batch_invariant on the GPU: each prompt alone (decode through CUDA graphs) gives the same
   tokens and bitwise the same log-probs as inside the whole batch, and as with graphs off;
   fast mode is reported for contrast.
Model: ``random:<preset>`` or a file saved by ``--pack`` (weights dict + config + CPU greedy
tokens, for the default GGUF model on a machine without the gguf package).

  PYTHONPATH=. python bench/e2e_check.py --model random:llama-mini
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import exactllm.llm as llm_mod
from exactllm import LLM, SamplingParams
from exactllm.models.loader import ModelSource, resolve_model

PROMPT_LENS = (5, 17, 33, 64, 100, 3, 250, 9)


def cpu_weights_source(model: str) -> ModelSource:
    """The model's weights built on the CPU (random presets seed a device generator), moved on demand."""
    src = resolve_model(model, torch.float32)
    cpu = src.weights_fn("cpu")
    return ModelSource(src.name, src.config, lambda device: {k: v.to(device) for k, v in cpu.items()}, src.tokenizer)


def run(source, prompts, device, dtype, numerics="fast", graphs=True, max_tokens=24):
    os.environ["EXACTLLM_CUDA_GRAPHS"] = "1" if graphs else "0"
    orig = llm_mod.resolve_model
    llm_mod.resolve_model = lambda model, dtype: source
    try:
        llm = LLM("packed", device=device, dtype=dtype, numerics=numerics, max_num_seqs=64)
    finally:
        llm_mod.resolve_model = orig
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.token_ids for o in outs], [o.logprobs for o in outs]


def pack(model: str | None, path: str) -> None:
    """Save weights + config + CPU greedy tokens (run where the gguf package is)."""
    src = resolve_model(model, torch.float32)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, src.config.vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    toks, _ = run(src, prompts, "cpu", torch.float32)
    torch.save({"config": src.config, "weights": src.weights_fn("cpu"), "prompts": prompts, "cpu_tokens": toks}, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-mini")
    ap.add_argument("--packed", help="file written by --pack (may be split: parts are concatenated)", nargs="*")
    ap.add_argument("--pack", help="write a packed file here and exit")
    ap.add_argument("--out", default="bench/results/e2e_check.json")
    a = ap.parse_args()
    if a.pack:
        return pack(None if a.model == "default" else a.model, a.pack)
    if a.packed:
        import io
        blob = b"".join(open(p, "rb").read() for p in a.packed)
        data = torch.load(io.BytesIO(blob), weights_only=False)
        from exactllm.tokenizer import Tokenizer
        w = data["weights"]
        source = ModelSource("default", data["config"], lambda device: {k: v.to(device) for k, v in w.items()},
                             Tokenizer.synthetic(data["config"].vocab))
        prompts, cpu = data["prompts"], data["cpu_tokens"]
    else:
        source = cpu_weights_source(a.model)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, source.config.vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]
        cpu, _ = run(source, prompts, "cpu", torch.float32)
    res = {"model": a.model if not a.packed else "default (packed)", "device": torch.cuda.get_device_name(),
           "date": time.strftime("%Y-%m-%d"), "argv": sys.argv}
    g32, _ = run(source, prompts, "cuda", torch.float32)
    res["fp32_gpu_eq_cpu"] = [x == y for x, y in zip(g32, cpu)]
    g16, _ = run(source, prompts, "cuda", torch.bfloat16)
    res["bf16_gpu_tokens_agree_with_cpu"] = [sum(p == q for p, q in zip(x, y)) / len(y) for x, y in zip(g16, cpu)]
    for mode in ("batch_invariant", "fast"):
        tb, lb = run(source, prompts, "cuda", torch.bfloat16, mode)
        te, le = run(source, prompts, "cuda", torch.bfloat16, mode, graphs=False)
        alone = [run(source, [p], "cuda", torch.bfloat16, mode) for p in prompts[:3]]
        res[mode] = {"graphs_eq_eager": tb == te and lb == le,
                     "alone_eq_batched": all(al[0][0] == tb[i] and al[1][0] == lb[i] for i, al in enumerate(alone))}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
