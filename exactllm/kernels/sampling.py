"""Greedy pick: each row's argmax token and that token's log-probability, as one [S, 2] float64
tensor (token, log-prob) so the host fetches a decode step's result in one copy."""
from __future__ import annotations

import torch


def greedy_pick_ref(logits: torch.Tensor, logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """logits [S, V]; logprobs: the rows' log-softmax if the caller has one (used as is, so its
    bits carry over), else torch.log_softmax in float32. Ties pick the lowest token id."""
    tok = logits.argmax(dim=-1)
    if logprobs is None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    lp = logprobs.gather(1, tok[:, None])[:, 0]
    return torch.stack((tok.double(), lp.double()), dim=1)
