"""ReaLB decisions on hand-made load tables, the EPLB policy, workloads and the trace format."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from exactllm.balance import EPLB, ReaLB, ReaLBConfig
from exactllm.balance.eplb import pack, rebalance, replicate
from exactllm.balance.realb import decide, rank_loads
from exactllm.balance.workload import (bias_router, load_trace, make_batch, pick_vision_experts,
                                       routing_stats, save_trace, vision_direction)
from exactllm.distributed.ep import Placement
from exactllm.layers.moe import MoELayer


def table(rows):
    """Routing table [1 source, slots, 2] from per-slot (text, vision) counts."""
    return torch.tensor(rows, dtype=torch.int64).unsqueeze(0)


# ----------------------------------------------------------------------------- ReaLB

def test_rank_loads_sums_sources_and_slots():
    t = torch.tensor([[[1, 2], [3, 4], [0, 0], [5, 0]],
                      [[0, 1], [1, 1], [2, 2], [0, 5]]])  # 2 sources, 4 slots, 2 per rank
    load, vision = rank_loads(t, slots_per_rank=2)
    assert load.tolist() == [13, 14]
    assert vision.tolist() == pytest.approx([8 / 13, 7 / 14])


CFG = ReaLBConfig(overload_threshold=0.2, modality_threshold=0.7)


@pytest.mark.parametrize("rows, expect", [
    # 4 ranks, 1 slot each: (text, vision) rows.
    ([(10, 90), (20, 10), (20, 10), (20, 20)], [True, False, False, False]),   # hot + vision
    ([(90, 10), (20, 10), (20, 10), (20, 20)], [False, False, False, False]),  # hot but text
    ([(5, 35), (30, 10), (30, 10), (30, 10)], [False, False, False, False]),   # vision, not hot
    ([(10, 40), (10, 40), (10, 40), (10, 40)], [False, False, False, False]),  # balanced
    ([(10, 90), (5, 95), (20, 0), (20, 0)], [True, True, False, False]),       # two hot ranks
    ([(0, 0), (0, 0), (0, 0), (0, 0)], [False, False, False, False]),          # empty step
])
def test_decisions_on_hand_made_tables(rows, expect):
    load, vision = rank_loads(table(rows), 1)
    assert decide(load, vision, CFG) == expect


def test_decision_thresholds_are_strict():
    # mean = 100; rank 0 at exactly 1.2 x mean and exactly 0.7 vision: not switched.
    rows = [(36, 84), (80, 0), (120, 0), (80, 0)]  # rank 2: exactly 1.2 x mean, text
    load, vision = rank_loads(table(rows), 1)
    assert load.double().mean() == 100 and vision[0] == pytest.approx(0.7)
    assert decide(load, vision, CFG) == [False] * 4
    rows[0] = (35, 86)  # 121 rows, 0.71 vision
    rows[1] = (79, 0)
    load, vision = rank_loads(table(rows), 1)
    assert decide(load, vision, CFG) == [True, False, False, False]
    assert decide(load, vision, ReaLBConfig(min_load=1000)) == [False] * 4


def test_realb_conversion_and_resident_copy():
    w13, w2 = torch.randn(2, 16, 32), torch.randn(2, 32, 8)
    rb = ReaLB()
    (q13, s13), (q2, s2) = ReaLB.finish(rb.start_conversion(w13, w2))
    assert q13.dtype == torch.float8_e4m3fn and s13.shape == (2, 16) and s2.shape == (2, 32)
    assert rb.resident_bytes() == 0  # converted per step, nothing kept
    rb = ReaLB(ReaLBConfig(resident=True))
    first = ReaLB.finish(rb.start_conversion(w13, w2))
    assert ReaLB.finish(rb.start_conversion(w13, w2)) is first
    assert rb.resident_bytes() == (2 * 16 * 32 + 2 * 32 * 8) + 4 * (2 * 16 + 2 * 32)


# ----------------------------------------------------------------------------- EPLB

def test_replicate_gives_extra_slots_to_the_hottest_per_replica():
    load = torch.tensor([100, 10, 10, 40])
    assert replicate(load, 1).tolist() == [2, 1, 1, 1]
    assert replicate(load, 3).tolist() == [3, 1, 1, 2]  # 100/2=50 > 40, then 40 > 33.3


def test_pack_balances_and_spreads_replicas():
    load = torch.tensor([100, 10, 10, 60, 20, 20])
    p = rebalance(load, n_ranks=2, n_redundant=2)
    assert p.slots.shape == (2, 4)
    assert sorted(p.slots.flatten().tolist()) == [0, 0, 1, 2, 3, 3, 4, 5]
    assert all(0 in row and 3 in row for row in p.slots.tolist())  # replicas on distinct ranks
    table_, n_rep = p.replica_table()
    per_replica = load.double() / n_rep
    rank_load = [float(per_replica[row].sum()) for row in p.slots]
    contiguous = [float(load[:3].sum()), float(load[3:].sum())]
    assert max(rank_load) < max(contiguous)
    assert rank_load == [110.0, 110.0]


def test_pack_rejects_uneven_slots():
    with pytest.raises(ValueError):
        pack(torch.ones(4), torch.tensor([2, 1, 1, 1]), 2)


def test_eplb_sliding_window_and_memory_cost():
    eplb = EPLB(n_experts=4, n_ranks=2, n_redundant=2, window=2, period=1)
    eplb.observe(torch.tensor([100, 0, 0, 0]))
    eplb.observe(torch.tensor([0, 0, 0, 100]))
    p = eplb.observe(torch.tensor([0, 0, 0, 100]))  # expert 0's step has left the window
    assert (p.slots == 3).sum() == 3 and (p.slots == 0).sum() == 1
    assert eplb.extra_bytes_per_rank(1000) == 1000  # 3 slots per rank instead of 2


def test_placement_round_robin_over_replicas():
    p = Placement(torch.tensor([[0, 1, 2], [0, 3, 0]]), 4)  # expert 0 in slots 0, 3, 5
    ids = torch.zeros(6, dtype=torch.int64)
    assert p.slot_of(ids, torch.arange(6)).tolist() == [0, 3, 5, 0, 3, 5]
    assert p.slot_of(torch.tensor([3, 2]), torch.tensor([7, 7])).tolist() == [4, 2]
    with pytest.raises(ValueError):
        Placement(torch.tensor([[0, 1], [1, 2]]), 4).replica_table()  # expert 3 has no slot


# ----------------------------------------------------------------------------- workloads

def test_biased_router_makes_a_hot_vision_rank():
    E, H, R, k = 32, 64, 4, 4
    layer = MoELayer(H, E, k, 16)
    d = vision_direction(H)
    x, mod = make_batch(2000, H, 0.8, d, seed=1)
    plain = routing_stats(layer.route(x)[0], mod, E, R)
    assert plain["hot_rank_over_mean"] < 1.2 and plain["vision_token_share"] == pytest.approx(0.8)
    experts = pick_vision_experts(E, R, hot_rank=2, n_vision=6, seed=3)
    assert len(experts) == 6 and (experts // (E // R) == 2).sum() >= 4
    layer.router_w = bias_router(layer.router_w, experts, d, 1.0)
    skew = routing_stats(layer.route(x)[0], mod, E, R)
    assert skew["hot_rank"] == 2 and skew["hot_rank_over_mean"] > 1.6
    assert skew["hot_expert_over_mean"] > 2 and skew["rank_vision_share"][2] > 0.7


def test_trace_round_trip_and_replay(tmp_path):
    layer = MoELayer(32, 8, 2, 16)
    steps = []
    for s in range(3):
        x, mod = make_batch(10 + s, 32, 0.5, vision_direction(32), seed=s)
        ids, w = layer.route(x)
        steps.append(dict(ids=ids, weights=w, modality=mod, layer=s, x=x))
    path = str(tmp_path / "trace.npz")
    save_trace(path, steps, n_experts=8, top_k=2)
    meta, back = load_trace(path)
    assert meta["n_steps"] == 3 and meta["top_k"] == 2
    for a, b in zip(steps, back):
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["modality"], b["modality"])
        assert torch.equal(a["weights"], b["weights"]) and a["layer"] == b["layer"]
        assert torch.equal(layer(a["x"], b["modality"], routing=(b["ids"], b["weights"])), layer(a["x"]))
