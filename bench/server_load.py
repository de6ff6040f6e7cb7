"""Load on the OpenAI server: requests/s, TTFT and inter-token latency at 1, 8, 64 streaming clients,
and the server's overhead against offline LLM.generate on the same work.

    PYTHONPATH=. python bench/server_load.py [--model random:tinyllama-1.1b] [--device cuda] \
        [--concurrency 1 8 64] [--rounds 3] [--max-tokens 8]

Each level runs C closed-loop clients, each sending `rounds` streaming requests one after
another (greedy, ignore_eos, exactly max_tokens tokens each). The offline baseline runs the
same prompts through LLM.generate in groups of C, one group after another, which is the batch
shape the server sees. The server runs in its own process (`exactllm serve`), idle while the
offline engine (in this process) runs. Server and offline runs alternate `--repeats` times per
level and the fastest wall time of each is compared, so that load from other processes on a
shared machine biases neither side; latency percentiles pool all repeats.
Writes bench/results/server_load_<device>.json and .png and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exactllm.server.runner import free_port, served_model_name  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def prompts_for(level: int, n: int) -> list[str]:
    # The request number leads, so prompts do not share cached prefix blocks across requests.
    return [f"{i}/{level}: Write one sentence about the history of tea in China." for i in range(n)]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    stamps, done = [], False
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            k = len(chunk["choices"][0]["logprobs"]["tokens"])
            if k:
                stamps.append((time.perf_counter(), k))
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    ntok = sum(k for _, k in stamps)
    itl = [(b - a) / k for (a, _), (b, k) in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0][0] - t0, "itl": itl, "tokens": ntok, "latency": time.perf_counter() - t0}


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    queue = list(reversed(prompts))
    results = []

    async def client_loop(client):
        while queue:
            body = {"model": model, "prompt": queue.pop(), "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "logprobs": 0}
            results.append(await stream_one(client, url, body))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    assert tokens == len(prompts) * max_tokens, (tokens, len(prompts), max_tokens)
    return {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "output_tokens_per_s": tokens / wall, "ttft": [r["ttft"] for r in results],
            "itl": [x for r in results for x in r["itl"]]}


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "exactllm", "serve", "--port", str(port), "--device", args.device,
           "--numerics", args.numerics, "--log-level", "warning", "--max-queue", "4096"]
    if args.model:
        cmd += ["--model", args.model]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not come up")
        time.sleep(0.5)


class Offline:
    """LLM.generate over the same prompts, in groups of C (the batch shape C clients make).

    It runs on one worker thread, as the server's engine does: on CPU, torch's OpenMP pool
    behaves differently when driven from a non-main thread (on a busy 2-core machine we saw a
    single request run 5-7x faster from a worker thread than from the main thread), and the
    comparison must be about the server, not about which thread drives torch."""

    def __init__(self, args):
        from exactllm import LLM, SamplingParams
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="offline-engine")
        self.llm = LLM(model=args.model, device=args.device, dtype=args.dtype, numerics=args.numerics)
        self.params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        self.max_tokens = args.max_tokens
        self.pool.submit(self.llm.generate, ["warm up"], self.params, use_tqdm=False).result()

    def run(self, prompts: list[str], c: int) -> float:
        return self.pool.submit(self._run, prompts, c).result()

    def _run(self, prompts: list[str], c: int) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(prompts), c):
            outs = self.llm.generate(prompts[i:i + c], self.params, use_tqdm=False)
            assert all(len(o.token_ids) == self.max_tokens for o in outs)
        return time.perf_counter() - t0


def merge(runs: list[dict]) -> dict:
    """Fastest wall time (and the rates from it); latency percentiles over every repeat."""
    best = min(runs, key=lambda r: r["wall_s"])
    ttft = [x for r in runs for x in r["ttft"]]
    itl = [x for r in runs for x in r["itl"]]
    return {"requests": best["requests"], "wall_s": best["wall_s"], "requests_per_s": best["requests_per_s"],
            "output_tokens_per_s": best["output_tokens_per_s"],
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "itl_mean_s": statistics.fmean(itl) if itl else float("nan"),
            "wall_s_all": [r["wall_s"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--numerics", default="fast")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=3, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="alternating server/offline runs per level")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/server_load_<device>.json)")
    args = ap.parse_args()

    work = {c: prompts_for(c, c * args.rounds) for c in args.concurrency}
    model = served_model_name(args.model)
    off = Offline(args)
    port = free_port()
    proc = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(run_level(url, model, ["warm up"], 1, args.max_tokens))
        for c, prompts in work.items():
            runs, walls = [], []
            for rep in range(args.repeats):
                runs.append(asyncio.run(run_level(url, model, prompts, c, args.max_tokens)))
                walls.append(off.run(prompts, c))
                print(f"C={c} repeat {rep}: server {runs[-1]['wall_s']:.2f} s, offline {walls[-1]:.2f} s", flush=True)
            s = merge(runs)
            rows.append({"concurrency": c, **s, "offline_wall_s": min(walls), "offline_wall_s_all": walls,
                         "overhead": s["wall_s"] / min(walls) - 1.0})
    finally:
        proc.terminate()
        proc.wait(120)

    device = args.device
    if device.startswith("cuda"):
        import torch
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU"
    result = {"model": model, "device": args.device, "device_name": device_name, "numerics": args.numerics,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "loadavg_end": os.getloadavg(), "levels": rows}

    hdr = (f"{'C':>4} {'req':>5} {'req/s':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
           f"{'ITL p50':>9} {'ITL p99':>9} {'server s':>9} {'offline s':>9} {'overhead':>9}")
    print(f"\n{model} on {device_name}, {args.max_tokens} tokens/request, numerics {args.numerics}")
    print(hdr)
    for r in rows:
        print(f"{r['concurrency']:>4} {r['requests']:>5} {r['requests_per_s']:>8.3f} {r['output_tokens_per_s']:>8.2f} "
              f"{r['ttft_p50_s'] * 1e3:>7.0f}ms {r['ttft_p99_s'] * 1e3:>7.0f}ms {r['itl_p50_s'] * 1e3:>7.0f}ms "
              f"{r['itl_p99_s'] * 1e3:>7.0f}ms {r['wall_s']:>9.2f} {r['offline_wall_s']:>9.2f} "
              f"{r['overhead'] * 100:>8.1f}%")

    out = args.out or os.path.join("bench", "results", f"server_load_{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, out[:-5] + ".png", f"{model} on {device_name}")
    print(f"wrote {out}")


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cs = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"),
                       ("itl_p50_s", "ITL p50"), ("itl_p99_s", "ITL p99")):
        a.plot(cs, [r[key] * 1e3 for r in rows], marker="o", label=label)
    a.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="ms", title="latency")
    a.legend()
    b.bar([str(c) for c in cs], [r["overhead"] * 100 for r in rows])
    b.set(xlabel="concurrent streaming clients", ylabel="% over offline LLM.generate", title="server overhead")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
