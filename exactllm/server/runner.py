"""Running the app under uvicorn: graceful drain on SIGTERM, and a background-thread server
for tests and benchmarks."""
from __future__ import annotations

import os
import socket
import threading
import time

import uvicorn


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, uvicorn stops accepting connections and waits for in-flight
    responses (streams included) to finish; we also mark the engine client as draining so a
    request arriving on a still-open keep-alive connection gets 503 + Retry-After."""

    def handle_exit(self, sig, frame) -> None:
        self.drain()
        super().handle_exit(sig, frame)

    def drain(self) -> None:
        app = self.config.app
        client = getattr(getattr(app, "state", None), "engine", None)
        if client is not None:
            client.draining = True


def served_model_name(model: str | None) -> str:
    if model is None:
        from exactllm.models.loader import DEFAULT_MODEL_FILE
        model = DEFAULT_MODEL_FILE
    if model.startswith("random:"):
        return model
    base = os.path.basename(model)
    return base[:-5] if base.endswith(".gguf") else base


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a daemon thread on a free loopback port (tests, benchmarks):

        with ServerThread(app) as srv: httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=30)
        self.server = DrainingServer(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
