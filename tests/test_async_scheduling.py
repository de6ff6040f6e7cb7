"""Async scheduling (engine/llm_engine.py) against the synchronous engine, on CPU.

Each case runs the same requests through two engines built alike, one with async_scheduling,
and requires the same token ids, log-prob bits, text and finish reasons for every request, with
greedy and seeded sampling, stop strings and tokens, EOS, max_tokens, prefix caching, several
completions of one prompt, preemption and aborts, in batch_invariant and fast numerics. The model is llama-mini with a 320-token
vocabulary, so most tokens are bytes and text is not empty; every 29th token counts as an EOS
and stop sets are wide, so that requests do stop on their tokens (and ride along one step).
The last tests break the engine on purpose (a token fed from the wrong row, a position off by
one, fast-numerics steps with ride-along rows not redone) and check that the comparison catches it.
"""
import dataclasses

import pytest
import torch

from exactllm import SamplingParams
from exactllm.config import PRESETS, EngineConfig
from exactllm.engine.llm_engine import LLMEngine
from exactllm.engine.scheduler import ScheduledChunk
from exactllm.models.llama import random_weights
from exactllm.models.loader import ModelSource
from exactllm.tokenizer import Tokenizer

VOCAB = 320
CFG = dataclasses.replace(PRESETS["llama-mini"], vocab=VOCAB, name="llama-mini-320")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """CPU ops on tiny tensors: threads only contend (30x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_engine(async_scheduling: bool, numerics: str = "batch_invariant", **kw) -> LLMEngine:
    tokenizer = Tokenizer.synthetic(VOCAB)
    tokenizer.eos_ids = {1, *range(29, VOCAB, 29)}
    source = ModelSource("random:llama-mini-320", CFG, lambda device: random_weights(CFG, 0, None, device),
                         tokenizer)
    cfg = EngineConfig(device="cpu", numerics=numerics, async_scheduling=async_scheduling,
                       **{"num_kv_blocks": 256, **kw})
    return LLMEngine(source, cfg)


def prompts(n: int, lengths=(5, 37, 16, 9, 32, 23, 20, 3), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]


def drive(engine: LLMEngine, requests: list, aborts: dict | None = None) -> list[tuple]:
    """Run requests [(prompt, params)] to the end; aborts {request index: m}: abort it after the
    step in which it has m tokens. Checks the step() contract on the way: every sequence it
    returns got new tokens, all of a sequence's tokens are returned by some step, an aborted
    sequence's blocks are freed at once. Returns (token ids, log-probs, text, finish reason)."""
    aborts = dict(aborts or {})
    seqs = [engine.add_request(p, sp) for p, sp in requests]
    seen = {s.seq_id: 0 for s in seqs}
    while engine.has_work():
        for s in engine.step():
            assert len(s.output_token_ids) > seen[s.seq_id]
            seen[s.seq_id] = len(s.output_token_ids)
        for i, m in list(aborts.items()):
            if not seqs[i].finished and len(seqs[i].output_token_ids) >= m:
                engine.abort(seqs[i])
                assert seqs[i].block_table == [] and seqs[i].finish_reason == "abort"
                del aborts[i]
    assert all(seen[s.seq_id] == len(s.output_token_ids) for s in seqs)
    bm = engine.block_manager
    assert bm.num_free == bm.num_blocks and not any(bm.ref_count)
    return [(o.token_ids, o.logprobs, o.text, o.finish_reason) for o in map(engine.output, seqs)]


def compare(requests: list, aborts=None, numerics="batch_invariant", **kw) -> tuple[list, list, LLMEngine]:
    sync, fast = make_engine(False, numerics, **kw), make_engine(True, numerics, **kw)
    return drive(sync, requests, aborts), drive(fast, requests, aborts), fast


def mixed_params(i: int) -> SamplingParams:
    """Greedy and seeded sampling, stop strings and stop tokens, EOS on or off, by request."""
    kind = i % 5
    if kind == 0:
        return SamplingParams(max_tokens=14, temperature=0)  # EOS may stop it
    if kind == 1:
        return SamplingParams(max_tokens=16, temperature=0.9, top_k=40, seed=100 + i, stop=list("&Q!aeiou"))
    if kind == 2:
        return SamplingParams(max_tokens=11, temperature=0.7, top_p=0.9, seed=7, stop=["&}", "x y", *"$%0123"], logprobs=False)
    if kind == 3:
        return SamplingParams(max_tokens=15, temperature=1.0, seed=i, stop_token_ids=list(range(30, VOCAB, 31)))
    return SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, stop=["\n"])


@pytest.mark.parametrize("numerics", ["batch_invariant", "fast"])
def test_outputs_match_with_stops_sampling_and_eos(numerics):
    """In fast numerics (CPU: eager, a row's bits depend on the row count) each step with a
    ride-along row is redone without it; in batch_invariant numerics none needs to be."""
    requests = [(p, mixed_params(i)) for i, p in enumerate(prompts(10))]
    sync, fast, engine = compare(requests, numerics=numerics)
    assert fast == sync
    reasons = [r[3] for r in sync]
    assert reasons.count("stop") >= 3 and "length" in reasons  # requests stop on their tokens, not on length
    assert engine.stats["ride_along_tokens"] > 0  # and ride along in the step after
    assert (engine.stats["redone_steps"] > 0) == (numerics == "fast")
    assert engine.stats["generation_tokens"] == sum(len(r[0]) for r in fast)


def test_fast_numerics_match_and_leave_the_same_blocks_when_requests_end_by_length():
    """Nothing rides along when requests end by max_tokens: the same batches, so even fast
    numerics give the same bits, and the KV pool ends in the same state (cached hashes, free order)."""
    requests = [(p, SamplingParams(max_tokens=5 + 3 * i, temperature=0.8 * (i % 2), seed=i, ignore_eos=True))
                for i, p in enumerate(prompts(8))]
    sync_engine, async_engine = make_engine(False, "fast"), make_engine(True, "fast")
    fed = []
    launch = async_engine.runner.launch
    async_engine.runner.launch = lambda *a, **k: fed.append(len(a) > 3 and a[3] is not None) or launch(*a, **k)
    assert drive(async_engine, requests) == drive(sync_engine, requests)
    assert sum(fed) > 20  # most decode steps were scheduled ahead and fed on the device
    assert async_engine.stats["ride_along_tokens"] == 0
    a, b = sync_engine.block_manager, async_engine.block_manager
    assert list(a.free) == list(b.free) and a.hash_to_block == b.hash_to_block and a.block_hash == b.block_hash


def test_preemption_under_a_small_kv_pool():
    requests = [(p, mixed_params(i)) for i, p in enumerate(prompts(8, lengths=(30, 21, 40, 12)))]
    sync_engine, async_engine = make_engine(False, num_kv_blocks=10), make_engine(True, num_kv_blocks=10)
    assert drive(async_engine, requests) == drive(sync_engine, requests)
    assert sync_engine.scheduler.num_preemptions > 0
    assert async_engine.scheduler.num_preemptions == sync_engine.scheduler.num_preemptions


def test_chunked_prefill_and_a_small_token_budget():
    requests = [(p, mixed_params(i)) for i, p in enumerate(prompts(6))]
    sync, fast, _ = compare(requests, max_num_batched_tokens=4)
    assert fast == sync


def test_prefix_caching_and_several_completions_of_one_prompt():
    """n > 1 as the server does it: one request per completion, the prompt's blocks shared; a
    second round of the same prompts hits the cache left by the first."""
    base = prompts(2, lengths=(32, 40), seed=5)
    requests = [(p, SamplingParams(max_tokens=10, temperature=0.8, seed=j)) for p in base for j in range(3)]
    requests += [(p, SamplingParams(max_tokens=8, temperature=0)) for p in base]
    out = {}
    for mode in (False, True):
        engine = make_engine(mode)
        hits = []
        allocate = engine.block_manager.allocate_prefix
        engine.block_manager.allocate_prefix = lambda seq: allocate(seq) or hits.append(seq.num_computed)
        out[mode] = drive(engine, requests) + drive(engine, requests[::-1])
        assert sum(hits) >= 4 * 16 + 4 * 32  # the second round reuses every full prompt block
    assert out[True] == out[False]


@pytest.mark.parametrize("aborts,numerics", [({0: 0, 3: 1, 5: 3}, "batch_invariant"), ({1: 2, 2: 9, 4: 3, 6: 1}, "fast")])
def test_aborts_at_any_point(aborts, numerics):
    """Abort right after the first step (prefill), after the first token, mid-stream; the blocks
    are freed at once (drive checks) while the async engine may have a step in flight."""
    requests = [(p, mixed_params(i)) for i, p in enumerate(prompts(8))]
    sync, fast, _ = compare(requests, aborts, numerics)
    assert fast == sync
    assert sum(r[3] == "abort" for r in sync) == len(aborts)


def test_requests_added_while_a_step_is_in_flight():
    sync_engine, async_engine = make_engine(False), make_engine(True)
    later = prompts(4, seed=9)
    outs = []
    for engine in (sync_engine, async_engine):
        seqs = [engine.add_request(p, mixed_params(i)) for i, p in enumerate(prompts(4))]
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
            if steps in (4, 7, 8, 15):  # the async engine has a decode step in flight now
                seqs.append(engine.add_request(later[len(seqs) - 4], mixed_params(len(seqs))))
        outs.append([engine.output(s) for s in seqs])
    assert outs[0] == outs[1]


def test_async_is_off_by_default_on_cpu():
    assert not make_engine(None).async_scheduling and make_engine(True).async_scheduling


def _feed_from_the_wrong_row(engine):
    ahead = engine._decode_ahead

    def broken(prev):
        args = ahead(prev)
        if args is not None and len(args[3][1]) > 1:
            prev_, rows = args[3]
            args = (*args[:3], (prev_, rows[1:] + rows[:1]))
        return args
    engine._decode_ahead = broken


def _position_off_by_one(engine):
    ahead = engine._decode_ahead

    def broken(prev):
        args = ahead(prev)
        if args is not None:
            args = ([ScheduledChunk(ch.seq, ch.start - 1, 1, True) for ch in args[0]], *args[1:])
        return args
    engine._decode_ahead = broken


def _no_redo(engine):
    engine.runner.same_bits = lambda n, m: True


@pytest.mark.parametrize("breakage,numerics", [(_feed_from_the_wrong_row, "batch_invariant"),
                                               (_position_off_by_one, "batch_invariant"), (_no_redo, "fast")])
def test_the_comparison_catches_a_broken_async_path(breakage, numerics):
    requests = [(p, mixed_params(i)) for i, p in enumerate(prompts(6))]
    sync_engine, async_engine = make_engine(False, numerics), make_engine(True, numerics)
    breakage(async_engine)
    assert drive(async_engine, requests) != drive(sync_engine, requests)
