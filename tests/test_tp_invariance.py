"""End to end on CPU (gloo, several processes): random:llama-mini generated at TP 1, 2, 4 and
scored by the training forward. tp_invariant: bit-identical tokens and log-probs everywhere;
fast: the log-probs DO move (so the invariant checks can fail)."""
import pytest
import torch

from exactllm import LLM, SamplingParams
from exactllm.train import TrainModel

PROMPTS = ["Tensor parallel", "gives the same bits"]
PARAMS = SamplingParams(max_tokens=4, temperature=0.8, seed=7, ignore_eos=True)


def generate(numerics, tp):
    outs = LLM("random:llama-mini", numerics=numerics, tensor_parallel_size=tp).generate(PROMPTS, PARAMS, use_tqdm=False)
    return outs


@pytest.fixture(scope="module")
def invariant_runs():
    return {tp: generate("tp_invariant", tp) for tp in (1, 2, 4)}


def _bits(outs):
    return [(o.token_ids, o.logprobs) for o in outs]


def test_tp_invariant_is_bit_identical_across_tp(invariant_runs):
    assert _bits(invariant_runs[2]) == _bits(invariant_runs[1])
    assert _bits(invariant_runs[4]) == _bits(invariant_runs[1])


def test_fast_mode_differs_across_tp():
    one, two = generate("fast", 1), generate("fast", 2)
    assert [o.logprobs for o in one] != [o.logprobs for o in two]


def test_training_forward_matches_serving_bit_for_bit(invariant_runs):
    trainer = TrainModel("random:llama-mini", numerics="tp_invariant")
    for tp in (2, 4):
        outs = invariant_runs[tp]
        scored = trainer([o.prompt_token_ids + o.token_ids for o in outs])
        for o, lp in zip(outs, scored):
            assert lp[-len(o.token_ids):].tolist() == o.logprobs


def test_training_forward_in_fast_mode_does_not_match(invariant_runs):
    outs = generate("fast", 2)
    scored = TrainModel("random:llama-mini", numerics="fast")([o.prompt_token_ids + o.token_ids for o in outs])
    assert any(lp[-len(o.token_ids):].tolist() != o.logprobs for o, lp in zip(outs, scored))


def test_training_gradients_match_autograd_on_the_plain_torch_path():
    """Gradients through the fixed-tree kernels equal (to rounding) those of the fast torch ops."""
    seqs = [[0, 40, 41, 42, 43, 44], [0, 50, 60, 70]]
    grads = {}
    for mode in ("tp_invariant", "fast"):
        model = TrainModel("random:llama-mini", numerics=mode)
        loss = -sum(lp.sum() for lp in model(seqs))
        loss.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(grads["fast"]) > 10
    for a, b in zip(grads["tp_invariant"], grads["fast"]):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def _fsdp_logprobs(rank, world, seqs):
    trainer = TrainModel("random:llama-mini", numerics="tp_invariant").fully_shard()
    scored = trainer(seqs)
    (-sum(lp.sum() for lp in scored)).backward()  # the sharded backward runs too
    return [lp.detach() for lp in scored]


def test_fsdp_training_forward_matches_serving(invariant_runs):
    """FSDP2 over 2 gloo ranks scores the TP=4 served sequences with the same bits."""
    from exactllm.distributed.launch import launch
    outs = invariant_runs[4]
    seqs = [o.prompt_token_ids + o.token_ids for o in outs]
    for rank_scores in launch(_fsdp_logprobs, 2, args=(seqs,)):
        for o, lp in zip(outs, rank_scores):
            assert lp[-len(o.token_ids):].tolist() == o.logprobs


def test_training_forward_matches_serving_with_quantized_weights_in_batch_invariant_mode():
    """The fused CPU kernel (quantized weights) is row-independent: one pass == token by token."""
    model = "random:llama-mini?quant=q4_1"
    outs = LLM(model, numerics="batch_invariant").generate(PROMPTS, PARAMS, use_tqdm=False)
    scored = TrainModel(model, numerics="batch_invariant")([o.prompt_token_ids + o.token_ids for o in outs])
    for o, lp in zip(outs, scored):
        assert lp[-len(o.token_ids):].tolist() == o.logprobs
