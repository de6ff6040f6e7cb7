"""Command line: exactllm generate | chat | quantize | info | serve | check-determinism | bench."""
from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf path or random:<preset>[?quant=q4_0]; default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--numerics", default="fast", choices=["fast", "batch_invariant", "tp_invariant"])
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _llm(args):
    from exactllm import LLM
    return LLM(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
               numerics=args.numerics, tensor_parallel_size=args.tp)


def _params(args):
    from exactllm import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=args.stop)


def cmd_generate(args) -> int:
    import time
    llm = _llm(args)
    params = _params(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat_template:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    start = time.perf_counter()
    n = 0
    for piece in llm.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    out = llm.engine.stats["generation_tokens"]
    print(f"[{out} tokens in {elapsed:.2f} s: {out / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    llm = _llm(args)
    params = _params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("exactllm chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = []
        for piece in llm.stream(prompt, params):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_quantize(args) -> int:
    from exactllm.formats.gguf_write import requantize_gguf
    counts = requantize_gguf(args.input, args.output, args.type)
    print(f"wrote {args.output}: {counts}")
    return 0


def cmd_info(args) -> int:
    from collections import Counter

    from exactllm.config import kv_cache_bytes
    from exactllm.formats.gguf import load_gguf
    from exactllm.formats.quant import QuantWeight
    m = load_gguf(args.path)
    cfg = m.config
    types = Counter(w.qtype.upper() if isinstance(w, QuantWeight) else str(w.dtype).replace("torch.", "")
                    for w in m.weights.values())
    size = sum(w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size() for w in m.weights.values())
    print(f"file:          {m.path}")
    print(f"name:          {cfg.name}")
    print(f"architecture:  {cfg.arch}: {cfg.n_layers} layers, hidden {cfg.hidden}, heads {cfg.n_heads}/{cfg.n_kv_heads} "
          f"(q/kv), head_dim {cfg.head_dim}, ffn {cfg.ffn}, vocab {cfg.vocab}")
    if cfg.n_experts:
        print(f"experts:       {cfg.n_experts}, top-{cfg.top_k} per token, expert ffn {cfg.expert_ffn}")
    print(f"context:       {cfg.max_context} tokens, rope base {cfg.rope_base:g}, rms eps {cfg.norm_eps:g}")
    print(f"tensors:       {len(m.weights)} ({', '.join(f'{k} x{v}' for k, v in sorted(types.items()))}), "
          f"{size / 2**20:.1f} MiB")
    print(f"KV cache:      {kv_cache_bytes(cfg, cfg.max_context, __import__('torch').float16) / 2**20:.1f} MiB "
          f"per {cfg.max_context}-token sequence in fp16")
    print(f"tokenizer:     {m.metadata.get('tokenizer.ggml.model')} ({m.metadata.get('tokenizer.ggml.pre', '-')}), "
          f"chat template: {'yes' if m.metadata.get('tokenizer.chat_template') else 'no'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exactllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (streams tokens)")
    g.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt in the model's chat template")
    _add_model_args(g)
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system message")
    _add_model_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    q = sub.add_parser("quantize", help="requantize a GGUF file (loads in llama.cpp)")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("--type", required=True, choices=["q4_0", "q4_1", "q8_0"])
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", help="describe a GGUF model file")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)

    from exactllm.bench_cli import add_parser as add_bench_parser
    from exactllm.check_determinism import add_parser as add_check_parser
    from exactllm.server.cli import add_serve_parser
    add_serve_parser(sub)
    add_check_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"exactllm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
