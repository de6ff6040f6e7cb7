"""Run a function on N ranks of one host, or inside a torchrun job, and collect the results.

    results = launch(fn, nprocs=4, args=(...), device="cpu")   # fn(rank, world_size, *args)

Each rank is a fresh process (multiprocessing "spawn") with a torch.distributed process group
already initialized: gloo on CPU, NCCL on CUDA with GPU ``rank``.  ``fn`` must be importable
(module level).  Results come back pickled by value (CUDA tensors moved to CPU) in rank
order.  If any rank raises, the others are stopped and ``WorkerError`` carries that rank's
traceback.  Under torchrun (its RANK / WORLD_SIZE / MASTER_* variables are set), this process
is one rank: ``fn`` runs here and every rank gets the list of all ranks' results.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class WorkerError(RuntimeError):
    """A rank failed; the message holds its rank and traceback."""


def under_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _init_group(device: str, rank: int, world: int, timeout: float) -> None:
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def _worker(rank, world, fn, args, device, port, results, timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        _init_group(device, rank, world, timeout)
        results.put((rank, True, pickle.dumps(_to_cpu(fn(rank, world, *args)))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch_torchrun(fn, args, device, timeout):
    own_group = not dist.is_initialized()
    if own_group:
        _init_group(device, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timeout)
    try:
        result = fn(dist.get_rank(), dist.get_world_size(), *args)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, _to_cpu(result))
        return gathered
    finally:
        if own_group:
            dist.destroy_process_group()


def launch(fn, nprocs: int, args: tuple = (), device: str = "cpu", timeout: float = 300.0) -> list:
    """fn(rank, world_size, *args) on ``nprocs`` ranks -> [result of rank 0, ..., rank n-1]."""
    if under_torchrun():
        return _launch_torchrun(fn, args, device, timeout)
    if device == "cuda" and torch.cuda.device_count() < nprocs:
        raise ValueError(f"{nprocs} ranks need {nprocs} GPUs; {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, fn, args, device, port, results, timeout),
                         name=f"exactllm-rank{r}") for r in range(nprocs)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < nprocs:
            try:
                rank, ok, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise WorkerError(f"{dead[0].name} died with exit code {dead[0].exitcode} "
                                      "before reporting a result") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"timed out after {timeout:.0f} s waiting for ranks "
                                      f"{sorted(set(range(nprocs)) - set(out))}") from None
                continue
            if not ok:
                raise WorkerError(f"rank {rank} of {nprocs} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == nprocs else 0.5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        results.close()
    return [out[r] for r in range(nprocs)]
