"""What the HTTP process spends per request and per streamed token under C streaming clients.

    PYTHONPATH=. python bench/http_overhead.py [--clients 64] [--rounds 4] [--tokens 1 64] \
        [--repeats 3] [--decode-ms 1.5] [--prompt-ms 3] [--client-procs 2] [--api-servers 2]

The server runs in this process as `exactllm serve` runs it (create_app on an EngineClient under
uvicorn, the same thread switch interval); its engine process runs random:llama-mini with the
model replaced by a stand-in (``fake_steps``) that sleeps about an H100 TinyLlama step and picks
tokens by formula, so the engine costs almost no CPU and the HTTP process is what is measured.
Admission behaves as on a GPU (a window from the measured prompt/decode step times).
C closed-loop clients (a lean raw-socket load generator, in --client-procs processes) each
send `rounds` streaming completions of T tokens (greedy, ignore_eos, logprobs=0, as
server_load.py does). Per level: this process's CPU seconds (getrusage: the uvicorn thread, the
sender thread) per request and per streamed token, SSE chunks received, and on the engine side
the prompt steps per round and how far apart each round's 64 requests reached it.
Per-request cost: CPU at T=1 / requests; per-token cost: the slope between the two T values.
Repeats of each T alternate; medians are reported. Writes bench/results/http_overhead.json.
With --api-servers N > 1 the HTTP side is N front-end processes as `exactllm serve --api-servers N`
runs them (server/api_servers.py), and their CPU (from /proc) is what is counted.
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = "random:llama-mini"


# ------------------------------------------------------------------ in the engine process
def fake_steps(engine, decode_s: float, prompt_s: float) -> None:
    """EngineSpec.setup: the model's forward replaced by a sleep (prompt_s for a step that
    computes prompt tokens, else decode_s) and a token picked by formula, as spread over the
    vocabulary as a random model's; Admission is told the runner has graphs, as on a GPU."""
    vocab = engine.model_config.vocab
    adds = engine.add_times = []
    add = engine.add_request

    def step(chunks, randoms, forward=None):
        time.sleep(prompt_s if any(ch.length > 1 for ch in chunks) else decode_s)
        return [(ch.seq, (ch.seq.seq_id * 7919 + ch.seq.num_tokens * 104729) % vocab, -1.25)
                for ch in chunks if ch.completes]

    def add_request(*args, **kw):
        adds.append(time.monotonic())
        return add(*args, **kw)

    engine.runner.step = step
    engine.runner.graphs = "fake"  # only Admission looks at it (no async scheduling on CPU)
    engine.add_request = add_request


def take_adds(core) -> list[float]:
    """Engine-process times of every add since the last call (EngineClient.call)."""
    adds = list(core.engine.add_times)
    core.engine.add_times.clear()
    return adds


def prompt_steps(core) -> int:
    """Steps so far that computed prompt tokens (EngineClient.call)."""
    return core.admission.steps["prompt"][0]


# ------------------------------------------------------------------ the load generator
async def lean_client(port: int, bodies: list[bytes], out: list) -> None:
    """One keep-alive connection sending its requests one after another; the response is read
    as raw bytes (no HTTP or JSON parsing beyond finding the end), so that on a 2-core machine
    the load generator takes as little CPU from the server as it can."""
    import asyncio
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for body in bodies:
        t0 = time.perf_counter()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        buf, first, chunks = b"", None, 0
        while not buf.endswith(b"0\r\n\r\n") or b"data: [DONE]" not in buf:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError("connection closed")
            if first is None and b"data: " in data:
                first = time.perf_counter()
            chunks += data.count(b"data: ")
            buf = buf[-16:] + data if b"data: [DONE]" not in buf else buf + data
        assert buf.startswith(b"HTTP/1.1 200") or first is not None, buf[:200]
        out.append({"ttft": first - t0, "chunks": chunks - 1})
    writer.close()


def client_process(port: int, work: list[list[bytes]], go: float) -> dict:
    import asyncio

    async def main():
        out = []
        await asyncio.sleep(max(0.0, go - time.monotonic()))
        t0 = time.monotonic()
        await asyncio.gather(*(lean_client(port, bodies, out) for bodies in work))
        return {"start": t0, "end": time.monotonic(), "results": out}
    return asyncio.run(main())


# ------------------------------------------------------------------ here
def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class FrontEnds:
    """`exactllm serve --api-servers N` as its processes run it (api_servers.api_server_main on
    sockets sharing one port), over an engine process with the stand-in steps; one more pipe
    goes to a control client here (EngineClient.call for take_adds, prompt_steps)."""

    def __init__(self, spec, n: int, max_queue: int, switch_interval_s: float):
        from exactllm.server.api_servers import FrontEndOptions, api_server_main, listen_sockets
        from exactllm.server.engine_client import EngineClient, EngineLink, EngineProcess
        from exactllm.server.runner import free_port
        self.engine = EngineProcess(spec, n + 1)
        ctx = multiprocessing.get_context("spawn")
        in_flight = ctx.Value("q", 0)
        self.port = free_port()
        socks = listen_sockets("127.0.0.1", self.port, n)
        opts = FrontEndOptions(MODEL, (), None, max_queue, 30.0, switch_interval_s, "warning", os.getpid())
        self.procs = [ctx.Process(target=api_server_main, args=(EngineLink(self.engine.conns[i], self.engine.info,
                                                                           in_flight, n + 1), socks[i], opts))
                      for i in range(n)]
        for p in self.procs:
            p.start()
        for sock in socks:
            sock.close()
        self.control = EngineClient(max_queue=max_queue, link=EngineLink(self.engine.conns[n], self.engine.info,
                                                                         in_flight, n + 1))
        import asyncio
        import threading
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.loop.call_soon_threadsafe(self.control.attach, self.loop)
        import httpx
        ok, deadline = 0, time.monotonic() + 120
        while ok < 4 * n:  # new connections land on every front end by now (in all likelihood)
            try:
                ok += httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the front ends did not start"
                time.sleep(0.2)

    def cpu(self) -> float:
        """CPU seconds of the front-end processes so far."""
        total = 0.0
        for p in self.procs:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(60)
        self.loop.call_soon_threadsafe(self.control.detach)
        time.sleep(0.1)
        self.control.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.engine.proc.join(30)
        self.engine.stop()


def run_level(pool, procs: int, port: int, client, prompts: list[str], c: int, tokens: int,
              cpu_seconds=cpu_seconds) -> dict:
    bodies = [json.dumps({"model": MODEL, "prompt": p, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                          "stream": True, "logprobs": 0}).encode() for p in prompts]
    clients = [bodies[k::c] for k in range(c)]
    procs = min(procs, c)
    client.call(take_adds)
    steps0 = client.call(prompt_steps)
    go = time.monotonic() + 0.5
    cpu0 = cpu_seconds()
    futs = [pool.submit(client_process, port, clients[p::procs], go) for p in range(procs)]
    parts = [f.result() for f in futs]
    cpu = cpu_seconds() - cpu0
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    results = [r for p in parts for r in p["results"]]
    adds = sorted(client.call(take_adds))
    rounds = len(prompts) // c
    spread = [adds[(i + 1) * c - 1] - adds[i * c] for i in range(rounds)]
    return {"wall_s": wall, "cpu_s": cpu, "requests": len(results), "tokens": len(prompts) * tokens,
            "chunks": sum(r["chunks"] for r in results),
            "ttft_p50_ms": statistics.median(r["ttft"] for r in results) * 1e3,
            "prompt_steps_per_round": (client.call(prompt_steps) - steps0) / rounds,
            "arrival_spread_ms": statistics.median(spread) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs=2, default=[1, 64], help="two completion lengths (slope)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-ms", type=float, default=1.5, help="stand-in decode step (H100 TinyLlama ~1.3-1.5)")
    ap.add_argument("--prompt-ms", type=float, default=3.0, help="stand-in prompt step (H100 graph ~2.4-3)")
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--switch-interval-ms", type=float, default=0.05, help="as `exactllm serve`")
    ap.add_argument("--api-servers", type=int, default=1,
                    help="N > 1: the HTTP side as `exactllm serve --api-servers N` runs it (N processes; their "
                         "CPU is measured), not in this process")
    ap.add_argument("--out", default=os.path.join("bench", "results", "http_overhead.json"))
    args = ap.parse_args()

    from exactllm.server.app import create_app
    from exactllm.server.engine_client import EngineClient
    from exactllm.server.engine_core import EngineSpec
    from exactllm.server.runner import ServerThread

    pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    for f in [pool.submit(time.sleep, 0.5) for _ in range(args.client_procs)]:
        f.result()
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    setup = functools.partial(fake_steps, decode_s=args.decode_ms / 1e3, prompt_s=args.prompt_ms / 1e3)
    spec = EngineSpec(MODEL, max_num_seqs=max(64, args.clients), setup=setup)
    c = args.clients
    runs = {t: [] for t in args.tokens}
    if args.api_servers > 1:
        fronts = FrontEnds(spec, args.api_servers, 4096, args.switch_interval_ms / 1e3)
        client, port, cpu_fn, stop = fronts.control, fronts.port, fronts.cpu, fronts.close
    else:
        client = EngineClient(spec, max_queue=4096)
        srv = ServerThread(create_app(client, MODEL)).__enter__()
        port, cpu_fn, stop = srv.port, cpu_seconds, lambda: srv.__exit__(None, None, None)
    try:
        warm = [f"warm {i}: Write one sentence about the history of tea in China." for i in range(c)]
        run_level(pool, args.client_procs, port, client, warm, c, 4, cpu_fn)
        for rep in range(args.repeats):
            for t in args.tokens:
                prompts = [f"{i}/{rep}/{t}: Write one sentence about the history of tea in China."
                           for i in range(c * args.rounds)]
                r = run_level(pool, args.client_procs, port, client, prompts, c, t, cpu_fn)
                runs[t].append(r)
                print(f"T={t} repeat {rep}: wall {r['wall_s']:.2f} s, HTTP CPU {r['cpu_s']:.2f} s "
                      f"({r['cpu_s'] / r['requests'] * 1e3:.2f} ms/request), chunks {r['chunks']}, "
                      f"TTFT p50 {r['ttft_p50_ms']:.1f} ms, prompt steps/round {r['prompt_steps_per_round']:.1f}, "
                      f"arrival spread {r['arrival_spread_ms']:.1f} ms", flush=True)
    finally:
        stop()
    pool.shutdown()

    med = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()}
    t1, t2 = args.tokens
    n = med[t1]["requests"]
    per_req = med[t1]["cpu_s"] / n
    per_tok = (med[t2]["cpu_s"] - med[t1]["cpu_s"]) / (n * (t2 - t1))
    per_chunk = (med[t2]["cpu_s"] - med[t1]["cpu_s"]) / max(1, med[t2]["chunks"] - med[t1]["chunks"])
    print(f"\nHTTP process(es): {args.api_servers}, {c} streaming clients x {args.rounds} rounds, "
          f"{platform.machine()} x{os.cpu_count()} CPU")
    print(f"{'T':>4} {'wall s':>7} {'CPU s':>7} {'chunks':>7} {'TTFT p50':>9} {'prompt st/round':>16} {'spread ms':>10}")
    for t in args.tokens:
        m = med[t]
        print(f"{t:>4} {m['wall_s']:>7.2f} {m['cpu_s']:>7.2f} {m['chunks']:>7.0f} {m['ttft_p50_ms']:>7.1f}ms "
              f"{m['prompt_steps_per_round']:>16.1f} {m['arrival_spread_ms']:>10.1f}")
    print(f"per request (T={t1}): {per_req * 1e3:.3f} ms CPU; per token: {per_tok * 1e6:.1f} us; "
          f"per extra SSE chunk: {per_chunk * 1e6:.1f} us")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{platform.machine()} x{os.cpu_count()}",
              "args": vars(args), "medians": med, "runs": runs, "cpu_ms_per_request": per_req * 1e3,
              "cpu_us_per_token": per_tok * 1e6, "cpu_us_per_chunk": per_chunk * 1e6}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
