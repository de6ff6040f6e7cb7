"""`exactllm serve --api-servers N`: N HTTP front-end processes over one engine process.

One HTTP process (uvicorn: one event loop) reads a burst of 64 resubmitted requests one after
another and writes ~64 SSE chunks per engine step; under 64 streaming clients on an H100 that
was what the server still spent beyond offline LLM.generate (bench/server_load.py). Here this
process starts the engine process with one pipe per front end, then N API-server processes,
each running the same app (create_app) on an EngineClient over its own pipe (EngineLink) and
its own listening socket bound to the one port with SO_REUSEPORT: the kernel spreads incoming
connections over them (by a hash of the client's address and port).

Shared by the front ends: the admitted-sequence count behind the 429 limit (one
multiprocessing.Value) and /metrics (each answers for all: the others' counters and
histograms come through the engine process, engine_client.scrape). /health is each front
end's own view (engine alive, draining), which all of them share in practice.

This process stays as supervisor: SIGTERM or SIGINT is passed on to every front end as SIGTERM
(each drains as the single-process server does) and it exits once they have; should a front
end exit on its own, the others are stopped too. The engine process exits when every front
end has stopped (or its pipe closed); front ends and engine exit when this process dies.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from exactllm.server.engine_client import EngineLink, EngineProcess, EngineStartError
from exactllm.server.engine_core import EngineSpec, exit_with_parent

log = logging.getLogger("exactllm.serve")
STOP_GRACE_S = 5.0  # beyond the drain timeout, before a front end that has not exited is killed


@dataclass
class FrontEndOptions:
    """What each API-server process needs besides its link and socket (picklable)."""
    name: str
    aliases: tuple
    api_key: str | None
    max_queue: int
    drain_timeout: float
    switch_interval_s: float
    log_level: str
    parent_pid: int
    http: str = "auto"   # uvicorn's HTTP parser and event loop
    loop: str = "auto"


def listen_sockets(host: str, port: int, n: int, backlog: int = 2048) -> list[socket.socket]:
    """n listening sockets on host:port with SO_REUSEPORT (one shared socket where the platform
    lacks it). Bound here, before any front end starts, so a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    socks = []
    for _ in range(n if reuse_port else 1):
        # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
        # (accepted ones inherit it); with 0, Nagle's algorithm held small SSE writes back until
        # the client's delayed ACK (~40 ms: TTFT 48 ms at one client on an H100, 8 ms without).
        s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            for t in socks:
                t.close()
            raise
        s.listen(backlog)
        s.set_inheritable(True)
        socks.append(s)
    return socks


def api_server_main(link: EngineLink, sock: socket.socket, opts: FrontEndOptions) -> None:
    """Entry point of one API-server process: the app under uvicorn on a socket it was given."""
    import uvicorn

    from exactllm.server.app import create_app
    from exactllm.server.engine_client import EngineClient
    from exactllm.server.runner import DrainingServer

    exit_with_parent(opts.parent_pid)
    holder = {}

    def on_signal(sig, frame):  # as cmd_serve's: after a drain uvicorn re-raises the signal it handled
        server = holder.get("server")
        if server is None or not server.should_exit:
            raise SystemExit(128 + sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sys.setswitchinterval(opts.switch_interval_s)
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = EngineClient(max_queue=opts.max_queue, link=link)
    app = create_app(client, opts.name, api_key=opts.api_key, aliases=opts.aliases)
    config = uvicorn.Config(app, log_level=opts.log_level, timeout_graceful_shutdown=opts.drain_timeout,
                            http=opts.http, loop=opts.loop)
    holder["server"] = server = DrainingServer(config)
    server.run(sockets=[sock])


def serve(spec: EngineSpec, n: int, host: str, port: int, opts: FrontEndOptions) -> int:
    """Run the server as this supervisor, one engine process and n API-server processes, until
    a signal stops it; the exit status (0 after a drain, 1 if the engine could not start or a
    front end failed)."""
    try:
        engine = EngineProcess(spec, n)
    except EngineStartError as exc:
        print(f"exactllm serve: the engine could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    ctx = multiprocessing.get_context("spawn")
    in_flight = ctx.Value("q", 0)
    socks = listen_sockets(host, port, n)
    procs, stopping = [], []

    def stop(sig, frame=None):
        if not stopping:
            stopping.append(time.monotonic())
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)

    # Set before the first front end starts: a start returns only once that process has read its
    # arguments (seconds, imports included), and the first may already answer meanwhile.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    for i in range(n):
        if stopping:
            break
        # Without the engine's info (the tokenizer: megabytes): a start blocks while its arguments
        # do not fit the pipe to the new process, and for ever should that process die first
        # (multiprocessing holds the pipe's read end until the write is done).
        link = EngineLink(engine.conns[i], None, in_flight, n)
        # Daemonic: should this process end abnormally, multiprocessing terminates them rather
        # than waiting for them for ever.
        p = ctx.Process(target=api_server_main, args=(link, socks[i % len(socks)], opts), name=f"exactllm-api-{i}",
                        daemon=True)
        p.start()
        procs.append(p)
        if stopping:  # the signal came while this one started
            os.kill(p.pid, signal.SIGTERM)
    for s in socks:  # the front ends hold them now: closed here, a drained server refuses connections
        s.close()
    for conn in engine.conns:
        conn.close()
    if not stopping:
        print(f"exactllm: serving '{opts.name}' on http://{host}:{port}/v1 with {n} API-server processes"
              f"{' (API key required)' if opts.api_key else ''}", file=sys.stderr, flush=True)
    status = 0
    while alive := [p for p in procs if p.is_alive()]:
        # (a sentinel stays readable once it ends; the timeout lets a stop's deadline pass)
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=1.0)
        if stopping and time.monotonic() > stopping[0] + opts.drain_timeout + STOP_GRACE_S:
            # past the drain timeout a front end should have exited (uvicorn's own bound): as a
            # supervisor must, end it rather than wait for ever
            log.error("API-server processes still running %.0f s after the stop: killing %s",
                      time.monotonic() - stopping[0], ", ".join(p.name for p in alive))
            for p in alive:
                p.kill()
            status = 1
            continue
        if not stopping and any(not p.is_alive() for p in procs):
            failed = [f"{p.name} (status {p.exitcode})" for p in procs if not p.is_alive()]
            log.error("an API-server process exited: %s; stopping the others", ", ".join(failed))
            status = 1
            stop(signal.SIGTERM)
    for p in procs:
        p.join()
        # After a signal, one that was still starting may have ended by it (SIGTERM's default
        # action, or SystemExit(143) before uvicorn took the signal over): not a failure.
        if p.exitcode not in ((0, -signal.SIGTERM, 128 + signal.SIGTERM) if status == 0 else (0,)):
            status = 1
    engine.proc.join(30)  # it exits once every front end has stopped
    engine.stop()
    return status
