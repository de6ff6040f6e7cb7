"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import weakref
from typing import Iterator, Sequence as Seq

from exactllm.config import EngineConfig, parse_dtype
from exactllm.engine.llm_engine import LLMEngine, RequestOutput
from exactllm.models.loader import resolve_model
from exactllm.numerics import resolve
from exactllm.sampling_params import SamplingParams


def run_generate(engine: LLMEngine, prompts: list, params: list[SamplingParams], use_tqdm: bool,
                 multi_modal: list | None = None) -> list[RequestOutput]:
    """Submit every prompt, step the engine until all finish; outputs in prompt order.
    multi_modal: per prompt, None or its MultiModalPrompt (images placed, see exactllm/multimodal.py)."""
    seqs = []
    for p, sp, mm in zip(prompts, params, multi_modal or [None] * len(prompts)):
        if mm is None:
            seqs.append(engine.add_request(p, sp))
        else:
            seqs.append(engine.add_request(mm.token_ids, sp, mm.modality_ids, mm.vision_embeds))
            seqs[-1].prompt = p if isinstance(p, str) else None
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(seqs), desc="generate", unit="req", dynamic_ncols=True)
    done = 0
    while engine.has_work():
        engine.step()
        if bar is not None:
            now = sum(s.finished for s in seqs)
            bar.update(now - done)
            done = now
    if bar is not None:
        bar.close()
    return [engine.output(s) for s in seqs]


class LLM:
    """Load a model and generate from it.

    model: None (the embedded SmolLM2-135M-Instruct), a .gguf path, or "random:<preset>[?quant=q4_0&seed=N]".
    numerics: "fast" | "batch_invariant" | "tp_invariant" (see exactllm.numerics).
    tensor_parallel_size: N > 1 shards the model over N ranks (gloo on CPU, NCCL with one GPU per
      rank): this process is rank 0 and N-1 worker processes are started once (engine/tp_workers.py);
      close() (or a with block, or interpreter exit) stops them. Under torchrun every process of
      the job is one rank and must make the same calls.

    Mixture-of-Experts models (random:moe-mini, random:qwen3-vl-30b-a3b; see models/moe.py):
    enable_expert_parallel: shard the experts over the tensor_parallel_size ranks (required for
      a MoE model at tensor_parallel_size > 1; attention stays tensor-parallel).
    load_balancer: "none" | "realb" (overloaded, vision-heavy ranks run their experts in low precision,
      realb_low_precision "fp8", "fp4" (weight-only MXFP4) or "nvfp4" (weight-only NVFP4; Hopper
      has no FP4 tensor cores, so FP4 weights are dequantized in the kernel), for the step) | "eplb" (redundant copies of hot experts from a sliding window of past loads).
    realb_modality_threshold / realb_overload_threshold / realb_low_precision / realb_resident:
      the ReaLB knobs (balance/realb.py ReaLBConfig); eplb_redundant_experts / eplb_window /
      eplb_period: the EPLB ones (models/moe.py MoEOptions).
    async_scheduling: prepare each decode step while the one before runs on the device (same
      tokens; see engine/llm_engine.py); None: on for CUDA with tensor_parallel_size 1.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", dtype=None, seed: int = 0,
                 numerics: str = "fast", tensor_parallel_size: int = 1, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096, block_size: int = 16, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 enable_expert_parallel: bool = False, load_balancer: str = "none",
                 realb_modality_threshold: float = 0.7, realb_overload_threshold: float = 0.2,
                 realb_low_precision: str = "fp8", realb_resident: bool = False,
                 eplb_redundant_experts: int | None = None, eplb_window: int = 8, eplb_period: int = 1,
                 async_scheduling: bool | None = None):
        resolve(numerics)  # validate early
        if tensor_parallel_size < 1 or tensor_parallel_size & (tensor_parallel_size - 1):
            raise ValueError(f"tensor_parallel_size must be a power of two >= 1, got {tensor_parallel_size}")
        from exactllm.balance import ReaLBConfig
        from exactllm.models.moe import MoEOptions
        moe = MoEOptions(enable_expert_parallel, load_balancer,
                         ReaLBConfig(overload_threshold=realb_overload_threshold,
                                     modality_threshold=realb_modality_threshold,
                                     low_precision=realb_low_precision, resident=realb_resident),
                         eplb_redundant_experts, eplb_window, eplb_period)
        torch_dtype = parse_dtype(dtype, device)
        source = resolve_model(model, torch_dtype)
        moe.validate(source.config, tensor_parallel_size)
        if max_model_len:
            source.config = source.config.__class__(**{**source.config.__dict__, "max_context": max_model_len})
        cfg = EngineConfig(device=device, dtype=torch_dtype, numerics=numerics, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                           num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_memory_utilization,
                           tensor_parallel_size=tensor_parallel_size, seed=seed, async_scheduling=async_scheduling)
        if source.config.n_experts:
            cfg.extra["model_kwargs"] = {"moe": moe}
        cfg_model = source.config
        if cfg_model.n_heads % tensor_parallel_size or cfg_model.n_kv_heads % tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size {tensor_parallel_size} must divide the attention heads "
                             f"({cfg_model.n_heads} query, {cfg_model.n_kv_heads} key/value)")
        self.source, self.config = source, cfg
        self.tokenizer = source.tokenizer
        self.pool = None
        if tensor_parallel_size == 1:
            self.engine = LLMEngine(source, cfg)
        else:
            from exactllm.distributed.launch import under_torchrun
            from exactllm.engine import tp_workers
            if under_torchrun():
                self.engine = tp_workers.spmd_engine(source, cfg)
            else:
                self.pool, self.engine = tp_workers.start_pool(source, cfg)
                weakref.finalize(self, self.pool.close)

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (no-op without them); the LLM is unusable after."""
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: "str | list[int] | Seq[str | list[int]]",
                 sampling_params: "SamplingParams | Seq[SamplingParams] | None" = None,
                 use_tqdm: bool = True, multi_modal_data: "dict | Seq[dict | None] | None" = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (continuous batching); outputs in prompt order.

        multi_modal_data: per prompt None or {"image": images} (a dict alone applies to a single
        prompt); the images' patches go before the prompt's tokens as vision tokens. An image is
        a tensor [N, hidden] of patch embeddings, an int N (synthetic image of N patches) or
        {"patches": N, "kind": k, "seed": s}; see exactllm/multimodal.py. MoE models only."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        mm = self._place_images(list(prompts), multi_modal_data)
        return run_generate(self.engine, list(prompts), params, use_tqdm, mm)

    def _place_images(self, prompts: list, data) -> list | None:
        if data is None:
            return None
        from exactllm.multimodal import place_images
        cfg = self.source.config
        if not cfg.n_experts:
            raise ValueError("multi_modal_data needs a MoE model (modality ids feed its MoE layers)")
        data = [data] if isinstance(data, dict) else list(data)
        if len(data) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(data)} multi_modal_data entries")
        out = []
        for p, d in zip(prompts, data):
            if d is None:
                out.append(None)
                continue
            text = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            out.append(place_images(text, d, cfg.hidden, cfg.vocab))
        return out

    def stream(self, prompt: "str | list[int]", sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of one completion as tokens arrive (never splitting a UTF-8 character)."""
        params = sampling_params or SamplingParams()
        seq = self.engine.add_request(prompt, params)
        detok = self.tokenizer.stream()
        # Hold back text that could be the start of a stop string; the engine's final text decides.
        hold = max((len(stop) for stop in params.stop), default=1) - 1
        text, emitted, seen = "", 0, 0
        while not seq.finished:
            self.engine.step()
            for token in seq.output_token_ids[seen:]:
                text += detok.push(token)
            seen = len(seq.output_token_ids)
            if not seq.finished and len(text) - hold > emitted:
                yield text[emitted:len(text) - hold]
                emitted = len(text) - hold
        if len(seq.text) > emitted:
            yield seq.text[emitted:]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> RequestOutput:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt], sampling_params, use_tqdm=use_tqdm)[0]
