"""GGUF read/write through the ``gguf`` package.

Reading maps the metadata of a supported architecture into one ModelConfig and the tensors
into dense tensors (F32/F16/BF16) or QuantWeight (Q4_0/Q4_1/Q8_0); everything that can go wrong
with a file raises ModelFileError with a one-line message naming the file (and the tensor).

Architectures:
- ``llama``: dense decoder (Llama, TinyLlama, SmolLM2).
- ``qwen3moe`` (llama.cpp's name for Qwen3-MoE): config arch "moe". Metadata keys
  ``qwen3moe.expert_count`` / ``expert_used_count`` / ``expert_feed_forward_length``,
  ``attention.key_length`` for the head size (Qwen3 heads are wider than hidden / n_heads). Per layer: the router
  ``blk.N.ffn_gate_inp.weight`` [E, H] and the experts as 3-D tensors ``ffn_gate_exps`` /
  ``ffn_up_exps`` [E, F, H] and ``ffn_down_exps`` [E, H, F] (torch order; GGUF lists the dims
  reversed). A quantized 3-D tensor is returned as one QuantWeight of E*N rows (expert e owns
  rows e*N:(e+1)*N; layers/moe.py ``expert_matrix`` cuts one out). Qwen3 normalizes q and k per head
  (``attn_q_norm`` / ``attn_k_norm`` [head_dim]) and uses NeoX RoPE (pairs (i, i + d/2)), while
  exactllm's RoPE rotates adjacent pairs (2i, 2i+1): on load the rows of attn_q / attn_k and the
  q/k norm weights are permuted within each head (i -> 2i, i + d/2 -> 2i+1), which makes the two
  rotations the same and leaves every q.k product unchanged. gguf defines no shared-expert tensors
  for qwen3moe (qwen2moe's come with a sigmoid gate this MoE layer does not model).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from exactllm.config import ModelConfig
from exactllm.formats.quant import LAYOUTS, QuantWeight

SUPPORTED_ARCHS = ("llama", "qwen3moe")
MOE_ARCHS = ("qwen3moe",)
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
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
    head_dim = int(get("attention.key_length", get("rope.dimension_count", hidden // n_heads)))
    moe = {}
    if arch in MOE_ARCHS:
        moe = dict(n_experts=int(get("expert_count")), top_k=int(get("expert_used_count")),
                   expert_ffn=int(get("expert_feed_forward_length")))
        if not 0 < moe["top_k"] <= moe["n_experts"]:
            raise ModelFileError(f"{path}: {arch}.expert_used_count {moe['top_k']} not in [1, "
                                 f"{arch}.expert_count {moe['n_experts']}]")
    return ModelConfig(
        arch="moe" if moe else "llama", n_layers=int(get("block_count")), hidden=hidden, n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim,
        ffn=int(get("feed_forward_length", 0) if moe else get("feed_forward_length")),
        vocab=int(meta.get(f"{arch}.vocab_size", vocab_size)),
        rope_base=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_context=int(get("context_length", 2048)),
        name=str(meta.get("general.name", os.path.basename(path))), **moe)


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
    if len(shape) not in (2, 3):
        raise ModelFileError(f"{path}: quantized tensor {t.name} has {len(shape)} dimensions, expected 2 (or 3 for experts)")
    rows = int(np.prod(shape[:-1]))
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, -1).copy())
    return QuantWeight.from_raw(raw, qtype)


def _check_moe_tensors(path: str, cfg: ModelConfig, weights: dict) -> None:
    """Every MoE layer has its router, experts and q/k norms, with the shapes of the config."""
    E, H, F, D = cfg.n_experts, cfg.hidden, cfg.expert_ffn, cfg.head_dim
    want = {"ffn_gate_inp": [(E, H)], "ffn_gate_exps": [(E, F, H), (E * F, H)],
            "ffn_up_exps": [(E, F, H), (E * F, H)], "ffn_down_exps": [(E, H, F), (E * H, F)],
            "attn_q": [(cfg.q_dim, H)], "attn_k": [(cfg.kv_dim, H)], "attn_q_norm": [(D,)], "attn_k_norm": [(D,)]}
    for i in range(cfg.n_layers):
        for name, shapes in want.items():
            key = f"blk.{i}.{name}.weight"
            if key not in weights:
                raise ModelFileError(f"{path}: missing tensor {key}")
            got = tuple(weights[key].shape)
            if isinstance(weights[key], QuantWeight) and name in EXPERT_TENSORS:
                ok = got == shapes[1]  # quantized experts come as E*N rows
            else:
                ok = got == shapes[0]
            if not ok:
                raise ModelFileError(f"{path}: tensor {key} has shape {list(got)}, expected {list(shapes[0])} "
                                     f"(expert_count {E}, embedding_length {H}, expert_feed_forward_length {F}, head_dim {D})")


def neox_to_adjacent(head_dim: int) -> torch.Tensor:
    """Row order within a head that turns NeoX RoPE pairs (i, i + d/2) into adjacent pairs (2i, 2i+1)."""
    half = head_dim // 2
    return torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()


def _permute_rows(w, perm: torch.Tensor):
    if isinstance(w, QuantWeight):
        return QuantWeight(w.qtype, w.shape, w.qs[perm], w.scale[perm], None if w.min is None else w.min[perm])
    return w[perm]


def _qwen3_rope_layout(cfg: ModelConfig, weights: dict) -> None:
    """Permute attn_q / attn_k rows (and the q/k norms) from NeoX to adjacent RoPE pairs, in place."""
    D = cfg.head_dim
    within = neox_to_adjacent(D)
    for i in range(cfg.n_layers):
        for name, heads in (("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads)):
            key = f"blk.{i}.{name}.weight"
            perm = (torch.arange(heads)[:, None] * D + within[None, :]).flatten()
            weights[key] = _permute_rows(weights[key], perm)
            weights[f"blk.{i}.{name}_norm.weight"] = weights[f"blk.{i}.{name}_norm.weight"][within]


def load_gguf(path: str, file_layout: bool = False) -> GGUFModel:
    """Read a GGUF model file (metadata, config and weights).

    file_layout=True keeps the tensors as stored (no qwen3moe RoPE row permutation): for
    rewriting the file (gguf_write.requantize_gguf), not for running it."""
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
    weights = {}
    for t in reader.tensors:
        try:
            weights[t.name] = _tensor_from_reader(t, path)
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(f"{path}: corrupt or truncated data in tensor {t.name} "
                                 f"({type(exc).__name__}: {exc})".splitlines()[0]) from None
    for required in ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"):
        if required not in weights:
            raise ModelFileError(f"{path}: missing tensor {required}")
    if config.arch == "moe":
        _check_moe_tensors(path, config, weights)
        if not file_layout:
            _qwen3_rope_layout(config, weights)
    if weights["token_embd.weight"].shape[0] != config.vocab:
        config = ModelConfig(**{**config.__dict__, "vocab": weights["token_embd.weight"].shape[0]})
    return GGUFModel(path, config, weights, meta)
