"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one LLMEngine.

app.py: routes and errors; engine_loop.py: the engine thread behind an asyncio queue;
protocol.py: request schemas and response bodies; metrics.py: Prometheus text;
runner.py: uvicorn with drain on SIGTERM; cli.py: ``exactllm serve``.
Nothing is imported here, so ``exactllm --help`` does not pay for FastAPI.
"""
