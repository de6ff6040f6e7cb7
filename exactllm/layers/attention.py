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

    def forward_norm(self, x, residual, norm_weight, eps, positions, batch: AttnBatch, kv_cache, rope_tables):
        """forward(rmsnorm(x [+ residual])) and the new residual stream. The norm, the qkv projection,
        RoPE and the KV-cache write go to one op (Ops.norm_qkv_rope_kv: one kernel where it can),
        except in models that normalize q and k between the projection and RoPE (normalize_qk)."""
        if type(self).normalize_qk is not Attention.normalize_qk:
            qkv, residual = self.ops.norm_linear(x, residual, norm_weight, eps, self.qkv.value)
            return self.attend(qkv, positions, batch, kv_cache, rope_tables), residual
        q, residual = self.ops.norm_qkv_rope_kv(x, residual, norm_weight, eps, self.qkv.value,
                                                (self.n_heads, self.n_kv_heads, self.head_dim), positions,
                                                rope_tables, kv_cache, batch.slot_mapping)
        return self.attend_rotated(q, batch, kv_cache), residual

    def attend(self, qkv, positions, batch: AttnBatch, kv_cache, rope_tables):
        """Everything after the qkv projection (whose output is qkv [T, (heads + 2 kv_heads) * head_dim])."""
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
        return self.attend_rotated(q, batch, kv_cache)

    def attend_rotated(self, q, batch: AttnBatch, kv_cache):
        """Attention of the rotated q [T, heads, head_dim] over the cache (this step's k and v already
        in it), then the output projection."""
        k_cache, v_cache = kv_cache
        o = self.ops.attention(q, k_cache, v_cache, batch.cu_seqlens_q, batch.context_lens,
                               batch.block_tables, self.scale)
        return self.ops.row_parallel_linear(o.reshape(q.shape[0], -1), self.o.value, self.tp)
