"""Picks the kernel for each op from (device, numerics mode): the one place where that choice is made.

- CPU, fast: the fused quantized matmul of kernels/cpu_qmatmul.py (C, compiled at first use)
  for small batches, plain torch (MKL matmul, SDPA) otherwise.
- CPU, batch_invariant / tp_invariant: the fixed-binary-tree ops of kernels/tree.py, exact by
  construction (elementwise products and pairwise adds in one fixed order); in batch_invariant,
  quantized linears use the fused C kernel at every M (its per-element order depends on K only).
- CUDA: Triton kernels (kernels/*_triton.py, imported lazily so CPU-only installs never need
  triton). fast: for up to GEMV_MAX_M rows of a dense 16-bit linear our GEMV (gemv_triton.py),
  the RMSNorm before qkv and gate/up fused into it (norm_linear), RoPE and the KV-cache write
  after qkv in its epilogue (norm_qkv_rope_kv, by GEMV_ROPE) and, by GEMV_SWIGLU, the SwiGLU
  before the down projection (swiglu_linear); for up to QGEMV_MAX_M rows of a quantized linear
  the quantized GEMV (qgemv_triton.py); cuBLAS for the other dense linears, fixed M-bucket tiles
  of the dequantizing GEMM for quantized ones, unsplit prefill attention. batch_invariant: dense linears run GEMM tiles
  from one bit class (tiles may follow M only among configs shown bit-identical) with no split-K,
  quantized linears the TBIK tree (batch invariant as well, and it may split K at small M);
  attention with the fixed KV split size numerics.kv_split for prefill, chunked prefill and decode
  alike; RMSNorm/RoPE/SwiGLU are one-row-per-program or elementwise, so invariant in every mode.
  tp_invariant: linears follow the TBIK tile tree (kernels/tree_matmul_triton.py). With
  INVARIANT_FUSIONS, in both invariant modes on CUDA the SwiGLU goes into the down projection's
  prologue, RoPE + KV write into the qkv projection's epilogue, and (TBIK) the RMSNorm into the
  prologue at small M, with the bits of the separate kernels (tests/test_tree_matmul_fused.py,
  bench/invariant_fusion_gpu.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from exactllm.formats.quant import QuantWeight
from exactllm.kernels import activation, attention, cpu_qmatmul, rmsnorm, rope, sampling
from exactllm.layers.parallel import TPContext
from exactllm.numerics import Numerics

# Fast mode on CUDA, dense 16-bit weights: our GEMV for at most GEMV_MAX_M rows, where it beat cuBLAS
# on every TinyLlama linear on the H100 (bench/gemv_bf16.py, bench/results/gemv_bf16.json; at M = 2
# cuBLAS wins on gate/up and lm_head). GEMV_SWIGLU fuses the SwiGLU into the down projection: off,
# since the SwiGLU kernel + GEMV was faster (decode graph step 1165 vs 1203 us, profile_decode_gemv*.json).
GEMV_MAX_M = 1
GEMV_SWIGLU = False
# Fast mode on CUDA, quantized weights (QuantWeight): the few-row GEMV of qgemv_triton.py for at most
# QGEMV_MAX_M rows (at M = 2 it beat the old GEMV and the fused GEMM on every TinyLlama linear on the
# H100). Its RMSNorm (QGEMV_NORM) and SwiGLU (QGEMV_SWIGLU) prologues are off: the RMSNorm kernel +
# GEMV and the SwiGLU kernel + GEMV were faster (a program of 2-4 weight rows recomputes the norm or
# SwiGLU over all of K; bench/gemv_quant.py, section fused, gemv_quant.json).
QGEMV_MAX_M = 2
QGEMV_NORM = False
QGEMV_SWIGLU = False
# RoPE and the KV-cache write in the epilogue of the qkv GEMV (no RoPE kernel in the decode step):
# BF16 batch-1 graph step 1,141 -> 1,104 us on the H100 (bench/ab_step.py, ab_step_s5_rope_pdl2.json).
GEMV_ROPE = True
# SwiGLU in the epilogue of the gate/up GEMV (norm_mlp; no SwiGLU kernel, gate/up never written):
# each activation is computed once there, where the prologue of GEMV_SWIGLU recomputes all of them
# in each of the down projection's 512 programs.
GEMV_SWIGLU_EPILOGUE = True
# The invariant modes' fusions (SwiGLU prologue, RoPE + KV epilogue, TBIK RMSNorm prologue): each
# equal to the separate kernels bit for bit on the H100 at M = 1, 5, 17, 300 (invariant_fusion_gpu.json),
# but off until an end-to-end GPU run shows batch/TP invariance and train == serve with them, and
# what they save per step (none was run: the device time ran out).
INVARIANT_FUSIONS = False


@dataclass(frozen=True)
class Ops:
    device_type: str
    numerics: Numerics

    @property
    def _exact_cpu(self) -> bool:
        return self.device_type == "cpu" and self.numerics.invariant

    @property
    def _cuda(self) -> bool:
        return self.device_type == "cuda"

    def _gemv(self, x: torch.Tensor, w) -> bool:
        """Whether x @ w.T may run our few-row GEMV (fast mode, CUDA, a dense weight of x's 16-bit dtype)."""
        return (self._cuda and not self.numerics.invariant and isinstance(w, torch.Tensor)
                and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and x.shape[0] <= GEMV_MAX_M)

    def _qgemv(self, x: torch.Tensor, w) -> bool:
        """Whether x @ w.T may run the quantized few-row GEMV (fast mode, CUDA, a QuantWeight)."""
        return (self._cuda and not self.numerics.invariant and isinstance(w, QuantWeight)
                and x.shape[0] <= QGEMV_MAX_M)

    def linear(self, x: torch.Tensor, w) -> torch.Tensor:
        """Column-parallel or unsharded linear: x [M, K] @ w[N, K].T."""
        if self._gemv(x, w):
            from exactllm.kernels import gemv_triton
            return gemv_triton.gemv(x, w)
        if self._qgemv(x, w):
            from exactllm.kernels import qgemv_triton
            return qgemv_triton.gemv(x, w)
        if self._exact_cpu:
            if not self.numerics.tree and isinstance(w, QuantWeight) and cpu_qmatmul.available():
                # The C kernel's arithmetic per output element is fixed by K alone (no split of K,
                # no M-dependent path), so it is batch invariant at any M; not TP invariant.
                return cpu_qmatmul.qmatmul(x, w).to(x.dtype)
            from exactllm.kernels.tree import tree_matmul
            return tree_matmul(x, w, out_dtype=x.dtype)
        if self._cuda and self.numerics.tree:
            from exactllm.kernels.tree_matmul_triton import tbik_matmul
            return tbik_matmul(x, w, out_dtype=x.dtype)
        if self._cuda:
            from exactllm.kernels import matmul_triton
            return matmul_triton.linear(x, w, invariant=self.numerics.invariant)
        return cpu_qmatmul.linear_cpu(x, w)

    def row_parallel_linear(self, x: torch.Tensor, w, tp: TPContext) -> torch.Tensor:
        """Linear whose K is split over the TP ranks; combines the ranks' partial sums."""
        if tp.world == 1:
            return self.linear(x, w)
        if self.numerics.tree and self._cuda:
            from exactllm.kernels.tree_matmul_triton import tbik_matmul_partial
            return tp.tree_allreduce(tbik_matmul_partial(x, w, tp.world)).to(x.dtype)
        if self.numerics.tree:
            from exactllm.kernels.tree import tree_matmul_partial
            return tp.tree_allreduce(tree_matmul_partial(x, w, tp.world)).to(x.dtype)
        if self._exact_cpu:
            from exactllm.kernels.tree import tree_matmul
            return tp.all_reduce(tree_matmul(x, w, out_dtype=torch.float32)).to(x.dtype)
        return tp.all_reduce(self.linear(x, w).float()).to(x.dtype)

    def norm_linear(self, x, residual, norm_weight, eps, w):
        """rmsnorm(x [+ residual]) @ w.T and the new residual stream (x itself when residual is None),
        as ``rmsnorm`` then ``linear``; one kernel where our GEMV runs."""
        if self._gemv(x, w):
            from exactllm.kernels import gemv_triton
            return gemv_triton.norm_gemv(x, residual, norm_weight, eps, w)
        if QGEMV_NORM and self._qgemv(x, w):
            from exactllm.kernels import qgemv_triton
            return qgemv_triton.norm_gemv(x, residual, norm_weight, eps, w)
        if INVARIANT_FUSIONS and self._tbik(w):   # the RMSNorm in the tree's prologue (the norm kernel's bits)
            from exactllm.kernels.tree_matmul_triton import tbik_norm_matmul
            return tbik_norm_matmul(x, residual, norm_weight, eps, w)
        if residual is None:
            return self.linear(self.rmsnorm(x, norm_weight, eps), w), x
        h, residual = self.rmsnorm(x, norm_weight, eps, residual)
        return self.linear(h, w), residual

    def norm_qkv_rope_kv(self, x, residual, norm_weight, eps, w, heads: tuple[int, int, int], positions,
                         rope_tables, kv_cache, slot_mapping):
        """The qkv projection of rmsnorm(x [+ residual]) (``norm_linear``), then ``rope_kv`` on its
        heads = (n_heads, n_kv_heads, head_dim): returns (rotated q [T, n_heads, head_dim], the new
        residual stream) and stores rotated k and v in kv_cache; one kernel where our GEMV runs on
        a dense weight (RoPE and the cache write in its epilogue)."""
        n_heads, n_kv_heads, head_dim = heads
        t, q_width, kv_width = x.shape[0], n_heads * head_dim, n_kv_heads * head_dim
        (cos, sin), (k_cache, v_cache) = rope_tables, kv_cache
        if GEMV_ROPE and self._gemv(x, w) and isinstance(w, torch.Tensor):
            from exactllm.kernels import gemv_triton
            rope_kv = gemv_triton.RopeKV(q_width, kv_width, head_dim, positions, cos, sin, k_cache, v_cache,
                                         slot_mapping)
            qkv, residual = gemv_triton.norm_gemv_rope_kv(x, residual, norm_weight, eps, w, rope_kv)
            return qkv[:, :q_width].view(t, n_heads, head_dim), residual
        if INVARIANT_FUSIONS and self._cuda and self.numerics.invariant:   # RoPE + KV write in the epilogue
            from exactllm.kernels import rope_triton
            rope_kv = rope_triton.rope_kv_args(q_width, kv_width, head_dim, positions, cos, sin, k_cache, v_cache,
                                               slot_mapping)
            if self._tbik(w):   # and the RMSNorm in its prologue
                from exactllm.kernels.tree_matmul_triton import tbik_norm_matmul
                qkv, residual = tbik_norm_matmul(x, residual, norm_weight, eps, w, rope_kv=rope_kv)
            else:
                h, residual = self.rmsnorm(x, norm_weight, eps, residual) if residual is not None else \
                    (self.rmsnorm(x, norm_weight, eps), x)
                qkv = self._invariant_linear(h, w, rope_kv=rope_kv)
            return qkv[:, :q_width].view(t, n_heads, head_dim), residual
        qkv, residual = self.norm_linear(x, residual, norm_weight, eps, w)
        q, k, v = (part.view(t, -1, head_dim) for part in qkv.split((q_width, kv_width, kv_width), dim=-1))
        return self.rope_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping), residual

    def norm_mlp(self, x, residual, norm_weight, eps, w_gate_up, w_down, tp: TPContext):
        """The MLP after an RMSNorm: ``swiglu_linear(norm_linear(x, residual, ..., w_gate_up), w_down)``
        and the new residual stream; where our GEMV runs on a dense [gate; up] weight, the norm and
        the SwiGLU go into the gate/up GEMV (GEMV_SWIGLU_EPILOGUE) and the down projection reads
        its output."""
        if GEMV_SWIGLU_EPILOGUE and self._gemv(x, w_gate_up):
            from exactllm.kernels import gemv_triton
            h, residual = gemv_triton.norm_gemv_swiglu(x, residual, norm_weight, eps, w_gate_up)
            return self.row_parallel_linear(h, w_down, tp), residual
        gate_up, residual = self.norm_linear(x, residual, norm_weight, eps, w_gate_up)
        return self.swiglu_linear(gate_up, w_down, tp), residual

    def swiglu_linear(self, gate_up, w, tp: TPContext):
        """Row-parallel down projection of silu(gate) * up, gate and up the two halves of gate_up;
        one kernel where our GEMV runs (the halves are read as strided views, never copied)."""
        gate, up = gate_up.chunk(2, dim=-1)
        if QGEMV_SWIGLU and self._qgemv(gate, w):
            from exactllm.kernels import qgemv_triton
            y = qgemv_triton.silu_gemv(gate, up, w)
        elif GEMV_SWIGLU and self._gemv(gate, w):
            from exactllm.kernels import gemv_triton
            y = gemv_triton.silu_gemv(gate, up, w)
        elif INVARIANT_FUSIONS and self._cuda and self.numerics.invariant and tp.world == 1:   # SwiGLU prologue
            return self._invariant_linear(gate, w, up=up)
        elif INVARIANT_FUSIONS and self._cuda and self.numerics.tree:
            from exactllm.kernels.tree_matmul_triton import tbik_matmul_partial
            return tp.tree_allreduce(tbik_matmul_partial(gate, w, tp.world, up=up)).to(gate.dtype)
        else:
            return self.row_parallel_linear(self.silu_mul(gate, up), w, tp)
        return y if tp.world == 1 else tp.all_reduce(y.float()).to(y.dtype)

    def _tbik(self, w) -> bool:
        """Whether ``linear`` runs the TBIK tree of tree_matmul_triton (CUDA: tp_invariant, and
        batch_invariant on quantized weights)."""
        return self._cuda and (self.numerics.tree or (self.numerics.invariant and isinstance(w, QuantWeight)))

    def _invariant_linear(self, x, w, up=None, rope_kv=None):
        """``linear`` on CUDA in an invariant mode with a fused SwiGLU prologue (``up``) or rope_kv
        epilogue: the same kernel as ``linear``, the bits of the separate kernels (tests/test_tree_matmul_fused.py)."""
        if self.numerics.tree:
            from exactllm.kernels.tree_matmul_triton import tbik_matmul
            return tbik_matmul(x, w, out_dtype=x.dtype, up=up, rope_kv=rope_kv)
        from exactllm.kernels import matmul_triton
        return matmul_triton.linear(x, w, invariant=True, up=up, rope_kv=rope_kv)

    def rmsnorm(self, x, weight, eps, residual=None):
        if self._exact_cpu:
            from exactllm.kernels.tree import rmsnorm_tree
            if residual is not None:
                x = x + residual
                return rmsnorm_tree(x, weight, eps), x
            return rmsnorm_tree(x, weight, eps)
        if self._cuda:
            from exactllm.kernels import rmsnorm_triton
            return rmsnorm_triton.rmsnorm(x, weight, eps, residual)
        return rmsnorm.rmsnorm_ref(x, weight, eps, residual)

    def rope_kv(self, q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
        """RoPE on q and k, then k and v stored at their cache slots; returns the rotated q (on
        CUDA q is rotated in place, one kernel for all of it; negative slots are skipped there)."""
        if self._cuda:
            from exactllm.kernels import rope_triton
            return rope_triton.rope_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
        attention.write_kv_ref(rope.apply_rope_ref(k, positions, cos, sin), v, k_cache, v_cache, slot_mapping)
        return rope.apply_rope_ref(q, positions, cos, sin)

    def silu_mul(self, gate, up):
        if self._cuda:
            from exactllm.kernels import activation_triton
            return activation_triton.silu_mul(gate, up)
        return activation.silu_mul_ref(gate, up)

    def attention(self, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
        if self._exact_cpu:
            return self._attention_tree(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)
        if self._cuda:
            from exactllm.kernels import attention_triton
            split = self.numerics.kv_split if self.numerics.invariant else None
            return attention_triton.paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens,
                                                    block_tables, scale, kv_split=split)
        return attention.paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale)

    def _attention_tree(self, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale):
        from exactllm.kernels.tree import attention_tree
        out = torch.empty_like(q)
        cu = cu_seqlens_q.tolist()
        for s, length in enumerate(context_lens.tolist()):
            n_q = cu[s + 1] - cu[s]
            k = attention.gather_context(k_cache, block_tables[s], length)
            v = attention.gather_context(v_cache, block_tables[s], length)
            q_pos = torch.arange(length - n_q, length, device=q.device)
            out[cu[s]:cu[s + 1]] = attention_tree(q[cu[s]:cu[s + 1]], k, v, q_pos, scale,
                                                  kv_split=self.numerics.kv_split).to(q.dtype)
        return out

    def log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 log-probabilities over the last dim."""
        if self._exact_cpu:
            from exactllm.kernels.tree import log_softmax_tree
            return log_softmax_tree(logits.float())
        return torch.log_softmax(logits.float(), dim=-1)

    def greedy_pick(self, logits: torch.Tensor) -> torch.Tensor:
        """[S, 2] float64: each row's argmax token and its log-prob. The log-prob is this Ops'
        log_softmax's own bits (as the training forward computes them) except on CUDA in fast
        mode, where one fused kernel does it all."""
        if self._cuda:
            from exactllm.kernels import sampling_triton
            if self.numerics.invariant:
                return sampling_triton.greedy_pick(logits, self.log_softmax(logits))
            return sampling_triton.greedy_pick(logits)
        return sampling.greedy_pick_ref(logits, self.log_softmax(logits))


def make_ops(device: "str | torch.device", numerics: Numerics) -> Ops:
    return Ops(torch.device(device).type, numerics)
