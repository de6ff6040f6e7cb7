"""Qwen3-MoE GGUF files (llama.cpp arch ``qwen3moe``): a tiny model written with gguf's
GGUFWriter loads through LLM("file.gguf") and its logits equal an independent float64 torch
forward of the same weights (dequantized by gguf.quants, NeoX RoPE, per-head q/k RMSNorm,
softmax top-k renormalized router, SwiGLU experts) for F32/F16/BF16/Q8_0/Q4_0 expert tensors;
bad or missing expert tensors give one-line errors naming the file and the tensor; requantizing
keeps the 3-D expert stacks and the F32 router."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from exactllm import LLM, SamplingParams  # noqa: E402
from exactllm.formats.gguf import ModelFileError, load_gguf  # noqa: E402
from exactllm.tokenizer import Tokenizer  # noqa: E402
from exactllm.train.logprobs import _packed_batch  # noqa: E402

# Shape: head_dim 32 is wider than hidden / n_heads = 16 (as in Qwen3), 2 KV heads for 4 query heads.
L, H, NH, NKV, D, E, K, F, V = 2, 64, 4, 2, 32, 8, 2, 32, 300
EPS, BASE = 1e-6, 1_000_000.0
SEQS = [[0] + list(range(5, 40, 3)), [0, 77, 12, 250, 9, 9, 140]]
# exactllm runs fp32 (summation orders differ from the float64 reference; measured max 4e-6);
# logits have std ~3.
LOGIT_TOL = 1e-4


def make_weights(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def n(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).numpy().astype(np.float32)

    w = {"token_embd.weight": n(V, H), "output_norm.weight": 1 + n(H, std=0.1), "output.weight": n(V, H, std=3 / H ** 0.5)}
    for i in range(L):
        p = f"blk.{i}"
        w.update({f"{p}.attn_norm.weight": 1 + n(H, std=0.1), f"{p}.ffn_norm.weight": 1 + n(H, std=0.1),
                  f"{p}.attn_q.weight": n(NH * D, H, std=H ** -0.5), f"{p}.attn_k.weight": n(NKV * D, H, std=H ** -0.5),
                  f"{p}.attn_v.weight": n(NKV * D, H, std=H ** -0.5),
                  f"{p}.attn_output.weight": n(H, NH * D, std=(NH * D) ** -0.5 / 2),
                  f"{p}.attn_q_norm.weight": 1 + n(D, std=0.3), f"{p}.attn_k_norm.weight": 1 + n(D, std=0.3),
                  f"{p}.ffn_gate_inp.weight": n(E, H, std=2 * H ** -0.5),
                  f"{p}.ffn_gate_exps.weight": n(E, F, H, std=H ** -0.5), f"{p}.ffn_up_exps.weight": n(E, F, H, std=H ** -0.5),
                  f"{p}.ffn_down_exps.weight": n(E, H, F, std=F ** -0.5 / 2)})
    return w


def stored(name: str, arr: np.ndarray, qtype: str):
    """(array or raw bytes, ggml type or None) as the file stores ``name`` in a ``qtype`` file:
    matrices and expert stacks in qtype, the router and norms F32 (as llama.cpp does)."""
    if arr.ndim == 1 or name.endswith("ffn_gate_inp.weight") or qtype == "F32":
        return arr, None
    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F16":
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, t), t


def write_qwen3moe(path, weights: dict, qtype: str = "F32", drop=(), meta_drop=()) -> dict:
    """Write the file; returns the weights as the file holds them (dequantized by gguf, float32)."""
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    keys = {"block_count": L, "context_length": 256, "embedding_length": H, "feed_forward_length": 96,
            "attention.head_count": NH, "attention.head_count_kv": NKV, "attention.key_length": D,
            "attention.value_length": D, "expert_count": E, "expert_used_count": K,
            "expert_feed_forward_length": F}
    for key, value in keys.items():
        if key not in meta_drop:
            w.add_uint32(f"qwen3moe.{key}", value)
    w.add_float32("qwen3moe.rope.freq_base", BASE)
    w.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", EPS)
    tok = Tokenizer.synthetic(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    held = {}
    for name, arr in weights.items():
        if name in drop:
            continue
        data, t = stored(name, arr, qtype)
        if t is None:
            w.add_tensor(name, data)
            held[name] = data.astype(np.float32)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=t)
            held[name] = gguf.quants.dequantize(data, t).reshape(arr.shape)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return held


# ----------------------------------------------------------------------------- reference

def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _neox_rope(x, pos):
    half = x.shape[-1] // 2
    ang = pos[:, None].double() * BASE ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)


def reference_logits(w: dict, ids: list[int], rope=_neox_rope) -> torch.Tensor:
    """Qwen3-MoE forward in float64 on the file's (dequantized) weights: logits [T, V]."""
    t = {k: torch.from_numpy(np.array(v)).double() for k, v in w.items()}
    T = len(ids)
    pos = torch.arange(T)
    x = t["token_embd.weight"][torch.tensor(ids)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        p = f"blk.{i}."
        h = _rms(x, t[p + "attn_norm.weight"])
        q = _rms((h @ t[p + "attn_q.weight"].T).view(T, NH, D), t[p + "attn_q_norm.weight"])
        k = _rms((h @ t[p + "attn_k.weight"].T).view(T, NKV, D), t[p + "attn_k_norm.weight"])
        v = (h @ t[p + "attn_v.weight"].T).view(T, NKV, D)
        q, k = rope(q, pos), rope(k, pos)
        k, v = k.repeat_interleave(NH // NKV, 1), v.repeat_interleave(NH // NKV, 1)
        s = torch.einsum("thd,shd->hts", q, k) * D ** -0.5
        a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        x = x + torch.einsum("hts,shd->thd", a, v).reshape(T, -1) @ t[p + "attn_output.weight"].T
        h = _rms(x, t[p + "ffn_norm.weight"])
        probs = torch.softmax(h @ t[p + "ffn_gate_inp.weight"].T, -1)
        gw, ge = probs.topk(K, -1)
        gw = gw / gw.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for r in range(T):
            for j in range(K):
                e = int(ge[r, j])
                act = torch.nn.functional.silu(t[p + "ffn_gate_exps.weight"][e] @ h[r]) * (t[p + "ffn_up_exps.weight"][e] @ h[r])
                y[r] += gw[r, j] * (t[p + "ffn_down_exps.weight"][e] @ act)
        x = x + y
    return _rms(x, t["output_norm.weight"]) @ t["output.weight"].T


def _adjacent_rope(x, pos):
    """The wrong rotation for this file (pairs (2i, 2i+1)): the test must see the difference."""
    half = x.shape[-1] // 2
    ang = pos[:, None].double() * BASE ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)


def exactllm_logits(llm: LLM, seqs) -> list[torch.Tensor]:
    model = llm.engine.runner.model
    ids, pos, batch, n_blocks = _packed_batch(seqs, 16, "cpu")
    kv = model.allocate_kv(n_blocks, 16, model.dtype, "cpu")
    with torch.inference_mode():
        logits = model.logits(model(ids, pos, batch, kv)).double()
    return list(logits.split([len(s) for s in seqs]))


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def weights():
    return make_weights()


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory, weights):
    path = tmp_path_factory.mktemp("qwen3moe") / "tiny-f32.gguf"
    return path, write_qwen3moe(path, weights)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_logits_match_float64_reference(tmp_path, weights, qtype):
    path = tmp_path / f"tiny-{qtype}.gguf"
    held = write_qwen3moe(path, weights, qtype)
    llm = LLM(str(path))
    cfg = llm.source.config
    assert (cfg.arch, cfg.n_experts, cfg.top_k, cfg.expert_ffn, cfg.head_dim) == ("moe", E, K, F, D)
    got = exactllm_logits(llm, SEQS)
    for seq, lg in zip(SEQS, got):
        ref = reference_logits(held, seq)
        assert ref.std() > 1.0  # logits are not degenerate
        err = (lg - ref).abs().max().item()
        assert err < LOGIT_TOL, f"{qtype}: max |logit diff| {err}"
        # ... and a reference with the other RoPE pairing is far off: the permutation matters
        assert (reference_logits(held, seq, _adjacent_rope) - ref).abs().max().item() > 100 * LOGIT_TOL


def test_generate_through_llm(f32_file):
    path, held = f32_file
    llm = LLM(str(path))
    prompt = SEQS[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0]
    seq = list(prompt)
    for _ in range(3):  # greedy continuation of the reference
        seq.append(int(reference_logits(held, seq)[-1].argmax()))
    assert out.token_ids == seq[len(prompt):]


def test_expert_parallel_ep2_matches_ep1(f32_file):
    path, _ = f32_file
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=True)
    ref = LLM(str(path)).generate(SEQS, params, use_tqdm=False)
    with LLM(str(path), tensor_parallel_size=2, enable_expert_parallel=True) as llm:
        got = llm.generate(SEQS, params, use_tqdm=False)
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def _one_line_error(path, fragment):
    with pytest.raises(ModelFileError) as exc:
        load_gguf(str(path))
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and fragment in msg, msg


@pytest.mark.parametrize("tensor", ["blk.1.ffn_down_exps.weight", "blk.0.attn_k_norm.weight"])
def test_missing_tensor_is_named(tmp_path, weights, tensor):
    path = tmp_path / "missing.gguf"
    write_qwen3moe(path, weights, drop={tensor})
    _one_line_error(path, f"missing tensor {tensor}")


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_wrong_expert_shape_is_named(tmp_path, weights, qtype):
    bad = dict(weights)
    bad["blk.0.ffn_up_exps.weight"] = weights["blk.0.ffn_up_exps.weight"][: E - 1]  # one expert short
    path = tmp_path / f"short-{qtype}.gguf"
    write_qwen3moe(path, bad, qtype)
    _one_line_error(path, "tensor blk.0.ffn_up_exps.weight has shape")


def test_missing_expert_metadata_is_named(tmp_path, weights):
    path = tmp_path / "nometa.gguf"
    write_qwen3moe(path, weights, meta_drop={"expert_used_count"})
    _one_line_error(path, "missing metadata key qwen3moe.expert_used_count")


def test_unsupported_expert_type_is_named(tmp_path, weights):
    path = tmp_path / "q5.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    raw = gguf.quants.quantize(weights["blk.0.ffn_gate_exps.weight"], gguf.GGMLQuantizationType.Q5_0)
    w.add_tensor("blk.0.ffn_gate_exps.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    for key, value in {"block_count": L, "embedding_length": H, "attention.head_count": NH,
                       "expert_count": E, "expert_used_count": K, "expert_feed_forward_length": F}.items():
        w.add_uint32(f"qwen3moe.{key}", value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    _one_line_error(path, "tensor blk.0.ffn_gate_exps.weight has unsupported type Q5_0")


def test_requantize_keeps_expert_stacks_and_router(tmp_path, f32_file):
    from exactllm.formats.gguf_write import requantize_gguf
    src, held = f32_file
    dst = str(tmp_path / "tiny-q8_0.gguf")
    requantize_gguf(str(src), dst, "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(dst, "r").tensors}
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    assert gate.tensor_type.name == "Q8_0" and list(gate.shape) == [H, F, E]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type.name == "F32"
    # the rewritten file holds the stored (NeoX) row order: its logits are the source's within Q8_0 error
    q8 = {name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(held[name].shape)
          for name, t in tensors.items()}
    got = exactllm_logits(LLM(dst), SEQS[:1])[0]
    assert (got - reference_logits(q8, SEQS[0])).abs().max().item() < LOGIT_TOL
    assert (got - reference_logits(held, SEQS[0])).abs().max().item() < 0.5


def test_cli_info_shows_the_experts(f32_file, capsys):
    from exactllm.cli import main
    path, _ = f32_file
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"experts:       {E}, top-{K} per token, expert ffn {F}" in out
    assert "architecture:  moe" in out
