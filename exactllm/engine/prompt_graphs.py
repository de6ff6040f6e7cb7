"""CUDA graphs of the model forward for steps that compute prompt tokens, one per token-count bucket.

A step with prompt tokens (prompt chunks, alone or with decode rows riding along) ran eagerly:
~400 kernels for TinyLlama's 22 layers, each launch paying Python, Triton or cuBLAS host cost
(~45-60 us on average), so it was host-bound. H100, bench/prompt_step.py (2026-11-23), eager vs
graph, wall ms to the tokens (kernel ms): one 17-token prompt 18.6 vs 2.2 (1.6), 63 decode rows +
one 17-token prompt 25.0 vs 2.4 (1.8), 64 x 17 tokens 26.5 vs 5.9 (4.6-5.0), 4 x 512 tokens 31.3
vs 8.8 (7.8-8.1). Replaying a graph costs one launch. A step of T tokens in n chunks runs the
graph of the smallest bucket B >= T, laid out as B + 1 sequences:

  rows 0..T-1         the real tokens, sequences 0..n-1 with their own cu_seqlens / context;
  sequences n..B-1    empty (no query rows, no context): the attention kernel gives them no tile;
  sequence B          the padding rows T..B-1: token 0 at position 0, context 0 (attention writes
                      zeros for them) and KV slot -1 (``rope_kv`` stores nothing).

B + 1 sequences is more than any step of B tokens can have (chunks are never empty), so one
graph per token bucket serves every sequence count, and B + 1 != B keeps the attention on its
prefill path, as in the eager step (its launch grid comes from shapes only). The graph ends
with the hidden states of all B rows; the rows whose logits are wanted are gathered and sent
through the LM head eagerly, at their own count, as in the eager step.

Bits: every op is row-independent except the dense linears, which see B rows instead of T. In
the invariant modes that changes nothing (their GEMM tiles are batch invariant; on the H100 the
graph's logits equalled the eager step's bitwise, batch_invariant); in fast mode a linear's bits
may follow its row count (cuBLAS picks kernels by shape), as they already follow the batch's
composition: on the H100 six step shapes gave the eager bits, one (80 tokens -> bucket 128) did
not. Offline ``LLM.generate`` and the server run the same runner, so they take the same graphs
for the same steps. EXACTLLM_PROMPT_GRAPHS=0 turns them off (the eager step as before).

Inputs go through pinned host buffers: int32 [3, B_max] (ids, positions, slots), int32
[2, B_max + 2] (cu_seqlens, context lengths) and the block-table rows of the real sequences;
an event recorded behind the last upload guards them from being rewritten too early.
"""
from __future__ import annotations

import numpy as np
import torch

from exactllm.layers.attention import AttnBatch

BUCKETS = (16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048)


def bucket_for(tokens: int, buckets=BUCKETS) -> int | None:
    """The smallest bucket holding `tokens` rows, None above the largest."""
    return next((b for b in buckets if b >= tokens), None)


def pack(ids, positions, slots, cu_seqlens, context_lens, bucket: int):
    """The padded layout of a step (module docstring) as numpy int32 arrays:
    tok [3, bucket] (ids, positions, slots), seq [2, bucket + 2] (cu_seqlens over bucket + 1
    sequences; context lengths in the first bucket + 1 entries of row 1)."""
    T, n = len(ids), len(context_lens)
    assert n <= T <= bucket, (n, T, bucket)
    tok = np.zeros((3, bucket), np.int32)
    tok[0, :T], tok[1, :T], tok[2, :T] = ids, positions, slots
    tok[2, T:] = -1
    seq = np.zeros((2, bucket + 2), np.int32)
    seq[0, :n + 1] = cu_seqlens
    seq[0, n + 1:bucket + 1] = T
    seq[0, bucket + 1] = bucket
    seq[1, :n] = context_lens
    return tok, seq


class PromptGraphs:
    def __init__(self, model, kv_caches: list, device: torch.device, block_size: int, buckets=BUCKETS):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buckets = tuple(sorted(buckets))
        self.max_tokens = self.buckets[-1]
        self.max_blocks = -(-model.cfg.max_context // block_size)
        i32, B = torch.int32, self.max_tokens
        self.host_tok = torch.zeros(3, B, dtype=i32, pin_memory=True)
        self.host_seq = torch.zeros(2, B + 2, dtype=i32, pin_memory=True)
        self.host_tables = torch.zeros(B + 1, self.max_blocks, dtype=i32, pin_memory=True)
        self.tok = torch.zeros(3, B, dtype=i32, device=device)
        self.seq = torch.zeros(2, B + 2, dtype=i32, device=device)
        self.tables = torch.zeros(B + 1, self.max_blocks, dtype=i32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.uploaded = torch.cuda.Event()

    def accepts(self, inputs) -> bool:
        """Whether a step's StepInputs (host tensors) can run a graph: text only, few enough
        tokens, and some chunk longer than one token (a step of single-token chunks runs the
        attention's decode path eagerly; the graph's layout would take it to the prefill path)."""
        T = inputs.input_ids.numel()
        return (inputs.modality_ids is None and not inputs.input_ids.is_cuda
                and inputs.batch.context_lens.numel() < T <= self.max_tokens)

    def _upload(self, tok: np.ndarray, seq: np.ndarray, tables: np.ndarray | None) -> None:
        self.uploaded.synchronize()  # the last step's copies have left the host buffers
        b = tok.shape[1]
        self.host_tok.numpy()[:, :b] = tok
        self.host_seq.numpy()[:, :b + 2] = seq
        self.tok.copy_(self.host_tok, non_blocking=True)
        self.seq.copy_(self.host_seq, non_blocking=True)
        if tables is not None and tables.size:
            n, w = tables.shape
            self.host_tables.numpy()[:n, :w] = tables  # columns past w are stale: never read
            self.tables[:n].copy_(self.host_tables[:n], non_blocking=True)
        self.uploaded.record()

    def _forward(self, b: int) -> torch.Tensor:
        t, s = self.tok, self.seq
        batch = AttnBatch(s[0, :b + 2], s[1, :b + 1], self.tables[:b + 1], t[2, :b])
        return self.model(t[0, :b], t[1, :b], batch, self.kv_caches)

    def _capture(self, b: int) -> None:
        """Capture bucket b (the buffers hold a valid layout of b rows: real or all padding)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(b)  # warm-up: Triton compiles, GEMM tile tuning; writes the same KV values
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = (graph, hidden)

    @torch.inference_mode()
    def capture_all(self, max_tokens: int) -> list[int]:
        """Capture now every bucket a step of up to max_tokens tokens can use (all-padding inputs:
        nothing is written to the KV cache); the buckets captured by this call."""
        top = bucket_for(min(max_tokens, self.max_tokens), self.buckets)
        done = []
        for b in self.buckets:
            if b > top or b in self.graphs:
                continue
            self._upload(*pack([], [], [], [0], [], b), None)
            self._capture(b)
            done.append(b)
        return done

    @torch.inference_mode()
    def hidden(self, inputs) -> torch.Tensor:
        """The final hidden states [T, hidden] of a step's real rows (``LlamaModel.forward``)."""
        b = bucket_for(inputs.input_ids.numel(), self.buckets)
        bt = inputs.batch
        self._upload(*pack(inputs.input_ids.numpy(), inputs.positions.numpy(), bt.slot_mapping.numpy(),
                           bt.cu_seqlens_q.numpy(), bt.context_lens.numpy(), b), bt.block_tables.numpy())
        if b not in self.graphs:
            self._capture(b)
        graph, hidden = self.graphs[b]
        graph.replay()
        return hidden[:inputs.input_ids.numel()]
