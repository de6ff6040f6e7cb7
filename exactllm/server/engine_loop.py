"""One engine thread behind an asyncio front end.

The LLMEngine is not thread-safe, so exactly one thread touches it: HTTP handlers post
commands (add, abort) into a thread-safe inbox; the engine thread applies them between
steps, runs ``engine.step()`` while there is work, and hands each step's results back to the
event loop in one ``call_soon_threadsafe`` call. Each HTTP call owns an ``asyncio.Queue``
that receives the events of all its sequences (``n`` choices, several prompts).

Admission is bounded: at most ``max_in_flight`` sequences may be admitted and unfinished;
beyond that the front end refuses with 429, so memory does not grow with offered load. Requests
that arrive while the engine is decoding are added in groups (see Admission), so that their
prompts share one step instead of each costing the running streams an eager step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from exactllm.engine.llm_engine import LLMEngine, RequestOutput
from exactllm.engine.sequence import Sequence
from exactllm.sampling_params import SamplingParams

log = logging.getLogger("exactllm.server")


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
    prompt_tokens: int = 0              # set on the "accepted" event
    accepted: bool = False
    error: tuple[int, str] | None = None  # (HTTP status, message)
    time: float = 0.0                   # perf_counter when the engine produced it


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
    """One sequence to generate, as the server tracks it across both threads."""
    index: int
    prompt: "str | list[int]"
    params: SamplingParams
    max_tokens: int | None              # None: up to the model's context
    stream: bool
    events: asyncio.Queue
    n_choices: int = 1                  # choices per prompt in this HTTP call
    arrival: float = field(default_factory=time.perf_counter)
    # engine-thread state
    seq: Sequence | None = None
    cancelled: bool = False
    detok: object = None
    n_seen: int = 0                     # output tokens already turned into events
    decoded: str = ""                   # text decoded so far (streaming)
    sent: str = ""                      # text already sent (a prefix of decoded)
    # event-loop-thread state
    done: bool = False
    last_token_time: float | None = None


class Admission:
    """When requests that arrive while the engine is busy join the batch.

    A step that computes prompts cannot replay a CUDA graph of pure decode: it runs eagerly for
    every running sequence, and on a GPU costs several decode steps (launch-bound, nearly
    whatever the number of prompt tokens). Requests arriving one by one would each force such
    a step on every stream. So while sequences are decoding, new ones are held until the first
    has waited ``window`` seconds, then added together: a request waits at most about what one
    more eager step would cost all the others. An idle engine takes requests at once.

    window None (auto): the measured extra cost of a step that computes prompts over a decode
    step (medians of recent steps), at most max_window; 0 when the runner has no CUDA graphs
    (a prompt then costs its compute, alone or batched). A number: that fixed window.
    """

    RECENT = 16

    def __init__(self, window: float | None = None, graphs: bool = False, max_window: float = 0.02):
        self.fixed, self.graphs, self.max_window = window, graphs, max_window
        self.first_held = 0.0  # perf_counter when the oldest held request arrived
        self._times: dict[bool, deque] = {True: deque(maxlen=self.RECENT), False: deque(maxlen=self.RECENT)}
        self.steps = {"prompt": [0, 0.0], "decode": [0, 0.0]}  # kind -> [steps, seconds] (for /metrics)

    def observe(self, mixed: bool, seconds: float) -> None:
        """One step's duration; mixed: it computed prompt tokens."""
        self._times[mixed].append(seconds)
        total = self.steps["prompt" if mixed else "decode"]
        total[0] += 1
        total[1] += seconds

    @property
    def window(self) -> float:
        if self.fixed is not None:
            return self.fixed
        mixed, decode = self._times[True], self._times[False]
        if not (self.graphs and mixed and decode):
            return 0.0
        return min(self.max_window, max(0.0, statistics.median(mixed) - statistics.median(decode)))

    def due(self, now: float, busy: bool) -> bool:
        return not busy or now - self.first_held >= self.window


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_in_flight: int, on_events: Callable[[list], None] | None = None,
                 admission_window: float | None = None):
        """admission_window: see Admission (None: automatic)."""
        self.engine = engine
        self.admission = Admission(admission_window, graphs=getattr(engine.runner, "graphs", None) is not None)
        self._held: list[GenRequest] = []  # arrived, not yet added to the engine (engine thread only)
        self.max_in_flight = max_in_flight
        self.in_flight = 0          # admitted, unfinished sequences (event-loop thread only)
        self.draining = False
        self.on_events = on_events  # metrics hook, called on the event-loop thread
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[int, GenRequest] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: BaseException | None = None

    # ------------------------------------------------------------ event-loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="exactllm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def admit(self, n: int) -> None:
        """Reserve n sequence slots or raise Draining / Overloaded."""
        if self.draining:
            raise Draining()
        if self.in_flight + n > self.max_in_flight:
            raise Overloaded()
        self.in_flight += n

    def submit(self, req: GenRequest) -> None:
        self._inbox.put(("add", req))

    def abort(self, req: GenRequest) -> None:
        """Cancel a sequence (client went away, or a sibling choice failed); idempotent."""
        if not req.done:
            self._release(req)
            self._inbox.put(("abort", req))

    def _release(self, req: GenRequest) -> None:
        req.done = True
        self.in_flight -= 1

    def _deliver(self, batch: list[tuple[GenRequest, Event]]) -> None:
        delivered = []
        for req, ev in batch:
            if req.done:  # aborted from this side already: drop late events
                continue
            if ev.error is not None or ev.output is not None:
                self._release(req)
            req.events.put_nowait(ev)
            delivered.append((req, ev))
        if self.on_events is not None:
            self.on_events(delivered)

    # ------------------------------------------------------------ engine thread
    def _post(self, batch: list) -> None:
        if batch:
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _run(self) -> None:
        try:
            while True:
                if not self._apply_commands(block=not (self.engine.has_work() or self._held)):
                    return
                self._admit(time.perf_counter())
                if not self.engine.has_work():
                    continue
                mixed = bool(self.engine.scheduler.waiting)  # some prompt is computed this step
                t0 = time.perf_counter()
                try:
                    seqs = self.engine.step()
                except Exception as exc:  # a bug or a device fault: fail what is running, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
                    continue
                now = time.perf_counter()
                self.admission.observe(mixed, now - t0)
                self._post([(self._active[s.seq_id], self._progress(self._active[s.seq_id], now))
                            for s in seqs if s.seq_id in self._active])
                for s in seqs:
                    if s.finished:
                        self._active.pop(s.seq_id, None)
        except BaseException as exc:  # keep /health honest if the thread dies
            self.failed = exc
            log.exception("engine thread died")
            raise

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; when idle, wait for one. False when told to stop."""
        while True:
            try:
                kind, req = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
            except queue.Empty:
                break
            block = False
            if kind == "stop":
                for r in list(self._active.values()):
                    self.engine.abort(r.seq)
                return False
            if kind == "add":
                self._hold(req)
            elif kind == "abort":
                req.cancelled = True
                if req.seq is not None and not req.seq.finished:
                    self.engine.abort(req.seq)
                    self._active.pop(req.seq.seq_id, None)
        return True

    def _hold(self, req: GenRequest) -> None:
        if not req.cancelled:
            if not self._held:
                self.admission.first_held = time.perf_counter()
            self._held.append(req)

    def _admit(self, now: float) -> None:
        """Add the held requests to the engine, so that their prompts are computed in one step,
        once the admission policy says so; each gets "accepted" (or its error) then."""
        if not self._held or not self.admission.due(now, self.engine.has_work()):
            return
        batch = [(req, self._add(req)) for req in self._held if not req.cancelled]
        self._held.clear()
        self._post(batch)

    def _add(self, req: GenRequest) -> Event:
        try:
            ids = self.engine.encode(req.prompt)
            limit = self.engine.max_model_len
            if len(ids) >= limit:
                raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {limit} tokens")
            if req.max_tokens is None:
                req.params.max_tokens = limit - len(ids)
            elif len(ids) + req.max_tokens > limit:
                raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds "
                                 f"this model's context of {limit} tokens")
            req.seq = self.engine.add_request(ids, req.params)
        except ValueError as exc:
            return Event(req.index, error=(400, str(exc)))
        except Exception as exc:
            log.exception("could not add a request")
            return Event(req.index, error=(500, f"{type(exc).__name__}: {exc}"))
        if req.stream:
            req.detok = self.engine.tokenizer.stream()
        self._active[req.seq.seq_id] = req
        return Event(req.index, accepted=True, prompt_tokens=len(ids))

    def _progress(self, req: GenRequest, now: float) -> Event:
        """The event for the tokens seq got since the last one: text that cannot still turn
        out to be part of a stop string, and the final output when it finished."""
        seq = req.seq
        ev = Event(req.index, token_ids=seq.output_token_ids[req.n_seen:],
                   logprobs=seq.logprobs[req.n_seen:], finish_reason=seq.finish_reason, time=now)
        req.n_seen = len(seq.output_token_ids)
        if req.stream:
            for t in ev.token_ids:
                req.decoded += req.detok.push(t)
            if seq.finished:
                # The engine's text is authoritative (stop strings cut, held-back bytes settled).
                final = seq.text
                ev.text = final[len(req.sent):] if final.startswith(req.sent) else ""
            else:
                hold = max((len(s) for s in seq.params.stop), default=1) - 1
                ev.text = req.decoded[len(req.sent):max(len(req.sent), len(req.decoded) - hold)]
            req.sent += ev.text
        if seq.finished:
            ev.output = self.engine.output(seq)
        return ev

    def _fail_all(self, message: str) -> None:
        batch = []
        for req in list(self._active.values()):
            self.engine.abort(req.seq)
            batch.append((req, Event(req.index, error=(500, message))))
        self._active.clear()
        self._post(batch)
