"""CUDA graphs of pure-decode steps (every sequence adds one token), one per batch-size bucket.

A decode step of a small model is hundreds of short kernel launches; replaying a captured
graph removes the launch gaps. A step of n sequences runs the graph of the smallest captured
size B >= n, with rows n..B-1 as padding: token 0 at position 0, context length 0 (attention
writes zeros) and KV slot -1 (``rope_kv`` stores nothing). Every op is row-independent, so
padding changes no real row's bits. The graph ends with the greedy pick of every row (token and
log-prob, ``Ops.greedy_pick``), so an all-greedy step costs the host one small copy.

Inputs go through one pinned host buffer and two copies: ids, positions, context lengths and
slots as int32 [4, B_max], and the block tables [B_max, max_blocks]. Only the first w columns
of the tables are written each step (w: the widest table; narrower rows are zero-padded), and
they come from the runner's ``BlockTables``, which writes only what changed since the last
step; columns beyond w are stale and never read (attention masks its page lookups to the
context). Each row of the [4, B] buffer is written
as a whole from a list, not element by element. The host buffers are rewritten only after an
event recorded behind the last step's copies has passed: with async scheduling the engine fills
step n+1 while step n may still be queued. A step fed on the device (async scheduling) gets its
token ids copied into the ids row after the upload. Graphs are captured lazily, the first time a
bucket is needed, after one eager warm-up pass (Triton compilation and GEMV tuning happen there),
or all at once by ``capture_all`` (the server does this at startup).
"""
from __future__ import annotations

import torch

from exactllm.layers.attention import AttnBatch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(self, model, kv_caches: list, device: torch.device, block_size: int, tables, buckets=BUCKETS):
        """tables: the runner's BlockTables (model_runner.py)."""
        self.model, self.kv_caches, self.device, self.block_size = model, kv_caches, device, block_size
        self.block_tables = tables
        self.buckets = tuple(sorted(buckets))
        self.max_batch = self.buckets[-1]
        self.max_blocks = -(-model.cfg.max_context // block_size)
        i32 = torch.int32
        pin = device.type == "cuda"
        self.host = torch.zeros(4, self.max_batch, dtype=i32, pin_memory=pin)
        self.host_tables = torch.zeros(self.max_batch, self.max_blocks, dtype=i32, pin_memory=pin)
        self.host_np, self.host_tables_np = self.host.numpy(), self.host_tables.numpy()
        self.dev = torch.zeros(4, self.max_batch, dtype=i32, device=device)
        self.tables = torch.zeros(self.max_batch, self.max_blocks, dtype=i32, device=device)
        self.cu = torch.arange(self.max_batch + 1, dtype=i32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = None
        self.uploaded = torch.cuda.Event() if device.type == "cuda" else None  # the host buffers' last copy

    def accepts(self, chunks) -> bool:
        return len(chunks) <= self.max_batch and all(ch.length == 1 and ch.completes for ch in chunks)

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _fill(self, chunks, bucket: int, ids: torch.Tensor | None = None) -> None:
        """ids: the step's token ids on the device (else each sequence's last token, from the host)."""
        n, bs = len(chunks), self.block_size
        if self.uploaded is not None:
            self.uploaded.synchronize()
        h = self.host_np
        if bucket > n:
            h[:, n:bucket] = 0
            h[3, n:bucket] = -1  # padding rows: no KV slot
        pos = [ch.start for ch in chunks]
        if ids is None:
            h[0, :n] = [ch.seq.last_token for ch in chunks]  # decode: position p holds the last token
        h[1, :n] = pos
        h[2, :n] = [p + 1 for p in pos]
        h[3, :n] = [ch.seq.block_table[p // bs] * bs + p % bs for ch, p in zip(chunks, pos)]
        tables = self.block_tables.gather([ch.seq for ch in chunks])
        width = tables.shape[1]
        self.host_tables_np[:n, :width] = tables
        self.dev.copy_(self.host, non_blocking=True)
        self.tables[:n, :width].copy_(self.host_tables[:n, :width], non_blocking=True)
        if self.uploaded is not None:
            self.uploaded.record()
        if ids is not None:
            self.dev[0, :n].copy_(ids)

    def _forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dev
        batch = AttnBatch(self.cu[:b + 1], d[2, :b], self.tables[:b], d[3, :b])
        hidden = self.model(d[0, :b], d[1, :b], batch, self.kv_caches)
        logits = self.model.logits(hidden)
        return logits, self.model.ops.greedy_pick(logits)

    def _capture(self, b: int) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(b)  # warm-up: compiles kernels, tunes GEMV tiles, writes the same KV values
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b)
        self.pool = graph.pool()
        self.graphs[b] = (graph, out)

    def buckets_for(self, max_batch: int) -> list[int]:
        """The buckets a step of up to max_batch sequences can use."""
        top = self._bucket(min(max_batch, self.max_batch))
        return [b for b in self.buckets if b <= top]

    @torch.inference_mode()
    def capture_all(self, max_batch: int) -> list[int]:
        """Capture now every bucket a step of up to max_batch sequences can use, so that no request
        of a server waits for a capture (or a Triton compile) mid-stream. The inputs are all
        padding rows (no context, no KV slot), so nothing is written to the cache. Returns the
        buckets captured by this call."""
        done = []
        for b in self.buckets_for(max_batch):
            if b in self.graphs:
                continue
            if self.uploaded is not None:
                self.uploaded.synchronize()
            self.host_np[:, :b] = 0
            self.host_np[3, :b] = -1
            self.dev.copy_(self.host, non_blocking=True)
            self.tables[:b].zero_()
            self._capture(b)
            done.append(b)
        return done

    @torch.inference_mode()
    def run(self, chunks, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 logits [len(chunks), vocab] of a pure-decode step, and its greedy picks
        [len(chunks), 2] (``Ops.greedy_pick``: token, log-prob). ids: see _fill."""
        b = self._bucket(len(chunks))
        self._fill(chunks, b, ids)
        if b not in self.graphs:
            self._capture(b)
        graph, (logits, picks) = self.graphs[b]
        graph.replay()
        n = len(chunks)
        return logits[:n], picks[:n]
