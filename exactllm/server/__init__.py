"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one LLMEngine in a process of its own.

app.py: routes and errors; engine_client.py: the HTTP process's side of the engine process,
engine_core.py: the engine process (its step loop and admission policy);
protocol.py: request schemas and response bodies; metrics.py: Prometheus text;
runner.py: uvicorn with drain on SIGTERM; cli.py: ``exactllm serve``.
Nothing is imported here, so ``exactllm --help`` does not pay for FastAPI.
"""
