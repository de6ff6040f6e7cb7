"""Llama-family decoder (Llama, TinyLlama, SmolLM2) over GGUF-named weights.

Weights come as a dict keyed by GGUF tensor names (token_embd.weight, blk.N.attn_q.weight, ...),
each a dense tensor [N, K] or a QuantWeight; the same dict feeds every tensor-parallel rank,
which keeps only its shard.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from exactllm.config import ModelConfig
from exactllm.formats.quant import QuantWeight
from exactllm.kernels.rope import rope_cache
from exactllm.layers.attention import Attention, AttnBatch
from exactllm.layers.linear import Linear, concat_rows, shard_weight
from exactllm.layers.ops import Ops
from exactllm.layers.parallel import TPContext


def embedding_rows(w: "torch.Tensor | QuantWeight", ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` of an embedding table, dequantizing only those rows."""
    if isinstance(w, QuantWeight):
        rows = QuantWeight(w.qtype, (ids.numel(), w.shape[1]), w.qs[ids], w.scale[ids],
                           None if w.min is None else w.min[ids])
        return rows.dequantize(dtype)
    return w[ids].to(dtype)


class MLP(nn.Module):
    def __init__(self, weights: dict, prefix: str, ops: Ops, tp: TPContext):
        super().__init__()
        self.ops, self.tp = ops, tp
        self.gate_up = Linear(concat_rows([shard_weight(weights[f"{prefix}.ffn_{name}.weight"], 0, tp)
                                           for name in ("gate", "up")]))
        self.down = Linear(shard_weight(weights[f"{prefix}.ffn_down.weight"], 1, tp))

    def forward(self, x):
        return self.ops.swiglu_linear(self.ops.linear(x, self.gate_up.value), self.down.value, self.tp)

    def forward_norm(self, x, residual, norm_weight, eps):
        """forward(rmsnorm(x [+ residual])) with the norm fused into the gate/up projection, and the
        SwiGLU into its epilogue, where the ops can (Ops.norm_mlp); returns the output and the new
        residual stream."""
        return self.ops.norm_mlp(x, residual, norm_weight, eps, self.gate_up.value, self.down.value, self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict, index: int, ops: Ops, tp: TPContext, ffn_factory=MLP):
        super().__init__()
        prefix = f"blk.{index}"
        self.ops, self.eps = ops, cfg.norm_eps
        self.attn_norm = nn.Parameter(weights[f"{prefix}.attn_norm.weight"], requires_grad=False)
        self.ffn_norm = nn.Parameter(weights[f"{prefix}.ffn_norm.weight"], requires_grad=False)
        self.attn = Attention(cfg, weights, prefix, ops, tp)
        self.ffn = ffn_factory(weights, prefix, ops, tp)

    def forward(self, x, residual, positions, batch, kv_cache, rope_tables):
        """(layer output, residual stream); residual is None at the first layer (x is the stream).
        Each RMSNorm goes with the projection after it (one kernel where the ops can)."""
        h, residual = self.attn.forward_norm(x, residual, self.attn_norm, self.eps, positions, batch, kv_cache,
                                             rope_tables)
        if isinstance(self.ffn, MLP):
            return self.ffn.forward_norm(h, residual, self.ffn_norm, self.eps)
        h, residual = self.ops.rmsnorm(h, self.ffn_norm, self.eps, residual)
        return self.ffn(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict, ops: Ops, tp: TPContext = TPContext(),
                 dtype: torch.dtype = torch.float32, ffn_factory=MLP):
        super().__init__()
        self.cfg, self.ops, self.tp, self.dtype = cfg, ops, tp, dtype
        if cfg.vocab % tp.world:
            raise ValueError(f"tensor_parallel_size {tp.world} must divide the vocabulary size {cfg.vocab}")
        self.vocab_start, self.vocab_end = tp.shard_range(cfg.vocab)
        self.embed = Linear(shard_weight(weights["token_embd.weight"], 0, tp))
        head = weights.get("output.weight", weights["token_embd.weight"])
        self.lm_head = Linear(shard_weight(head, 0, tp))
        self.layers = nn.ModuleList(DecoderLayer(cfg, weights, i, ops, tp, ffn_factory)
                                    for i in range(cfg.n_layers))
        self.norm = nn.Parameter(weights["output_norm.weight"], requires_grad=False)
        cos, sin = rope_cache(cfg.head_dim, cfg.max_context, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: each rank fills the rows it owns, zeros elsewhere, then a sum
        over ranks (exact: one non-zero term per element)."""
        if self.tp.world == 1:
            return embedding_rows(self.embed.value, input_ids, self.dtype)
        local = input_ids - self.vocab_start
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        rows = embedding_rows(self.embed.value, local.clamp(0, self.vocab_end - self.vocab_start - 1), self.dtype)
        return self.tp.all_reduce(rows * owned[:, None].to(rows.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch,
                kv_caches: list) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, for packed rows of several sequences."""
        x = self.embed_tokens(input_ids)
        residual = None
        tables = (self.rope_cos, self.rope_sin)
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, batch, kv, tables)
        h, _ = self.ops.rmsnorm(x, self.norm, self.cfg.norm_eps, residual)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [S, vocab] (vocab-parallel shards gathered)."""
        return self.tp.all_gather_cat(self.ops.linear(hidden, self.lm_head.value).float(), dim=-1)

    def allocate_kv(self, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> list:
        shape = (num_blocks, block_size, self.cfg.n_kv_heads // self.tp.world, self.cfg.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(self.cfg.n_layers)]


def random_weights(cfg: ModelConfig, seed: int = 0, qtype: str | None = None,
                   device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Seeded random weights with GGUF names, scaled like a real init so logits are not degenerate:
    projections ~ N(0, 1/K), output projections further scaled by 1/sqrt(2 * layers) to keep the
    residual stream O(1), embeddings ~ N(0, 1), norms ~ 1 + N(0, 0.1)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std

    def matrix(n, k, extra=1.0):
        w = normal((n, k), extra / math.sqrt(k))
        return QuantWeight.quantize(w, qtype) if qtype else w.to(dtype)

    def norm(n):
        return (1.0 + normal((n,), 0.1)).float()

    depth = 1.0 / math.sqrt(2 * cfg.n_layers)
    w = {"token_embd.weight": QuantWeight.quantize(normal((cfg.vocab, cfg.hidden), 1.0), qtype) if qtype
         else normal((cfg.vocab, cfg.hidden), 1.0).to(dtype),
         "output_norm.weight": norm(cfg.hidden),
         "output.weight": matrix(cfg.vocab, cfg.hidden, 4.0)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}"
        w[f"{p}.attn_norm.weight"] = norm(cfg.hidden)
        w[f"{p}.ffn_norm.weight"] = norm(cfg.hidden)
        w[f"{p}.attn_q.weight"] = matrix(cfg.q_dim, cfg.hidden)
        w[f"{p}.attn_k.weight"] = matrix(cfg.kv_dim, cfg.hidden)
        w[f"{p}.attn_v.weight"] = matrix(cfg.kv_dim, cfg.hidden)
        w[f"{p}.attn_output.weight"] = matrix(cfg.hidden, cfg.q_dim, depth)
        if cfg.n_experts == 0:
            w[f"{p}.ffn_gate.weight"] = matrix(cfg.ffn, cfg.hidden)
            w[f"{p}.ffn_up.weight"] = matrix(cfg.ffn, cfg.hidden)
            w[f"{p}.ffn_down.weight"] = matrix(cfg.hidden, cfg.ffn, depth)
    if cfg.n_experts:  # experts and routers: generated by each MoE layer on the rank holding them
        from exactllm.models.moe import random_expert_specs
        w.update(random_expert_specs(cfg, seed))
    return w
