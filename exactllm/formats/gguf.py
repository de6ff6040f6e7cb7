"""GGUF read/write through the ``gguf`` package.

Reading maps llama-architecture metadata into one ModelConfig and the tensors into dense
tensors (F32/F16/BF16) or QuantWeight (Q4_0/Q4_1/Q8_0); everything that can go wrong with a
file raises ModelFileError with a one-line message naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from exactllm.config import ModelConfig
from exactllm.formats.quant import LAYOUTS, QuantWeight

SUPPORTED_ARCHS = ("llama",)
DENSE_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class ModelFileError(ValueError):
    """A model file that cannot be used; the message is one line and names the file."""


@dataclass
class GGUFModel:
    path: str
    config: ModelConfig
    weights: dict
    metadata: dict  # every key/value field, decoded to Python values


def _field_value(field):
    """Decode one GGUF key/value field into a Python value (str, number, bool or list)."""
    return field.contents()


def read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = _field_value(field)
    return meta


def config_from_metadata(meta: dict, path: str, vocab_size: int) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFileError(f"{path}: missing metadata key {arch}.{key}")
        return value

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = int(get("rope.dimension_count", hidden // n_heads))
    return ModelConfig(
        arch="llama", n_layers=int(get("block_count")), hidden=hidden, n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim,
        ffn=int(get("feed_forward_length")), vocab=int(meta.get(f"{arch}.vocab_size", vocab_size)),
        rope_base=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(get("context_length", 2048)),
        name=str(meta.get("general.name", os.path.basename(path))))


def _tensor_from_reader(t, path: str):
    type_name = t.tensor_type.name
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (K) first
    if type_name in DENSE_TYPES:
        arr = np.array(t.data)
        if type_name == "BF16":
            tensor = torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(arr.copy())
        return tensor.reshape(shape)
    qtype = type_name.lower()
    if qtype not in LAYOUTS:
        raise ModelFileError(f"{path}: tensor {t.name} has unsupported type {type_name} "
                             f"(supported: F32, F16, BF16, {', '.join(q.upper() for q in LAYOUTS)})")
    if len(shape) != 2:
        raise ModelFileError(f"{path}: quantized tensor {t.name} has {len(shape)} dimensions, expected 2")
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(shape[0], -1).copy())
    return QuantWeight.from_raw(raw, qtype)


def load_gguf(path: str) -> GGUFModel:
    """Read a GGUF model file (metadata, config and weights)."""
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a directory, expected a .gguf file")
    try:
        import gguf
        reader = gguf.GGUFReader(path, "r")
    except ModelFileError:
        raise
    except Exception as exc:  # the gguf package raises ValueError/struct errors on bad files
        raise ModelFileError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    meta = read_metadata(reader)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = config_from_metadata(meta, path, len(tokens))
    try:
        weights = {t.name: _tensor_from_reader(t, path) for t in reader.tensors}
    except ModelFileError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: corrupt or truncated tensor data ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    for required in ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"):
        if required not in weights:
            raise ModelFileError(f"{path}: missing tensor {required}")
    if weights["token_embd.weight"].shape[0] != config.vocab:
        config = ModelConfig(**{**config.__dict__, "vocab": weights["token_embd.weight"].shape[0]})
    return GGUFModel(path, config, weights, meta)
