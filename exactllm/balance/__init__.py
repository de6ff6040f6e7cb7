"""Load balancers for expert-parallel MoE layers: "none", "realb" (precision), "eplb" (replicas)."""
from exactllm.balance.eplb import EPLB
from exactllm.balance.realb import ReaLB, ReaLBConfig

BALANCERS = ("none", "realb", "eplb")

__all__ = ["BALANCERS", "EPLB", "ReaLB", "ReaLBConfig"]
