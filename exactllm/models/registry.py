"""Architecture name -> model class."""
from __future__ import annotations

from exactllm.config import ModelConfig


def model_class(cfg: ModelConfig):
    if cfg.arch == "llama":
        from exactllm.models.llama import LlamaModel
        return LlamaModel
    if cfg.arch == "moe":
        from exactllm.models.moe import MoEModel
        return MoEModel
    raise ValueError(f"unsupported architecture {cfg.arch!r}")
