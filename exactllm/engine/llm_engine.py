"""The engine loop: requests in, scheduled steps through the model runner, finished outputs out.

Independent of HTTP: the offline ``LLM`` class and the server both drive it.

Async scheduling (EngineConfig.async_scheduling; on by default on CUDA with one process): while
the device runs decode step n, the host prepares step n+1 and then reads and processes step n's
tokens, so its Python work hides behind the GPU. Step n+1 is scheduled before step n's tokens
are known, assuming every running sequence goes on: each takes one more token, fed to it on the
device from step n's picks. A sequence found finished at step n (EOS, stop string or token; or
aborted meanwhile) rides along in step n+1 and that row's token is dropped; its blocks, the one
taken for step n+1 included, are freed when it finishes. Sequences that finish at step n by
length (max_tokens, context) are known in advance and left out. Step n+1 is only scheduled ahead
where the synchronous scheduler would schedule the very same chunks, less the sequences that
finish at step n: a pure-decode step of every running sequence, nothing waiting, within the
token budget and the free blocks (no preemption); otherwise the engine reads step n and
schedules as usual. Steps with prompt tokens and tensor-parallel engines always run
synchronously, CPU engines unless asked (nothing to overlap there: torch runs CPU ops inline).

A ride-along row must not change the other rows' bits. In the invariant numerics it cannot; in
fast numerics it can when the step's shape differs from the synchronous step's (another CUDA
graph bucket, or any other row count on the eager path): then the step is sent again without
the ride-along rows, with the same random numbers, before anything reads it (stats
"redone_steps"; rare where graphs are used). So every sequence gets the same token ids,
log-prob bits, text and finish reason as in the synchronous engine. What may differ: the prefix
cache can keep other blocks (a block taken for a ride-along row loses its cached hash).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from exactllm.config import EngineConfig, kv_cache_bytes
from exactllm.engine.block_manager import BlockManager
from exactllm.engine.model_runner import Launched, ModelRunner
from exactllm.engine.sampler import SeqRandom
from exactllm.engine.scheduler import ScheduledChunk, Scheduler
from exactllm.engine.sequence import Sequence, Status
from exactllm.layers.ops import make_ops
from exactllm.layers.parallel import TPContext
from exactllm.models.loader import ModelSource
from exactllm.numerics import resolve
from exactllm.sampling_params import SamplingParams


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def build_model(source: ModelSource, cfg: EngineConfig, tp: TPContext = TPContext()):
    from exactllm.models.registry import model_class
    ops = make_ops(cfg.device, resolve(cfg.numerics))
    weights = source.weights_fn(cfg.device)
    model = model_class(source.config)(source.config, weights, ops, tp, cfg.dtype,
                                       **cfg.extra.get("model_kwargs", {}))
    return model.to(cfg.device).eval()


def num_kv_blocks(source: ModelSource, cfg: EngineConfig, tp_world: int) -> int:
    """Size the paged KV pool: an explicit count, else free GPU memory x utilization, else a CPU budget."""
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    per_block = kv_cache_bytes(source.config, cfg.block_size, cfg.dtype) // tp_world
    if torch.device(cfg.device).type == "cuda":
        free, total = torch.cuda.mem_get_info(torch.device(cfg.device))
        budget = free - total * (1.0 - cfg.gpu_memory_utilization)
    else:
        budget = cfg.cpu_kv_bytes
    needed = cfg.max_num_seqs * -(-source.config.max_context // cfg.block_size)
    return max(2, min(int(budget // per_block), needed))


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut text before the earliest stop string; returns (text, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class LLMEngine:
    def __init__(self, source: ModelSource, cfg: EngineConfig, tp: TPContext = TPContext(), wrap_runner=None):
        """tp.world > 1: either every rank runs this loop and follows rank 0's tokens (SPMD,
        torchrun), or, with wrap_runner (engine/tp_workers.py), this is rank 0 driving worker
        ranks: wrap_runner(runner) returns a runner whose forward runs on all ranks."""
        self.source, self.cfg, self.tp = source, cfg, tp
        self.spmd = tp.world > 1 and wrap_runner is None
        self.tokenizer = source.tokenizer
        self.model_config = source.config
        self.max_model_len = source.config.max_context
        model = build_model(source, cfg, tp)  # first, so the KV pool is sized from what is left
        blocks = num_kv_blocks(source, cfg, cfg.tensor_parallel_size)
        if tp.world > 1:  # every rank runs the same scheduler: all must have the same pool
            import torch.distributed as dist
            count = torch.tensor([blocks], device=cfg.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN, group=tp.group)
            blocks = int(count.item())
        kv = model.allocate_kv(blocks, cfg.block_size, cfg.dtype, cfg.device)
        self.runner = ModelRunner(model, kv, cfg.device, cfg.block_size)
        if wrap_runner is not None:
            self.runner = wrap_runner(self.runner)
        self.block_manager = BlockManager(blocks, cfg.block_size)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self._ids = itertools.count()
        self._randoms: dict[int, SeqRandom] = {}
        # ride_along_tokens: async decode rows dropped (their sequence had finished); redone_steps:
        # async steps sent again without such rows, which changed the batch's shape (fast numerics)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "requests": 0, "ride_along_tokens": 0,
                      "redone_steps": 0}
        overlap = cfg.async_scheduling
        if overlap is None:
            overlap = torch.device(cfg.device).type == "cuda"
        self.async_scheduling = bool(overlap) and tp.world == 1  # TP ranks run steps in lockstep
        self._inflight: Launched | None = None  # a decode step sent to the device, tokens not read

    def encode(self, prompt: "str | list[int]") -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.model_config.vocab for t in prompt):
            raise ValueError(f"prompt token ids must be a non-empty list of ints in [0, {self.model_config.vocab})")
        return list(prompt)

    def add_request(self, prompt: "str | list[int]", params: SamplingParams, modality_ids=None,
                    vision_embeds=None) -> Sequence:
        """modality_ids: one per prompt token (0 text, 1 vision); vision_embeds [vision tokens,
        hidden]: the embeddings of the vision tokens, in order (see exactllm/multimodal.py)."""
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if modality_ids is not None and (len(modality_ids) != len(ids) or vision_embeds is None
                                         or vision_embeds.shape[0] != sum(modality_ids)):
            raise ValueError("modality_ids needs one id per prompt token and vision_embeds one row per vision token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        capacity = self.block_manager.num_blocks * self.cfg.block_size
        needed = min(len(ids) + params.max_tokens, self.max_model_len)
        if needed > capacity:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs {needed} "
                             f"KV slots; the KV cache holds only {capacity}")
        seq_id = next(self._ids)
        seed = params.seed if params.seed is not None else hash((self.cfg.seed, seq_id)) & 0x7FFFFFFF
        seq = Sequence(seq_id, ids, params, seed, prompt if isinstance(prompt, str) else None,
                       modality_ids=modality_ids, vision_embeds=vision_embeds)
        self._randoms[seq_id] = SeqRandom(seed)
        self.scheduler.add(seq)
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(ids)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancel a request (e.g. its client went away): frees its KV blocks."""
        if not seq.finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)
            self._randoms.pop(seq.seq_id, None)

    def has_work(self) -> bool:
        return self._inflight is not None or self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """One scheduled forward pass; returns the sequences that got a new token. With async
        scheduling a call may send a step to the device and return the tokens of the one before
        (or nothing, when none was in flight)."""
        prev, self._inflight = self._inflight, None
        if prev is not None:
            return self._step_after(prev)
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.scheduler.has_work():
                raise RuntimeError("the KV cache is too small to make progress on any request")
            return []
        if self.async_scheduling and len(chunks) == len(self.scheduler.running) and \
                all(ch.length == 1 and ch.completes for ch in chunks):
            self._inflight = self.runner.launch(chunks, self._randoms)
            return []
        results = self.runner.step(chunks, self._randoms)
        if self.spmd:  # every rank runs this loop; all follow rank 0's tokens
            results = self._follow_rank0(results)
        for ch in chunks:
            ch.seq.num_computed = ch.start + ch.length
            self.block_manager.commit_full_blocks(ch.seq)
        for seq, token, logprob in results:
            seq.output_token_ids.append(token)
            if seq.params.logprobs:
                seq.logprobs.append(logprob)
            self.stats["generation_tokens"] += 1
            self._check_finished(seq, token)
        return [seq for seq, _, _ in results]

    def _step_after(self, prev: Launched) -> list[Sequence]:
        """Step n = prev is on the device: commit its blocks (as the synchronous engine does first
        after a step; only token ids are read), send step n+1 where it can go ahead, then read
        step n's tokens and process them."""
        prev = self._redo_if_needed(prev)
        finished, commit = Status.FINISHED, self.block_manager.commit_full_blocks
        for ch in prev.chunks:
            seq = ch.seq
            if seq.status is not finished:
                seq.num_computed = ch.start + ch.length
                commit(seq)
        ahead = self._decode_ahead(prev) if self.async_scheduling else None
        if ahead is not None:
            self._inflight = self.runner.launch(*ahead)
        out, stats = [], self.stats
        for seq, (token, logprob) in zip(prev.done, prev.results()):
            if seq.status is finished:  # at the step before, or aborted: this row rode along
                stats["ride_along_tokens"] += 1
                continue
            seq.output_token_ids.append(token)
            if seq.params.logprobs:
                seq.logprobs.append(logprob)
            stats["generation_tokens"] += 1
            self._check_finished(seq, token)
            out.append(seq)
        return out

    def _redo_if_needed(self, prev: Launched) -> Launched:
        """prev with its ride-along rows dropped where they change the other rows' bits (fast
        numerics, another batch shape than the synchronous step's): sent again without them, with
        the same random numbers, its input tokens now on the host; the first one's KV writes are
        overwritten by the second's, in stream order. Else prev."""
        live = [ch for ch in prev.chunks if ch.seq.status is not Status.FINISHED]
        if not live or self.runner.same_bits(len(prev.chunks), len(live)):
            return prev
        for ch in live:  # each sampling row of prev drew one number
            if not ch.seq.params.greedy:
                self._randoms[ch.seq.seq_id].put_back()
        self.stats["ride_along_tokens"] += len(prev.chunks) - len(live)
        self.stats["redone_steps"] += 1
        return self.runner.launch(live, self._randoms)

    def _decode_ahead(self, prev: Launched) -> tuple | None:
        """runner.launch arguments of step n+1 while step n = prev (a decode step of every running
        sequence) is on the device, or None where the synchronous scheduler could schedule
        anything but one more token of each running sequence that does not finish at step n."""
        sched, blocks, limit = self.scheduler, self.block_manager, self.max_model_len
        if sched.waiting:
            return None
        running_status, bs = Status.RUNNING, blocks.block_size
        rows, starts, running, need = [], [], 0, 0
        for i, seq in enumerate(prev.done):
            if seq.status is not running_status:
                continue
            running += 1
            n_out = len(seq.output_token_ids)
            pos = len(seq.prompt_token_ids) + n_out  # where step n's token goes
            if n_out + 1 >= seq.params.max_tokens or pos + 1 >= limit:
                continue  # finishes at step n
            if pos >= len(seq.block_table) * bs:
                need += 1
            rows.append(i)
            starts.append(pos)
        if not rows or running != len(sched.running) or len(rows) > sched.max_tokens or need > blocks.num_free:
            return None
        chunks, done = [], prev.done
        for i, pos in zip(rows, starts):
            seq = done[i]
            if pos >= len(seq.block_table) * bs:
                blocks.grow(seq, pos + 1)
            chunks.append(ScheduledChunk(seq, pos, 1, True))  # its input, step n's token, is not in seq yet
        return chunks, self._randoms, None, (prev, rows)

    def _follow_rank0(self, results: list[tuple]) -> list[tuple]:
        import torch.distributed as dist
        picked = [[(tok, lp) for _, tok, lp in results]]
        dist.broadcast_object_list(picked, src=0, group=self.tp.group)
        return [(seq, tok, lp) for (seq, _, _), (tok, lp) in zip(results, picked[0])]

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        reason = None
        n_out = len(seq.output_token_ids)
        if (token in self.tokenizer.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif n_out >= p.max_tokens or n_out + len(seq.prompt_token_ids) >= self.max_model_len:
            reason = "length"
        if p.stop and self._stop_string_seen(seq, token, p.stop):
            reason = "stop"
        if reason:
            text = self.tokenizer.decode(seq.output_token_ids)
            seq.text = truncate_at_stop(text, p.stop)[0] if p.stop else text
            seq.finish_reason = reason
            self.scheduler.finish(seq)
            self._randoms.pop(seq.seq_id, None)

    def _stop_string_seen(self, seq: Sequence, token: int, stops: list[str]) -> bool:
        """Whether a stop string occurs in decode(output tokens), looking only at new text.

        The output so far decodes to the stream decoder's text plus, while a character's bytes
        are incomplete, U+FFFD for them. No stop string occurred at earlier tokens (the sequence
        would have finished), so an occurrence now ends in the text this token added: the last
        longest-stop - 1 characters before it are all the context it needs. An occurrence that
        involves held-back bytes contains U+FFFD: such stop strings take the full decode."""
        if any("\ufffd" in s for s in stops):
            return truncate_at_stop(self.tokenizer.decode(seq.output_token_ids), stops)[1]
        if seq.detok is None:
            seq.detok = self.tokenizer.stream()
        text = seq.detok_tail + seq.detok.push(token)
        seq.detok_tail = text[max(0, len(text) - max(map(len, stops)) + 1):]
        return any(s in text for s in stops)

    def output(self, seq: Sequence) -> RequestOutput:
        text = seq.text if seq.finished else self.tokenizer.decode(seq.output_token_ids)
        return RequestOutput(seq.seq_id, seq.prompt, list(seq.prompt_token_ids), text,
                             list(seq.output_token_ids), list(seq.logprobs), seq.finish_reason)
