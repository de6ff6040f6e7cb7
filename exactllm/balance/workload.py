"""Skewed multimodal routing workloads, routing statistics, and a replayable trace format.

Synthetic skew: hidden states of vision tokens carry a shared "vision direction" d; the router
rows of a chosen subset of experts (the vision experts of this step) get +strength * d. A vision
token's logits on those experts rise by about ``vision_gain * strength``, so vision tokens pile
onto them while text tokens route as before. Choosing the subset mostly on one rank makes that
rank hot; changing the subset from step to step reproduces the drifting hot rank the ReaLB
paper reports (hot expert 2x-12x mean load, hot rank 2x-3x the mean at EP=8, vision 50%-90%
of prefill tokens). ``routing_stats`` measures what a batch actually got.

Trace format (``.npz``, version 1): ``meta`` (JSON: version, n_experts, top_k, n_steps),
``offsets`` [n_steps+1] token offsets, ``ids`` [tokens, top_k] int16 expert ids, ``weights``
[tokens, top_k] float32 gate weights, ``modality`` [tokens] int8 (0 text, 1 vision), ``layer``
[n_steps] int32. Real routing traces written in this format replay through
``MoELayer.forward(x, modality, routing=(ids, weights))``.
"""
from __future__ import annotations

import json

import numpy as np
import torch

TEXT, VISION = 0, 1
TRACE_VERSION = 1


def vision_direction(hidden: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed + 7919)
    d = torch.randn(hidden, generator=g)
    return (d / d.norm()).to(device)


def pick_vision_experts(n_experts: int, n_ranks: int, hot_rank: int, n_vision: int,
                        hot_fraction: float = 0.75, seed: int = 0) -> torch.Tensor:
    """n_vision experts, about hot_fraction of them on hot_rank (contiguous shards)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    per = n_experts // n_ranks
    n_hot = min(per, round(n_vision * hot_fraction))
    hot = hot_rank * per + torch.randperm(per, generator=g)[:n_hot]
    others = torch.tensor([e for e in range(n_experts) if e // per != hot_rank])
    rest = others[torch.randperm(len(others), generator=g)[:n_vision - n_hot]]
    return torch.cat([hot, rest]).sort().values


def bias_router(router_w: torch.Tensor, experts: torch.Tensor, direction: torch.Tensor,
                strength: float) -> torch.Tensor:
    """Copy of router_w [E, H] with +strength * direction added to the rows of ``experts``."""
    w = router_w.clone()
    w[experts.to(w.device)] += strength * direction.to(w.device, w.dtype)
    return w


def make_batch(n_tokens: int, hidden: int, vision_frac: float, direction: torch.Tensor, *,
               vision_gain: float = 4.0, seed: int = 0, device="cpu", dtype=torch.float32):
    """(x [T, H], modality [T] int8): standard normal hidden states, vision rows + gain * d.

    Vision tokens come as whole images (contiguous runs of patches) between text spans."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n_tokens, hidden, generator=g)
    n_vis = int(round(vision_frac * n_tokens))
    modality = torch.zeros(n_tokens, dtype=torch.int8)
    start = int(torch.randint(0, n_tokens - n_vis + 1, (1,), generator=g)) if n_vis < n_tokens else 0
    modality[start:start + n_vis] = VISION
    x[modality == VISION] += vision_gain * direction.cpu()
    return x.to(device=device, dtype=dtype), modality.to(device)


def routing_stats(ids: torch.Tensor, modality: torch.Tensor, n_experts: int, n_ranks: int) -> dict:
    """Skew of one routing result: hot expert / mean, hot rank / mean, vision shares."""
    ids = ids.cpu().long()
    mod = modality.cpu().long()
    k = ids.shape[1]
    load = torch.bincount(ids.flatten(), minlength=n_experts).double()
    vis = torch.bincount(ids[mod == VISION].flatten(), minlength=n_experts).double()
    rank_load = load.view(n_ranks, -1).sum(1)
    rank_vis = vis.view(n_ranks, -1).sum(1) / rank_load.clamp_min(1)
    return {
        "tokens": int(ids.shape[0]), "top_k": k,
        "vision_token_share": float((mod == VISION).double().mean()),
        "hot_expert_over_mean": float(load.max() / load.mean()),
        "hot_rank_over_mean": float(rank_load.max() / rank_load.mean()),
        "hot_rank": int(rank_load.argmax()),
        "rank_load": rank_load.long().tolist(),
        "rank_vision_share": [round(v, 4) for v in rank_vis.tolist()],
    }


def save_trace(path: str, steps: list[dict], n_experts: int, top_k: int) -> None:
    """steps: dicts with ids [T, k], weights [T, k], modality [T], optional layer (int)."""
    offsets = np.zeros(len(steps) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([int(s["ids"].shape[0]) for s in steps])
    cat = lambda key, dt: np.concatenate([torch.as_tensor(s[key]).cpu().numpy().astype(dt) for s in steps])
    meta = dict(format="exactllm-moe-trace", version=TRACE_VERSION, n_experts=n_experts, top_k=top_k,
                n_steps=len(steps))
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), offsets=offsets,
                        ids=cat("ids", np.int16), weights=cat("weights", np.float32),
                        modality=cat("modality", np.int8),
                        layer=np.array([int(s.get("layer", 0)) for s in steps], dtype=np.int32))


def load_trace(path: str) -> tuple[dict, list[dict]]:
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    if meta.get("format") != "exactllm-moe-trace" or meta.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: not an exactllm MoE trace v{TRACE_VERSION}")
    o = z["offsets"]
    steps = [dict(ids=torch.from_numpy(z["ids"][a:b].astype(np.int64)),
                  weights=torch.from_numpy(z["weights"][a:b]),
                  modality=torch.from_numpy(z["modality"][a:b]),
                  layer=int(z["layer"][i]))
             for i, (a, b) in enumerate(zip(o[:-1], o[1:]))]
    return meta, steps
