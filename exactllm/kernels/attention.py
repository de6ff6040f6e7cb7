"""Attention over a paged KV cache.

Layout: ``k_cache``/``v_cache`` are [num_blocks, block_size, n_kv_heads, head_dim]; a
sequence's tokens live in the blocks its row of ``block_tables`` lists, in order. A batch
is a packed ragged set of query rows: sequence s owns rows cu_seqlens_q[s]:cu_seqlens_q[s+1],
which are the last ones of its context of ``context_lens[s]`` tokens (prefill, chunked
prefill and decode are all this one case).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Store new keys/values [T, Hkv, D] at flat slots (block * block_size + offset)."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:n_blocks]].flatten(0, 1)[:length]


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal grouped-query attention of packed query rows [T, Hq, D] against their cached context."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for s, length in enumerate(lens):
        rows = slice(cu[s], cu[s + 1])
        n_q = cu[s + 1] - cu[s]
        k = gather_context(k_cache, block_tables[s], length).transpose(0, 1).float()
        v = gather_context(v_cache, block_tables[s], length).transpose(0, 1).float()
        mask = None  # a single (decode) row sees its whole context
        if n_q > 1:
            q_pos = torch.arange(length - n_q, length, device=q.device)
            mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q[rows].transpose(0, 1).float(), k, v, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out[rows] = o.transpose(0, 1).to(q.dtype)
    return out
