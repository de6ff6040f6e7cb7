"""The engine process: one LLMEngine and its step loop, away from the HTTP process.

The HTTP process (FastAPI, uvicorn, tokenizer, JSON, SSE) and the engine share no interpreter
lock: under 64 streams the HTTP side kept a single-process server's decode step ~35% slower
than offline (bench/server_load.py on an H100, 2026-11-23). This process owns the engine;
each HTTP process (one, or several with `exactllm serve --api-servers N`: front ends) talks
to it over a duplex pipe of its own (engine_client.py); rids are per pipe:

  in:  a list of commands per message: ("add", rid, prompt ids, SamplingParams),
       ("abort", rid), ("parsing", n) (requests that front end is still turning into adds),
       ("call", call id, fn, args) (fn(core, *args), for tests), ("info",) (send "ready"
       again, to a front end that was not given it), ("scrape", id) (the other
       front ends' metrics, for /metrics), ("snap", key, metrics) (this front end's, asked
       for by a scrape), ("stop",) (this front end is done: what it still runs is aborted)
  out: ("ready", info) or ("failed", message) once; then per loop iteration that did
       anything one ("out", events, stats) message, events being ("a", rid) accepted,
       ("e", rid, HTTP status, message), ("t", rid, new token ids, new log-probs or None,
       finish reason or None, final text or None); ("reply", call id, ok, value);
       ("scrape", key) (send your metrics); ("scraped", id, [metrics of the others], stats).

Requests reach the engine through Admission, which decides when held arrivals join the batch.
The process exits when every pipe has closed or said stop (the front ends went away, however
they died) or, as a watchdog notices within a second, when its parent is gone.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("exactllm.server")


@dataclass
class EngineSpec:
    """How the engine process builds its LLM (picklable: it crosses to the spawned process)."""
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    seed: int = 0
    numerics: str = "fast"
    tp: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    admission_window: float | None = None   # seconds; None: automatic (see Admission)
    log_level: str = "warning"
    setup: Callable | None = None           # setup(engine) after the build: tests patch the engine here


class Admission:
    """When held requests join the batch.

    A step that computes prompts costs more than a decode step: it replays a prompt-step CUDA
    graph (engine/prompt_graphs.py), is synchronous (no step scheduled ahead) and computes the
    prompt tokens. Requests arriving one by one would each force such a step on every stream.
    So while sequences are decoding, new ones are held until the first has waited ``window``
    seconds, then added together: a request waits at most about what one more prompt step
    would cost all the others. (H100, TinyLlama, bench/prompt_step.py: a step of 63 decode rows
    and one 17-token prompt 2.4 ms from its graph, 25 ms eagerly; a decode step of 64 ~1.3 ms.)

    An idle engine waits for arrivals to pause (QUIET) before its first step, up to max_window
    from the first arrival (with a fixed window: up to that window): clients that resubmit as
    soon as their previous answers ended arrive in a burst spread over the HTTP process's parsing
    time, and a burst split over two prompt steps keeps two cohorts decoding out of step from
    then on (each round then costs the steps of both).
    For the same reason, while every running sequence will end (by its token limit) within the
    window, held requests wait for the batch to drain rather than start a cohort of their own;
    and while the HTTP process reports requests it has received but not yet submitted
    (``parsing``: a burst it is still working through), held requests wait for them, up to
    max_window from the first held (a fixed window: up to that window).

    window None (auto): the measured extra cost of a step that computes prompts over a decode
    step (medians of recent steps), at most max_window; 0 when the runner has no CUDA graphs
    (a prompt then costs its compute, alone or batched). A number: that fixed window.
    """

    RECENT = 16
    QUIET = 0.002

    # On an H100 under 64 streams of TinyLlama an eager prompt step took ~32 ms and a decode step
    # ~1.3 ms (bench/server_load.py, 2026-11-23): the cap must not cut the window below that
    # difference where prompt steps run eagerly (no prompt graphs, or more tokens than their buckets).
    def __init__(self, window: float | None = None, graphs: bool = False, max_window: float = 0.05):
        self.fixed, self.graphs, self.max_window = window, graphs, max_window
        self.first_held = 0.0  # monotonic time the oldest held request arrived
        self.last_held = 0.0   # and the newest
        self.parsing = 0       # requests the HTTP process has received and not yet submitted
        self._times: dict[bool, deque] = {True: deque(maxlen=self.RECENT), False: deque(maxlen=self.RECENT)}
        self.steps = {"prompt": [0, 0.0], "decode": [0, 0.0]}  # kind -> [steps, seconds] (for /metrics)

    def observe(self, mixed: bool, seconds: float) -> None:
        """One step's duration; mixed: it computed prompt tokens."""
        self._times[mixed].append(seconds)
        total = self.steps["prompt" if mixed else "decode"]
        total[0] += 1
        total[1] += seconds

    def hold(self, now: float, first: bool) -> None:
        if first:
            self.first_held = now
        self.last_held = now

    @property
    def window(self) -> float:
        if self.fixed is not None:
            return self.fixed
        mixed, decode = self._times[True], self._times[False]
        if not (self.graphs and mixed and decode):
            return 0.0
        return min(self.max_window, max(0.0, statistics.median(mixed) - statistics.median(decode)))

    def wait(self, now: float, busy: bool) -> float:
        """Seconds until the held requests are due (0: now), by the window alone."""
        window = self.window
        cap = self.max_window if self.fixed is None else window
        if self.parsing:  # more of this burst is on its way: wait for it (at most cap)
            return max(0.0, self.first_held + cap - now)
        if busy:
            return max(0.0, self.first_held + window - now)
        return max(0.0, min(self.first_held + cap, self.last_held + min(cap, self.QUIET)) - now)

    def due(self, now: float, busy: bool) -> bool:
        return self.wait(now, busy) == 0.0

    def drain_steps(self) -> int:
        """Decode steps that fit in the window (at most max_window): a batch whose sequences all
        end within that many steps is left to drain before held requests join."""
        decode = self._times[False]
        if not (self.graphs and decode):
            return 0
        return int(min(self.window, self.max_window) / max(statistics.median(decode), 1e-6))


class EngineCore:
    """The step loop of the engine process (see the module docstring for the messages).

    conns: one pipe per front end; a request is known by (front end, its rid)."""

    def __init__(self, engine, conns, window: float | None = None):
        self.engine, self.conns = engine, list(conns)
        self.open = dict.fromkeys(range(len(self.conns)))  # front ends still attached (ordered)
        self.admission = Admission(window, graphs=getattr(engine.runner, "graphs", None) is not None)
        self.parsing = [0] * len(self.conns)  # each front end's count (Admission sees the sum)
        self.held: list[tuple] = []           # (front end, rid, prompt ids, params), arrived, not yet added
        self.active: dict[int, list] = {}      # seq_id -> [front end, rid, seq, tokens already sent]
        self.by_rid: dict[tuple, int] = {}     # (front end, rid) -> seq_id
        self.scrapes: dict[tuple, list] = {}   # (front end, id) -> [front ends still to answer, their metrics]
        self.touched: set[int] = set()         # front ends that sent commands in this loop iteration

    def run(self) -> None:
        engine = self.engine
        while self.open:
            busy = engine.has_work()
            timeout = 0.0 if busy else (self.admission.wait(time.monotonic(), False) if self.held else None)
            out: list[list] = [[] for _ in self.conns]
            self.touched = set()
            changed = self._receive(timeout, out)
            if self.held and self._due():
                self._admit(out)
            if engine.has_work():
                self._step(out)
                changed = True
            if changed or any(out):
                # A front end hears of every change only where it is the only one; several hear
                # of their own requests (and get stats with them), /metrics asks (scrape).
                stats, single = self.stats(), len(self.conns) == 1
                for src in list(self.open):
                    if out[src] or (changed and (single or src in self.touched)):
                        self._send(src, ("out", out[src], stats))

    def _send(self, src: int, msg) -> None:
        try:
            self.conns[src].send(msg)
        except OSError:  # that front end is gone
            self._detach(src)

    def _due(self) -> bool:
        busy = self.engine.has_work()
        if not self.admission.due(time.monotonic(), busy):
            return False
        if not busy or self.engine.scheduler.waiting:
            return True
        steps = self.admission.drain_steps()
        return not steps or any(s.params.max_tokens - len(s.output_token_ids) > steps
                                for s in self.engine.scheduler.running)

    def stats(self) -> dict:
        e = self.engine
        return {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
                "kv_usage": e.block_manager.usage(), "prompt_tokens": e.stats["prompt_tokens"],
                "generation_tokens": e.stats["generation_tokens"], "steps": self.admission.steps,
                "admission_window": self.admission.window}

    def _receive(self, timeout: float | None, out: list) -> bool:
        """Apply every queued command of every front end, waiting up to timeout (None: for ever)
        for the first. True if the engine's state changed."""
        changed = False
        while self.open:
            ready = multiprocessing.connection.wait([self.conns[src] for src in self.open], timeout)
            if not ready:
                return changed
            timeout = 0.0
            for conn in ready:
                src = self.conns.index(conn)
                self.touched.add(src)
                try:
                    cmds = conn.recv()
                except (EOFError, OSError):  # that front end is gone
                    changed |= self._detach(src)
                    continue
                changed |= self._apply(src, cmds, out)
        return changed

    def _apply(self, src: int, cmds: list, out: list) -> bool:
        changed = False
        for cmd in cmds:
            kind = cmd[0]
            if kind == "add":
                self.admission.hold(time.monotonic(), first=not self.held)
                self.held.append((src, *cmd[1:]))
            elif kind == "abort":
                changed |= self._abort(src, cmd[1])
            elif kind == "parsing":
                self.parsing[src] = cmd[1]
                self.admission.parsing = sum(self.parsing)
            elif kind == "call":
                self._call(src, *cmd[1:])
            elif kind == "info":
                self._send(src, ("ready", engine_info(self.engine)))
            elif kind == "scrape":
                self._scrape(src, cmd[1])
            elif kind == "snap":
                self._snap(src, cmd[1], cmd[2])
            else:  # "stop"
                return self._detach(src) or changed
        return changed

    def _detach(self, src: int) -> bool:
        """A front end stopped or went away: abort its requests, forget its count; True if the
        engine's state changed."""
        if src not in self.open:
            return False
        del self.open[src]
        with contextlib.suppress(OSError):
            self.conns[src].close()
        self.parsing[src] = 0
        self.admission.parsing = sum(self.parsing)
        self.held = [h for h in self.held if h[0] != src]
        mine = [key for key in self.by_rid if key[0] == src]
        for key in mine:
            self._abort(*key)
        for key in list(self.scrapes):  # it will not answer a scrape any more, nor hear one
            self._snap(src, key, None)
        return bool(mine)

    def _call(self, src: int, call_id: int, fn, args) -> None:
        try:
            reply = ("reply", call_id, True, fn(self, *args))
        except Exception as exc:
            reply = ("reply", call_id, False, f"{type(exc).__name__}: {exc}")
        self._send(src, reply)

    def _scrape(self, src: int, scrape_id: int) -> None:
        """Front end src serves /metrics: ask every other front end for its metrics."""
        key = (src, scrape_id)
        others = [s for s in self.open if s != src]
        self.scrapes[key] = [set(others), []]
        for s in others:
            self._send(s, ("scrape", key))
        self._snap(None, key, None)

    def _snap(self, src: int | None, key: tuple, metrics) -> None:
        """src's answer to a scrape (None: no answer, it went away); answer the scrape once all did."""
        entry = self.scrapes.get(key)
        if entry is None:
            return
        entry[0].discard(src)
        if metrics is not None:
            entry[1].append(metrics)
        if not entry[0]:
            del self.scrapes[key]
            if key[0] in self.open:
                self._send(key[0], ("scraped", key[1], entry[1], self.stats()))

    def _abort(self, src: int, rid: int) -> bool:
        seq_id = self.by_rid.pop((src, rid), None)
        if seq_id is None:
            self.held = [h for h in self.held if h[:2] != (src, rid)]
            return False
        self.engine.abort(self.active.pop(seq_id)[2])
        return True

    def _admit(self, out: list) -> None:
        """Add every held request, so that their prompts are computed in one step."""
        for src, rid, ids, params in self.held:
            try:
                seq = self.engine.add_request(ids, params)
            except ValueError as exc:
                out[src].append(("e", rid, 400, str(exc)))
                continue
            except Exception as exc:
                log.exception("could not add a request")
                out[src].append(("e", rid, 500, f"{type(exc).__name__}: {exc}"))
                continue
            self.active[seq.seq_id] = [src, rid, seq, 0]
            self.by_rid[(src, rid)] = seq.seq_id
            out[src].append(("a", rid))
        self.held.clear()

    def _step(self, out: list) -> None:
        engine = self.engine
        waiting = engine.scheduler.waiting
        head = waiting[0] if waiting else None
        t0 = time.perf_counter()
        try:
            seqs = engine.step()
        except Exception as exc:  # a bug or a device fault: fail what is running, keep serving
            log.exception("engine step failed")
            message = f"engine error: {type(exc).__name__}: {exc}"
            for src, rid, seq, _ in self.active.values():
                engine.abort(seq)
                out[src].append(("e", rid, 500, message))
            self.active.clear()
            self.by_rid.clear()
            return
        # The step computed prompt tokens if it scheduled the first waiting sequence (with async
        # scheduling a call can instead just finish the decode step in flight).
        self.admission.observe(head is not None and (not waiting or waiting[0] is not head), time.perf_counter() - t0)
        for s in seqs:
            entry = self.active.get(s.seq_id)
            if entry is None:
                continue
            src, rid, _, sent = entry
            toks = s.output_token_ids[sent:]
            entry[3] = sent + len(toks)
            lps = s.logprobs[sent:] if s.params.logprobs else None
            if s.finished:
                out[src].append(("t", rid, toks, lps, s.finish_reason, s.text))
                del self.active[s.seq_id]
                del self.by_rid[(src, rid)]
            else:
                out[src].append(("t", rid, toks, lps, None, None))


def engine_info(engine) -> dict:
    """What a front end needs of the engine (the "ready" message)."""
    return {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len,
            "vocab": engine.model_config.vocab, "max_num_seqs": engine.cfg.max_num_seqs}


def exit_with_parent(parent_pid: int) -> None:
    """A watchdog thread: exit this process within a second of its parent's end (however the
    parent died, nobody would read what this process makes)."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="exactllm-parent-watch", daemon=True).start()


def core_main(spec: EngineSpec, conns: list, parent_pid: int) -> None:
    """Entry point of the engine process; conns: one pipe per front end."""
    exit_with_parent(parent_pid)
    # A terminal's Ctrl-C or a service manager's SIGTERM reaches the whole process group: the HTTP
    # processes drain, and this one keeps stepping until told to stop (or its pipes close). A
    # no-op handler, not SIG_IGN, so that processes it starts (tensor-parallel ranks) keep the defaults.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    logging.basicConfig(level=spec.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from exactllm import LLM
        llm = LLM(model=spec.model, device=spec.device, dtype=spec.dtype, seed=spec.seed, numerics=spec.numerics,
                  tensor_parallel_size=spec.tp, max_num_seqs=spec.max_num_seqs,
                  max_num_batched_tokens=spec.max_num_batched_tokens, num_kv_blocks=spec.num_kv_blocks,
                  max_model_len=spec.max_model_len)
        engine = llm.engine
        t0 = time.perf_counter()  # capture every graph bucket before the first request, not during one
        done = engine.runner.capture_graphs(spec.max_num_seqs)
        prompt = engine.runner.capture_prompt_graphs(spec.max_num_batched_tokens)
        if done or prompt:
            logging.getLogger("exactllm.serve").info(
                "captured %d decode CUDA graphs (batch %s) and %d prompt-step graphs (tokens %s) in %.1f s",
                len(done), ",".join(map(str, done)), len(prompt), ",".join(map(str, prompt)), time.perf_counter() - t0)
        if spec.setup is not None:
            spec.setup(engine)
    except BaseException as exc:
        log.debug("engine start-up failed\n%s", traceback.format_exc())
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    info = engine_info(engine)
    for conn in conns:
        conn.send(("ready", info))
    # The step loop runs on a thread of its own: on a busy 2-core machine, torch's CPU ops driven
    # from the main thread took ~10x longer per step than from another thread (2026-11-23; the
    # offline baseline of bench/server_load.py runs on a worker thread for the same reason).
    loop = threading.Thread(target=EngineCore(engine, conns, spec.admission_window).run, name="exactllm-engine-loop")
    loop.start()
    loop.join()
    llm.close()
