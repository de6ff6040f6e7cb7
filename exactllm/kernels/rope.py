"""Rotary position embedding, GGUF/llama.cpp "normal" layout: adjacent pairs (2i, 2i+1)
rotate together (HF's convert script permutes q/k rows so this equals HF's rotate_half)."""
from __future__ import annotations

import torch


def rope_cache(head_dim: int, max_pos: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_pos, head_dim // 2] in float32; theta_i = base^(-2i/d)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.arange(max_pos, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope_ref(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; positions [T]; returns the rotated x (same dtype), computed in float32."""
    c = cos[positions][:, None, :]
    s = sin[positions][:, None, :]
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def rope_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """q, k rotated; rotated k and v stored at their flat cache slots (rows with a negative slot,
    CUDA-graph padding, store nothing); returns the rotated q."""
    from exactllm.kernels.attention import write_kv_ref
    keep = slot_mapping >= 0
    k_rot = apply_rope_ref(k, positions, cos, sin)
    write_kv_ref(k_rot[keep], v[keep], k_cache, v_cache, slot_mapping[keep])
    return apply_rope_ref(q, positions, cos, sin)


def norm_gemv_rope_kv_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                          w: torch.Tensor, rope_kv) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``gemv_triton.norm_gemv_rope_kv`` (``rope_kv``: a gemv_triton.RopeKV): the qkv
    projection of the normed x, then rope_kv_ref on its heads; returns (qkv with q rotated, the new
    residual stream) and fills the caches."""
    from exactllm.kernels.gemv import norm_gemv_ref
    qkv, residual = norm_gemv_ref(x, residual, norm_weight, eps, w)
    t, d = qkv.shape[0], rope_kv.head_dim
    q, k, v = qkv.split((rope_kv.q_width, rope_kv.kv_width, rope_kv.kv_width), dim=-1)
    q_rot = rope_kv_ref(q.reshape(t, -1, d), k.reshape(t, -1, d), v.reshape(t, -1, d), rope_kv.positions,
                        rope_kv.cos, rope_kv.sin, rope_kv.k_cache, rope_kv.v_cache, rope_kv.slot_mapping)
    return torch.cat((q_rot.reshape(t, -1), k, v), dim=-1), residual


def qkv_rope_kv_ref(qkv: torch.Tensor, rope_kv: tuple) -> torch.Tensor:
    """rope_kv_ref on a qkv output [T, q_width + 2 kv_width]: ``rope_kv`` is (head_dim, args) as
    ``rope_triton.rope_kv_args`` returns it. Returns qkv with q rotated (k, v as they were) and
    fills the caches: what a qkv linear with the ``rope_triton.rope_kv_tile`` epilogue returns."""
    d, (positions, cos, sin, slot_mapping, k_cache, v_cache, q_width, kv_width) = rope_kv[0], rope_kv[1][:8]
    t = qkv.shape[0]
    q, k, v = qkv.split((q_width, kv_width, kv_width), dim=-1)
    q_rot = rope_kv_ref(q.reshape(t, -1, d), k.reshape(t, -1, d), v.reshape(t, -1, d), positions, cos, sin,
                        k_cache, v_cache, slot_mapping)
    return torch.cat((q_rot.reshape(t, -1), k, v), dim=-1)
