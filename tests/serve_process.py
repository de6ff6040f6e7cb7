"""Start `exactllm serve` as its own process for a test, and wait until it answers /health."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from exactllm.server.runner import free_port


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
