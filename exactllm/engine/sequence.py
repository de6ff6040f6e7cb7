"""One request's state as it moves through the engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from exactllm.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's `seq in deque` must not compare token lists
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0          # tokens whose K/V are in the cache
    finish_reason: str | None = None
    text: str = ""                 # detokenized output, stop strings applied
    modality_ids: list[int] | None = None
    vision_embeds: object = None   # tensor [vision tokens, hidden]: their embeddings, in order
    # Block manager's prefix-cache bookkeeping (see BlockManager.commit_full_blocks):
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of the first full blocks
    num_checked_blocks: int = 0    # blocks of block_table already offered to the prefix cache
    unregistered_blocks: list[int] = field(default_factory=list)  # of those, ones to offer again
    # Stop-string scan (LLMEngine): an incremental detokenizer of the output, its text's end
    detok: object = None
    detok_tail: str = ""

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] (0 <= start <= end), without building the whole list."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
