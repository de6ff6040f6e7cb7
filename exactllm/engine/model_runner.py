"""Turns a scheduled step into tensors, runs the model, and returns next tokens with log-probs."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch

from exactllm.engine.sampler import host_to, select_on_device, to_device
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
        """On the device; host tensors go through pinned memory without a wait (see host_to)."""
        device = torch.device(device)
        move = lambda t: host_to(t, device)
        b = self.batch
        opt = lambda t: None if t is None else move(t)
        return StepInputs(move(self.input_ids), move(self.positions),
                          AttnBatch(move(b.cu_seqlens_q), move(b.context_lens), move(b.block_tables),
                                    move(b.slot_mapping)),
                          move(self.logit_rows), opt(self.modality_ids), opt(self.vision_embeds))

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
        part = m[ch.start:ch.start + ch.length]  # positions past the prompt are text
        mods.extend(part)
        mods.extend([0] * (ch.length - len(part)))
        n = sum(part)
        if n:
            first = sum(m[:ch.start])  # vision rows of this sequence before the chunk
            rows.append(ch.seq.vision_embeds[first:first + n])
    return torch.tensor(mods, dtype=torch.int8), (torch.cat(rows) if rows else None)


class BlockTables:
    """The block tables of a step's sequences as one zero-padded int32 array [n, widest table].

    Each sequence keeps a row of a staging array, and a step writes only the entries appended
    since that row was last written, then gathers the step's rows in one copy. This relies on
    how BlockManager treats tables: it only appends to a sequence's list, and gives a sequence
    a new list when it frees its blocks; so the list object and its length say what the row
    already holds. Rows of finished sequences are dropped wholesale when the staging fills up.
    """

    def __init__(self):
        self.staging = np.zeros((0, 0), np.int32)  # zero beyond each row's written entries
        self.rows: dict = {}  # id(Sequence) -> [row, the block_table list written, entries written]

    def _reset(self, rows: int, cols: int) -> None:
        rows, cols = max(rows, self.staging.shape[0]), max(cols, self.staging.shape[1])
        self.staging = np.zeros((rows, cols), np.int32)
        self.rows.clear()

    def gather(self, seqs: list) -> np.ndarray:
        tables = [seq.block_table for seq in seqs]
        width = max(map(len, tables))
        if width > self.staging.shape[1]:
            self._reset(0, max(2 * width, 16))
        if len(self.rows) + len(seqs) > self.staging.shape[0]:
            self._reset(2 * len(seqs) + 64, 0)
        staging, rows, index = self.staging, self.rows, []
        for seq, table in zip(seqs, tables):
            entry = rows.get(id(seq))  # a new sequence under a dead one's id has another list
            if entry is None:
                entry = rows[id(seq)] = [len(rows), None, 0]
            row, written, k = entry
            n = len(table)
            if written is not table:  # a new list: rewrite the row
                staging[row, :n] = table
                if k > n:
                    staging[row, n:k] = 0
                entry[1], entry[2] = table, n
            elif n > k:
                staging[row, k:n] = table[k:]
                entry[2] = n
            index.append(row)
        return staging[index, :width]


def build_inputs(chunks: list[ScheduledChunk], block_size: int, tables: BlockTables | None = None,
                 input_ids: torch.Tensor | None = None) -> StepInputs:
    """The step's input tensors. Per-chunk values are plain lists (O(chunks)); per-token
    positions and slots are array ops over the chunks' starts and lengths, except in a
    pure-decode step, where tokens are chunks. tables: the runner's BlockTables (kept across
    steps); None builds them afresh. input_ids: the token ids, when they are not on the host yet
    (a decode step fed by the step before it, on the device)."""
    n, bs = len(chunks), block_size
    starts = [ch.start for ch in chunks]
    lengths = [ch.length for ch in chunks]
    cu = [0, *itertools.accumulate(lengths)]
    ctx = [s + k for s, k in zip(starts, lengths)]
    logit_rows = [c - 1 for c, ch in zip(cu[1:], chunks) if ch.completes]
    if input_ids is None:
        ids = itertools.chain.from_iterable(ch.seq.tokens(ch.start, ch.start + ch.length) for ch in chunks)
        input_ids = torch.tensor(list(ids), dtype=torch.long)
    table = (tables or BlockTables()).gather([ch.seq for ch in chunks])
    if cu[-1] == n:  # one token per chunk
        pos = torch.tensor(starts, dtype=torch.long)
        slots = torch.tensor([ch.seq.block_table[p // bs] * bs + p % bs for ch, p in zip(chunks, starts)],
                             dtype=torch.long)
    else:
        lengths_np = np.array(lengths)
        offsets = np.repeat(np.array(cu[:-1]) - np.array(starts), lengths_np)
        pos_np = np.arange(cu[-1]) - offsets
        row = np.repeat(np.arange(n), lengths_np)
        pos = torch.from_numpy(pos_np)
        slots = torch.from_numpy(table[row, pos_np // bs].astype(np.int64) * bs + pos_np % bs)
    i32, i64 = torch.int32, torch.long
    batch = AttnBatch(torch.tensor(cu, dtype=i32), torch.tensor(ctx, dtype=i32), torch.from_numpy(table), slots)
    return StepInputs(input_ids, pos, batch, torch.tensor(logit_rows, dtype=i64),
                      *_vision_inputs(chunks))


class ModelRunner:
    """cuda_graphs: replay captured graphs on CUDA (default: on unless the environment sets
    EXACTLLM_CUDA_GRAPHS=0): for pure-decode steps (cuda_graphs.py) and for steps that compute
    prompt tokens (prompt_graphs.py; off alone with EXACTLLM_PROMPT_GRAPHS=0)."""

    def __init__(self, model, kv_caches: list, device, block_size: int, cuda_graphs: bool | None = None):
        self.model, self.kv_caches = model, kv_caches
        self.device, self.block_size = torch.device(device), block_size
        self.tables = BlockTables()
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("EXACTLLM_CUDA_GRAPHS", "1") != "0"
        self.graphs = self.prompt_graphs = None
        if cuda_graphs and self.device.type == "cuda" and getattr(model, "supports_cuda_graphs", True):
            from exactllm.engine.cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, kv_caches, self.device, block_size, self.tables)
            if os.environ.get("EXACTLLM_PROMPT_GRAPHS", "1") != "0":
                from exactllm.engine.prompt_graphs import PromptGraphs
                self.prompt_graphs = PromptGraphs(model, kv_caches, self.device, block_size)

    def capture_graphs(self, max_batch: int) -> list[int]:
        """Capture now the decode graphs of every batch bucket up to max_batch
        (``DecodeGraphs.capture_all``); the buckets captured, [] where there are no graphs."""
        return [] if self.graphs is None else self.graphs.capture_all(max_batch)

    def capture_prompt_graphs(self, max_tokens: int) -> list[int]:
        """Capture now the prompt-step graphs of every token bucket up to max_tokens
        (``PromptGraphs.capture_all``); the buckets captured, [] where there are none."""
        return [] if self.prompt_graphs is None else self.prompt_graphs.capture_all(max_tokens)

    @torch.inference_mode()
    def forward_logits(self, inputs: StepInputs) -> torch.Tensor:
        """float32 logits [len(logit_rows), vocab] (empty when no chunk completes)."""
        inputs = inputs.to(self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.batch, self.kv_caches,
                            **inputs.model_kwargs())
        return self.model.logits(hidden[inputs.logit_rows])

    @torch.inference_mode()
    def prompt_graph_logits(self, inputs: StepInputs) -> torch.Tensor:
        """As forward_logits, the layers replayed from a prompt-step graph (prompt_graphs.py)."""
        hidden = self.prompt_graphs.hidden(inputs)
        return self.model.logits(hidden[host_to(inputs.logit_rows, self.device)])

    def launch(self, chunks: list[ScheduledChunk], randoms: dict, forward=None, feed=None) -> "Launched":
        """Send one step to the device and return at once; ``Launched.results()`` reads its tokens.
        feed (prev, rows): a pure-decode step whose chunk i takes as input the token that row
        rows[i] of the Launched step prev picked, on the device (prev's results are not read yet)."""
        ids = None if feed is None else self._fed_ids(*feed)
        if forward is None and self.graphs is not None and self.graphs.accepts(chunks):
            logits, picks = self.graphs.run(chunks, ids)  # greedy picks computed inside the graph
        else:
            inputs = build_inputs(chunks, self.block_size, self.tables, ids)
            if forward is None and self.prompt_graphs is not None and self.prompt_graphs.accepts(inputs):
                forward = self.prompt_graph_logits
            logits = (forward or self.forward_logits)(inputs)
            picks = None
        done = [ch.seq for ch in chunks if ch.completes]
        if done:
            ops = self.model.ops
            if picks is None:
                picks = ops.greedy_pick(logits)
            picks = select_on_device(logits, picks, [s.params for s in done], [randoms[s.seq_id] for s in done],
                                     ops.log_softmax)
        return Launched(chunks, done, picks)

    def same_bits(self, n: int, m: int) -> bool:
        """Whether each row of a decode step of n sequences gets the same bits as in a step of m
        of them: always in the invariant numerics; in fast numerics when n == m or both steps
        replay the same CUDA graph (its ops are row-independent, padding rows change nothing)."""
        if n == m or self.model.ops.numerics.invariant:
            return True
        g = self.graphs
        return g is not None and max(n, m) <= g.max_batch and g._bucket(n) == g._bucket(m)

    def _fed_ids(self, prev: "Launched", rows: list[int]) -> torch.Tensor:
        tokens = prev.picks[:, 0]
        if rows[-1] == len(rows) - 1:  # rows ascend: the first len(rows) rows, a view
            return tokens[:len(rows)].long()
        return tokens[to_device(rows, torch.long, self.device)].long()

    def step(self, chunks: list[ScheduledChunk], randoms: dict, forward=None) -> list[tuple]:
        """Run one step; returns (seq, token, logprob) for every chunk that reached its end."""
        launched = self.launch(chunks, randoms, forward)
        return [(seq, tok, lp) for seq, (tok, lp) in zip(launched.done, launched.results())]


class Launched:
    """A step on its way through the device: picks [len(done), 2] float64 (token, log-prob) of the
    sequences whose chunk completes, in chunk order, on the device. On CUDA they are copied to
    pinned host memory behind the step and an event marks the copy, so the host can prepare the
    next step meanwhile; ``results()`` waits for that event only."""

    def __init__(self, chunks: list[ScheduledChunk], done: list, picks: torch.Tensor | None):
        self.chunks, self.done, self.picks = chunks, done, picks
        self.host, self.event = picks, None
        if picks is not None and picks.is_cuda:
            self.host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
            self.host.copy_(picks, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def results(self) -> list[tuple[int, float]]:
        """(token, log-prob) per sequence of ``done``."""
        if self.picks is None:
            return []
        if self.event is not None:
            self.event.synchronize()
        return [(int(t), lp) for t, lp in self.host.tolist()]
