"""The MoE decoder end to end on CPU: random:moe-mini generates; expert parallelism EP = 2, 4
(gloo, several processes) gives EP = 1's greedy tokens and its log-probs within LOGPROB_TOL;
modality ids reach the routers (vision tokens go to their kind's experts); ReaLB takes FP8 only
on hot, vision-heavy ranks (and then the log-probs do move); EPLB replicas change nothing;
bad option combinations fail clearly."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from exactllm import LLM, SamplingParams
from exactllm.balance.realb import ReaLBConfig, decide, rank_loads
from exactllm.distributed import launch
from exactllm.models.moe import MoEOptions, vision_experts

# The row-blocked expert GEMMs and the attention all-reduce round differently at different EP
# sizes (fp32 on CPU): log-probs agree to a few ulps of their magnitude, far under this bound.
LOGPROB_TOL = 1e-4
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, logprobs=True)
PROMPTS = [[1, 2, 3, 4, 5] * 3, [7, 8, 9], [100, 200, 300, 400]]
IMAGES = [{"image": {"patches": 60, "kind": 1}}, None, {"image": [30, {"patches": 20, "kind": 2}]}]


@pytest.fixture(scope="module")
def ep1():
    return LLM("random:moe-mini")


@pytest.fixture(scope="module")
def ep1_outputs(ep1):
    return ep1.generate(PROMPTS, GREEDY, use_tqdm=False, multi_modal_data=IMAGES)


def max_logprob_diff(a, b):
    return max(abs(x - y) for oa, ob in zip(a, b) for x, y in zip(oa.logprobs, ob.logprobs))


def test_moe_mini_generates(ep1, ep1_outputs):
    for out in ep1_outputs:
        assert len(out.token_ids) == 6 and all(0 <= t < 32000 for t in out.token_ids)
        assert all(lp <= 0 for lp in out.logprobs)
    # 60 vision tokens go before the first prompt's 15 text tokens
    assert len(ep1_outputs[0].prompt_token_ids) == 75
    again = ep1.generate(PROMPTS, GREEDY, use_tqdm=False, multi_modal_data=IMAGES)
    assert [o.token_ids for o in again] == [o.token_ids for o in ep1_outputs]
    # an image given as a tensor of patch embeddings is the same image
    from exactllm.multimodal import synthetic_image
    as_tensor = ep1.generate(PROMPTS[:1], GREEDY, use_tqdm=False,
                             multi_modal_data={"image": synthetic_image(256, 60, kind=1)})[0]
    assert as_tensor.token_ids == ep1_outputs[0].token_ids  # (alone, not batched: within rounding)
    assert max_logprob_diff([as_tensor], ep1_outputs[:1]) < LOGPROB_TOL
    # the image changes the continuation of the same text
    text_only = ep1.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    assert text_only.logprobs != ep1_outputs[0].logprobs


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_matches_ep1(ep, ep1_outputs):
    llm = LLM("random:moe-mini", tensor_parallel_size=ep, enable_expert_parallel=True)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, multi_modal_data=IMAGES)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ep1_outputs]
    assert max_logprob_diff(outs, ep1_outputs) < LOGPROB_TOL


def test_modality_ids_reach_the_router(ep1):
    model = ep1.engine.runner.model
    for f in model.moe_layers:
        f.record, f.trace = True, []
    one = SamplingParams(max_tokens=1, temperature=0.0)
    ep1.generate([[5, 6, 7, 8] * 5], one, use_tqdm=False, multi_modal_data={"image": {"patches": 100, "kind": 3}})
    ep1.generate([[9, 10, 11, 12] * 5], one, use_tqdm=False)
    k = model.cfg.top_k
    for f in model.moe_layers:
        (img_step, text_step) = f.trace  # one prefill step each
        table = img_step["table"][0]     # [experts, (text, vision)] pair counts of the step
        assert int(table[:, 1].sum()) == 100 * k and int(table[:, 0].sum()) == 20 * k
        # vision tokens prefer their kind's experts (2 of 8 here: uniform routing would give 25%)
        share = float(table[vision_experts(model.cfg, f.layer.seed, 3), 1].sum()) / (100 * k)
        assert share > 0.6
        assert int(text_step["table"][..., 1].sum()) == 0
        f.record = False


# ----------------------------------------------------------------------------- balancers under EP=2

BATCHES = {  # name -> (prompts, multi_modal_data)
    "text": ([[i, i + 1, i + 2] * 30 for i in range(4)], None),
    "mixed": ([[i + 50] * 8 for i in range(4)], [{"image": {"patches": 80, "kind": c}} for c in range(4)]),
    "one_kind": ([[i + 90] * 8 for i in range(4)], [{"image": {"patches": 80, "kind": 2, "seed": i}} for i in range(4)]),
}


def _balancer_worker(rank, world, modes):
    import torch.distributed as dist
    from exactllm.config import EngineConfig
    from exactllm.engine.llm_engine import LLMEngine
    from exactllm.layers.parallel import TPContext
    from exactllm.llm import run_generate
    from exactllm.models.loader import resolve_model
    from exactllm.multimodal import place_images
    source = resolve_model("random:moe-mini", torch.float32)
    cfg = EngineConfig(tensor_parallel_size=world,
                       extra={"model_kwargs": {"moe": MoEOptions(enable_expert_parallel=True)}})
    engine = LLMEngine(source, cfg, TPContext(rank, world, dist.group.WORLD))
    engine.block_manager.enable_prefix_caching = False  # every mode recomputes the same prompts
    model = engine.runner.model
    res = {}
    for mode in modes:
        model.set_load_balancer(MoEOptions(enable_expert_parallel=True, load_balancer=mode, eplb_window=2))
        for name, (prompts, mm) in BATCHES.items():
            for f in model.moe_layers:
                f.record, f.trace = True, []
            placed = None if mm is None else [place_images(p, d, 256, 32000) for p, d in zip(prompts, mm)]
            outs = run_generate(engine, prompts, [GREEDY] * len(prompts), False, placed)
            res[mode, name] = dict(outs=outs, trace=[f.trace for f in model.moe_layers])
    return res


@pytest.fixture(scope="module")
def balancer_runs():
    return launch(_balancer_worker, nprocs=2, args=(("none", "realb", "eplb"),))


def test_realb_goes_low_only_on_hot_vision_heavy_ranks(balancer_runs):
    r0 = balancer_runs[0]
    cfg = ReaLBConfig()
    lows = {}
    for name in BATCHES:
        lows[name] = []
        for layer_trace in r0["realb", name]["trace"]:
            for step in layer_trace:
                load, vision = rank_loads(step["table"], 4)
                assert step["decision"] == decide(load, vision, cfg)
                for r, low in enumerate(step["decision"]):
                    if low:  # the rule itself: overloaded and vision-dominated
                        assert load[r] > 1.2 * load.double().mean() and vision[r] > 0.7
                        lows[name].append(r)
    assert lows["text"] == [] and lows["mixed"] == []
    assert lows["one_kind"]  # images of one kind overload one rank per layer with vision tokens
    # every rank agrees on the decision, and runs FP8 exactly when it is the one chosen
    for layer, layer_trace in enumerate(r0["realb", "one_kind"]["trace"]):
        for s, step in enumerate(layer_trace):
            for r, res in enumerate(balancer_runs):
                other = res["realb", "one_kind"]["trace"][layer][s]
                assert other["decision"] == step["decision"] and other["low_precision"] == step["decision"][r]


def test_realb_changes_outputs_only_when_it_goes_low(balancer_runs):
    r0 = balancer_runs[0]
    for name in ("text", "mixed"):  # no FP8 step: the same bits as no balancing
        a, b = r0["none", name]["outs"], r0["realb", name]["outs"]
        assert [o.logprobs for o in a] == [o.logprobs for o in b]
    # FP8 experts on the hot rank move the log-probs by far more than EP rounding
    assert max_logprob_diff(r0["none", "one_kind"]["outs"], r0["realb", "one_kind"]["outs"]) > 10 * LOGPROB_TOL


def test_eplb_replicas_keep_outputs(balancer_runs):
    r0 = balancer_runs[0]
    for name in BATCHES:
        a, b = r0["none", name]["outs"], r0["eplb", name]["outs"]
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert max_logprob_diff(a, b) < LOGPROB_TOL
        assert all(s["slots_per_rank"] == 4 + 1 for t in r0["eplb", name]["trace"] for s in t)


def test_bad_combinations_fail_clearly():
    with pytest.raises(ValueError, match="enable_expert_parallel=True"):
        LLM("random:moe-mini", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="need a MoE model"):
        LLM("random:llama-mini", enable_expert_parallel=True)
    with pytest.raises(ValueError, match="load_balancer"):
        LLM("random:moe-mini", load_balancer="greedy")
    with pytest.raises(ValueError, match="enable_expert_parallel=True"):
        LLM("random:moe-mini", load_balancer="realb")
    with pytest.raises(ValueError, match="realb_modality_threshold"):
        LLM("random:moe-mini", enable_expert_parallel=True, load_balancer="realb", realb_modality_threshold=1.5)
    with pytest.raises(ValueError, match="use 'fp8', 'fp4'"):
        LLM("random:moe-mini", enable_expert_parallel=True, load_balancer="realb", realb_low_precision="fp6")


def test_bad_multimodal_input_fails_clearly(ep1, mini_llm):
    with pytest.raises(ValueError, match="needs a MoE model"):
        mini_llm.generate([[1, 2]], GREEDY, use_tqdm=False, multi_modal_data={"image": 4})
    with pytest.raises(ValueError, match=r"\[N >= 1, 256\]"):
        ep1.generate([[1, 2]], GREEDY, use_tqdm=False, multi_modal_data={"image": torch.randn(4, 100)})
    with pytest.raises(ValueError, match="only 'image'"):
        ep1.generate([[1, 2]], GREEDY, use_tqdm=False, multi_modal_data={"video": 4})
    with pytest.raises(ValueError, match="kind"):
        ep1.generate([[1, 2]], GREEDY, use_tqdm=False, multi_modal_data={"image": {"patches": 4, "kind": 9}})
