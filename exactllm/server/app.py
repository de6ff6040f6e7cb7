"""The OpenAI-compatible HTTP API over one LLMEngine.

    app = create_app(LLM(...).engine, "SmolLM2-135M-Instruct", api_key=None, max_queue=256)

Routes: POST /v1/completions, POST /v1/chat/completions (both with stream: true as
server-sent events ending in ``data: [DONE]``), GET /v1/models, GET /health, GET /metrics.
Every error is an OpenAI-style JSON body with a 4xx/5xx status; nothing the client sends
should produce a bare 500 or a dropped connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from exactllm.engine.llm_engine import RequestOutput
from exactllm.server.engine_client import Draining, EngineClient, Event, GenRequest, Overloaded, merge_events
from exactllm.server.metrics import ServerMetrics
from exactllm.server.protocol import (APIError, ChatCompletionRequest, ChunkEncoder, CompletionRequest, chat_body,
                                      chat_logprobs, completion_body, completion_choice_json,
                                      completion_logprobs, new_id, now, usage)

log = logging.getLogger("exactllm.server")

RETRY_AFTER_S = 1
_DISCONNECTED = object()  # put in an HTTP call's queue when its client goes away
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
_RECEIVED = "exactllm.received"  # scope key: the _Received of a generation request


class APIKeyMiddleware:
    """Bearer-token check for /v1/* as a plain ASGI middleware, so it runs before body parsing.

    Both sides are hashed first so compare_digest sees equal lengths; the key is never logged."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            ok = hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._digest)
            if not (ok and scheme.lower() == b"bearer"):
                err = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                               type="authentication_error", code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream(Response):
    """A text/event-stream response sending what an async iterator of str yields. Starlette's
    StreamingResponse starts an anyio task group per response to notice the client leaving;
    here one plain asyncio task watches for that and cancels the stream (the iterator is
    closed, so its finally clauses run)."""
    media_type = "text/event-stream"

    def __init__(self, chunks, headers: dict):
        self.chunks, self.status_code, self.background = chunks, 200, None
        self.init_headers(headers)

    async def __call__(self, scope, receive, send):
        task, gone = asyncio.current_task(), []

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.append(True)
            task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client went away: not an error
        finally:
            watcher.cancel()
            await self.chunks.aclose()


class _Received:
    """A generation request counted in EngineClient.parsing from its arrival here until it is
    submitted to the engine (or answered without reaching it)."""
    __slots__ = ("client", "counted")

    def __init__(self, client: EngineClient):
        self.client, self.counted = client, True
        client.parsing(1)

    def done(self) -> None:
        if self.counted:
            self.counted = False
            self.client.parsing(-1)


class FastGenerate:
    """Plain ASGI middleware: a POST to a generation route whose body is complete JSON that
    validates goes straight to its endpoint, past FastAPI's routing, body and dependency
    machinery (about 120 us of CPU per request, most of what the HTTP process spends on a
    request besides HTTP itself). Anything else -- another content type, a body in parts,
    JSON that does not validate -- goes the ordinary way with the body replayed, so every
    error answer is FastAPI's. The endpoint's answer is built as FastAPI builds it: a Response
    as it is, a dict as JSONResponse; an APIError as the app's handler answers it.

    routes: path -> (pydantic request model, endpoint(body, request)), filled once the
    endpoints exist."""

    def __init__(self, app, routes: dict):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or dict(scope["headers"]).get(b"content-type") != b"application/json":
            await self.app(scope, receive, send)
            return
        first = await receive()
        body = first.get("body", b"")
        parsed = None
        if not first.get("more_body", False) and body:
            try:
                parsed = route[0].model_validate_json(body)
            except ValueError:  # pydantic's ValidationError: FastAPI answers it
                pass
        if parsed is None:
            replayed = []

            async def replay():
                if not replayed:
                    replayed.append(True)
                    return first
                return await receive()

            await self.app(scope, replay, send)
            return
        try:
            response = await route[1](parsed, Request(scope, receive))
            if not isinstance(response, Response):
                response = JSONResponse(response)
        except APIError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        await response(scope, receive, send)


class ParsingCount:
    """Plain ASGI middleware: tells the engine how many generation requests this process has
    received and not yet submitted, so that a burst of arrivals it is still working through is
    admitted as one cohort (engine_core.Admission). Each request yields to the event loop once
    after being counted: the requests read in one loop iteration are then all counted before
    the first is parsed and submitted (a request is parsed without a pause in between). A
    request whose body is slow to arrive keeps the count up: Admission waits at most its cap."""

    def __init__(self, app, client: EngineClient):
        self.app, self.client = app, client

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATE_PATHS:
            await self.app(scope, receive, send)
            return
        received = scope[_RECEIVED] = _Received(self.client)
        try:
            await asyncio.sleep(0)
            await self.app(scope, receive, send)
        finally:
            received.done()


def create_app(client: EngineClient, model_name: str, *, api_key: str | None = None,
               aliases: tuple[str, ...] = ()) -> FastAPI:
    """client: the engine process (engine_client.py); the app's lifespan attaches it to the
    event loop and closes it (stopping the engine process) at shutdown."""
    stats = lambda key: lambda: client.stats[key]  # noqa: E731  (the engine's last report)
    metrics = ServerMetrics(queue_depth=lambda: client.in_flight, running=stats("running"),
                            waiting=stats("waiting"), kv_usage=stats("kv_usage"),
                            prompt_tokens=stats("prompt_tokens"), generation_tokens=stats("generation_tokens"),
                            engine_steps=stats("steps"), admission_window=stats("admission_window"))
    client.on_events = lambda batch: _observe(metrics, batch)
    client.on_scrape = metrics.snapshot
    names = {model_name, *aliases}
    tok = client.tokenizer
    created = now()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        client.attach(asyncio.get_running_loop())
        # What exists now (torch, the tokenizer's vocabulary, FastAPI: ~200k objects) lives as long
        # as the server: leave it out of the cyclic collector's scans, which otherwise walk it at
        # every full collection (bench/http_overhead.py on CPU: about a third of the app's time
        # per request went to collections).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            client.draining = True
            client.detach()
            await asyncio.to_thread(client.close)

    app = FastAPI(title="exactllm", lifespan=lifespan)
    app.state.engine, app.state.metrics = client, metrics
    fast_routes: dict = {}  # filled below, once the endpoints exist
    app.add_middleware(FastGenerate, routes=fast_routes)  # innermost of ours: after the key check and the count
    app.add_middleware(ParsingCount, client=client)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    # ---------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, loc = "the request body is not valid JSON", []
        elif loc:
            msg = f"{'.'.join(loc)}: {msg}"
        return JSONResponse(APIError(400, msg, param=".".join(loc) or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and "parsing the body" in msg:
            msg = "the request body is not valid UTF-8 JSON"
        return JSONResponse(APIError(exc.status_code, msg, type=kind).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    # ---------------------------------------------------------------- helpers
    def check_model(name: str) -> None:
        if name not in names:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    strs: dict[int, str] = {}  # token id -> its text in logprobs (at most the vocabulary)

    def token_str(t: int) -> str:
        s = strs.get(t)
        if s is None:
            s = strs[t] = tok.token_bytes(t).decode("utf-8", "replace")
        return s

    def admit(n: int, endpoint: str) -> None:
        try:
            client.admit(n)
        except Overloaded:
            metrics.requests.inc(endpoint=endpoint, outcome="rejected")
            raise APIError(429, "the server is at capacity; retry later", type="server_overloaded",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except Draining:
            metrics.requests.inc(endpoint=endpoint, outcome="rejected")
            raise APIError(503, client.failed or "the server is shutting down", type="server_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def abort_all(gens: list[GenRequest]) -> None:
        for g in gens:
            if not g.done:
                metrics.sequences.inc(reason="abort")
                client.abort(g)

    def encode(prompt, max_tokens: int | None, endpoint: str) -> list[int]:
        """Prompt ids, checked against the context here rather than in the engine process."""
        try:
            ids = client.encode(prompt)
            limit = client.max_model_len
            if len(ids) >= limit:
                raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {limit} tokens")
            if max_tokens is not None and len(ids) + max_tokens > limit:
                raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                                 f"this model's context of {limit} tokens")
        except ValueError as exc:
            metrics.requests.inc(endpoint=endpoint, outcome="invalid")
            raise APIError(400, str(exc), param="prompt") from None
        return ids

    async def start(gens: list[GenRequest], queue: asyncio.Queue, endpoint: str, scope: dict) -> list[Event]:
        """Submit every sequence and wait until the engine accepted all of them (an error the
        engine raises when adding one, e.g. a KV cache too small, is the HTTP call's error).
        Returns events that arrived meanwhile."""
        for g in gens:
            client.submit(g)
        if _RECEIVED in scope:
            scope[_RECEIVED].done()
        pending, accepted = [], 0
        try:
            while accepted < len(gens):
                ev = await queue.get()
                if ev.error is not None:
                    raise APIError(ev.error[0], ev.error[1], param="prompt" if ev.error[0] == 400 else None,
                                   type="invalid_request_error" if ev.error[0] < 500 else "server_error")
                if ev.accepted:
                    accepted += 1
                else:
                    pending.append(ev)
        except BaseException as exc:
            abort_all(gens)
            outcome = "invalid" if isinstance(exc, APIError) and exc.status < 500 else "error"
            metrics.requests.inc(endpoint=endpoint, outcome=outcome)
            raise
        return pending

    async def generate(raw: Request, body, prompts: list, endpoint: str, want_logprobs: bool,
                       max_tokens_default: int | None):
        """Returns (sequences, their event queue, early events, prompt tokens): n choices of one
        prompt count its tokens once, as OpenAI bills them."""
        n = body.n
        gens, queue, prompt_tokens = [], asyncio.Queue(), 0
        for i, prompt in enumerate(prompts):
            max_tokens = body.max_tokens if body.max_tokens is not None else max_tokens_default
            ids = encode(prompt, max_tokens, endpoint)
            prompt_tokens += len(ids)
            for j in range(n):
                params = body.sampling_params(max_tokens or client.max_model_len - len(ids), want_logprobs)
                if params.seed is not None:
                    params.seed += j  # n choices with one seed must still differ
                gens.append(GenRequest(i * n + j, prompt, ids, params, body.stream, queue))
        admit(len(gens), endpoint)
        pending = await start(gens, queue, endpoint, raw.scope)
        return gens, queue, pending, prompt_tokens

    async def collect(raw: Request, gens, queue, pending, endpoint: str) -> list[RequestOutput] | None:
        """Final outputs of every sequence in choice order, or None when the client disconnected first."""

        async def watch():
            while (await raw.receive())["type"] != "http.disconnect":
                pass
            queue.put_nowait(_DISCONNECTED)

        watcher = asyncio.create_task(watch())
        finals: dict[int, Event] = {}
        try:
            for ev in pending:
                if ev.output is not None:
                    finals[ev.index] = ev
            while len(finals) < len(gens):
                ev = await queue.get()
                if ev is _DISCONNECTED:
                    metrics.requests.inc(endpoint=endpoint, outcome="aborted")
                    return None
                if ev.error is not None:
                    metrics.requests.inc(endpoint=endpoint, outcome="error")
                    raise APIError(ev.error[0], ev.error[1], type="server_error")
                if ev.output is not None:
                    finals[ev.index] = ev
            metrics.requests.inc(endpoint=endpoint, outcome="ok")
            return [finals[i].output for i in range(len(gens))]
        finally:
            watcher.cancel()
            abort_all(gens)

    def sse_error(status: int, message: str) -> str:
        return f"data: {json.dumps(APIError(status, message, type='server_error').body(), ensure_ascii=False)}\n\n"

    async def batches(gens, queue, pending):
        """Until every sequence finished, yield what is queued, merged per choice (merge_events):
        the event loop then works per chunk, not per token. Raises APIError on an engine error."""
        left, evs = len(gens), list(pending)
        while left:
            if not evs:
                evs.append(await queue.get())
            while not queue.empty():
                evs.append(queue.get_nowait())
            for ev in evs:
                if ev.error is not None:
                    raise APIError(*ev.error)
            merged = merge_events(evs)
            left -= sum(ev.output is not None for ev in merged)
            evs = []
            yield merged

    def streaming(chunks, gens, endpoint: str) -> EventStream:
        async def body():
            outcome = "aborted"  # unless we reach the end: the client went away (task cancelled)
            try:
                async for chunk in chunks:
                    yield chunk
                outcome = "ok"
            except APIError as exc:
                outcome = "error"
                yield sse_error(exc.status, exc.message)
                yield "data: [DONE]\n\n"
            finally:
                metrics.requests.inc(endpoint=endpoint, outcome=outcome)
                abort_all(gens)

        return EventStream(body(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        if not client.alive:
            return JSONResponse({"status": "error", "detail": client.failed or "the engine process is not running"},
                                status_code=503)
        if client.draining:
            return JSONResponse({"status": "draining"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        # With several API-server processes, the others' series and fresh engine stats come
        # through the engine process (engine_client.scrape), so every front end answers for all.
        others = await client.scrape() if client.front_ends > 1 and client.alive else []
        return PlainTextResponse(metrics.render(others), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "exactllm", "max_model_len": client.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        endpoint = "completions"
        check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = body.prompts()
        _check_text(prompts, "prompt")
        gens, queue, pending, prompt_tokens = await generate(raw, body, prompts, endpoint, body.logprobs is not None,
                                                             max_tokens_default=16)
        rid, t0 = new_id("cmpl"), now()

        def logprobs_of(ev, offset: int):
            """OpenAI completion logprobs of a stream event or a final output (both carry token_ids, logprobs)."""
            if body.logprobs is None:
                return None
            return completion_logprobs([token_str(t) for t in ev.token_ids], ev.logprobs, offset)

        if not body.stream:
            outs = await collect(raw, gens, queue, pending, endpoint)
            if outs is None:
                return PlainTextResponse("", status_code=499)
            choices = [{"index": i, "text": out.text, "logprobs": logprobs_of(out, 0),
                        "finish_reason": out.finish_reason} for i, out in enumerate(outs)]
            tokens = sum(len(out.token_ids) for out in outs)
            return completion_body(rid, body.model, t0, choices, usage(prompt_tokens, tokens))

        async def chunks():
            enc = ChunkEncoder(rid, body.model, t0, "text_completion")
            completion_tokens, offsets = 0, [0] * len(gens)
            async for batch in batches(gens, queue, pending):
                out = []
                for ev in batch:
                    completion_tokens += len(ev.token_ids)
                    if not (ev.text or ev.output is not None or (body.logprobs is not None and ev.token_ids)):
                        continue
                    tokens = None if body.logprobs is None else [token_str(t) for t in ev.token_ids]
                    out.append(enc.encoded("[" + completion_choice_json(
                        ev.index, ev.text, tokens, ev.logprobs, offsets[ev.index],
                        ev.finish_reason if ev.output is not None else None) + "]"))
                    offsets[ev.index] += len(ev.text)
                if out:
                    yield "".join(out)
            tail = enc([], usage(prompt_tokens, completion_tokens)) if body.include_usage else ""
            yield tail + "data: [DONE]\n\n"

        return streaming(chunks(), gens, endpoint)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        endpoint = "chat"
        check_model(body.model)
        messages = body.rendered_messages()
        _check_text([m["content"] for m in messages], "messages")
        try:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # the model's template refused these messages
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        want_lp = body.logprobs
        gens, queue, pending, prompt_tokens = await generate(raw, body, [prompt], endpoint, want_lp,
                                                             max_tokens_default=None)
        rid, t0 = new_id("chatcmpl"), now()
        top = bool(body.top_logprobs)

        if not body.stream:
            outs = await collect(raw, gens, queue, pending, endpoint)
            if outs is None:
                return PlainTextResponse("", status_code=499)
            choices = [{"index": i, "message": {"role": "assistant", "content": out.text},
                        "logprobs": chat_logprobs([token_str(t) for t in out.token_ids], out.logprobs, top)
                        if want_lp else None, "finish_reason": out.finish_reason} for i, out in enumerate(outs)]
            tokens = sum(len(out.token_ids) for out in outs)
            return chat_body(rid, body.model, t0, choices, usage(prompt_tokens, tokens))

        async def chunks():
            enc = ChunkEncoder(rid, body.model, t0, "chat.completion.chunk")
            completion_tokens = 0
            yield "".join(enc([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]) for i in range(len(gens)))
            async for batch in batches(gens, queue, pending):
                out = []
                for ev in batch:
                    completion_tokens += len(ev.token_ids)
                    if ev.text or (want_lp and ev.token_ids):
                        lp = chat_logprobs([token_str(t) for t in ev.token_ids], ev.logprobs, top) if want_lp else None
                        out.append(enc([{"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp,
                                         "finish_reason": None}]))
                    if ev.output is not None:
                        out.append(enc([{"index": ev.index, "delta": {}, "logprobs": None,
                                         "finish_reason": ev.finish_reason}]))
                if out:
                    yield "".join(out)
            tail = enc([], usage(prompt_tokens, completion_tokens)) if body.include_usage else ""
            yield tail + "data: [DONE]\n\n"

        return streaming(chunks(), gens, endpoint)

    fast_routes.update({"/v1/completions": (CompletionRequest, completions),
                        "/v1/chat/completions": (ChatCompletionRequest, chat_completions)})
    return app


def _check_text(items, param: str) -> None:
    """Reject strings that cannot be UTF-8 (lone surrogates from JSON \\ud800 escapes)."""
    for s in items:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{param} contains text that is not valid Unicode", param=param) from None


def _observe(metrics: ServerMetrics, batch: list) -> None:
    """Latency histograms from the events just delivered (event-loop thread)."""
    for req, ev in batch:
        if ev.error is not None:
            metrics.sequences.inc(reason="error")
            continue
        if ev.token_ids:
            if req.last_token_time is None:
                metrics.ttft.observe(ev.time - req.arrival)
            else:
                metrics.itl.observe((ev.time - req.last_token_time) / len(ev.token_ids))
            req.last_token_time = ev.time
        if ev.output is not None:
            metrics.sequences.inc(reason=ev.output.finish_reason or "unknown")
            metrics.e2e.observe(ev.time - req.arrival)
