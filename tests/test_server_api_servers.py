"""Several HTTP front ends over one engine process (`exactllm serve --api-servers N`).

In process: one engine process with three pipes, two of them under an app each (two uvicorn
servers on two ports), the third a bare EngineClient: requests through both apps are all
answered once and correctly, /metrics of either counts both, the 429 limit is the server's,
and a front end that stops takes only its own requests with it. As processes: `exactllm serve
--api-servers 2` answers many connections, drains on SIGTERM, stops when a front end dies,
and leaves no process behind when killed.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import threading
import time

import httpx
import pytest

from exactllm import LLM, SamplingParams
from exactllm.server.app import create_app
from exactllm.server.engine_client import EngineClient, EngineLink, EngineProcess, GenRequest
from exactllm.server.engine_core import EngineSpec
from exactllm.server.runner import ServerThread
from serve_process import children, engine_state, gone, metric, slow_steps, start_serve

MINI = "random:llama-mini"
LONG = {"model": MINI, "prompt": "the long one", "max_tokens": 1500, "ignore_eos": True, "stream": True}


def token_str(tok, t: int) -> str:
    return tok.token_bytes(t).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def pair():
    """Two front ends (apps) and a third bare client (on an event loop of its own) over one
    engine process."""
    engine = EngineProcess(EngineSpec(MINI, max_num_seqs=16, setup=slow_steps), 3)
    in_flight = multiprocessing.get_context("spawn").Value("q", 0)
    clients = [EngineClient(max_queue=16, link=EngineLink(engine.conns[i], engine.info, in_flight, 3))
               for i in range(3)]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    clients[2].loop = loop
    on_loop(loop, clients[2].attach, loop)
    with ServerThread(create_app(clients[0], MINI)) as a, ServerThread(create_app(clients[1], MINI)) as b:
        yield engine, clients, a, b
    stop_third(clients[2])
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    assert gone(engine.proc.pid, timeout=10)  # every front end stopped: the engine process exits
    engine.stop()


def on_loop(loop, fn, *args):
    """fn(*args) on the event-loop thread of loop; its result."""
    async def call():
        return fn(*args)
    return asyncio.run_coroutine_threadsafe(call(), loop).result(10)


def stop_third(client: EngineClient) -> None:
    if client._loop is not None:
        on_loop(client.loop, client.detach)
        client.close()


@pytest.fixture(scope="module")
def ref():
    return LLM(MINI)


def wait_idle(client: EngineClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = client.call(engine_state)
        if state["running"] == state["waiting"] == state["held"] == client.in_flight == 0 and not state["kv_usage"]:
            return
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def test_requests_through_both_front_ends_are_answered_once(pair, ref):
    _, clients, a, b = pair
    prompts = [f"front end test {i}" for i in range(16)]
    want = ref.generate(prompts, SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)
    ok = 'exactllm_requests_total{endpoint="completions",outcome="ok"}'
    before = metric(a.url, ok)

    async def one(http, url, prompt, stream):
        body = {"model": MINI, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0, "stream": stream}
        if not stream:
            r = (await http.post(url + "/v1/completions", json=body)).json()
            return r["choices"][0]["logprobs"]["tokens"], {r["id"]}, 1
        toks, ids, done = [], set(), 0
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done += 1
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    ids.add(chunk["id"])
                    toks += chunk["choices"][0]["logprobs"]["tokens"]
        return toks, ids, done

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(one(http, (a.url, b.url)[i % 2], p, i % 4 < 2)
                                          for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for (toks, ids, done), w in zip(results, want):
        assert toks == [token_str(ref.tokenizer, t) for t in w.token_ids]
        assert len(ids) == 1 and done == 1
    assert len(set().union(*(ids for _, ids, _ in results))) == len(prompts)
    wait_idle(clients[0])
    # Each front end counted its own 8; /metrics of either reports the server's 16.
    assert metric(a.url, ok) == metric(b.url, ok) == before + len(prompts)
    steps = 'exactllm_engine_steps_total{kind="decode"}'
    assert metric(a.url, steps) == metric(b.url, steps) > 0
    count = "exactllm_time_to_first_token_seconds_count"
    assert metric(a.url, count) == metric(b.url, count) >= len(prompts)


def test_in_flight_limit_is_the_servers(pair):
    _, clients, a, b = pair
    wait_idle(clients[0])
    old = [c.max_in_flight for c in clients]
    for c in clients:
        c.max_in_flight = 2
    try:
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", a.url + "/v1/completions", json=LONG) as r1, \
                    c2.stream("POST", b.url + "/v1/completions", json=LONG) as r2:
                assert r1.status_code == r2.status_code == 200
                for url in (a.url, b.url):  # one on each: either front end is full
                    r = httpx.post(url + "/v1/completions", json={"model": MINI, "prompt": "hi", "max_tokens": 2})
                    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                    assert metric(url, "exactllm_queue_depth") == 2
    finally:
        for c, n in zip(clients, old):
            c.max_in_flight = n
    wait_idle(clients[0])  # both streams' disconnects freed their slots and KV
    assert httpx.post(b.url + "/v1/completions", json={"model": MINI, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_stopped_front_end_takes_only_its_requests(pair, ref):
    """The third client submits a long request and stops (as at its shutdown): the engine aborts
    that one and keeps serving the other front ends."""
    engine, clients, a, b = pair
    wait_idle(clients[0])
    third = clients[2]
    req = GenRequest(0, "the long one", third.encode("the long one"),
                     SamplingParams(max_tokens=1500, ignore_eos=True), False, asyncio.Queue())
    on_loop(third.loop, third.admit, 1)
    on_loop(third.loop, third.submit, req)
    deadline = time.monotonic() + 30
    while clients[0].call(engine_state)["running"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    want = ref.generate(["still here"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    with httpx.Client(timeout=60) as http, http.stream("POST", a.url + "/v1/completions", json=LONG) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        next(line for line in lines if line.startswith("data: {"))
        stop_third(third)
        deadline = time.monotonic() + 30
        while (st := clients[0].call(engine_state))["running"] != 1:  # only front end 0's stream is left
            assert time.monotonic() < deadline, locals().get("st")
            time.sleep(0.02)
    assert engine.proc.is_alive()
    got = httpx.post(b.url + "/v1/completions", json={"model": MINI, "prompt": "still here", "max_tokens": 4,
                                                      "temperature": 0}, timeout=60).json()
    assert got["choices"][0]["text"] == want.text
    with third._shared.get_lock():
        third._shared.value -= 1  # its admitted slot: a stopped front end never releases it


# ----------------------------------------------------------------------------- as processes
def api_processes(server_pid: int) -> list[int]:
    """The spawned children of `exactllm serve`: its engine process and its API-server processes."""
    found = []
    for child in children(server_pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                found.append(child)
    return found


def listening(pids: list[int], port: int) -> list[int]:
    """Those of pids that hold a socket listening on port (Linux /proc)."""
    inodes = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and f[3] == "0A":
            inodes.add(f"socket:[{f[9]}]")
    out = []
    for pid in pids:
        fds = f"/proc/{pid}/fd"
        if any(os.readlink(os.path.join(fds, fd)) in inodes for fd in os.listdir(fds)):
            out.append(pid)
    return out


def test_serve_with_two_api_servers_answers_drains_and_exits(ref):
    proc, url = start_serve("--model", MINI, "--api-servers", "2")
    try:
        spawned = api_processes(proc.pid)
        assert len(spawned) == 3 and len(listening(spawned, int(url.rsplit(":", 1)[1]))) == 2
        prompts = [f"connection {i}" for i in range(12)]
        want = ref.generate(prompts, SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)

        async def one(prompt):  # a connection of its own each: the kernel spreads them over the front ends
            async with httpx.AsyncClient(timeout=60) as http:
                r = await http.post(url + "/v1/completions", json={"model": MINI, "prompt": prompt, "max_tokens": 5,
                                                                   "temperature": 0, "logprobs": 0})
                return r.json()["choices"][0]["logprobs"]["tokens"]

        async def main():
            return await asyncio.gather(*(one(p) for p in prompts))

        for got, w in zip(asyncio.run(main()), want):
            assert got == [token_str(ref.tokenizer, t) for t in w.token_ids]
        assert metric(url, 'exactllm_requests_total{endpoint="completions",outcome="ok"}') == len(prompts)

        body = {**LONG, "max_tokens": 48, "logprobs": 0, "temperature": 0}
        tokens, done = 0, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if not tokens:
                        proc.send_signal(signal.SIGTERM)
                        time.sleep(0.3)
                        with pytest.raises(httpx.TransportError):  # no new connections while draining
                            httpx.get(url + "/health", timeout=2)
                    tokens += len(json.loads(line[6:])["choices"][0]["logprobs"]["tokens"])
        assert done and tokens == 48
        assert proc.wait(timeout=60) == 0
        assert all(gone(pid) for pid in spawned)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_while_front_ends_start():
    """SIGTERM as soon as the first front end answers, while the others may still be starting
    (the supervisor waits for each to read its arguments): a clean exit, nothing left behind
    (the supervisor once exited by SystemExit there and waited for ever on a front end)."""
    proc, url = start_serve("--model", MINI, "--api-servers", "3")
    try:
        spawned = api_processes(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert all(gone(pid) for pid in spawned)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("victim", ["front end", "supervisor"])
def test_no_process_outlives_a_killed_one(victim):
    """A front end killed: the supervisor stops the rest and exits 1. The supervisor killed (no
    chance to clean up): the engine and the front ends exit on their own."""
    proc, url = start_serve("--model", MINI, "--api-servers", "2")
    try:
        spawned = api_processes(proc.pid)
        assert httpx.post(url + "/v1/completions", json={"model": MINI, "prompt": "hi", "max_tokens": 2},
                          timeout=30).status_code == 200
        if victim == "supervisor":
            proc.kill()
            proc.wait()
        else:
            os.kill(listening(spawned, int(url.rsplit(":", 1)[1]))[0], signal.SIGKILL)
            assert proc.wait(timeout=120) == 1  # (a loaded 2-core box: front ends import torch)
        assert all(gone(pid) for pid in spawned)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_front_end_sockets_get_tcp_nodelay():
    """Connections accepted on listen_sockets() have Nagle's algorithm off under asyncio (it sets
    TCP_NODELAY only where the socket's proto is TCP); a socket made with proto 0 would not."""
    import socket

    from exactllm.server.api_servers import listen_sockets
    from exactllm.server.runner import free_port

    def accepted_nodelay(sock) -> int:
        async def main():
            got = asyncio.get_running_loop().create_future()

            class Proto(asyncio.Protocol):
                def connection_made(self, transport):
                    s = transport.get_extra_info("socket")
                    got.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                    transport.close()

            server = await asyncio.get_running_loop().create_server(Proto, sock=sock)
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(got, 10)
            writer.close()
            server.close()
            return value
        return asyncio.run(main())

    socks = listen_sockets("127.0.0.1", free_port(), 2)
    assert len(socks) == 2 and all(s.proto == socket.IPPROTO_TCP for s in socks)
    for s in socks:
        s.close()
    (sock,) = listen_sockets("127.0.0.1", free_port(), 1)  # one: a connection could land on the other
    assert accepted_nodelay(sock) != 0
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    assert accepted_nodelay(plain) == 0
