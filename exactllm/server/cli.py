"""`exactllm serve`: the OpenAI-compatible server on uvicorn."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", "-m", default=None,
                   help="a .gguf path or random:<preset>[?quant=q4_0]; default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: from --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--numerics", default="fast", choices=["fast", "batch_invariant", "tp_invariant"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel ranks: worker processes on this host (one GPU each on CUDA)")
    p.add_argument("--api-key", default=os.environ.get("EXACTLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $EXACTLLM_API_KEY; none: open)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences the engine batches at once")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences admitted beyond --max-num-seqs before new requests get 429")
    p.add_argument("--admission-window-ms", type=float, default=None,
                   help="while the engine decodes, new requests wait up to this long to be added together "
                        "(default: automatic, the measured cost of an eager prompt step on CUDA, 0 on CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to let in-flight requests finish after SIGTERM")
    p.add_argument("--switch-interval-ms", type=float, default=0.05,
                   help="the HTTP process's thread switch interval (sys.setswitchinterval): how long a "
                        "command for the engine process may wait for the interpreter while the event loop is busy")
    p.add_argument("--api-servers", type=int, default=1,
                   help="HTTP front-end processes sharing the port (SO_REUSEPORT) and the one engine process: "
                        "request parsing and streaming spread over them (server/api_servers.py)")
    p.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                   help="uvicorn's HTTP parser (auto: httptools where installed, else h11)")
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"],
                   help="uvicorn's event loop (auto: uvloop where installed, else asyncio)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    import uvicorn

    from exactllm.server.app import create_app
    from exactllm.server.engine_client import EngineClient, EngineStartError
    from exactllm.server.engine_core import EngineSpec
    from exactllm.server.runner import DrainingServer, served_model_name

    # Until uvicorn takes over the signals (while the engine process starts), SIGTERM exits at
    # once (the engine process follows); after a drain uvicorn re-raises the signal it handled,
    # which must then not turn into an error exit.
    holder = {}

    def on_term(sig, frame):
        server = holder.get("server")
        if server is None or not server.should_exit:
            raise SystemExit(128 + sig)

    signal.signal(signal.SIGTERM, on_term)
    # The thread that writes commands to the engine process needs the interpreter while the event
    # loop parses requests; at Python's default 5 ms an arrival could wait that long to be sent.
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    window = None if args.admission_window_ms is None else args.admission_window_ms / 1e3
    spec = EngineSpec(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed, numerics=args.numerics,
                      tp=args.tp, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
                      admission_window=window, log_level=args.log_level)
    name = args.served_model_name or served_model_name(args.model)
    aliases = (args.model,) if args.model and args.model != name else ()
    if args.api_servers > 1:
        from exactllm.server.api_servers import FrontEndOptions, serve
        opts = FrontEndOptions(name, aliases, args.api_key, args.max_queue, args.drain_timeout,
                               args.switch_interval_ms / 1e3, args.log_level, os.getpid(), args.http, args.loop)
        return serve(spec, args.api_servers, args.host, args.port, opts)
    try:
        client = EngineClient(spec, max_queue=args.max_queue)
    except EngineStartError as exc:
        print(f"exactllm serve: the engine could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    app = create_app(client, name, api_key=args.api_key, aliases=aliases)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout, http=args.http, loop=args.loop)
    print(f"exactllm: serving '{name}' on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr, flush=True)
    holder["server"] = server = DrainingServer(config)
    try:
        server.run()
    finally:
        client.close()
    return 0
