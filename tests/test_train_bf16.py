"""The training forward with 16-bit serving weights (CPU, gloo): float32 master weights whose
rounding is the served weight, so the log-probs keep the server's bits, FSDP2 accepts the model
(it needs one dtype per unit; the RMSNorm gains are float32) and an optimizer step moves the
masters. In fast numerics train and serve still part (the invariant check can fail)."""
import pytest
import torch

from exactllm import LLM, SamplingParams
from exactllm.distributed.launch import launch
from exactllm.layers.linear import Linear
from exactllm.train import TrainModel

MODEL = "random:llama-mini"
PROMPTS = ["Sixteen-bit weights", "a float32 master for each"]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def serve(numerics: str, tp: int = 1):
    llm = LLM(MODEL, numerics=numerics, dtype="bfloat16", tensor_parallel_size=tp)
    try:
        return llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    finally:
        llm.close()


def differing(outs, scored) -> int:
    return sum(a != b for o, lp in zip(outs, scored) for a, b in zip(lp[-len(o.token_ids):].tolist(), o.logprobs))


def sequences(outs):
    return [o.prompt_token_ids + o.token_ids for o in outs]


@pytest.fixture(scope="module")
def served_tp2():
    return serve("tp_invariant", tp=2)


def test_masters_are_float32_and_round_to_the_served_weights():
    trainer = TrainModel(MODEL, numerics="tp_invariant", dtype="bfloat16")
    linears = [m for m in trainer.modules() if isinstance(m, Linear) and m.weight is not None]
    assert linears and all(m.weight.dtype == torch.float32 and m.value.dtype == torch.bfloat16 for m in linears)
    assert {p.dtype for p in trainer.parameters() if p.requires_grad} == {torch.float32}
    served = TrainModel(MODEL, numerics="tp_invariant", dtype="bfloat16")  # same seed, same weights
    for a, b in zip(linears, [m for m in served.modules() if isinstance(m, Linear) and m.weight is not None]):
        assert torch.equal(a.value, b.weight.to(torch.bfloat16))


def test_training_forward_matches_bf16_serving(served_tp2):
    with torch.no_grad():
        scored = TrainModel(MODEL, numerics="tp_invariant", dtype="bfloat16")(sequences(served_tp2))
    assert differing(served_tp2, scored) == 0


def test_fast_mode_training_forward_differs_from_bf16_serving():
    outs = serve("fast", tp=2)
    with torch.no_grad():
        scored = TrainModel(MODEL, numerics="fast", dtype="bfloat16")(sequences(outs))
    assert differing(outs, scored) > 0


def test_an_optimizer_step_moves_the_masters():
    trainer = TrainModel(MODEL, numerics="tp_invariant", dtype="bfloat16")
    head = trainer.model.lm_head
    before = head.weight.detach().clone()
    opt = torch.optim.SGD(trainer.parameters(), lr=1e-3)
    (-trainer([[1, 2, 3, 4, 5]])[0].sum()).backward()
    opt.step()
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    assert not torch.equal(head.weight.detach(), before)


def _fsdp_scores(rank, world, seqs):
    trainer = TrainModel(MODEL, numerics="tp_invariant", dtype="bfloat16").fully_shard()
    scored = trainer(seqs)
    (-sum(lp.sum() for lp in scored)).backward()  # the sharded backward runs too
    return [lp.detach() for lp in scored]


def test_fsdp_accepts_the_bf16_model_and_matches_serving(served_tp2):
    for scored in launch(_fsdp_scores, 2, args=(sequences(served_tp2),)):
        assert differing(served_tp2, scored) == 0
