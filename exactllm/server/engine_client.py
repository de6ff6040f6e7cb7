"""The HTTP process's handle on the engine process (engine_core.py).

    client = EngineClient(EngineSpec(model=...), max_queue=256)  # spawns it, waits until ready
    app = create_app(client, name)                                # its lifespan attaches and closes it

HTTP handlers post commands (add, abort); the event loop gathers those of one loop iteration
into one message, which a sender thread writes to the pipe (so a full pipe never blocks the
loop, and a burst of arrivals wakes that thread once rather than per request). With them goes
the number of requests the HTTP side has received and not yet submitted (``parsing``), which
Admission (engine_core.py) waits for. The event loop reads the engine's messages (one per
engine step) as the pipe becomes readable and turns them into Events on the asyncio.Queue of
each HTTP call. Streaming text is decoded here, not in the engine process, so that its step
loop does no work a client could wait on.

Admission is bounded: at most ``max_in_flight`` sequences may be admitted and unfinished;
beyond that the front end refuses with 429, so memory does not grow with offered load.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import multiprocessing.util
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from exactllm.engine.llm_engine import RequestOutput
from exactllm.sampling_params import SamplingParams
from exactllm.server.engine_core import EngineSpec, core_main

log = logging.getLogger("exactllm.server")


class EngineStartError(RuntimeError):
    """The engine process could not build its engine (bad model path, out of memory, ...)."""


class Overloaded(Exception):
    """The admission limit is reached (answered 429 with Retry-After)."""


class Draining(Exception):
    """The server is shutting down (answered 503 with Retry-After)."""


@dataclass
class Event:
    """What one engine step produced for one sequence (or why it failed)."""
    index: int                          # choice index within the HTTP call
    text: str = ""                      # new text that is safe to show (streaming only)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    output: RequestOutput | None = None  # set on the final event
    accepted: bool = False
    error: tuple[int, str] | None = None  # (HTTP status, message)
    time: float = 0.0                   # perf_counter when this process received it


def merge_events(events: list[Event]) -> list[Event]:
    """Join the events of each choice into one, in order of first appearance: text, token ids
    and log-probs concatenated, the last event's finish, output and time kept. Streaming sends
    what is queued as one chunk per choice, so when the client or the event loop falls behind
    the engine it gets fewer, larger chunks instead of a growing backlog of one-token ones."""
    merged: dict[int, Event] = {}
    for ev in events:
        m = merged.get(ev.index)
        if m is None:
            merged[ev.index] = ev
            continue
        merged[ev.index] = Event(ev.index, m.text + ev.text, m.token_ids + ev.token_ids, m.logprobs + ev.logprobs,
                                 ev.finish_reason, ev.output, time=ev.time)
    return list(merged.values())


@dataclass
class GenRequest:
    """One sequence to generate, as the HTTP process tracks it."""
    index: int
    prompt: "str | list[int]"
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    events: asyncio.Queue
    arrival: float = field(default_factory=time.perf_counter)
    rid: int = -1
    done: bool = False
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    detok: object = None
    decoded: str = ""                   # text decoded so far (streaming)
    sent: str = ""                      # text already sent (a prefix of decoded)
    last_token_time: float | None = None
    hold: int = 0                       # characters held back from a stream (longest stop string - 1)


@dataclass
class EngineLink:
    """An API-server process's share of an engine process another process started (`exactllm
    serve --api-servers N`): its pipe, the engine's ready info (None: asked for over the pipe),
    the in-flight count all front ends share (a multiprocessing.Value: the 429 limit is the
    server's, not each process's)."""
    conn: object
    info: dict | None
    in_flight: object
    front_ends: int


class EngineProcess:
    """The engine process (engine_core.core_main) with one pipe per front end, started and ready;
    EngineStartError if it cannot start. It must not outlive this process: at interpreter exit
    (or when this object goes) its pipes are closed, and it is killed if it does not exit."""

    def __init__(self, spec: EngineSpec, front_ends: int = 1, start_timeout: float = 1800.0):
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked; nor can torch's thread pools
        pipes = [ctx.Pipe() for _ in range(front_ends)]
        self.conns = [ours for ours, _ in pipes]
        # Not a daemon: with --tp the engine process starts worker processes of its own.
        self.proc = ctx.Process(target=core_main, args=(spec, [theirs for _, theirs in pipes], os.getpid()),
                                name="exactllm-engine")
        self.proc.start()
        for _, theirs in pipes:
            theirs.close()
        # Runs at interpreter exit before multiprocessing joins its children (exitpriority >= 0).
        self.stop = multiprocessing.util.Finalize(self, _stop_process, args=(self.proc, self.conns), exitpriority=10)
        replies = [self._handshake(conn, start_timeout) for conn in self.conns]
        failed = next((info for kind, info in replies if kind != "ready"), None)
        if failed is not None:
            self.stop()
            raise EngineStartError(failed)
        self.info = replies[0][1]

    def _handshake(self, conn, timeout: float) -> tuple[str, object]:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.5):
            if not self.proc.is_alive():
                return "failed", f"the engine process exited with status {self.proc.exitcode} while starting"
            if time.monotonic() > deadline:
                return "failed", f"the engine process did not start within {timeout:.0f} s"
        try:
            return conn.recv()
        except EOFError:
            self.proc.join(5)
            return "failed", f"the engine process exited with status {self.proc.exitcode} while starting"


class EngineClient:
    def __init__(self, spec: EngineSpec | None = None, max_queue: int = 256, start_timeout: float = 1800.0, *,
                 link: EngineLink | None = None):
        """Spawn the engine process for spec and wait until it is ready (EngineStartError if it
        cannot start); or, in an API-server process, talk to the engine process over link.
        max_queue: sequences admitted beyond the engine's max_num_seqs before 429."""
        self._loop: asyncio.AbstractEventLoop | None = None
        if link is None:
            self._engine = EngineProcess(spec, 1, start_timeout)
            self.proc, self._conn, info = self._engine.proc, self._engine.conns[0], self._engine.info
            self._shared, self.front_ends = None, 1
        else:
            self._engine, self.proc, self._conn = None, None, link.conn
            info = link.info if link.info is not None else self._ask_info()
            self._shared, self.front_ends = link.in_flight, link.front_ends
        self.tokenizer, self.max_model_len, self.vocab = info["tokenizer"], info["max_model_len"], info["vocab"]
        self.max_in_flight = info["max_num_seqs"] + max_queue
        self.stats = {"running": 0, "waiting": 0, "kv_usage": 0.0, "prompt_tokens": 0, "generation_tokens": 0,
                      "steps": {}, "admission_window": 0.0}
        self._in_flight = 0         # admitted, unfinished sequences (of every front end where shared)
        self.draining = False
        self.failed: str | None = None
        self.on_events = None       # metrics hook: on_events([(GenRequest, Event)])
        self.on_scrape = None       # metrics hook: on_scrape() -> this process's metrics (scrape())
        self._reqs: dict[int, GenRequest] = {}
        self._rids = itertools.count()
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._scrapes: dict[int, asyncio.Future] = {}
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # lists of commands
        self._batch: list[tuple] = []   # commands of this loop iteration (event-loop thread)
        self._parsing = self._parsing_sent = 0
        self._sender = threading.Thread(target=self._send_loop, name="exactllm-engine-send", daemon=True)
        self._sender.start()

    def _ask_info(self) -> dict:
        """The engine's ready info over the pipe (an API-server process is not given it: its
        arguments must stay small, see api_servers.serve). A scrape another front end started
        meanwhile is answered empty."""
        self._conn.send([("info",)])
        while True:
            msg = self._conn.recv()
            if msg[0] == "ready":
                return msg[1]
            if msg[0] == "scrape":
                self._conn.send([("snap", msg[1], None)])

    # ------------------------------------------------------------ lifetime
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the engine's messages on this event loop."""
        self._loop = loop
        loop.add_reader(self._conn.fileno(), self._on_readable)

    def detach(self) -> None:
        """Stop reading on the event loop (from its thread)."""
        if self._loop is not None:
            self._flush()
            self._loop.remove_reader(self._conn.fileno())
            self._loop = None

    def close(self, timeout: float = 30.0) -> None:
        """Stop the engine process (aborting what runs) and wait for it; through a link, only
        this front end's requests are aborted. Idempotent. Call detach() first if attached."""
        self._outbox.put([("stop",)])
        self._sender.join(timeout)
        if self._engine is None:
            self._conn.close()
            return
        self.proc.join(timeout)
        self._engine.stop()

    @property
    def alive(self) -> bool:
        return self.failed is None and (self.proc is None or self.proc.is_alive())

    @property
    def in_flight(self) -> int:
        """Admitted, unfinished sequences: of the whole server where front ends share the count."""
        return self._in_flight if self._shared is None else self._shared.value

    # ------------------------------------------------------------ requests (event-loop thread)
    def encode(self, prompt: "str | list[int]") -> list[int]:
        """Prompt token ids; ValueError for ids outside the vocabulary or an empty prompt."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif prompt and all(isinstance(t, int) and 0 <= t < self.vocab for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"prompt token ids must be a non-empty list of ints in [0, {self.vocab})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def admit(self, n: int) -> None:
        """Reserve n sequence slots or raise Draining / Overloaded."""
        if self.draining or self.failed is not None:
            raise Draining()
        if self._shared is None:
            if self._in_flight + n > self.max_in_flight:
                raise Overloaded()
            self._in_flight += n
            return
        with self._shared.get_lock():
            if self._shared.value + n > self.max_in_flight:
                raise Overloaded()
            self._shared.value += n

    def submit(self, req: GenRequest) -> None:
        req.rid = next(self._rids)
        self._reqs[req.rid] = req
        if req.stream:
            req.detok = self.tokenizer.stream()
            req.hold = max((len(s) for s in req.params.stop), default=1) - 1
        self._post(("add", req.rid, req.prompt_ids, req.params))

    def abort(self, req: GenRequest) -> None:
        """Cancel a sequence (client went away, or a sibling choice failed); idempotent."""
        if not req.done:
            self._release(req)
            self._post(("abort", req.rid))

    def parsing(self, delta: int) -> None:
        """A request was received (+1) / submitted or turned away (-1): Admission holds arrivals
        while the count it was last sent is above 0 (see engine_core.Admission)."""
        self._parsing += delta
        self._post(None)

    def _post(self, cmd: tuple | None) -> None:
        """Queue cmd (None: only the parsing count) for the end of this loop iteration."""
        if self._loop is None:
            if cmd is not None:
                self._outbox.put([cmd])
            return
        if not self._batch:
            self._loop.call_soon(self._flush)
        self._batch.append(cmd)

    def _flush(self) -> None:
        """Send this loop iteration's commands, and the parsing count where it changed, as one message."""
        cmds = [c for c in self._batch if c is not None]
        self._batch = []
        if self._parsing != self._parsing_sent:
            self._parsing_sent = self._parsing
            cmds.append(("parsing", self._parsing))
        if cmds:
            self._outbox.put(cmds)

    def _release(self, req: GenRequest) -> None:
        req.done = True
        self._reqs.pop(req.rid, None)
        if self._shared is None:
            self._in_flight -= 1
            return
        with self._shared.get_lock():
            self._shared.value -= 1

    async def scrape(self, timeout: float = 10.0) -> list:
        """The metrics of the other front ends (their on_scrape()), gathered by the engine
        process; self.stats is the engine's as of the answer. Event-loop thread."""
        fut = self._loop.create_future()
        self._scrapes[id(fut)] = fut
        self._post(("scrape", id(fut)))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._scrapes.pop(id(fut), None)

    # ------------------------------------------------------------ inspection (tests; any other thread)
    def call(self, fn, *args, timeout: float = 60.0):
        """fn(core, *args) in the engine process (core: engine_core.EngineCore), between steps;
        fn and its result must pickle. Not from the event-loop thread (it reads the reply)."""
        fut = concurrent.futures.Future()
        call_id = id(fut)
        self._calls[call_id] = fut
        self._outbox.put([("call", call_id, fn, args)])
        ok, value = fut.result(timeout)
        if not ok:
            raise RuntimeError(f"engine call failed: {value}")
        return value

    # ------------------------------------------------------------ the pipe
    def _send_loop(self) -> None:
        """Write queued commands, all that are waiting in one message, so that the event loop
        never blocks on a full pipe (the engine reads between steps)."""
        while True:
            batch = list(self._outbox.get())
            while True:
                try:
                    batch += self._outbox.get_nowait()
                except queue.Empty:
                    break
            try:
                self._conn.send(batch)
            except (OSError, ValueError):
                return
            if batch[-1][0] == "stop":
                return

    def _on_readable(self) -> None:
        try:
            while True:
                self._handle(self._conn.recv())
                if not self._conn.poll(0):
                    return
        except (EOFError, OSError):
            self._engine_died()

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "reply":
            fut = self._calls.pop(msg[1], None)
            if fut is not None:
                fut.set_result((msg[2], msg[3]))
            return
        if kind == "scrape":
            self._post(("snap", msg[1], self.on_scrape() if self.on_scrape is not None else None))
            return
        if kind == "scraped":
            self.stats = msg[3]
            fut = self._scrapes.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
            return
        _, events, self.stats = msg
        now = time.perf_counter()
        delivered = []
        for e in events:
            req = self._reqs.get(e[1])
            if req is None:  # aborted here already: late events are dropped
                continue
            if e[0] == "t":
                ev = self._tokens(req, *e[2:], now)
            elif e[0] == "a":
                ev = Event(req.index, accepted=True, time=now)
            else:
                ev = Event(req.index, error=(e[2], e[3]), time=now)
            if ev.error is not None or ev.output is not None:
                self._release(req)
            req.events.put_nowait(ev)
            delivered.append((req, ev))
        if self.on_events is not None and delivered:
            self.on_events(delivered)

    def _tokens(self, req: GenRequest, toks: list[int], lps: list[float] | None, finish: str | None,
                final: str | None, now: float) -> Event:
        """The event for a sequence's new tokens: text that cannot still turn out to be part of
        a stop string, and the final output when it finished."""
        lps = lps or []
        ev = Event(req.index, token_ids=toks, logprobs=lps, finish_reason=finish, time=now)
        req.token_ids += toks
        req.logprobs += lps
        if req.stream:
            for t in toks:
                req.decoded += req.detok.push(t)
            if finish is not None:
                # The engine's text is authoritative (stop strings cut, held-back bytes settled).
                ev.text = final[len(req.sent):] if final.startswith(req.sent) else ""
            else:
                ev.text = req.decoded[len(req.sent):max(len(req.sent), len(req.decoded) - req.hold)]
            req.sent += ev.text
        if finish is not None:
            ev.output = RequestOutput(req.rid, req.prompt if isinstance(req.prompt, str) else None,
                                      req.prompt_ids, final, req.token_ids, req.logprobs, finish)
        return ev

    def _engine_died(self) -> None:
        """The pipe closed under us: fail every request; /health reports it from now on."""
        self.detach()
        if self.proc is None:
            self.failed = "the engine process exited"
        else:
            self.proc.join(5)
            self.failed = f"the engine process exited (status {self.proc.exitcode})"
        log.error("%s", self.failed)
        batch = []
        for req in list(self._reqs.values()):
            ev = Event(req.index, error=(500, f"engine error: {self.failed}"), time=time.perf_counter())
            self._release(req)
            req.events.put_nowait(ev)
            batch.append((req, ev))
        for fut in self._calls.values():
            fut.set_result((False, self.failed))
        for fut in self._scrapes.values():
            if not fut.done():
                fut.set_exception(RuntimeError(self.failed))
        if self.on_events is not None and batch:
            self.on_events(batch)


def _stop_process(proc, conns) -> None:
    """Last resort (finalizer, interpreter exit): the engine process must not outlive us. It
    ignores SIGTERM (see engine_core.core_main), so what does not exit on EOF is killed."""
    for conn in conns:
        conn.close()  # the engine sees EOF on all and exits (unless it is still loading)
    proc.join(2)
    if proc.is_alive():
        proc.kill()
        proc.join()
