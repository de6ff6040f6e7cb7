"""Mixture-of-Experts layer: softmax top-k router, SwiGLU experts, optional shared expert,
expert parallelism over a torch.distributed group, and a per-step load balancer.

Router (Qwen3-MoE): probs = softmax(x W_r^T) over all experts in fp32, keep the top k,
renormalize them to sum to 1. Every token carries a modality id (0 text, 1 vision) that the
balancer reads. Each rank passes its own tokens (data-parallel attention in front of EP) and
gets their outputs back.

Weights are generated per expert from (seed, expert id) on the layer's device, so a rank builds
only the experts it holds (and an EPLB replica is the same expert bit for bit): a layer-only
benchmark never needs the whole model in memory. Or they come from a model file
(``ExpertTensors``: GGUF qwen3moe tensors, dense or block-quantized); the rank then converts only
the experts it holds to the compute dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exactllm.balance.realb import ReaLB
from exactllm.distributed.ep import Placement, all_to_all, exchange_counts, receive_layout, world
from exactllm.formats.quant import QuantWeight
from exactllm.kernels.moe_gemm import expert_ffn


def _randn(shape, seed: int, std: float, device, dtype):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * std).to(dtype)


def expert_matrix(w, e: int, n_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expert e's [N, K] matrix of a stack of expert matrices: dense [E, N, K], or a QuantWeight
    of E*N rows (how formats/gguf.py loads a block-quantized 3-D tensor), dequantized to dtype."""
    if isinstance(w, QuantWeight):
        return w.shard(0, e, n_experts).dequantize(dtype)
    return w[e].to(dtype)


@dataclass(frozen=True)
class ExpertTensors:
    """One MoE layer's weights from a model file: router [E, H] (dense or QuantWeight), and the
    gate / up [E, F, H] and down [E, H, F] expert stacks (see ``expert_matrix``)."""
    router: object
    gate: object
    up: object
    down: object


class MoELayer:
    def __init__(self, hidden: int, n_experts: int, top_k: int, expert_ffn_dim: int, *,
                 shared_expert_ffn: int = 0, group=None, placement: Placement | None = None,
                 balancer=None, backend: str = "torch", dtype=torch.float32, device="cpu",
                 seed: int = 0, tensors: ExpertTensors | None = None):
        self.hidden, self.n_experts, self.top_k, self.ffn = hidden, n_experts, top_k, expert_ffn_dim
        self.group, self.balancer, self.backend = group, balancer, backend
        self.dtype, self.device, self.seed = dtype, torch.device(device), seed
        self.tensors = tensors
        self.rank, self.size = world(group)
        if tensors is not None:  # the router stays fp32 (route() computes in fp32 anyway)
            r = tensors.router
            self.router_w = (r.dequantize(torch.float32) if isinstance(r, QuantWeight) else r.float()).to(self.device)
        else:
            self.router_w = _randn((n_experts, hidden), seed * 1_000_003 + 999_983, hidden ** -0.5,
                                   self.device, dtype)
        self.shared = None
        if shared_expert_ffn and tensors is not None:
            raise ValueError("a shared expert is only generated for random layers (no file tensors for it)")
        if shared_expert_ffn:
            s = seed * 1_000_003 + 999_979
            self.shared = (_randn((2 * shared_expert_ffn, hidden), s, hidden ** -0.5, self.device, dtype),
                           _randn((hidden, shared_expert_ffn), s + 1, shared_expert_ffn ** -0.5,
                                  self.device, dtype))
        self.set_placement(placement or Placement.contiguous(n_experts, self.size))
        self.profile = False
        self.events: list[tuple[str, torch.cuda.Event]] = []
        self.last_table: torch.Tensor | None = None
        self.last_low_precision = False

    @classmethod
    def from_config(cls, cfg, **kw) -> "MoELayer":
        return cls(cfg.hidden, cfg.n_experts, cfg.top_k, cfg.expert_ffn,
                   shared_expert_ffn=cfg.shared_expert_ffn, **kw)

    # ------------------------------------------------------------------ weights
    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2F, H] = gate rows then up rows, w2 [H, F]) of logical expert e."""
        if self.tensors is not None:
            t, E = self.tensors, self.n_experts
            w13 = torch.cat([expert_matrix(t.gate, e, E), expert_matrix(t.up, e, E)])
            return (w13.to(self.device, self.dtype),
                    expert_matrix(t.down, e, E).to(self.device, self.dtype))
        s = self.seed * 1_000_003 + 2 * e
        return (_randn((2 * self.ffn, self.hidden), s, self.hidden ** -0.5, self.device, self.dtype),
                _randn((self.hidden, self.ffn), s + 1, self.ffn ** -0.5, self.device, self.dtype))

    def set_placement(self, placement: Placement) -> None:
        """Hold the experts of this rank's slots (EPLB calls this with a new placement)."""
        if placement.n_ranks != self.size or placement.n_experts != self.n_experts:
            raise ValueError("placement does not match this layer's experts / EP group")
        self.placement = placement
        self._replicas = placement.replica_table()
        ws = [self.expert_weights(e) for e in placement.local_experts(self.rank)]
        self.w13 = torch.stack([w[0] for w in ws])
        self.w2 = torch.stack([w[1] for w in ws])

    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.ffn * self.w13.element_size()

    # ------------------------------------------------------------------ forward
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [T, k] int64, gate weights [T, k] fp32)."""
        probs = torch.softmax(x.float() @ self.router_w.float().T, dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        return ids, w / w.sum(-1, keepdim=True)

    def _mark(self, name: str) -> None:
        if self.profile and self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append((name, ev))

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None, routing=None) -> torch.Tensor:
        """x [T, H] (this rank's tokens), modality [T] (0 text, 1 vision), routing: optional
        (ids, weights) to replay instead of the router's choice."""
        T, H = x.shape
        k, rank, R = self.top_k, self.rank, self.size
        S, n_slots = self.placement.slots_per_rank, self.placement.n_slots
        dev = x.device
        self._mark("start")
        if modality is None:
            modality = torch.zeros(T, dtype=torch.int8, device=dev)
        ids, gate = routing if routing is not None else self.route(x)
        ids, gate = ids.to(dev).long(), gate.to(dev).float()
        self._mark("route")

        # Counts first: per destination slot and modality, all-gathered into the routing table.
        pair_tok = torch.arange(T * k, device=dev) // k
        slot = self.placement.slot_of(ids.flatten(), pair_tok + rank, self._replicas)
        order = torch.argsort(slot, stable=True)
        pair_mod = modality.to(dev).long()[pair_tok]
        local_counts = torch.bincount(slot * 2 + pair_mod, minlength=2 * n_slots).view(n_slots, 2)
        table = exchange_counts(local_counts, self.group)
        table_cpu = table.cpu()
        self.last_table = table_cpu
        low, handle = False, None
        if isinstance(self.balancer, ReaLB):
            low = self.balancer.plan(table_cpu, S)[rank]
            if low:  # side stream: overlaps the dispatch all-to-all below
                handle = self.balancer.start_conversion(self.w13, self.w2)
        self.last_low_precision = low
        self._mark("counts")

        send_splits = table_cpu[rank].view(R, S, 2).sum((1, 2)).tolist()
        recv_splits = table_cpu[:, rank * S:(rank + 1) * S].sum((1, 2)).tolist()
        _, recv_slot, offsets = receive_layout(table, rank, S, output_size=sum(recv_splits))
        recv_x = all_to_all(x[order // k], send_splits, recv_splits, self.group)
        self._mark("dispatch")

        perm = torch.argsort(recv_slot, stable=True)  # expert-sorted order, gathered in the GEMM
        if low:
            w13, w2 = ReaLB.finish(handle)
            y_recv = expert_ffn(recv_x, offsets, w13, w2, self.balancer.cfg.low_precision, self.backend,
                                rows=perm)
        else:
            y_recv = expert_ffn(recv_x, offsets, self.w13, self.w2, "bf16", self.backend, rows=perm)
        self._mark("experts")

        y_back = all_to_all(y_recv, recv_splits, send_splits, self.group)
        y_pairs = torch.empty_like(y_back).index_copy_(0, order, y_back)
        # Weighted sum over the k experts of each token: fixed order, fp32, elementwise (so it is
        # batch invariant), one fused multiply-add pass per expert slot.
        yv = y_pairs.view(T, k, H)
        out = yv[:, 0].float() * gate[:, :1]
        for j in range(1, k):
            out.addcmul_(yv[:, j], gate[:, j:j + 1])
        if self.shared is not None:
            out += _swiglu(x, *self.shared).float()
        self._mark("combine")
        return out.to(x.dtype)

    __call__ = forward

    def expert_load(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """Rows per logical expert [E] in a routing table (default: the last step's)."""
        table = self.last_table if table is None else table
        per_slot = table.sum((0, 2))
        return torch.zeros(self.n_experts, dtype=torch.int64).index_add_(
            0, self.placement.slots.flatten(), per_slot.to(torch.int64))

    # ------------------------------------------------------------------ reference
    def reference_forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """Single-process dense reference in fp32: every expert, no EP, no kernels."""
        ids, gate = routing if routing is not None else self.route(x)
        ids, gate = ids.to(x.device), gate.to(x.device).float()
        xf = x.float()
        out = torch.zeros_like(xf)
        for e in range(self.n_experts):
            tok, j = (ids == e).nonzero(as_tuple=True)
            if len(tok):
                w13, w2 = self.expert_weights(e)
                out.index_add_(0, tok, _swiglu(xf[tok], w13.float(), w2.float()) * gate[tok, j, None])
        if self.shared is not None:
            out += _swiglu(xf, *(w.float() for w in self.shared))
        return out


def _swiglu(x, w13, w2):
    g, u = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w2)
