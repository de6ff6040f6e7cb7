"""The trainer's forward pass, built from the same model and the same invariant kernels as serving.

An RL trainer scores whole sequences in one pass (every position at once, with gradients); the
server produced them token by token, batched with strangers, maybe at TP=4. In ``tp_invariant``
mode the fixed-tree kernels make both computations the same arithmetic, so the log-probs agree
bit for bit. Gradients flow through the reference ops (plain torch, elementwise), so any
autograd-based optimizer, and FSDP's fully_shard over the model's Parameters, can use it.
"""
from __future__ import annotations

import torch

from exactllm.config import EngineConfig, parse_dtype
from exactllm.engine.llm_engine import build_model
from exactllm.layers.attention import AttnBatch
from exactllm.layers.linear import Linear
from exactllm.layers.parallel import TPContext
from exactllm.models.loader import resolve_model


class TrainModel(torch.nn.Module):
    """The serving model with its dense weights trainable: ``TrainModel("random:llama-mini",
    numerics="tp_invariant")``. Dense weights are float32 masters computed in the serving dtype
    (Linear.hold_float32_master); quantized weights stay frozen (they have no gradient)."""

    def __init__(self, model: str | None = None, numerics: str = "tp_invariant", device: str = "cpu",
                 dtype=None, tp: TPContext = TPContext()):
        super().__init__()
        torch_dtype = parse_dtype(dtype, device)
        source = resolve_model(model, torch_dtype)
        self.cfg = EngineConfig(device=device, dtype=torch_dtype, numerics=numerics)
        self.model = build_model(source, self.cfg, tp).train()
        for module in self.model.modules():
            if isinstance(module, Linear):
                module.hold_float32_master()
        for p in self.model.parameters():
            p.requires_grad_(p.is_floating_point())
        self.block_size = 16

    def forward(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        return sequence_logprobs(self.model, sequences, self.block_size)

    def fully_shard(self) -> "TrainModel":
        """Shard parameters over the default process group with FSDP2 (one unit per decoder layer,
        plus the root). The forward all-gathers the weights it needs, so its arithmetic and its
        log-prob bits are those of the unsharded model."""
        from torch.distributed.fsdp import fully_shard
        for layer in self.model.layers:
            fully_shard(layer)
        fully_shard(self)
        return self


def _packed_batch(sequences: list[list[int]], block_size: int, device) -> tuple:
    ids, pos, slots, cu, tables = [], [], [], [0], []
    next_block = 0
    for seq in sequences:
        n_blocks = -(-len(seq) // block_size)
        table = list(range(next_block, next_block + n_blocks))
        next_block += n_blocks
        ids.extend(seq)
        pos.extend(range(len(seq)))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(len(seq)))
        cu.append(cu[-1] + len(seq))
        tables.append(table)
    width = max(len(t) for t in tables)
    i32 = torch.int32
    batch = AttnBatch(torch.tensor(cu, dtype=i32, device=device),
                      torch.tensor([len(s) for s in sequences], dtype=i32, device=device),
                      torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=i32, device=device),
                      torch.tensor(slots, dtype=torch.long, device=device))
    return (torch.tensor(ids, device=device), torch.tensor(pos, device=device), batch, next_block)


def sequence_logprobs(model, sequences: list[list[int]], block_size: int = 16) -> list[torch.Tensor]:
    """For each token sequence, log p(token[i] | tokens[:i]) for i = 1..n-1 (float32), all
    positions of all sequences in one forward pass with a scratch KV cache."""
    if not sequences or any(len(s) < 2 for s in sequences):
        raise ValueError("each sequence needs at least two tokens")
    device = model.rope_cos.device
    ids, pos, batch, n_blocks = _packed_batch(sequences, block_size, device)
    kv = model.allocate_kv(n_blocks, block_size, model.dtype, device)
    hidden = model(ids, pos, batch, kv)
    # The LM head and log-softmax run one sequence at a time: a [tokens, vocab] float32 block for a
    # whole RL batch would be tens of GB (and past 2^31 elements, where 32-bit indexing breaks).
    out, start = [], 0
    for seq in sequences:
        logprobs = model.ops.log_softmax(model.logits(hidden[start:start + len(seq) - 1]))
        targets = torch.tensor(seq[1:], device=device)
        out.append(logprobs.gather(1, targets[:, None])[:, 0])
        start += len(seq)
    return out
