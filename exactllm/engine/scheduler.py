"""Continuous batching with chunked prefill and preemption by recompute.

Every step schedules, for each chosen sequence, the next chunk of its not-yet-computed tokens
(a decode step is a chunk of one). Running sequences go first; waiting ones are admitted while
the token budget, the sequence cap and free KV blocks allow. When blocks run out, the most
recently admitted running sequence is preempted: its blocks are freed and it goes back to the
head of the waiting queue, to be recomputed later (nothing is lost or truncated).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from exactllm.engine.block_manager import BlockManager
from exactllm.engine.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int   # first token index computed this step
    length: int  # tokens computed this step
    # True when this chunk reaches the sequence's last token, so it yields a next token (set
    # when the chunk is made: the step that runs it appends that token afterwards; None: from
    # the sequence, else given: a decode step scheduled ahead, whose input token is not in seq yet)
    completes: bool | None = None

    def __post_init__(self):
        if self.completes is None:
            self.completes = self.start + self.length == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[Sequence, None] = {}  # an ordered set: admission order, O(1) removal
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        del self.running[seq]
        self.blocks.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _last_running(self) -> Sequence:
        return next(reversed(self.running))

    def schedule(self) -> list[ScheduledChunk]:
        budget, chunks, bs = self.max_tokens, [], self.blocks.block_size
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted below to make room for an earlier sequence
                continue
            start, total = seq.num_computed, len(seq.prompt_token_ids) + len(seq.output_token_ids)
            n = min(total - start, budget)
            end = start + n
            if end > len(seq.block_table) * bs:  # needs new blocks (else nothing to check or take)
                while not self.blocks.can_grow(seq, end) and self._last_running() is not seq:
                    self.preempt(self._last_running())
                if not self.blocks.can_grow(seq, end):
                    self.preempt(seq)
                    continue
                self.blocks.grow(seq, end)
            chunks.append(ScheduledChunk(seq, start, n, end == total))
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
            self.running[seq] = None
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return chunks

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            del self.running[seq]
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.blocks.free_seq(seq)
