"""Model and engine configuration.

``ModelConfig`` is filled from GGUF metadata (formats/gguf.py) or from a named
``random:<preset>``; ``PRESETS`` reads like gpt-fast's table of named shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"
    n_layers: int = 4
    hidden: int = 256
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 32
    ffn: int = 1024
    vocab: int = 32000
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_context: int = 2048
    tie_embeddings: bool = False
    # Mixture of experts (arch == "moe"): 0 experts means a dense FFN.
    n_experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_expert_ffn: int = 0
    name: str = ""

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


PRESETS: dict[str, ModelConfig] = {
    # The exact TinyLlama-1.1B shape of seed 003.
    "tinyllama-1.1b": ModelConfig(n_layers=22, hidden=2048, n_heads=32, n_kv_heads=4, head_dim=64,
                                  ffn=5632, vocab=32000, rope_base=10000.0, max_context=2048,
                                  name="tinyllama-1.1b"),
    # Small, with every head count and K dimension divisible by 4 (CPU tensor-parallel tests).
    "llama-mini": ModelConfig(n_layers=4, hidden=256, n_heads=8, n_kv_heads=4, head_dim=32,
                              ffn=1024, vocab=32000, max_context=2048, name="llama-mini"),
    # MoE presets (Qwen3-MoE style router, SwiGLU experts).
    "moe-mini": ModelConfig(arch="moe", n_layers=2, hidden=256, n_heads=8, n_kv_heads=4, head_dim=32,
                            ffn=0, vocab=32000, n_experts=8, top_k=2, expert_ffn=128,
                            max_context=2048, name="moe-mini"),
    # The language-model shape of Qwen3-VL-30B-A3B.
    "qwen3-vl-30b-a3b": ModelConfig(arch="moe", n_layers=48, hidden=2048, n_heads=32, n_kv_heads=4,
                                    head_dim=128, ffn=0, vocab=151936, n_experts=128, top_k=8,
                                    expert_ffn=768, rope_base=1000000.0, max_context=32768,
                                    norm_eps=1e-6, name="qwen3-vl-30b-a3b"),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: "str | torch.dtype | None", device: str) -> torch.dtype:
    """Compute dtype: float32 on CPU and bfloat16 on CUDA unless asked otherwise."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def kv_cache_bytes(cfg: ModelConfig, seq_len: int, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of KV cache for one sequence: layers x 2 (K and V) x kv_heads x head_dim x tokens x dtype size.

    TinyLlama-1.1B at 2048 tokens: 92,274,688 bytes in fp32 (seed 003), half that in fp16.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * seq_len * itemsize


@dataclass
class EngineConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    numerics: str = "fast"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from free memory
    gpu_memory_utilization: float = 0.85
    cpu_kv_bytes: int = 512 << 20  # KV pool on CPU: 11.6k tokens of SmolLM2-135M in fp32
    tensor_parallel_size: int = 1
    seed: int = 0
    # Overlap the host's work with the device's (engine/llm_engine.py); None: on for CUDA.
    async_scheduling: bool | None = None
    extra: dict = field(default_factory=dict)

    def with_(self, **kw) -> "EngineConfig":
        return replace(self, **kw)
