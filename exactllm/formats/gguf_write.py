"""Writing GGUF files (through the gguf package): requantize a model to Q4_0/Q4_1/Q8_0.

Every metadata field is copied unchanged (with general.file_type updated); 2-D weight matrices
and 3-D expert stacks ([E, N, K], qwen3moe) are converted to the target block type; 1-D tensors
(norms) and MoE routers (``ffn_gate_inp``) stay F32, as llama.cpp's quantizer leaves them.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from exactllm.formats.gguf import EXPERT_TENSORS, ModelFileError, load_gguf
from exactllm.formats.quant import LAYOUTS, QuantWeight

# llama.cpp's llama_ftype values for "mostly <type>" files.
FILE_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7}


def _copy_metadata(reader, writer, file_type: int) -> None:
    import gguf
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = file_type if key == "general.file_type" else field.contents()
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, main_type, sub_type=sub_type)
    if "general.file_type" not in reader.fields:
        writer.add_file_type(file_type)


def _stored_shape(name: str, w: torch.Tensor, cfg) -> tuple:
    """The tensor's shape in the file: a quantized expert stack loads as [E*N, K] (formats/gguf.py)."""
    if cfg.n_experts and name.rsplit(".", 2)[-2] in EXPERT_TENSORS and w.dim() == 2:
        return (cfg.n_experts, w.shape[0] // cfg.n_experts, w.shape[1])
    return tuple(w.shape)


def requantize_gguf(src: str, dst: str, qtype: str) -> dict:
    """Write src as a qtype GGUF at dst; returns a count of output tensor types."""
    import gguf
    qtype = qtype.lower()
    if qtype not in LAYOUTS:
        raise ValueError(f"unknown type {qtype!r} (known: {', '.join(LAYOUTS)})")
    model = load_gguf(src, file_layout=True)
    reader = gguf.GGUFReader(src, "r")
    arch = model.metadata["general.architecture"]
    writer = gguf.GGUFWriter(dst, arch)
    _copy_metadata(reader, writer, FILE_TYPES[qtype])
    counts: Counter = Counter()
    ggml_type = gguf.GGMLQuantizationType[qtype.upper()]
    for name, w in tqdm(model.weights.items(), desc=f"quantize {qtype}", unit="tensor"):
        dense = w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float()
        shape = _stored_shape(name, dense, model.config)
        if (dense.dim() >= 2 and dense.shape[-1] % LAYOUTS[qtype].block_size == 0
                and not name.endswith("ffn_gate_inp.weight")):
            raw = QuantWeight.quantize(dense.reshape(-1, dense.shape[-1]), qtype).to_raw()
            raw = raw.reshape(*shape[:-1], -1).numpy()
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=ggml_type)
            counts[qtype.upper()] += 1
        else:
            writer.add_tensor(name, dense.reshape(shape).numpy().astype(np.float32))
            counts["F32"] += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    check = load_gguf(dst)
    if set(check.weights) != set(model.weights):
        raise ModelFileError(f"{dst}: written file lost tensors")
    return dict(counts)
