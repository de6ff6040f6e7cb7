"""Engine behaviour on CPU: scheduling, paged KV, preemption, prefix caching, sampling, stops."""
import pytest
import torch

from exactllm import LLM, SamplingParams
from exactllm.config import PRESETS, kv_cache_bytes
from exactllm.models.loader import parse_random_spec

PROMPTS = ["The quick brown fox jumps over", "Hello", "a b c d e f g h i j k l m n o p q r s t",
           "Numbers: 1 2 3 4 5 6 7", "x" * 40]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def run(llm, prompts=PROMPTS, params=GREEDY):
    return [(o.token_ids, o.logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_kv_cache_bytes_matches_seed_003():
    tiny = PRESETS["tinyllama-1.1b"]
    assert kv_cache_bytes(tiny, 2048, torch.float32) == 92_274_688
    assert kv_cache_bytes(tiny, 2048, torch.float16) == 92_274_688 // 2


def test_random_spec_parsing():
    assert parse_random_spec("random:tinyllama-1.1b?quant=q4_0&seed=3") == ("tinyllama-1.1b", "q4_0", 3)
    assert parse_random_spec("random:llama-mini-q8_0") == ("llama-mini", "q8_0", 0)
    with pytest.raises(ValueError, match="unknown quant"):
        parse_random_spec("random:llama-mini?quant=q3_k")
    with pytest.raises(ValueError, match="unknown preset"):
        LLM("random:no-such-model")


def test_outputs_have_the_documented_fields(mini_llm):
    out = mini_llm.generate(["Hello there"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                            use_tqdm=False)[0]
    assert len(out.token_ids) == 5 and len(out.logprobs) == 5
    assert all(lp <= 0.0 for lp in out.logprobs)
    assert out.finish_reason == "length"
    assert isinstance(out.text, str) and out.text == mini_llm.tokenizer.decode(out.token_ids)


def test_random_logits_are_not_degenerate(mini_llm):
    out = mini_llm.generate(["abc"], SamplingParams(max_tokens=8, temperature=1.0, seed=1), use_tqdm=False)[0]
    # A uniform distribution over 32000 tokens would give log-probs of -10.37 everywhere.
    assert max(out.logprobs) > -9.0
    assert len(set(out.token_ids)) > 1


@pytest.mark.parametrize("model", ["random:llama-mini", "random:llama-mini?quant=q8_0"])
def test_batched_greedy_equals_one_by_one_in_batch_invariant_mode(model):
    llm = LLM(model, numerics="batch_invariant")
    together = run(llm)
    alone = [run(llm, [p])[0] for p in PROMPTS]
    assert together == alone  # token ids AND log-probs bit-identical


def test_fast_mode_quantized_logprobs_do_depend_on_the_batch():
    """Counterpart for quantized weights: a batch of over 64 rows leaves the fused kernel's path."""
    llm = LLM("random:llama-mini?quant=q8_0")
    together = run(llm)
    alone = [run(llm, [p])[0] for p in PROMPTS]
    assert [lp for _, lp in together] != [lp for _, lp in alone]


def test_fast_mode_logprobs_do_depend_on_the_batch(mini_llm):
    """The counterpart of the invariance test: without invariant kernels the bits move."""
    together = run(mini_llm)
    alone = [run(mini_llm, [p])[0] for p in PROMPTS]
    assert [t for t, _ in together] == [t for t, _ in alone]  # same greedy tokens here
    assert [lp for _, lp in together] != [lp for _, lp in alone]


def test_preemption_and_chunked_prefill_lose_nothing():
    """A KV pool too small for the batch forces preemption; a tiny token budget forces chunked
    prefill. Outputs must equal those of a roomy engine (exactly, in batch_invariant mode)."""
    roomy = LLM("random:llama-mini", numerics="batch_invariant")
    tight = LLM("random:llama-mini", numerics="batch_invariant", num_kv_blocks=16, block_size=4,
                max_num_batched_tokens=7)
    expected = run(roomy)
    got = run(tight)
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert tight.engine.block_manager.num_free == 16  # every block returned


def test_prefix_caching_shares_blocks_and_keeps_outputs():
    llm = LLM("random:llama-mini", numerics="batch_invariant", block_size=4)
    prefix = "shared system prompt: you are a helpful assistant. "
    first = run(llm, [prefix + "one"])
    bm = llm.engine.block_manager
    cached = len(bm.hash_to_block)
    assert cached > 0
    seq = llm.engine.add_request(prefix + "two", GREEDY)
    bm.allocate_prefix(seq)
    shared_blocks = (1 + len(prefix)) // 4  # BOS + one byte-level token per character
    assert seq.num_computed == 4 * shared_blocks  # the prefix's full blocks were reused, not recomputed
    bm.free_seq(seq)
    llm.engine.abort(seq)
    no_cache = LLM("random:llama-mini", numerics="batch_invariant", block_size=4)
    no_cache.engine.block_manager.enable_prefix_caching = False
    assert run(llm, [prefix + "two"]) == run(no_cache, [prefix + "two"])
    assert first == run(no_cache, [prefix + "one"])


def test_seeded_sampling_is_reproducible_and_batch_independent(mini_llm):
    p = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    a = mini_llm.generate(["Once upon"], p, use_tqdm=False)[0].token_ids
    b = mini_llm.generate(["Once upon", "other", "prompts here"], p, use_tqdm=False)[0].token_ids
    c = mini_llm.generate(["Once upon"], SamplingParams(**{**p.__dict__, "seed": 99}), use_tqdm=False)[0].token_ids
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy(mini_llm):
    greedy = mini_llm.generate(["Tell me"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                               use_tqdm=False)[0].token_ids
    for p in (SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=5, ignore_eos=True)):
        assert mini_llm.generate(["Tell me"], p, use_tqdm=False)[0].token_ids == greedy


def test_stop_strings_and_stop_tokens(default_llm):
    mini_llm = default_llm  # a real vocabulary, so generated text is not empty
    full = mini_llm.generate(["Stop test"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                             use_tqdm=False)[0]
    stop = full.text[len(full.text) // 2:][:2]
    assert stop
    out = mini_llm.generate(["Stop test"], SamplingParams(max_tokens=12, temperature=0, stop=[stop],
                                                           ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and full.text.startswith(out.text)
    token = full.token_ids[3]
    out = mini_llm.generate(["Stop test"], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[token]),
                            use_tqdm=False)[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(token) + 1]
    assert out.finish_reason == "stop"


def test_bad_requests_are_rejected_clearly(mini_llm):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="context"):
        mini_llm.generate([[1] * 5000], use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        mini_llm.generate([[1, -3]], use_tqdm=False)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM("random:llama-mini", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="numerics"):
        LLM("random:llama-mini", numerics="exact")


def test_quantized_random_model_runs():
    llm = LLM("random:llama-mini?quant=q4_0")
    out = llm.generate(["hi"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 4


def test_eos_finishes_a_chat_reply(default_llm):
    out = default_llm.chat([{"role": "user", "content": "Say hi."}],
                           SamplingParams(max_tokens=64, temperature=0))
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in default_llm.tokenizer.eos_ids
    assert out.text and "<|im_end|>" not in out.text


def test_stream_pieces_add_up_to_the_final_text_and_stop_before_a_stop_string(default_llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = default_llm.generate(["Count: one, two,"], params, use_tqdm=False)[0].text
    assert "".join(default_llm.stream("Count: one, two,", params)) == full
    stop = full[len(full) // 2:][:3]
    stopped = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    pieces = list(default_llm.stream("Count: one, two,", stopped))
    assert "".join(pieces) == default_llm.generate(["Count: one, two,"], stopped, use_tqdm=False)[0].text
    assert stop not in "".join(pieces)
