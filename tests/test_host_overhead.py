"""The engine's vectorized / incremental host bookkeeping equals the plain per-token, rescan-
everything versions it replaced (kept here as references), exactly, on random schedules:
step inputs (build_inputs), CUDA-graph input fill, prefix-cache block registration, scheduling."""
from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest
import torch

from exactllm.engine.block_manager import BlockManager
from exactllm.engine.cuda_graphs import DecodeGraphs
from exactllm.engine.model_runner import BlockTables, build_inputs
from exactllm.engine.scheduler import ScheduledChunk, Scheduler
from exactllm.engine.sequence import Sequence, Status
from exactllm.sampling_params import SamplingParams

BS = 4  # small blocks: many block boundaries per sequence


# ----------------------------------------------------------------------------- references
def reference_build_inputs(chunks, block_size):
    """The per-token construction build_inputs replaced: (ids, pos, cu, ctx, tables, slots, logit_rows)."""
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
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), torch.tensor(cu, dtype=i32),
            torch.tensor(ctx, dtype=i32), torch.tensor(tables, dtype=i32), torch.tensor(slots, dtype=torch.long),
            torch.tensor(logit_rows, dtype=torch.long))


def reference_vision_inputs(chunks):
    """The per-position modality ids and vision rows _vision_inputs replaced."""
    if all(ch.seq.modality_ids is None for ch in chunks):
        return None, None
    mods, rows = [], []
    for ch in chunks:
        m = ch.seq.modality_ids or []
        part = [m[p] if p < len(m) else 0 for p in range(ch.start, ch.start + ch.length)]
        mods.extend(part)
        n = sum(part)
        if n:
            first = sum(m[:ch.start])
            rows.append(ch.seq.vision_embeds[first:first + n])
    return torch.tensor(mods, dtype=torch.int8), (torch.cat(rows) if rows else None)


def reference_fill(chunks, bucket, block_size, max_blocks):
    """The per-sequence graph input fill DecodeGraphs._fill replaced: (host [4, bucket], tables [n, width])."""
    n = len(chunks)
    h = np.zeros((4, bucket), np.int32)
    h[3, n:bucket] = -1
    tables = np.zeros((n, max_blocks), np.int32)
    width = 0
    for i, ch in enumerate(chunks):
        seq, p = ch.seq, ch.start
        table = seq.block_table
        h[0, i] = seq.token_ids[p]
        h[1, i] = p
        h[3, i] = table[p // block_size] * block_size + p % block_size
        tables[i, :len(table)] = table
        width = max(width, len(table))
    h[2, :n] = h[1, :n] + 1
    return h, tables[:, :width]


class ReferenceBlockManager(BlockManager):
    """Prefix-cache registration as before: rehash every full block and offer each, every call."""

    def commit_full_blocks(self, seq):
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed // self.block_size
        h, token_ids = 0, seq.token_ids
        for i in range(n_full):
            h = hash((h, tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])))
            block = seq.block_table[i]
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block


class ReferenceScheduler(Scheduler):
    """The scheduler as before: running is a deque, membership by scanning it."""

    def __init__(self, *a):
        super().__init__(*a)
        self.running = deque()

    def preempt(self, seq):
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self):
        budget, chunks = self.max_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq, seq.num_computed + n) and self.running[-1] is not seq:
                self.preempt(self.running[-1])
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                self.preempt(seq)
                continue
            self.blocks.grow(seq, seq.num_computed + n)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.allocate_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.can_grow(seq, seq.num_computed + n):
                self.blocks.free_seq(seq)
                break
            self.blocks.grow(seq, seq.num_computed + n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return chunks

    def finish(self, seq):
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)


# ----------------------------------------------------------------------------- helpers
def make_seq(rng, seq_id, prompts=None, max_tokens=12, outputs=True):
    prompt = rng.choice(prompts) if prompts else [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
    mods = None
    if rng.random() < 0.3:
        mods = [int(rng.random() < 0.5) for _ in prompt]
    seq = Sequence(seq_id, list(prompt), SamplingParams(max_tokens=max_tokens), 0, modality_ids=mods,
                   vision_embeds=torch.randn(sum(mods), 3) if mods else None)
    if outputs:
        seq.output_token_ids = [rng.randrange(1000) for _ in range(rng.randrange(0, 3))]
    return seq


def simulate(rng, sched, steps, make, n_start):
    """Drive a scheduler like LLMEngine.step (tokens appended at random, random finishes and
    arrivals); yields every step's chunks."""
    seqs = [make(i) for i in range(n_start)]
    for s in seqs:
        sched.add(s)
    next_id = n_start
    for _ in range(steps):
        chunks = sched.schedule()
        yield chunks
        for ch in chunks:
            ch.seq.num_computed = ch.start + ch.length
            sched.blocks.commit_full_blocks(ch.seq)
        for ch in chunks:
            if ch.completes:
                ch.seq.output_token_ids.append(rng.randrange(1000))
                if len(ch.seq.output_token_ids) >= ch.seq.params.max_tokens or rng.random() < 0.05:
                    sched.finish(ch.seq)
        if rng.random() < 0.3:
            sched.add(make(next_id))
            next_id += 1


# ----------------------------------------------------------------------------- tests
def test_sequence_tokens_slices_token_ids():
    rng = random.Random(0)
    for _ in range(50):
        seq = make_seq(rng, 0)
        seq.output_token_ids = [rng.randrange(1000) for _ in range(rng.randrange(0, 6))]
        n = seq.num_tokens
        assert seq.last_token == seq.token_ids[-1]
        for start in range(n + 1):
            for end in range(start, n + 1):
                assert seq.tokens(start, end) == seq.token_ids[start:end]


@pytest.mark.parametrize("seed", range(4))
def test_build_inputs_equals_per_token_construction(seed):
    """Random chunked-prefill + decode schedules (preemption by a tight pool, prefix hits from
    shared prompts, multimodal sequences); BlockTables kept across steps, as the runner does."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(1, 30))] for _ in range(4)]
    sched = Scheduler(BlockManager(40, BS), max_num_seqs=6, max_num_batched_tokens=rng.choice([7, 16, 64]))
    tables = BlockTables()
    steps = multimodal = 0
    for chunks in simulate(rng, sched, 120, lambda i: make_seq(rng, i, prompts), 8):
        if not chunks:
            continue
        steps += 1
        got = build_inputs(chunks, BS, tables)
        fresh = build_inputs(chunks, BS)
        ref = reference_build_inputs(chunks, BS)
        for inputs in (got, fresh):
            b = inputs.batch
            for x, y in zip((inputs.input_ids, inputs.positions, b.cu_seqlens_q, b.context_lens, b.block_tables,
                             b.slot_mapping, inputs.logit_rows), ref):
                assert x.dtype == y.dtype and torch.equal(x, y)
        mods, embeds = reference_vision_inputs(chunks)
        for x, y in ((got.modality_ids, mods), (got.vision_embeds, embeds)):
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y))
        multimodal += mods is not None and embeds is not None
    assert steps > 50 and multimodal > 5


def test_block_tables_follow_replaced_and_grown_tables():
    """A freed sequence gets a new list; a row whose sequence changed shrinks with zeros."""
    rng = random.Random(1)
    tables = BlockTables()
    seqs = [make_seq(rng, i) for i in range(5)]
    for s in seqs:
        s.block_table = [rng.randrange(100) for _ in range(rng.randrange(1, 6))]
    for step in range(60):
        order = rng.sample(seqs, rng.randrange(1, len(seqs) + 1))
        got = tables.gather(order)
        width = max(len(s.block_table) for s in order)
        want = np.array([s.block_table + [0] * (width - len(s.block_table)) for s in order], np.int32)
        assert got.dtype == np.int32 and np.array_equal(got, want)
        s = rng.choice(seqs)
        if rng.random() < 0.3:
            s.block_table = [rng.randrange(100) for _ in range(rng.randrange(1, 4))]  # freed, re-admitted
        else:
            s.block_table.append(rng.randrange(100))
        if rng.random() < 0.1:
            seqs[rng.randrange(len(seqs))] = make_seq(rng, 99)  # a sequence leaves, another arrives
            seqs[-1].block_table = [rng.randrange(100)]


class _Cfg:
    max_context = 64


class _Model:
    cfg = _Cfg()


@pytest.mark.parametrize("seed", range(3))
def test_graph_fill_equals_per_sequence_fill(seed):
    """DecodeGraphs' input fill (CPU buffers) against the per-sequence one, on the decode steps
    of random schedules; padding rows keep token 0, position 0, context 0, slot -1."""
    rng = random.Random(seed)
    sched = Scheduler(BlockManager(60, BS), max_num_seqs=8, max_num_batched_tokens=64)
    graphs = DecodeGraphs(_Model(), [], torch.device("cpu"), BS, BlockTables(), buckets=(1, 2, 4, 8))
    checked = 0
    for chunks in simulate(rng, sched, 150, lambda i: make_seq(rng, i, max_tokens=30), 6):
        if not chunks or not graphs.accepts(chunks):
            continue
        bucket = graphs._bucket(len(chunks))
        graphs.host_np[:] = 7  # stale values must all be overwritten where they matter
        graphs._fill(chunks, bucket)
        want_h, want_t = reference_fill(chunks, bucket, BS, graphs.max_blocks)
        n, width = want_t.shape
        assert np.array_equal(graphs.host_np[:, :bucket], want_h)
        assert np.array_equal(graphs.host_tables_np[:n, :width], want_t)
        assert torch.equal(graphs.dev[:, :bucket], torch.from_numpy(want_h))
        assert torch.equal(graphs.tables[:n, :width], torch.from_numpy(want_t))
        checked += 1
    assert checked > 30


def test_capture_all_captures_each_bucket_once_on_padding_rows(monkeypatch):
    """A server captures every bucket a step of up to max_num_seqs sequences can use before its
    first request; each capture sees only padding rows (no context, no KV slot, zero tables), so
    nothing reaches the KV cache. (The capture itself needs CUDA: here it records its inputs.)"""
    graphs = DecodeGraphs(_Model(), [], torch.device("cpu"), BS, BlockTables(), buckets=(1, 2, 4, 8, 16))
    seen = []

    def record(b):
        seen.append((b, graphs.dev[:, :b].clone(), graphs.tables[:b].clone()))
        graphs.graphs[b] = None
    monkeypatch.setattr(graphs, "_capture", record)
    graphs.host_np[:] = 7
    graphs.tables.fill_(7)
    assert graphs.capture_all(5) == [1, 2, 4, 8]  # 5 sequences run the bucket of 8
    for b, dev, tables in seen:
        assert dev[:3].eq(0).all() and dev[3].eq(-1).all() and tables.eq(0).all(), b
    assert graphs.capture_all(16) == [16] and graphs.capture_all(100) == []  # none twice; 16 is the top


@pytest.mark.parametrize("seed", range(4))
def test_incremental_commit_equals_full_rescan(seed):
    """Same prompts admitted together (duplicate blocks that cannot register until the holder's
    block is handed out again), preemption and reuse: every pool structure stays identical."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(9, 20))] for _ in range(2)]
    pools = [BlockManager(24, BS), ReferenceBlockManager(24, BS)]
    rngs = [random.Random(seed + 100), random.Random(seed + 100)]
    runs = [simulate(r, Scheduler(bm, 5, 32),
                     150, (lambda r: lambda i: make_seq(r, i, prompts, max_tokens=20, outputs=False))(r), 7)
            for bm, r in zip(pools, rngs)]
    retried = 0
    for new_chunks, ref_chunks in zip(*runs):
        assert [(c.seq.seq_id, c.start, c.length) for c in new_chunks] == \
               [(c.seq.seq_id, c.start, c.length) for c in ref_chunks]
        a, b = pools
        assert a.block_hash == b.block_hash and a.hash_to_block == b.hash_to_block
        assert a.ref_count == b.ref_count and list(a.free) == list(b.free)
        retried += sum(bool(c.seq.unregistered_blocks) for c in new_chunks)
    assert retried > 0  # the re-offer path ran


@pytest.mark.parametrize("seed", range(4))
def test_scheduler_equals_deque_scheduler(seed):
    """Preemption-heavy random workloads: the same chunks, preemptions and finishes as the
    deque-scanning scheduler."""
    rng = random.Random(seed)
    budget = rng.choice([5, 16, 64])
    runs = []
    for cls in (Scheduler, ReferenceScheduler):
        r = random.Random(seed + 7)
        sched = cls(BlockManager(18, BS), 6, budget)
        runs.append((sched, simulate(r, sched, 200, (lambda r: lambda i: make_seq(r, i, max_tokens=25))(r), 9)))
    (new, new_run), (ref, ref_run) = runs
    for new_chunks, ref_chunks in zip(new_run, ref_run):
        assert [(c.seq.seq_id, c.start, c.length) for c in new_chunks] == \
               [(c.seq.seq_id, c.start, c.length) for c in ref_chunks]
        assert [s.seq_id for s in new.running] == [s.seq_id for s in ref.running]
        assert [s.seq_id for s in new.waiting] == [s.seq_id for s in ref.waiting]
    assert new.num_preemptions == ref.num_preemptions > 0


@pytest.mark.parametrize("seed", range(6))
def test_stop_string_scan_equals_full_decode(seed):
    """The engine's incremental stop-string check agrees, token by token, with searching the
    whole decoded output: byte-level tokens split multi-byte characters, invalid bytes decode to
    U+FFFD, stop strings come from the text itself (so they hit), some hold U+FFFD."""
    from exactllm.engine.llm_engine import LLMEngine, truncate_at_stop
    from exactllm.tokenizer import Tokenizer

    class Engine:
        tokenizer = Tokenizer.synthetic(300)
        _stop_string_seen = LLMEngine._stop_string_seen
    engine, rng, hits = Engine(), random.Random(seed), 0
    for _ in range(40):
        text = "".join(rng.choice(["a", "b", " ", "\n", "é", "€", "😀", ", "]) for _ in range(rng.randrange(1, 40)))
        data = bytearray(text.encode())
        for _ in range(rng.randrange(0, 3)):
            data.insert(rng.randrange(len(data) + 1), rng.choice([0xFF, 0x80, 0xE2]))
        decoded = engine.tokenizer.decode([2 + b for b in data])
        i = rng.randrange(len(decoded))
        stops = [decoded[i:i + rng.randrange(1, 5)], rng.choice(["ab", "€a", " b", "zz", "\n\n", "\ufffd"])]
        seq = Sequence(0, [0], SamplingParams(stop=stops), 0)
        for b in data:
            seq.output_token_ids.append(2 + b)
            want = truncate_at_stop(engine.tokenizer.decode(seq.output_token_ids), stops)[1]
            assert engine._stop_string_seen(seq, 2 + b, stops) == want
            if want:
                hits += 1
                break
    assert hits > 20


def test_seq_random_draws_equal_single_draws():
    """SeqRandom draws in blocks; the numbers are those of one torch.rand(()) per token."""
    from exactllm.engine.sampler import SeqRandom
    for seed in (0, 5, 2**31 - 1):
        r, g = SeqRandom(seed), torch.Generator().manual_seed(seed)
        assert [r.uniform() for _ in range(3 * SeqRandom.DRAW + 5)] == \
               [torch.rand((), generator=g).item() for _ in range(3 * SeqRandom.DRAW + 5)]
