"""Load on the OpenAI server: requests/s, TTFT and inter-token latency at 1, 8, 64 streaming clients,
and the server's overhead against offline LLM.generate on the same work.

    PYTHONPATH=. python bench/server_load.py [--model random:tinyllama-1.1b] [--device cuda] \
        [--concurrency 1 8 64] [--rounds 3] [--max-tokens 8] [--client-procs 8] [--client-check] \
        [--serve-args="--admission-window-ms 20"] [--variant "one=" --variant "api4=--api-servers 4"]

Each level runs C closed-loop clients, each sending `rounds` streaming requests one after
another (greedy, ignore_eos, exactly max_tokens tokens each), spread over --client-procs load
generator processes (one asyncio loop parsing 64 streams cannot keep up with a GPU; measure the
load generator alone with --client-check). The clients parse HTTP and SSE by hand
(LeanConnection; --client httpx for the httpx client of earlier results, ~6x its CPU per event). The offline baseline runs the same prompts through
LLM.generate in groups of C, one group after another, which is the batch shape the server sees.
The server runs as processes of its own (`exactllm serve`: HTTP and engine), idle while the
offline engine (in this process) runs. Before each level both sides run one untimed group of C (CUDA graphs of the
level's batch sizes, kernels). Server and offline runs alternate `--repeats` times per level and
the fastest wall time of each is compared, so that load from other processes on a shared
machine biases neither side; latency percentiles pool all repeats. The server's own step
counters (/metrics) show how its time splits into prompt and decode steps; the CPU seconds of
its processes (HTTP front ends, engine) and of the load generator show who was busy.
--variant LABEL=FLAGS (repeatable) runs one server per variant (more `exactllm serve` flags
after --serve-args), all started up front and run in turn in every repeat, so that settings
are compared in the same run against the same offline runs.
Writes bench/results/server_load_<device>.json and .png and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

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


class StreamStats:
    """What a load-generator stream records of its SSE events, whichever client parsed them: the
    chunk count and each chunk's token count and arrival time, from t0 (just before the request)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.stamps, self.done, self.chunks = [], False, 0

    def event(self, data) -> None:
        """One event's payload, after "data: " (str or bytes)."""
        if data in ("[DONE]", b"[DONE]"):
            self.done = True
            return
        self.chunks += 1
        k = len(json.loads(data)["choices"][0]["logprobs"]["tokens"])
        if k:
            self.stamps.append((time.perf_counter(), k))

    def result(self) -> dict:
        if not self.done:
            raise RuntimeError("stream ended without [DONE]")
        stamps = self.stamps
        itl = [(b - a) / k for (a, _), (b, k) in zip(stamps, stamps[1:])]
        return {"ttft": stamps[0][0] - self.t0, "itl": itl, "tokens": sum(k for _, k in stamps),
                "chunks": self.chunks, "latency": time.perf_counter() - self.t0}


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    stats = StreamStats()
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                stats.event(line[6:])
    return stats.result()


class LeanConnection:
    """One keep-alive HTTP/1.1 connection that sends requests as bytes and parses the chunked SSE
    answer by hand, json-decoding each event as stream_one does (token counts, timestamps): about
    a fifth of httpx's CPU per event. Under 64 streams the load generator otherwise burned most
    of the 16 cores the server shares with it (bench/results/server_load_cuda_s7.json)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> "LeanConnection":
        host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def _head(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), head.lower()

    async def _body(self, head: bytes) -> bytes:
        if b"transfer-encoding: chunked" not in head:
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length:"))
            return await self.reader.readexactly(length)
        return b"".join([part async for part in self._chunks()])

    async def _chunks(self):
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            yield (await self.reader.readexactly(size + 2))[:-2]

    async def get(self, path: str) -> int:
        self.writer.write(b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % path.encode())
        status, head = await self._head()
        await self._body(head)
        return status

    async def stream(self, body: dict) -> dict:
        """stream_one over this connection."""
        data = json.dumps(body).encode()
        stats = StreamStats()
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (len(data), data))
        status, head = await self._head()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {(await self._body(head)).decode()}")
        buf = b""
        async for part in self._chunks():
            buf += part
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if ev.startswith(b"data: "):
                    stats.event(ev[6:])
        return stats.result()

    def close(self) -> None:
        self.writer.close()


async def run_clients(url: str, model: str, work: list[list[str]], max_tokens: int, go: float,
                      kind: str = "lean") -> dict:
    """One closed-loop client per list in work, each sending its prompts one after another,
    from time.monotonic() == go; the connections are opened before that. kind: lean
    (LeanConnection) or httpx (one AsyncClient for the process's connections)."""
    results = []

    def body(prompt):
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "logprobs": 0}

    if kind == "lean":
        conns = [await LeanConnection.open(url) for _ in work]
        assert all(s == 200 for s in await asyncio.gather(*(c.get("/health") for c in conns)))

        async def lean_loop(conn, prompts):
            for prompt in prompts:
                results.append(await conn.stream(body(prompt)))

        await asyncio.sleep(max(0.0, go - time.monotonic()))
        t0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.gather(*(lean_loop(c, prompts) for c, prompts in zip(conns, work)))
        t1, cpu1 = time.monotonic(), time.process_time()
        for c in conns:
            c.close()
        return {"start": t0, "end": t1, "results": results, "cpu_s": cpu1 - cpu0}

    async def client_loop(client, prompts):
        for prompt in prompts:
            results.append(await stream_one(client, url, body(prompt)))

    limits = httpx.Limits(max_connections=len(work), max_keepalive_connections=len(work))
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        await asyncio.gather(*(client.get(url + "/health") for _ in work))
        await asyncio.sleep(max(0.0, go - time.monotonic()))
        t0, cpu0 = time.monotonic(), time.process_time()
        await asyncio.gather(*(client_loop(client, prompts) for prompts in work))
        t1, cpu1 = time.monotonic(), time.process_time()
    return {"start": t0, "end": t1, "results": results, "cpu_s": cpu1 - cpu0}


def client_process(url: str, model: str, work: list[list[str]], max_tokens: int, go: float, kind: str) -> dict:
    """A load-generator process (see run_clients)."""
    return asyncio.run(run_clients(url, model, work, max_tokens, go, kind))


CLIENT = "lean"  # the load generator run_level uses (main sets it from --client)


def run_level(pool: ProcessPoolExecutor, procs: int, url: str, model: str, prompts: list[str], concurrency: int,
              max_tokens: int, server: "Server | None" = None) -> dict:
    """C clients (client k sends prompts k, k+C, ...) spread over `procs` processes: one asyncio
    loop parsing 64 SSE streams is itself a bottleneck at GPU token rates, so the load
    generator must not be measured instead of the server."""
    clients = [prompts[k::concurrency] for k in range(concurrency)]
    procs = min(procs, concurrency)
    go = time.monotonic() + 0.5
    cpu0 = server.cpu() if server else {}
    futs = [pool.submit(client_process, url, model, clients[p::procs], max_tokens, go, CLIENT) for p in range(procs)]
    parts = [f.result(timeout=900) for f in futs]
    cpu = {k: v - cpu0[k] for k, v in server.cpu().items()} if server else {}
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    results = [r for p in parts for r in p["results"]]
    tokens = sum(r["tokens"] for r in results)
    assert tokens == len(prompts) * max_tokens, (tokens, len(prompts), max_tokens)
    return {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "output_tokens_per_s": tokens / wall, "ttft": [r["ttft"] for r in results],
            "itl": [x for r in results for x in r["itl"]],
            "cpu_s": {**cpu, "clients": sum(p["cpu_s"] for p in parts)}}


def scrape_steps(url: str) -> dict:
    """The server's engine-step counters from /metrics: {kind: [steps, seconds]}."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for name, i in (("exactllm_engine_steps_total", 0), ("exactllm_engine_step_seconds_total", 1)):
            if line.startswith(name + '{kind="'):
                kind = line.split('"')[1]
                out.setdefault(kind, [0, 0.0])[i] = float(line.split()[-1])
    return out


class Server:
    """`exactllm serve` with some flags, as processes of its own on a free port."""

    def __init__(self, args, label: str, flags: str):
        self.label, self.flags, self.port = label, flags, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "exactllm", "serve", "--port", str(self.port), "--device", args.device,
               "--numerics", args.numerics, "--log-level", "warning", "--max-queue", "4096"]
        if args.model:
            cmd += ["--model", args.model]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.max_num_seqs:
            cmd += ["--max-num-seqs", str(args.max_num_seqs)]
        cmd += shlex.split(args.serve_args) + shlex.split(flags)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, env=env)
        self.roles: dict[int, str] = {}

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.label!r} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server {self.label!r} did not come up")
            time.sleep(0.5)
        time.sleep(1.0)  # every front end listening
        self.roles = process_roles(self.proc.pid, self.port)

    def cpu(self) -> dict:
        """CPU seconds so far of the server's processes by role (http: those listening on the
        port; engine: the other spawned ones; other: the rest, e.g. a supervisor)."""
        out = {"http": 0.0, "engine": 0.0, "other": 0.0}
        for pid, role in self.roles.items():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[role] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (FileNotFoundError, ProcessLookupError):
                pass
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


def process_roles(root: int, port: int) -> dict[int, str]:
    """pid -> role for root and its descendants (Linux /proc): http if it holds a socket listening
    on port, engine if it is another multiprocessing spawn, else other."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                todo += [int(x) for x in f.read().split()]
    inodes = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "0A":
            inodes.add(f"socket:[{f[9]}]")
    roles = {}
    for pid in pids:
        fds = f"/proc/{pid}/fd"
        links = set()
        for fd in os.listdir(fds):
            try:
                links.add(os.readlink(os.path.join(fds, fd)))
            except OSError:
                pass
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            spawned = b"spawn_main" in f.read()
        roles[pid] = "http" if links & inodes else "engine" if spawned else "other"
    return roles


class Offline:
    """LLM.generate over the same prompts, in groups of C (the batch shape C clients make), its
    CUDA graphs captured up front as the server's are.

    It runs on one worker thread, as the server's engine does: on CPU, torch's OpenMP pool
    behaves differently when driven from a non-main thread (on a busy 2-core machine we saw a
    single request run 5-7x faster from a worker thread than from the main thread), and the
    comparison must be about the server, not about which thread drives torch."""

    def __init__(self, args):
        from exactllm import LLM, SamplingParams
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="offline-engine")
        self.llm = LLM(model=args.model, device=args.device, dtype=args.dtype, numerics=args.numerics,
                       **({"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}))
        self.params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        self.max_tokens = args.max_tokens
        self.pool.submit(self._warm).result()

    def _warm(self) -> None:
        """Capture every CUDA graph now, as `exactllm serve` does at startup (none on CPU)."""
        engine = self.llm.engine
        engine.runner.capture_graphs(engine.cfg.max_num_seqs)
        engine.runner.capture_prompt_graphs(engine.cfg.max_num_batched_tokens)
        self.llm.generate(["warm up"], self.params, use_tqdm=False)

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
    ap.add_argument("--client-procs", type=int, default=8, help="load-generator processes (at most C)")
    ap.add_argument("--client-check", action="store_true",
                    help="first time the load generator alone against a stub server that answers at once")
    ap.add_argument("--serve-args", default="",
                    help="more `exactllm serve` flags, e.g. --serve-args='--admission-window-ms 20'")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="both sides' batch limit (fewer CUDA graphs to capture at start; default the engine's)")
    ap.add_argument("--client", default="lean", choices=["lean", "httpx"],
                    help="load generator: raw-socket SSE parsing (lean) or httpx (what earlier results used)")
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL=FLAGS: a server with these more flags (repeatable; all run in turn in one run), "
                         "e.g. --variant='one=' --variant='api4=--api-servers 4'")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/server_load_<device>.json)")
    args = ap.parse_args()
    global CLIENT
    CLIENT = args.client

    variants = [v.partition("=")[::2] for v in args.variant] or [("server", "")]
    work = {c: prompts_for(c, c * args.rounds) for c in args.concurrency}
    model = served_model_name(args.model)
    # Load-generator processes, started before this process touches CUDA.
    pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    for f in [pool.submit(time.sleep, 1.0) for _ in range(args.client_procs)]:  # start every worker now
        f.result()
    client_only = {}
    if args.client_check:
        client_only = check_client(pool, args, work)
    servers = [Server(args, label, flags) for label, flags in variants]  # starting while the offline LLM builds
    rows = []
    try:
        off = Offline(args)
        for srv in servers:
            srv.wait_ready()
            print(f"server {srv.label!r} ({srv.flags or 'defaults'}): process roles {sorted(srv.roles.values())}",
                  flush=True)
        for c, prompts in work.items():
            # Warm both sides at this level's batch shapes (CUDA graphs, kernels), untimed.
            for srv in servers:
                run_level(pool, args.client_procs, srv.url, model, prompts_for(-c, c), c, args.max_tokens)
            off.run(prompts_for(-c, c), c)
            steps0 = [scrape_steps(srv.url) for srv in servers]
            runs, walls = [[] for _ in servers], []
            for rep in range(args.repeats):
                for i, srv in enumerate(servers):
                    runs[i].append(run_level(pool, args.client_procs, srv.url, model, prompts, c, args.max_tokens,
                                             srv))
                walls.append(off.run(prompts, c))
                print(f"C={c} repeat {rep}: " + ", ".join(f"{srv.label} {r[-1]['wall_s']:.2f} s"
                                                          for srv, r in zip(servers, runs))
                      + f", offline {walls[-1]:.2f} s", flush=True)
            for srv, srv_runs, st0 in zip(servers, runs, steps0):
                steps = {k: [(v[0] - st0.get(k, [0, 0.0])[0]) / args.repeats,
                             (v[1] - st0.get(k, [0, 0.0])[1]) / args.repeats] for k, v in scrape_steps(srv.url).items()}
                m = merge(srv_runs)
                cpu = {k: statistics.median(r["cpu_s"][k] for r in srv_runs) for k in srv_runs[0]["cpu_s"]}
                rows.append({"variant": srv.label, "serve_flags": srv.flags, "concurrency": c, **m,
                             "offline_wall_s": min(walls), "offline_wall_s_all": walls,
                             "overhead": m["wall_s"] / min(walls) - 1.0, "server_steps_per_repeat": steps,
                             "cpu_s_median": cpu, "client_only_wall_s": client_only.get(c)})
    finally:
        for srv in servers:
            srv.stop()
        pool.shutdown()

    device = args.device
    if device.startswith("cuda"):
        import torch
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{platform.processor() or platform.machine()} x{os.cpu_count()} CPU"
    result = {"model": model, "device": args.device, "device_name": device_name, "numerics": args.numerics,
              "serve_args": args.serve_args, "max_num_seqs": args.max_num_seqs, "variants": dict(variants), "client": args.client,
              "max_tokens": args.max_tokens, "rounds": args.rounds, "repeats": args.repeats,
              "client_procs": args.client_procs, "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_end": os.getloadavg(), "levels": rows}

    hdr = (f"{'variant':>8} {'C':>4} {'req/s':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
           f"{'ITL p50':>8} {'ITL p99':>8} {'server s':>9} {'offline s':>9} {'overhead':>9} "
           f"{'steps p/d':>10} {'step s':>7} {'http cpu':>9} {'eng cpu':>8} {'load cpu':>9} {'client s':>9}")
    print(f"\n{model} on {device_name}, {args.max_tokens} tokens/request, numerics {args.numerics}")
    print(hdr)
    for r in rows:
        cpu = r["cpu_s_median"]
        print(f"{r['variant'][:8]:>8} {r['concurrency']:>4} {r['requests_per_s']:>8.1f} {r['output_tokens_per_s']:>8.0f} "
              f"{r['ttft_p50_s'] * 1e3:>7.1f}ms {r['ttft_p99_s'] * 1e3:>7.1f}ms {r['itl_p50_s'] * 1e3:>6.2f}ms "
              f"{r['itl_p99_s'] * 1e3:>6.2f}ms {r['wall_s']:>9.3f} {r['offline_wall_s']:>9.3f} "
              f"{r['overhead'] * 100:>8.1f}% {steps_cell(r):>10} {step_seconds(r):>7.3f} "
              f"{cpu.get('http', 0):>9.2f} {cpu.get('engine', 0):>8.2f} {cpu.get('clients', 0):>9.2f} "
              f"{r['client_only_wall_s'] or float('nan'):>9.2f}")
    print("steps p/d: the server's engine steps per repeat that computed prompt tokens / only decoded; "
          "step s: their seconds; http/eng/load cpu: CPU seconds of the HTTP front ends, the engine process "
          "and the load generator in a run (median); client s: the load generator alone against a stub "
          "(--client-check)")

    out = args.out or os.path.join("bench", "results", f"server_load_{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, out[:-5] + ".png", f"{model} on {device_name}")
    print(f"wrote {out}")


def steps_cell(row: dict) -> str:
    st = row["server_steps_per_repeat"]
    return f"{st.get('prompt', [0])[0]:.0f}/{st.get('decode', [0])[0]:.0f}"


def step_seconds(row: dict) -> float:
    return sum(v[1] for v in row["server_steps_per_repeat"].values())


def stub_server(port: int, max_tokens: int) -> None:
    """A stand-in for the server that streams max_tokens one-token completion chunks at once
    for every request (HTTP/1.1 keep-alive, chunked): what the load generator alone can take."""
    chunk = "data: " + json.dumps({"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub",
                                   "choices": [{"index": 0, "text": " tea", "finish_reason": None,
                                                "logprobs": {"tokens": [" tea"], "token_logprobs": [-1.0],
                                                             "top_logprobs": [{" tea": -1.0}], "text_offset": [0]}}]})
    frames = [b"%x\r\n%s\r\n" % (len(b), b) for b in ((chunk + "\n\n").encode(), b"data: [DONE]\n\n")]
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def handle(reader, writer):
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in request.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                writer.write(head)
                for _ in range(max_tokens):
                    writer.write(frames[0])
                    await writer.drain()
                writer.write(frames[1] + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve():
        async with await asyncio.start_server(handle, "127.0.0.1", port) as srv:
            await srv.serve_forever()

    asyncio.run(serve())


def check_client(pool: ProcessPoolExecutor, args, work: dict) -> dict:
    """Wall time of each level's load against the stub: the floor the load generator puts under
    any server measurement (it should be far below the offline engine's time)."""
    port = free_port()
    stub = multiprocessing.get_context("spawn").Process(target=stub_server, args=(port, args.max_tokens), daemon=True)
    stub.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the stub server did not start") from None
                time.sleep(0.1)
        walls = {}
        for c, prompts in work.items():
            walls[c] = min(run_level(pool, args.client_procs, f"http://127.0.0.1:{port}", "stub", prompts, c,
                                     args.max_tokens)["wall_s"] for _ in range(args.repeats))
            print(f"C={c}: load generator alone (stub server) {walls[c]:.2f} s", flush=True)
        return walls
    finally:
        stub.terminate()
        stub.join()


def plot(rows: list[dict], path: str, title: str) -> None:
    """Per variant: TTFT p50/p99 by concurrency (left), overhead over offline (right, bars side by side)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    cs = list(dict.fromkeys(r["concurrency"] for r in rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["variant"] == label]
        for key, name in (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99")):
            a.plot([r["concurrency"] for r in mine], [r[key] * 1e3 for r in mine], marker="o", label=f"{label} {name}")
        b.bar([cs.index(r["concurrency"]) + (i - (len(labels) - 1) / 2) * width for r in mine],
              [r["overhead"] * 100 for r in mine], width, label=label)
    a.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="ms", title="time to first token")
    a.legend(fontsize=7)
    b.set_xticks(range(len(cs)), [str(c) for c in cs])
    b.axhline(10, color="grey", lw=0.8, ls="--")
    b.set(xlabel="concurrent streaming clients", ylabel="% over offline LLM.generate", title="server overhead")
    b.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
