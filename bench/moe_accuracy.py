"""Why the ReaLB accuracy proxy (top-1 agreement, low-precision experts vs full precision) is low,
measured on CPU: low-precision formats for every expert of a random-weight MoE model, the margin
(top-1 minus top-2 logit) distribution of the reference, and agreement split by margin.

    PYTHONPATH=. python bench/moe_accuracy.py --out bench/results

Model: the Qwen3-VL-30B-A3B language-model layout scaled to CPU (``--hidden`` etc.), random
weights as ``random:`` presets make them (LM head std 4/sqrt(H), so logits have std ~4), fp32,
EP = 1, text tokens drawn uniformly. Reference: the fp32 model. Variants, applied to every expert
of every layer (an upper bound on ReaLB, which converts only hot vision-heavy ranks):
  bf16          the whole model in bfloat16 (what plain BF16 inference already moves)
  fp8/channel   e4m3 weights, one scale per output channel, activations e4m3 per token (the
                shipped FP8 path; also run through the real ReaLB code as a check)
  fp8/block128  e4m3 weights with one scale per 128-block of K, activations as above
  fp8 weights   e4m3 per-channel weights, activations left in full precision
  mxfp4, nvfp4  weight-only FP4 (formats/quant.py), activations in full precision
Weights and activations are quantized and dequantized in fp32 ("fake quantization": the same
values the FP8 kernels multiply; only accumulation order differs).

Trained-model check: the default model (SmolLM2-135M, dense) predicting real text (this
repository's README and notes), with its FFN weights dequantized to fp32 as the reference and the
same formats applied to every FFN (attention stays Q4_1): agreement where the distributions are
those of a trained LM. Its margins also calibrate the random model's. Margins are compared in units of each position's logit std. The "real-LM
margins" column reweights each variant's agreement per margin bin by the trained model's bin
frequencies: an estimate, assuming a flip depends on the margin in logit-std units only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import exactllm.layers.moe as moe_layer_mod  # noqa: E402
from exactllm.balance import ReaLB, ReaLBConfig  # noqa: E402
from exactllm.config import EngineConfig, preset  # noqa: E402
from exactllm.engine.llm_engine import build_model  # noqa: E402
from exactllm.formats.quant import dequantize_mxfp4, dequantize_nvfp4, quantize_mxfp4  # noqa: E402
from exactllm.kernels import moe_gemm as mg  # noqa: E402
from exactllm.layers.parallel import TPContext  # noqa: E402
from exactllm.models.llama import random_weights  # noqa: E402
from exactllm.models.loader import ModelSource  # noqa: E402
from exactllm.models.moe import MoEOptions  # noqa: E402
from exactllm.train.logprobs import _packed_batch  # noqa: E402

BINS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, float("inf"))  # margin / logit std
THRESHOLDS = (0.05, 0.1, 0.2)


def fq_fp8(w: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """e4m3 quantize-dequantize along the last dim: one scale per row, or per ``block`` of it."""
    shape = w.shape
    if block:
        w = w.reshape(*shape[:-1], shape[-1] // block, block)
    q, s = mg.quantize_rows_fp8_ref(w)
    return (q.float() * s.unsqueeze(-1)).reshape(shape)


def fq_weights(w: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "fp8/channel":
        return fq_fp8(w)
    if fmt == "fp8/block128":
        return fq_fp8(w, 128)
    if fmt == "mxfp4":
        return dequantize_mxfp4(*quantize_mxfp4(w))
    if fmt == "nvfp4":
        qs, sc, g = mg.quantize_nvfp4_experts(w)
        return dequantize_nvfp4(qs, sc) * g[:, None, None]
    raise ValueError(fmt)


def fq_expert_ffn(act_fp8: bool):
    """expert_ffn with activations fake-quantized to e4m3 per token before each GEMM."""
    def ffn(x, offsets, w13, w2, precision="bf16", backend="torch", rows=None):
        if act_fp8:
            x = fq_fp8(x)
        h = mg.grouped_gemm_ref(x, w13, offsets, a_rows=rows)
        a = mg.silu_mul_ref(h)
        if act_fp8:
            a = fq_fp8(a)
        return mg.grouped_gemm_ref(a, w2, offsets, out_rows=rows)
    return ffn


def run_logits(model, seqs) -> torch.Tensor:
    ids, pos, batch, n_blocks = _packed_batch(seqs, 16, "cpu")
    kv = model.allocate_kv(n_blocks, 16, model.dtype, "cpu")
    with torch.inference_mode():
        hidden = model(ids, pos, batch, kv)
        return torch.cat([model.logits(h).float() for h in hidden.split(1024)])


def margins(logits: torch.Tensor) -> torch.Tensor:
    """(top-1 - top-2 logit) / std of the position's logits."""
    top = logits.topk(2, -1).values
    return (top[:, 0] - top[:, 1]) / logits.std(-1)


def compare(ref: torch.Tensor, test: torch.Tensor, m: torch.Tensor, real_freq: torch.Tensor | None) -> dict:
    lr, lt = torch.log_softmax(ref.double(), -1), torch.log_softmax(test.double(), -1)
    agree = lr.argmax(-1) == lt.argmax(-1)
    kl = (lr.exp() * (lr - lt)).sum(-1)
    dm = (test - ref).std(-1) / ref.std(-1)
    out = dict(positions=int(agree.numel()), top1_agreement=float(agree.double().mean()), mean_kl=float(kl.mean()),
               rel_logit_perturbation=float(dm.mean()))
    for t in THRESHOLDS:
        keep = m > t
        out[f"agreement_margin_gt_{t}"] = float(agree[keep].double().mean())
        out[f"positions_margin_gt_{t}"] = int(keep.sum())
    per_bin = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (m >= lo) & (m < hi)
        per_bin.append(float(agree[sel].double().mean()) if sel.any() else 1.0)
    out["agreement_per_bin"] = per_bin
    if real_freq is not None:
        out["agreement_real_lm_margins"] = float((torch.tensor(per_bin, dtype=torch.float64) * real_freq).sum())
    return out


def bin_freq(m: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(((m >= lo) & (m < hi)).double().mean()) for lo, hi in zip(BINS[:-1], BINS[1:])],
                        dtype=torch.float64)


def _fq_mlp_forward(mlp, act_fp8: bool):
    """MLP.forward (models/llama.py) with activations fake-quantized to e4m3 per token."""
    def forward(x):
        ops = mlp.ops
        gate, up = ops.linear(fq_fp8(x) if act_fp8 else x, mlp.gate_up.value).chunk(2, dim=-1)
        h = ops.silu_mul(gate, up)
        return ops.row_parallel_linear(fq_fp8(h) if act_fp8 else h, mlp.down.value, mlp.tp)
    return forward


def real_lm(tokens: int):
    """The default model (SmolLM2-135M, trained) on real text (README + bench notes): its margins,
    and top-1 agreement when its FFN weights (dequantized to fp32: the reference) go low precision.
    Attention keeps its Q4_1 weights in every run."""
    from exactllm import LLM
    from exactllm.layers.linear import Linear
    llm = LLM()
    model = llm.engine.runner.model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = "".join(open(os.path.join(root, f)).read() for f in ("README.md", "bench/NOTES.md", "BENCHMARKS.md")
                   if os.path.exists(os.path.join(root, f)))
    ids = llm.tokenizer.encode(text)[:tokens]
    seqs = [s for s in (ids[i:i + 512] for i in range(0, len(ids), 512)) if len(s) > 1]
    mlps = [layer.ffn for layer in model.layers]
    dense = [(m.gate_up.value.dequantize(torch.float32), m.down.value.dequantize(torch.float32)) for m in mlps]

    def set_ffn(fmt: str | None, act_fp8: bool):
        for m, (gu, dn) in zip(mlps, dense):
            if fmt is None:
                m.gate_up, m.down = Linear(gu), Linear(dn)
            elif fmt == "bf16":
                m.gate_up, m.down = Linear(gu.bfloat16().float()), Linear(dn.bfloat16().float())
            elif fmt.startswith("fp8/block"):
                m.gate_up = Linear(fq_fp8(gu, 128 if gu.shape[1] % 128 == 0 else 64))
                m.down = Linear(fq_fp8(dn, 128 if dn.shape[1] % 128 == 0 else 64))
            else:
                m.gate_up, m.down = Linear(fq_weights(gu[None], fmt)[0]), Linear(fq_weights(dn[None], fmt)[0])
            m.forward = _fq_mlp_forward(m, act_fp8)

    set_ffn(None, False)
    ref = run_logits(model, seqs)
    m = margins(ref)
    rows = {}
    for name, fmt, act in (("bf16", "bf16", False), ("fp8/channel", "fp8/channel", True),
                           ("fp8/block128", "fp8/block", True), ("fp8 weights only", "fp8/channel", False),
                           ("mxfp4", "mxfp4", False), ("nvfp4", "nvfp4", False)):
        set_ffn(fmt, act)
        rows[name] = compare(ref, run_logits(model, seqs), m, None)
    return m, rows


def plot(result: dict, path: str) -> None:
    """Top-1 agreement per reference-margin bin, per variant: random MoE and SmolLM2 side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bins = result["margin_bins"]
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(bins[:-1], bins[1:])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, key, title, freq in ((axes[0], "variants", "random MoE (all experts low)", "random_moe"),
                                 (axes[1], "smollm2_ffn_variants", "SmolLM2-135M, real text (all FFNs low)",
                                  "smollm2_real_text")):
        for name, r in result[key].items():
            ax.plot(labels, r["agreement_per_bin"], marker="o", label=f"{name} ({100 * r['top1_agreement']:.1f}%)")
        ax2 = ax.twinx()
        ax2.bar(labels, result["margins"][freq]["bin_freq"], alpha=0.15, color="gray")
        ax2.set_ylabel("fraction of positions (bars)")
        ax.set_title(title)
        ax.set_xlabel("reference top-1 margin / logit std")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("top-1 agreement vs full precision")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--expert-ffn", type=int, default=384)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-tokens", type=int, default=4096)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON in --out")
    a = p.parse_args(argv)
    if a.plot_only:
        with open(os.path.join(a.out, "moe_accuracy.json")) as f:
            plot(json.load(f), os.path.join(a.out, "moe_accuracy.png"))
        return
    torch.manual_seed(a.seed)
    cfg = dataclasses.replace(preset("qwen3-vl-30b-a3b"), n_layers=a.layers, hidden=a.hidden, n_heads=a.hidden // 128,
                              n_kv_heads=max(1, a.hidden // 512), n_experts=a.experts, top_k=a.top_k,
                              expert_ffn=a.expert_ffn, vocab=a.vocab, max_context=max(a.seq_len, 256),
                              name="moe-accuracy")
    t0 = time.perf_counter()
    real_m, real_rows = real_lm(a.real_tokens)
    real_freq = bin_freq(real_m)

    def build(dtype):
        src = ModelSource(cfg.name, cfg, lambda d: random_weights(cfg, a.seed, None, d, dtype), None)
        return build_model(src, EngineConfig(device="cpu", dtype=dtype, extra={"model_kwargs": {"moe": MoEOptions()}}),
                           TPContext())

    g = torch.Generator().manual_seed(a.seed + 1)
    n = a.positions // a.seq_len
    seqs = [torch.randint(0, cfg.vocab, (a.seq_len,), generator=g).tolist() for _ in range(n)]
    model = build(torch.float32)
    ref = run_logits(model, seqs)
    m = margins(ref)
    rows = {"bf16": compare(ref, run_logits(build(torch.bfloat16), seqs).float(), m, real_freq)}
    layers = [f.layer for f in model.moe_layers]
    full = [(lay.w13, lay.w2) for lay in layers]
    orig_ffn = moe_layer_mod.expert_ffn
    variants = [("fp8/channel", "fp8/channel", True), ("fp8/block128", "fp8/block128", True),
                ("fp8 weights only", "fp8/channel", False), ("mxfp4", "mxfp4", False), ("nvfp4", "nvfp4", False)]
    try:
        for name, wfmt, act in variants:
            for lay, (w13, w2) in zip(layers, full):
                lay.w13, lay.w2 = fq_weights(w13, wfmt), fq_weights(w2, wfmt)
            moe_layer_mod.expert_ffn = fq_expert_ffn(act)
            rows[name] = compare(ref, run_logits(model, seqs), m, real_freq)
    finally:
        moe_layer_mod.expert_ffn = orig_ffn
        for lay, (w13, w2) in zip(layers, full):
            lay.w13, lay.w2 = w13, w2
    for lay in layers:  # the shipped path: ReaLB forced low on every layer
        lay.balancer = ReaLB(ReaLBConfig(-1.0, -1.0, low_precision="fp8"), "torch")
    rows["fp8/channel (ReaLB path)"] = compare(ref, run_logits(model, seqs), m, real_freq)

    def pct(x, q):
        return float(torch.quantile(x.double(), q))
    margin_stats = {name: dict(p10=pct(x, 0.1), median=pct(x, 0.5), frac_below_0_05=float((x < 0.05).double().mean()),
                               frac_below_0_1=float((x < 0.1).double().mean()), bin_freq=bin_freq(x).tolist())
                    for name, x in (("random_moe", m), ("smollm2_real_text", real_m))}
    result = dict(config=dataclasses.asdict(cfg), positions=int(m.numel()), real_positions=int(real_m.numel()),
                  margin_bins=list(BINS), margins=margin_stats, variants=rows,
                  smollm2_ffn_variants=real_rows, seconds=time.perf_counter() - t0,
                  command="PYTHONPATH=. python bench/moe_accuracy.py " + " ".join(argv or sys.argv[1:]))
    print(f"margin (top1 - top2) / logit std:  random MoE median {margin_stats['random_moe']['median']:.3f}, "
          f"{100 * margin_stats['random_moe']['frac_below_0_05']:.1f}% < 0.05 | SmolLM2 on text median "
          f"{margin_stats['smollm2_real_text']['median']:.3f}, {100 * margin_stats['smollm2_real_text']['frac_below_0_05']:.1f}% < 0.05")
    print(f"{'variant':<26}{'top1':>8}{'KL':>10}{'dlogit':>8}" + "".join(f"{'m>' + str(t):>9}" for t in THRESHOLDS)
          + f"{'real-LM':>9}")
    for name, r in rows.items():
        print(f"{name:<26}{r['top1_agreement']:>8.4f}{r['mean_kl']:>10.2e}{r['rel_logit_perturbation']:>8.4f}"
              + "".join(f"{r[f'agreement_margin_gt_{t}']:>9.4f}" for t in THRESHOLDS)
              + f"{r['agreement_real_lm_margins']:>9.4f}")
    print("positions with margin > t: " + ", ".join(f"{t}: {rows['bf16'][f'positions_margin_gt_{t}']}" for t in THRESHOLDS))
    print(f"\nSmolLM2-135M on real text, FFN weights low precision vs fp32 ({result['real_positions']} positions):")
    for name, r in real_rows.items():
        print(f"{name:<26}{r['top1_agreement']:>8.4f}{r['mean_kl']:>10.2e}{r['rel_logit_perturbation']:>8.4f}"
              + "".join(f"{r[f'agreement_margin_gt_{t}']:>9.4f}" for t in THRESHOLDS))
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "moe_accuracy.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(a.out, "moe_accuracy.png"))
    print(f"wrote {path} and moe_accuracy.png ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
