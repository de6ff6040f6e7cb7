"""Token selection: greedy, temperature, top-k, top-p; seeded per sequence.

Each sequence owns a CPU generator seeded from its request seed, and draws exactly one uniform
number per sampled token, so its samples do not depend on what else is in the batch. The
filtering and the inverse-CDF lookup run batched on the logits' device.
"""
from __future__ import annotations

import torch

from exactllm.sampling_params import SamplingParams


class SeqRandom:
    """One sequence's random stream: float32 uniforms in [0, 1) from a CPU generator seeded with
    the request seed. Drawn DRAW at a time, since a torch call per token costs microseconds of
    host time; a tensor of k draws holds the same numbers as k single draws (tested)."""
    DRAW = 64

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self._drawn: list[float] = []  # reversed: the next number is last
        self.last = 0.0

    def uniform(self) -> float:
        if not self._drawn:
            self._drawn = torch.rand(self.DRAW, generator=self.gen).tolist()[::-1]
        self.last = self._drawn.pop()
        return self.last

    def put_back(self) -> None:
        """Undo the last uniform(): the next one returns it again (a step sent and then redone)."""
        self._drawn.append(self.last)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities [S, V] after temperature, top-k (0 = off) and top-p (1 = off), sorted descending,
    with the matching token ids: returns (sorted_probs, sorted_ids)."""
    scaled = logits / temperature[:, None]
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    probs = probs.masked_fill(before >= top_p[:, None], 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), sorted_ids


def host_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on device, without making the host wait for the device: a host tensor goes to a GPU
    through pinned memory (a copy from pageable memory synchronizes the stream, which would
    stall the engine behind the step in flight: async scheduling)."""
    if device.type == "cuda" and not t.is_cuda:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on device (see host_to)."""
    return host_to(torch.tensor(values, dtype=dtype), device)


def sample(logits: torch.Tensor, params: list[SamplingParams], randoms: list[SeqRandom]) -> torch.Tensor:
    """One sampled token per row of float32 logits [S, V] (temperature, top-k, top-p; no greedy rows)."""
    dev = logits.device
    temperature = to_device([p.temperature for p in params], torch.float32, dev)
    top_k = to_device([p.top_k for p in params], torch.long, dev)
    top_p = to_device([p.top_p for p in params], torch.float32, dev)
    probs, ids = filter_logits(logits, temperature, top_k, top_p)
    u = to_device([r.uniform() for r in randoms], torch.float32, dev)
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(logits.shape[-1] - 1)
    return ids.gather(1, pick)[:, 0]


def select_on_device(logits: torch.Tensor, picks: torch.Tensor, params: list[SamplingParams],
                     randoms: list[SeqRandom], log_softmax) -> torch.Tensor:
    """[S, 2] float64 (token, log-prob) per row, left on the logits' device (nothing waits for it).
    picks [S, 2] float64 holds every row's greedy choice and its log-prob (``Ops.greedy_pick``);
    rows that sample draw from ``logits`` instead and take their log-prob from ``log_softmax``
    (the Ops' own, so the invariant modes keep the training bits). Each sampling row takes its
    sequence's next uniform now, on the host."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return picks
    idx = to_device(sampled, torch.long, logits.device)
    sub = logits[idx]
    tokens = sample(sub, [params[i] for i in sampled], [randoms[i] for i in sampled])
    lps = log_softmax(sub).gather(1, tokens[:, None])[:, 0]
    out = picks.clone()  # picks may be a CUDA graph's output buffer, rewritten by its next replay
    out[idx] = torch.stack((tokens.double(), lps.double()), dim=1)
    return out
