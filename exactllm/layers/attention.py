"""Self-attention block (GQA, RoPE) over a paged KV cache, and the batch metadata it reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exactllm.config import ModelConfig
from exactllm.layers.linear import Linear, concat_rows, shard_weight
from exactllm.layers.ops import Ops
from exactllm.layers.parallel import TPContext


@dataclass
class AttnBatch:
    """Where a packed batch of query rows sits in the paged KV cache.

    Sequence s owns query rows cu_seqlens_q[s]:cu_seqlens_q[s+1]; they are the last rows of
    its context of context_lens[s] tokens; slot_mapping[t] is the flat cache slot of row t.
    """
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor

    @property
    def last_rows(self) -> torch.Tensor:
        return self.cu_seqlens_q[1:] - 1


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict, prefix: str, ops: Ops, tp: TPContext):
        super().__init__()
        if cfg.n_heads % tp.world or cfg.n_kv_heads % tp.world:
            raise ValueError(f"tensor_parallel_size {tp.world} must divide n_heads {cfg.n_heads} "
                             f"and n_kv_heads {cfg.n_kv_heads}")
        self.ops, self.tp = ops, tp
        self.n_heads = cfg.n_heads // tp.world
        self.n_kv_heads = cfg.n_kv_heads // tp.world
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv = Linear(concat_rows([shard_weight(weights[f"{prefix}.attn_{name}.weight"], 0, tp)
                                       for name in ("q", "k", "v")]))
        self.o = Linear(shard_weight(weights[f"{prefix}.attn_output.weight"], 1, tp))

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook between the qkv projection and RoPE ([T, heads, head_dim] each); Llama: none."""
        return q, k

    def forward(self, x, positions, batch: AttnBatch, kv_cache, rope_tables):
        return self.attend(self.ops.linear(x, self.qkv.value), positions, batch, kv_cache, rope_tables)

    def attend(self, qkv, positions, batch: AttnBatch, kv_cache, rope_tables):
        """Everything after the qkv projection (whose output is qkv [T, (heads + 2 kv_heads) * head_dim]):
        the decoder layer computes it fused with its norm (Ops.norm_linear)."""
        ops = self.ops
        t = qkv.shape[0]
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)
        q = q.reshape(t, self.n_heads, self.head_dim)
        k = k.reshape(t, self.n_kv_heads, self.head_dim)
        v = v.reshape(t, self.n_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        cos, sin = rope_tables
        k_cache, v_cache = kv_cache
        q = ops.rope_kv(q, k, v, positions, cos, sin, k_cache, v_cache, batch.slot_mapping)
        o = ops.attention(q, k_cache, v_cache, batch.cu_seqlens_q, batch.context_lens,
                          batch.block_tables, self.scale)
        return ops.row_parallel_linear(o.reshape(t, -1), self.o.value, self.tp)
