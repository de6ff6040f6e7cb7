"""Images in a request, placed in the sequence as vision tokens.

``LLM.generate(prompts, params, multi_modal_data=...)`` takes, per prompt, None or
``{"image": item}`` / ``{"image": [item, ...]}``, where an item is
- a tensor [N, hidden]: the image's patch embeddings (from a vision encoder), or
- an int N: a synthetic image of N patches (kind 0), or
- a dict ``{"patches": N, "kind": k, "seed": s}``: a synthetic image of kind k (0..3).
The images' patches come first, in order, then the prompt's text tokens. Every token carries a
modality id (0 text, 1 vision) through the batch to the MoE layers; vision rows take their
embeddings from the image instead of the token table. Their placeholder token ids are derived
from a hash of the image's content, so prefix caching shares KV blocks only between identical
images.

Synthetic patches of kind k are N(0, 1) + VISION_GAIN * d_k, where d_k is a fixed unit direction
(models/moe.py); the random MoE presets' routers send each kind to its own group of experts.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

TEXT, VISION = 0, 1


@dataclass
class MultiModalPrompt:
    """A prompt with its images placed: token ids, modality ids, vision rows' embeddings."""
    token_ids: list[int]
    modality_ids: list[int]
    vision_embeds: torch.Tensor  # [number of vision tokens, hidden] float32


def synthetic_image(hidden: int, patches: int, kind: int = 0, seed: int = 0) -> torch.Tensor:
    from exactllm.models.moe import N_IMAGE_KINDS, VISION_GAIN, image_direction
    if not 0 <= kind < N_IMAGE_KINDS:
        raise ValueError(f"synthetic image kind {kind}: use 0..{N_IMAGE_KINDS - 1}")
    if patches < 1:
        raise ValueError(f"a synthetic image needs at least one patch, got {patches}")
    g = torch.Generator().manual_seed(seed * 7 + kind)
    return torch.randn(patches, hidden, generator=g) + VISION_GAIN * image_direction(hidden, kind)


def image_embeds(item, hidden: int) -> torch.Tensor:
    if isinstance(item, bool):
        raise TypeError("an image is a tensor [N, hidden], an int N or a dict(patches=N, kind=k, seed=s)")
    if isinstance(item, int):
        return synthetic_image(hidden, item)
    if isinstance(item, dict):
        unknown = set(item) - {"patches", "kind", "seed"}
        if unknown or "patches" not in item:
            raise ValueError(f"synthetic image spec {item}: keys are patches (required), kind, seed")
        return synthetic_image(hidden, int(item["patches"]), int(item.get("kind", 0)), int(item.get("seed", 0)))
    if isinstance(item, torch.Tensor):
        if item.dim() != 2 or item.shape[1] != hidden or item.shape[0] < 1:
            raise ValueError(f"image embeddings must be [N >= 1, {hidden}], got {list(item.shape)}")
        return item.detach().float().cpu()
    raise TypeError("an image is a tensor [N, hidden], an int N or a dict(patches=N, kind=k, seed=s)")


def placeholder_ids(embeds: torch.Tensor, vocab: int) -> list[int]:
    h = zlib.crc32(embeds.contiguous().numpy().tobytes())
    return [(h + i) % vocab for i in range(embeds.shape[0])]


def place_images(text_ids: list[int], data: dict, hidden: int, vocab: int) -> MultiModalPrompt:
    if set(data) != {"image"}:
        raise ValueError(f"multi_modal_data keys: only 'image' is supported, got {sorted(data)}")
    items = data["image"] if isinstance(data["image"], (list, tuple)) else [data["image"]]
    if not items:
        raise ValueError("multi_modal_data['image'] is empty")
    images = [image_embeds(it, hidden) for it in items]
    ids = [t for img in images for t in placeholder_ids(img, vocab)] + list(text_ids)
    n_vis = sum(img.shape[0] for img in images)
    return MultiModalPrompt(ids, [VISION] * n_vis + [TEXT] * len(text_ids), torch.cat(images))
