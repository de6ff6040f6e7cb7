"""Paged KV cache bookkeeping: fixed-size blocks, a block table per sequence, and prefix caching.

A full block is identified by a hash chained over all tokens up to its end, so two sequences
with the same prompt prefix share those blocks (reference counted). Freed blocks keep their
hash until they are handed out again, so a later request with the same prefix can still hit.
"""
from __future__ import annotations

from collections import OrderedDict

from exactllm.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs so that its first num_tokens tokens have a slot."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]
        self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def block_hashes(self, seq: Sequence, n_blocks: int) -> list[int]:
        """The chain hashes of seq's first n_blocks full blocks: hash((previous, block's tokens)).
        Cached on the sequence and extended as it grows (a full block's tokens never change), so a
        step hashes only blocks that just filled up; the list returned may be longer than n_blocks."""
        hashes, bs = seq.block_hashes, self.block_size
        h = hashes[-1] if hashes else 0
        for i in range(len(hashes), n_blocks):
            h = hash((h, tuple(seq.tokens(i * bs, (i + 1) * bs))))
            hashes.append(h)
        return hashes

    def allocate_prefix(self, seq: Sequence) -> None:
        """For a sequence with no blocks: reuse cached full blocks of its prefix (never the block
        holding its last token, which must be computed to get logits) and set num_computed."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return
        n_full = (seq.num_tokens - 1) // self.block_size
        for h in self.block_hashes(seq, n_full)[:n_full]:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            if self.ref_count[block] == 0:
                del self.free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
        seq.num_computed = len(seq.block_table) * self.block_size

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self._take_free())

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of seq's blocks that are now completely computed.

        A block is offered once, when it fills up; one that cannot be registered because another
        block already holds its hash is offered again on every later call (that other block may
        have been handed out since), in block order: the same outcome as offering every full
        block on every call, at the cost of the new ones only."""
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed // self.block_size
        if n_full <= seq.num_checked_blocks and not seq.unregistered_blocks:
            return
        hashes = self.block_hashes(seq, n_full)
        offered = seq.unregistered_blocks + list(range(seq.num_checked_blocks, n_full))
        seq.unregistered_blocks, seq.num_checked_blocks = [], max(n_full, seq.num_checked_blocks)
        for i in offered:
            block, h = seq.block_table[i], hashes[i]
            if self.block_hash[block] is not None:
                continue
            if h in self.hash_to_block:
                seq.unregistered_blocks.append(i)
            else:
                self.block_hash[block] = h
                self.hash_to_block[h] = block

    def free_seq(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed = seq.num_checked_blocks = 0
        seq.unregistered_blocks = []
