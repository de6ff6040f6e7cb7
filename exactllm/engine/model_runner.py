"""Turns a scheduled step into tensors, runs the model, and returns next tokens with log-probs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from exactllm.engine.sampler import select
from exactllm.engine.scheduler import ScheduledChunk
from exactllm.layers.attention import AttnBatch


@dataclass
class StepInputs:
    """Everything one forward pass needs; plain tensors so it can be broadcast to TP workers."""
    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttnBatch
    logit_rows: torch.Tensor  # rows whose next-token distribution is wanted
    modality_ids: torch.Tensor | None = None   # [T] int8, 0 text / 1 vision; None: all text
    vision_embeds: torch.Tensor | None = None  # [vision rows, hidden]: their embeddings, in row order

    def to(self, device) -> "StepInputs":
        b = self.batch
        opt = lambda t: None if t is None else t.to(device)
        return StepInputs(self.input_ids.to(device), self.positions.to(device),
                          AttnBatch(b.cu_seqlens_q.to(device), b.context_lens.to(device),
                                    b.block_tables.to(device), b.slot_mapping.to(device)),
                          self.logit_rows.to(device), opt(self.modality_ids), opt(self.vision_embeds))

    def model_kwargs(self) -> dict:
        """Extra forward arguments: modality ids and vision embeddings, only when the step has them."""
        if self.modality_ids is None:
            return {}
        return {"modality_ids": self.modality_ids, "vision_embeds": self.vision_embeds}


def _vision_inputs(chunks: list[ScheduledChunk]):
    """(modality ids [T] int8, vision rows' embeddings) of a step; (None, None) if all text."""
    if all(ch.seq.modality_ids is None for ch in chunks):
        return None, None
    mods, rows = [], []
    for ch in chunks:
        m = ch.seq.modality_ids or []
        part = [m[p] if p < len(m) else 0 for p in range(ch.start, ch.start + ch.length)]
        mods.extend(part)
        n = sum(part)
        if n:
            first = sum(m[:ch.start])  # vision rows of this sequence before the chunk
            rows.append(ch.seq.vision_embeds[first:first + n])
    return torch.tensor(mods, dtype=torch.int8), (torch.cat(rows) if rows else None)


def build_inputs(chunks: list[ScheduledChunk], block_size: int) -> StepInputs:
    ids, pos, slots, cu, ctx, logit_rows = [], [], [], [0], [], []
    for ch in chunks:
        seq = ch.seq
        ids.extend(seq.token_ids[ch.start:ch.start + ch.length])
        for p in range(ch.start, ch.start + ch.length):
            pos.append(p)
            slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
        cu.append(cu[-1] + ch.length)
        ctx.append(ch.start + ch.length)
        if ch.completes:
            logit_rows.append(cu[-1] - 1)
    width = max(len(ch.seq.block_table) for ch in chunks)
    tables = [ch.seq.block_table + [0] * (width - len(ch.seq.block_table)) for ch in chunks]
    i32 = torch.int32
    return StepInputs(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                      AttnBatch(torch.tensor(cu, dtype=i32), torch.tensor(ctx, dtype=i32),
                                torch.tensor(tables, dtype=i32), torch.tensor(slots, dtype=torch.long)),
                      torch.tensor(logit_rows, dtype=torch.long), *_vision_inputs(chunks))


class ModelRunner:
    """cuda_graphs: replay captured graphs for pure-decode steps on CUDA (default: on unless the
    environment sets EXACTLLM_CUDA_GRAPHS=0)."""

    def __init__(self, model, kv_caches: list, device, block_size: int, cuda_graphs: bool | None = None):
        self.model, self.kv_caches = model, kv_caches
        self.device, self.block_size = torch.device(device), block_size
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("EXACTLLM_CUDA_GRAPHS", "1") != "0"
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and getattr(model, "supports_cuda_graphs", True):
            from exactllm.engine.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, kv_caches, self.device, block_size)

    @torch.inference_mode()
    def forward_logits(self, inputs: StepInputs) -> torch.Tensor:
        """float32 logits [len(logit_rows), vocab] (empty when no chunk completes)."""
        inputs = inputs.to(self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.batch, self.kv_caches,
                            **inputs.model_kwargs())
        return self.model.logits(hidden[inputs.logit_rows])

    def step(self, chunks: list[ScheduledChunk], randoms: dict, forward=None) -> list[tuple]:
        """Run one step; returns (seq, token, logprob) for every chunk that reached its end."""
        if forward is None and self.graphs is not None and self.graphs.accepts(chunks):
            logits, picks = self.graphs.run(chunks)  # greedy picks computed inside the graph
        else:
            inputs = build_inputs(chunks, self.block_size)
            logits = (forward or self.forward_logits)(inputs)
            picks = None
        done = [ch.seq for ch in chunks if ch.completes]
        if not done:
            return []
        ops = self.model.ops
        if picks is None:
            picks = ops.greedy_pick(logits)
        chosen = select(logits, picks, [s.params for s in done], [randoms[s.seq_id] for s in done], ops.log_softmax)
        return [(seq, tok, lp) for seq, (tok, lp) in zip(done, chosen)]
