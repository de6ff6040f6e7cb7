"""Tensor parallelism on one host as a persistent worker pool.

The calling process is rank 0: it keeps the scheduler, builds its model shard and samples.
``world - 1`` worker processes are spawned once; each joins the process group (gloo on CPU,
NCCL on CUDA with GPU ``rank``), builds its shard and KV cache once, then loops on a pipe from
the driver: for every step it receives the ``StepInputs`` and runs the same forward, so the
collectives inside the model line up across ranks. Only rank 0 needs the logits.

Control goes over pipes rather than a collective so that an idle worker waits without a
collective timeout, and a worker notices at once when the driver goes away (its pipe closes;
a watchdog thread also exits the worker when its parent dies). A worker that fails sends its
traceback and exits; the driver's pending collective then fails and the driver raises
``WorkerError`` with that traceback, and the pool is closed.

The driver holds the default torch.distributed process group, so one pool can be open per
process at a time. Under torchrun (multi-host) ``spmd_engine`` is used instead: every rank runs
the whole engine loop and follows rank 0's tokens.
"""
from __future__ import annotations

import datetime
import gc
import os
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from exactllm.config import EngineConfig
from exactllm.distributed.launch import WorkerError, free_port
from exactllm.engine.llm_engine import LLMEngine
from exactllm.layers.parallel import TPContext
from exactllm.models.loader import ModelSource, resolve_model

TIMEOUT_S = 600.0  # a collective (or start-up) that waits longer than this fails


SHARE_GPUS_ENV = "EXACTLLM_TP_SHARE_GPUS"


def shares_gpus(device: str) -> bool:
    """Whether ranks may share GPUs ($EXACTLLM_TP_SHARE_GPUS=1): rank r runs on GPU
    r % device_count and collectives go over gloo through host memory. Slow; it exists to check
    tensor-parallel bits (TP=4 == TP=1 with the GPU kernels) on a machine with fewer GPUs than
    ranks. Off, more ranks than GPUs is an error."""
    return torch.device(device).type == "cuda" and os.environ.get(SHARE_GPUS_ENV) == "1"


def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" and not shares_gpus(device) else "gloo"


def _rank_device(device: str, rank: int) -> str:
    if torch.device(device).type == "cuda":
        gpu = rank % torch.cuda.device_count() if shares_gpus(device) else rank
        torch.cuda.set_device(gpu)
        return f"cuda:{gpu}"
    return device


def _share_cpu(world: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def _init_group(device: str, rank: int, world: int, port: int) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group(_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(3)  # the driver died: nothing will ever come


def _worker_main(rank: int, world: int, port: int, model_name: str, model_config, cfg: EngineConfig,
                 conn, parent_pid: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        device = _rank_device(cfg.device, rank)
        if device == "cpu":
            _share_cpu(world)
        _init_group(cfg.device, rank, world, port)
        source = resolve_model(model_name, cfg.dtype)
        source.config = model_config
        engine = LLMEngine(source, cfg.with_(device=device), TPContext(rank, world, dist.group.WORLD))
        conn.send(("ready", os.getpid()))
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the driver closed its end without saying stop
                os._exit(0)
            if msg[0] == "step":
                engine.runner.forward_logits(msg[1])
            elif msg[0] == "call":
                conn.send(("ok", msg[1](engine, *msg[2])))
            else:  # "stop"
                break
    except BaseException:
        traceback.print_exc()  # also on stderr: a driver blocked in a collective never reads the pipe
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)  # closes this rank's sockets, so the peers' collectives fail instead of hanging
    dist.destroy_process_group()
    conn.send(("stopped",))


class TPWorkerPool:
    """Ranks 1..world-1 of a tensor-parallel group, driven from this process (rank 0)."""

    def __init__(self, source: ModelSource, cfg: EngineConfig):
        world = cfg.tensor_parallel_size
        if dist.is_initialized():
            gc.collect()  # an unreachable LLM may still hold a pool; its finalizer closes it
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process (another "
                               "tensor-parallel LLM is open?): close() it before starting a new one")
        if torch.device(cfg.device).type == "cuda" and torch.cuda.device_count() < world and not shares_gpus(cfg.device):
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs; {torch.cuda.device_count()} "
                             f"visible (set {SHARE_GPUS_ENV}=1 to place several ranks on one GPU, slowly, "
                             f"to check bits)")
        self.world, self.broken, self.closed = world, False, False
        ctx = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        self._driver_threads = torch.get_num_threads()  # _share_cpu changes it; close() gives it back
        for rank in range(1, world):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker_main, name=f"exactllm-tp-rank{rank}", daemon=True,
                            args=(rank, world, port, source.name, source.config, cfg, theirs, os.getpid()))
            p.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(p)
        try:
            self.device = _rank_device(cfg.device, 0)
            if self.device == "cpu":
                _share_cpu(world)
            self._wait_for(lambda: _init_group(cfg.device, 0, world, port))
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _wait_for(self, fn) -> None:
        """Run fn (which blocks on the workers) in a thread, failing early if a worker fails."""
        box = {}

        def target():
            try:
                fn()
            except BaseException as e:
                box["error"] = e
        t = threading.Thread(target=target, daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.2)
            self._check_workers()
        if "error" in box:
            raise box["error"]

    def _check_workers(self) -> None:
        """Raise WorkerError if a worker has exited, with the traceback it sent if any."""
        for rank, (conn, p) in enumerate(zip(self.conns, self.procs), start=1):
            if p.exitcode is None:
                continue
            detail = f"died (exit code {p.exitcode})"
            while conn.poll():
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "error":
                    detail = f"failed:\n{msg[1]}"
            raise WorkerError(f"tensor-parallel rank {rank} of {self.world} {detail}")

    def _reply(self, rank: int):
        conn, p = self.conns[rank - 1], self.procs[rank - 1]
        deadline = time.monotonic() + TIMEOUT_S
        while not conn.poll(0.2):
            if p.exitcode is not None and not conn.poll():
                raise WorkerError(f"tensor-parallel rank {rank} of {self.world} died (exit code {p.exitcode})")
            if time.monotonic() > deadline:
                raise WorkerError(f"tensor-parallel rank {rank} did not answer in {TIMEOUT_S:.0f} s")
        msg = conn.recv()
        if msg[0] == "error":
            raise WorkerError(f"tensor-parallel rank {rank} of {self.world} failed:\n{msg[1]}")
        return msg[1]

    def wait_ready(self) -> None:
        self._guard(lambda: [self._reply(r) for r in range(1, self.world)])

    def _guard(self, fn):
        """Run fn against the workers; on any failure report the workers' tracebacks and close."""
        if self.closed or self.broken:
            raise WorkerError("the tensor-parallel worker pool is closed" if not self.broken else
                              "the tensor-parallel worker pool failed earlier; create a new LLM")
        try:
            return fn()
        except WorkerError:
            self.broken = True
            self.close()
            raise
        except BaseException as e:
            self.broken = True
            time.sleep(0.5)  # a failing worker's report may still be on its way
            try:
                self._check_workers()
            except WorkerError as w:
                self.close()
                raise w from e
            self.close()
            raise

    def _send(self, msg) -> None:
        self._check_workers()
        for conn in self.conns:
            conn.send(msg)

    def forward(self, inputs, local_forward):
        """Run one step's forward on every rank; rank 0's logits come back."""
        return self._guard(lambda: (self._send(("step", inputs)), local_forward(inputs))[1])

    def call(self, fn, *args) -> list:
        """fn(engine, *args) on every worker rank (fn importable at module level); results by rank 1..N-1.
        For inspection; fn must not run collectives."""
        return self._guard(lambda: (self._send(("call", fn, args)), [self._reply(r) for r in range(1, self.world)])[1])

    def close(self) -> None:
        """Stop the workers (terminating any that do not stop) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        if not self.broken:
            for conn in self.conns:
                try:
                    conn.send(("stop",))
                except (OSError, ValueError):
                    pass
        for p in self.procs:
            p.join(timeout=0.5 if self.broken else 10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        torch.set_num_threads(self._driver_threads)
        if dist.is_initialized():
            dist.destroy_process_group()


class TPRunner:
    """The driver's ModelRunner, with every forward run on all ranks (same ``step`` contract)."""

    def __init__(self, runner, pool: TPWorkerPool):
        self.inner, self.pool = runner, pool

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def capture_graphs(self, max_batch: int) -> list[int]:
        # every step runs eagerly on all ranks: a graph captured on rank 0 alone would hang, and decode
        # graphs replayed on every rank (NCCL collectives captured) hung on the H200 x2 host: see
        # BENCHMARKS.md "Multi-GPU"
        return []

    def forward_logits(self, inputs):
        return self.pool.forward(inputs, self.inner.forward_logits)

    def step(self, chunks, randoms: dict, forward=None) -> list[tuple]:
        return self.inner.step(chunks, randoms, forward or self.forward_logits)


def start_pool(source: ModelSource, cfg: EngineConfig) -> tuple[TPWorkerPool, LLMEngine]:
    """Spawn the workers and build rank 0's engine here; returns (pool, engine)."""
    pool = TPWorkerPool(source, cfg)
    box = {}

    def build():
        box["engine"] = LLMEngine(source, cfg.with_(device=pool.device), TPContext(0, pool.world, dist.group.WORLD),
                                  wrap_runner=lambda runner: TPRunner(runner, pool))
    try:
        pool._guard(lambda: pool._wait_for(build))
        pool.wait_ready()
    except BaseException:
        pool.close()
        raise
    return pool, box["engine"]


def spmd_engine(source: ModelSource, cfg: EngineConfig) -> LLMEngine:
    """Under torchrun: this process is one rank of the job and runs the whole engine loop on its
    shard; every rank must make the same calls (generate, stream) in the same order."""
    if not dist.is_initialized():
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        device = _rank_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
        if device == "cpu":
            _share_cpu(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        dist.init_process_group(_backend(cfg.device), timeout=datetime.timedelta(seconds=TIMEOUT_S))
    world = dist.get_world_size()
    if world != cfg.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {cfg.tensor_parallel_size} but the torchrun job has {world} ranks")
    device = (f"cuda:{torch.cuda.current_device()}" if torch.device(cfg.device).type == "cuda" else cfg.device)
    return LLMEngine(source, cfg.with_(device=device), TPContext(dist.get_rank(), world, dist.group.WORLD))
