"""Start `exactllm serve` as its own process for a test, and wait until it answers /health;
helpers that tests run inside the engine process."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from exactllm.server.runner import free_port


def metric(url: str, series: str) -> float:
    """One sample from /metrics by its exact series text, e.g. 'x_total{reason="abort"}'; 0 if absent."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == series:
            return float(value)
    return 0.0


def start_serve(*args: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """(process, base url) of a server started with ``exactllm serve --port <free> *args``."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exactllm", "serve", "--port", str(port),
                             "--log-level", "warning", *args],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def children(pid: int) -> list[int]:
    """Process ids whose parent is pid (Linux /proc)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def engine_pid(server_pid: int) -> int:
    """The engine process of `exactllm serve` (its other child is multiprocessing's resource tracker)."""
    found = []
    for child in children(server_pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                found.append(child)
    assert len(found) == 1, found
    return found[0]


def gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether pid exits (or is a zombie) within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------ run in the engine process
# (EngineSpec.setup and EngineClient.call pickle functions by name: they live here, a light import)
def slow_steps(engine, seconds: float = 0.005) -> None:
    """Each engine step takes at least `seconds` more, so that a 1500-token request keeps decoding
    (>= 7.5 s) for as long as a test needs it, however fast the machine runs the tiny model."""
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()
    engine.step = slow_step


def engine_state(core) -> dict:
    """What the engine process holds: sequences, KV use, held arrivals, step counts."""
    e = core.engine
    return {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
            "kv_usage": e.block_manager.usage(), "held": len(core.held), "parsing": core.admission.parsing,
            "prompt_steps": core.admission.steps["prompt"][0]}


def set_window(core, seconds) -> None:
    core.admission.fixed = seconds


def fail_step(core, after: int, message: str) -> None:
    """The engine step after `after` more raises RuntimeError(message) once."""
    step, calls = core.engine.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise RuntimeError(message)
        return step()
    core.engine.step = flaky_step
