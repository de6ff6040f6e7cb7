"""Serve one of bench/invariance_gpu.py's target prompts (in a fresh engine, and after another
request) and rescore it with the training forward; print the context lengths where they part.
This is how the FMA-contraction difference in the attention kernel's unmasked path was found.

    PYTHONPATH=. python bench/train_serve_targets.py random:tinyllama-1.1b tp_invariant [target]
"""
from __future__ import annotations

import sys

import torch

from exactllm import LLM, SamplingParams
from exactllm.train import TrainModel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from invariance_gpu import TARGETS  # noqa: E402


def parting(train: list[float], served: list[float], prompt_len: int) -> list[int]:
    return [prompt_len + j for j, (x, y) in enumerate(zip(train, served)) if x != y]


def main() -> None:
    model, mode = sys.argv[1], sys.argv[2]
    target = TARGETS[int(sys.argv[3]) if len(sys.argv) > 3 else 6]
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    fresh = LLM(model, device="cuda", numerics=mode).generate([target], params, use_tqdm=False)[0]
    reused_llm = LLM(model, device="cuda", numerics=mode)
    reused_llm.generate([TARGETS[5]], params, use_tqdm=False)
    reused = reused_llm.generate([target], params, use_tqdm=False)[0]
    del reused_llm
    print("fresh vs after-another serving: differing", sum(x != y for x, y in zip(fresh.logprobs, reused.logprobs)))
    with torch.no_grad():
        train = TrainModel(model, numerics=mode, device="cuda")([fresh.prompt_token_ids + fresh.token_ids])[0]
    train = train[-len(fresh.token_ids):].tolist()
    p0 = len(fresh.prompt_token_ids)
    print("train vs fresh serve: parting at context lengths", parting(train, fresh.logprobs, p0)[:8])
    print("train vs reused serve: parting at context lengths", parting(train, reused.logprobs, p0)[:8])


if __name__ == "__main__":
    main()
