"""The OpenAI-compatible server, driven over loopback HTTP.

Normal use goes through the official `openai` client; malformed requests through raw httpx.
Most tests share one server over random:llama-mini (fast; its engine process steps at least
5 ms apart, see serve_process.slow_steps); tests look into its engine process with
EngineClient.call (helpers in serve_process.py). test_server_process.py runs `exactllm serve`
itself and the default model.

References come from a second LLM over the same random weights. The server runs numerics
"fast", so a reference could in principle differ from a server answer by a last-bit logit
change that flips a greedy argmax between batch shapes; with random weights the top-2 logit
gaps are far above that, and the prompts here were checked to agree.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import threading
import time

import httpx
import openai
import pytest

from exactllm import LLM, SamplingParams
from exactllm.engine.llm_engine import RequestOutput
from exactllm.server.app import create_app
from exactllm.server.engine_client import EngineClient, Event, merge_events
from exactllm.server.engine_core import Admission, EngineCore, EngineSpec
from exactllm.server.protocol import ChunkEncoder, chat_body, completion_body
from exactllm.server.runner import ServerThread
from serve_process import engine_state, fail_step, gone, metric, set_window, slow_steps

MINI = "random:llama-mini"
KEY = "sk-test-7f3a9c"  # the mini server requires it
KV_BLOCKS = 120          # 1920 KV slots: less than the 2048-token context, so the engine can refuse a request


def token_str(tok, t: int) -> str:
    return tok.token_bytes(t).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def mini():
    engine = EngineClient(EngineSpec(MINI, max_num_seqs=16, num_kv_blocks=KV_BLOCKS, setup=slow_steps), max_queue=16)
    app = create_app(engine, MINI, api_key=KEY)
    with ServerThread(app) as srv:
        srv.engine = engine
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield srv
    assert gone(engine.proc.pid, timeout=1)  # the app's shutdown stopped the engine process


@pytest.fixture(scope="module")
def ref():
    """An offline LLM over the same random weights (seeded), for reference answers."""
    return LLM(MINI)


def headers(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def wait_idle(srv, timeout=30.0):
    """Until the engine process holds no sequence and no KV block, and the server admits none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = srv.engine.call(engine_state)
        if state["running"] == state["waiting"] == state["held"] == srv.engine.in_flight == state["parsing"] == 0 \
                and state["kv_usage"] == 0.0:
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: {state} in_flight={srv.engine.in_flight}")


# ----------------------------------------------------------------------------- normal use
def test_models_health_metrics(mini):
    assert [m.id for m in mini.client.models.list().data] == [MINI]
    assert httpx.get(mini.url + "/health").json() == {"status": "ok"}
    text = httpx.get(mini.url + "/metrics").text
    for name in ("exactllm_requests_total", "exactllm_generation_tokens_total", "exactllm_queue_depth",
                 "exactllm_kv_cache_usage_ratio", "exactllm_time_to_first_token_seconds_bucket",
                 "exactllm_inter_token_latency_seconds_count"):
        assert name in text


def test_completion_greedy_equals_offline(mini, ref):
    prompt = "The quick brown fox"
    want = ref.generate([prompt], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
    want_tokens = [token_str(ref.tokenizer, t) for t in want.token_ids]
    wait_idle(mini)

    r = mini.client.completions.create(model=MINI, prompt=prompt, max_tokens=8, temperature=0, logprobs=1)
    c = r.choices[0]
    assert c.logprobs.tokens == want_tokens
    assert c.logprobs.token_logprobs == want.logprobs  # floats survive JSON exactly
    assert c.text == want.text and c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), 8)

    chunks = list(mini.client.completions.create(model=MINI, prompt=prompt, max_tokens=8, temperature=0,
                                                 logprobs=1, stream=True))
    assert sum((ch.choices[0].logprobs.tokens for ch in chunks), []) == want_tokens
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"
    assert len({ch.id for ch in chunks}) == 1


def test_chat_stream_with_usage(mini, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    want = ref.chat(messages, SamplingParams(max_tokens=6, temperature=0))
    stream = mini.client.chat.completions.create(model=MINI, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 logprobs=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    toks = [t.token for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert toks == [token_str(ref.tokenizer, t) for t in want.token_ids]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)

    r = mini.client.chat.completions.create(model=MINI, messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text


def test_seed_and_n(mini, ref):
    kw = dict(model=MINI, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=1234, logprobs=1)
    a = mini.client.completions.create(n=3, **kw)
    b = mini.client.completions.create(n=3, **kw)
    toks = lambda r: [c.logprobs.tokens for c in sorted(r.choices, key=lambda c: c.index)]  # noqa: E731
    assert toks(a) == toks(b)                      # the same seed gives the same samples
    assert len({tuple(t) for t in toks(a)}) == 3   # and the n choices differ (seeds seed, seed+1, ...)
    want = ref.generate(["Once upon a time"], SamplingParams(max_tokens=6, temperature=1.0, seed=1234),
                        use_tqdm=False)[0]
    assert toks(a)[0] == [token_str(ref.tokenizer, t) for t in want.token_ids]
    assert a.usage.completion_tokens == 18 and a.usage.prompt_tokens == len(want.prompt_token_ids)


def test_concurrent_streams_all_complete_and_correct(mini, ref):
    prompts = [f"client {i} says hello" for i in range(12)]
    want = ref.generate(prompts, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    before = metric(mini.url, 'exactllm_requests_total{endpoint="completions",outcome="ok"}')

    async def one(client, prompt):
        toks, ids, finish = [], set(), None
        async for ch in await client.completions.create(model=MINI, prompt=prompt, max_tokens=8, temperature=0,
                                                        logprobs=1, stream=True):
            ids.add(ch.id)
            toks += ch.choices[0].logprobs.tokens
            finish = ch.choices[0].finish_reason or finish
        return toks, ids, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=mini.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    for (toks, ids, finish), w in zip(results, want):
        assert toks == [token_str(ref.tokenizer, t) for t in w.token_ids] and finish == "length"
        assert len(ids) == 1
    assert len(set().union(*(ids for _, ids, _ in results))) == len(prompts)  # no answer given twice
    wait_idle(mini)
    assert metric(mini.url, 'exactllm_requests_total{endpoint="completions",outcome="ok"}') == before + len(prompts)


# ----------------------------------------------------------------------------- bad input
GOOD = {"model": MINI, "prompt": "hi", "max_tokens": 2}
BAD_BODIES = {
    "malformed json": b'{"model": "random:llama-mini", "prompt": ',
    "invalid utf-8": b'{"model": "random:llama-mini", "prompt": "\xff\xfe\xfa"}',
    "lone surrogate": b'{"model": "random:llama-mini", "prompt": "\\ud800"}',
    "not an object": b"[1, 2, 3]",
    "empty body": b"",
    "missing prompt": {"model": MINI},
    "missing model": {"prompt": "hi"},
    "prompt wrong type": {**GOOD, "prompt": 5},
    "empty prompt list": {**GOOD, "prompt": []},
    "token id out of range": {**GOOD, "prompt": [1, 2, 10**9]},
    "max_tokens string": {**GOOD, "max_tokens": "ten"},
    "max_tokens float": {**GOOD, "max_tokens": 2.5},
    "max_tokens negative": {**GOOD, "max_tokens": -3},
    "max_tokens zero": {**GOOD, "max_tokens": 0},
    "max_tokens huge": {**GOOD, "max_tokens": 10**12},
    "prompt longer than context": {**GOOD, "prompt": "x" * 3000},
    "temperature negative": {**GOOD, "temperature": -1},
    "top_p zero": {**GOOD, "top_p": 0},
    "n zero": {**GOOD, "n": 0},
    "stream not bool": {**GOOD, "stream": "yes"},
    "empty stop string": {**GOOD, "stop": [""]},
    "logprobs too many": {**GOOD, "logprobs": 1000},
}
BAD_CHAT = {
    "empty message list": {"model": MINI, "messages": []},
    "message without role": {"model": MINI, "messages": [{"content": "hi"}]},
    "unknown role": {"model": MINI, "messages": [{"role": "wizard", "content": "hi"}]},
    "content wrong type": {"model": MINI, "messages": [{"role": "user", "content": 7}]},
    "image part": {"model": MINI, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
}


@pytest.mark.parametrize("path,case,body", [("/v1/completions", k, v) for k, v in BAD_BODIES.items()]
                         + [("/v1/chat/completions", k, v) for k, v in BAD_CHAT.items()])
def test_bad_input_gets_openai_4xx(mini, path, case, body):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(mini.url + path, headers={**headers(), "Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == 400, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and isinstance(err["message"], str) and err["message"]


def test_parsing_count_returns_to_zero(mini):
    """Every generation request the HTTP process counted as received (Admission waits while the
    count is above 0) is uncounted, however it ends: refused, turned away by the API key, answered."""
    for body in (b'{"model": "random:llama-mini", "prompt": ', {**GOOD, "model": "gpt-4"}, {**GOOD, "max_tokens": 0},
                 {**GOOD, "prompt": "x" * 3000}, GOOD, {**GOOD, "stream": True}):
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        assert httpx.post(mini.url + "/v1/completions", headers=headers(), **kw).status_code in (200, 400, 404)
    assert httpx.post(mini.url + "/v1/completions", json=GOOD).status_code == 401
    assert httpx.post(mini.url + "/v1/chat/completions", headers=headers(),
                      json={"model": MINI, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                      ).status_code == 200
    wait_idle(mini)  # checks the engine's count is 0 (and until(): it was sent there)
    assert mini.engine._parsing == 0


def test_parsing_middleware_counts_until_the_submit():
    """Generation requests are counted from their arrival (all those of one loop iteration before
    any is parsed) until their submit, or until they are answered without one."""
    from exactllm.server.app import _RECEIVED, ParsingCount
    seen, entered = [], []
    client = type("C", (), {"n": 0, "parsing": lambda self, d: (setattr(self, "n", self.n + d), seen.append(self.n))})()

    async def app(scope, receive, send):
        entered.append(client.n)
        if scope["path"] == "/health":
            return
        if scope["path"] == "/v1/completions":
            scope[_RECEIVED].done()             # submitted: uncounted at once
            assert client.n == 1
            await asyncio.sleep(0)
        else:
            raise ValueError("turned away before the submit")

    async def main():
        mw = ParsingCount(app, client)
        done = await asyncio.gather(mw({"type": "http", "path": "/v1/completions"}, None, None),
                                    mw({"type": "http", "path": "/v1/chat/completions"}, None, None),
                                    return_exceptions=True)
        assert done[0] is None and isinstance(done[1], ValueError)
        await mw({"type": "http", "path": "/health"}, None, None)

    asyncio.run(main())
    assert entered == [2, 1, 0]  # both requests were counted before the first was parsed
    assert seen == [1, 2, 1, 0] and client.n == 0


def test_fast_path_answers_as_fastapi_does(mini):
    """Valid generation requests sent as plain application/json skip FastAPI's request machinery
    (app.FastGenerate); the same request sent with a charset parameter takes FastAPI's way. Both
    answers agree byte for byte but for the response id and time; a body that does not validate
    is passed on to FastAPI even with the fast path's content type."""
    from exactllm.server.app import FastGenerate
    fast = mini.server.config.app.middleware_stack
    while not isinstance(fast, FastGenerate):
        fast = fast.app
    inner, reached = fast.app, []

    async def counting(scope, receive, send):
        reached.append(scope["path"])
        await inner(scope, receive, send)

    def post(path, body, fastapi: bool):
        ctype = "application/json; charset=utf-8" if fastapi else "application/json"
        r = httpx.post(mini.url + path, headers={**headers(), "Content-Type": ctype}, content=json.dumps(body), timeout=30)
        return r.status_code, r.headers["content-type"], re.sub(r'"(id|created)":("[^"]*"|\d+)', "", r.text)

    cases = [("/v1/completions", {"model": MINI, "prompt": "fast or slow", "max_tokens": 5, "temperature": 0,
                                  "logprobs": 1, "stream": stream}) for stream in (False, True)]
    cases += [("/v1/chat/completions", {"model": MINI, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                        "temperature": 0, "logprobs": True, "stream": stream}) for stream in (False, True)]
    fast.app = counting
    try:
        for path, body in cases:
            post(path, body, fastapi=True)  # first: both answers below then find the same prefix cache
            wait_idle(mini)
            a = post(path, body, fastapi=False)
            wait_idle(mini)
            b = post(path, body, fastapi=True)
            assert a == b and a[0] == 200, (a, b)
        assert reached == [p for p, _ in cases for _ in "ab"]  # only the charset requests went through FastAPI
        assert post("/v1/completions", {"model": MINI, "prompt": 5}, fastapi=False)[0] == 400
        assert post("/v1/completions", {**GOOD, "model": "gpt-4"}, fastapi=False)[0] == 404  # the endpoint's APIError
        assert reached[-1] == "/v1/completions" and len(reached) == 2 * len(cases) + 1
    finally:
        fast.app = inner


def test_unknown_model_route_and_method(mini):
    r = httpx.post(mini.url + "/v1/completions", headers=headers(), json={**GOOD, "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        mini.client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    r = httpx.get(mini.url + "/v1/nowhere", headers=headers())
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(mini.url + "/v1/completions", headers=headers())
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(mini.url + "/health").status_code == 200  # and the server is still fine


def test_api_key(mini, caplog):
    caplog.set_level(logging.DEBUG)
    for h in ({}, headers("wrong"), {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(mini.url + "/v1/completions", headers=h, json=GOOD)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(mini.url + "/v1/completions", headers={"Content-Type": "application/json"}, content=b"{oops")
    assert r.status_code == 401  # authentication comes before parsing
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=mini.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.post(mini.url + "/v1/completions", headers=headers(), json=GOOD).status_code == 200
    assert httpx.get(mini.url + "/health").status_code == 200  # health and metrics stay open
    assert KEY not in caplog.text and "wrong" not in caplog.text


# ----------------------------------------------------------------------------- faults and load
def test_stream_disconnect_aborts_and_frees_kv(mini):
    """A client that goes away aborts its sequence in the engine process, which frees its KV blocks."""
    wait_idle(mini)
    aborted = metric(mini.url, 'exactllm_sequences_total{reason="abort"}')
    body = {**GOOD, "max_tokens": 1500, "ignore_eos": True, "stream": True, "logprobs": 0}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", mini.url + "/v1/completions", headers=headers(), json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            state = mini.engine.call(engine_state)
            assert state["kv_usage"] > 0 and state["running"] == 1
        # leaving the block closes the connection mid-stream
    wait_idle(mini)
    assert metric(mini.url, 'exactllm_sequences_total{reason="abort"}') == aborted + 1

    # A non-streaming client that gives up (times out) is cancelled the same way.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(mini.url + "/v1/completions", headers=headers(),
                   json={**GOOD, "max_tokens": 1500, "ignore_eos": True}, timeout=1.0)
    wait_idle(mini)
    assert metric(mini.url, 'exactllm_sequences_total{reason="abort"}') == aborted + 2


def test_queue_full_gets_429_and_draining_503(mini):
    wait_idle(mini)
    old = mini.engine.max_in_flight
    mini.engine.max_in_flight = 2
    long = {**GOOD, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
            with c1.stream("POST", mini.url + "/v1/completions", headers=headers(), json=long) as r1, \
                    c2.stream("POST", mini.url + "/v1/completions", headers=headers(), json=long) as r2:
                assert r1.status_code == r2.status_code == 200
                r = httpx.post(mini.url + "/v1/completions", headers=headers(), json=GOOD)
                assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                # n counts against the limit too
                r = httpx.post(mini.url + "/v1/completions", headers=headers(), json={**GOOD, "n": 3})
                assert r.status_code == 429
                with pytest.raises(openai.RateLimitError):
                    mini.client.completions.create(model=MINI, prompt="hi", max_tokens=1)
                assert metric(mini.url, "exactllm_queue_depth") == 2
    finally:
        mini.engine.max_in_flight = old
    wait_idle(mini)
    mini.engine.draining = True
    try:
        r = httpx.post(mini.url + "/v1/completions", headers=headers(), json=GOOD)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "error" in r.json()
        assert httpx.get(mini.url + "/health").status_code == 503
    finally:
        mini.engine.draining = False
    assert httpx.post(mini.url + "/v1/completions", headers=headers(), json=GOOD).status_code == 200


def test_engine_refusal_is_a_400(mini):
    """A request the HTTP process lets through but the engine refuses when adding it (here: it
    needs more KV slots than the cache has) is the client's 400, from across the process boundary."""
    body = {**GOOD, "prompt": [7] * 1900, "max_tokens": 100}  # 2000 tokens: within the context, not the cache
    r = httpx.post(mini.url + "/v1/completions", headers=headers(), json=body)
    assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(mini.url + "/v1/completions", headers=headers(), json={**body, "max_tokens": 20}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20  # 1920 tokens fit
    wait_idle(mini)


def test_engine_fault_is_a_500_body_and_server_recovers(mini):
    mini.engine.call(fail_step, 1, "simulated device fault")
    r = httpx.post(mini.url + "/v1/completions", headers=headers(), json={**GOOD, "max_tokens": 5}, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "simulated device fault" in r.json()["error"]["message"]
    wait_idle(mini)
    r = httpx.post(mini.url + "/v1/completions", headers=headers(), json={**GOOD, "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


# ----------------------------------------------------------------------------- throughput machinery
def test_merge_events_joins_each_choice_in_order():
    out = RequestOutput(0, None, [1], "abc", [5, 6, 7], [-1.0, -2.0, -3.0], "length")
    evs = [Event(0, "a", [5], [-1.0], time=1.0), Event(1, "x", [9], [-0.5], time=1.0),
           Event(0, "b", [6], [-2.0], time=2.0), Event(0, "c", [7], [-3.0], "length", out, time=3.0)]
    a, b = merge_events(evs)
    assert (a.index, a.text, a.token_ids, a.logprobs, a.finish_reason, a.output, a.time) == \
        (0, "abc", [5, 6, 7], [-1.0, -2.0, -3.0], "length", out, 3.0)
    assert (b.index, b.text, b.token_ids) == (1, "x", [9])
    assert evs[0].token_ids == [5]  # the events merged are not changed
    single = Event(2, "z", [3], [-1.0])
    assert merge_events([single]) == [single]


@pytest.mark.parametrize("usage_", [None, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}])
def test_chunk_encoder_is_the_chunk_body_as_json(usage_):
    choice = {"index": 0, "text": "h\u00e9 \"q\"\n", "logprobs": None, "finish_reason": None}
    for obj, body in (("text_completion", completion_body), ("chat.completion.chunk", chat_body)):
        line = ChunkEncoder("cmpl-1", "m\"odel", 17, obj)([choice], usage_)
        assert line.startswith("data: ") and line.endswith("\n\n")
        assert json.loads(line[6:]) == body("cmpl-1", "m\"odel", 17, [choice], usage_, chunk=True)


def test_completion_choice_json_is_the_choice_as_json():
    """The hand-written JSON of a streamed completion choice equals the generic encoder's for the
    same dict: escapes, non-ASCII, non-finite and negative-zero log-probs, with and without logprobs."""
    from exactllm.server.protocol import completion_choice_json, completion_logprobs
    rng = random.Random(0)
    pieces = ["a", "\u00e9", '"', "\\", "\n", "\x00", "\u2028", "\U0001f600", " ", "<filler_12>", "\ufffd", ""]
    enc = ChunkEncoder("cmpl-1", "m", 17, "text_completion")
    for case in range(400):
        n = rng.randint(0, 4)
        tokens = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 3))) for _ in range(n)]
        lps = [rng.choice([-rng.random() * 20, 0.0, -0.0, float("-inf"), float("nan"), -1e-300, -123456789.125])
               for _ in range(n)]
        text, finish, offset, with_lp = "".join(tokens[:2]), rng.choice([None, "length", "stop"]), rng.randint(0, 99), \
            rng.random() < 0.8
        want = {"index": case % 3, "text": text, "logprobs": completion_logprobs(tokens, lps, offset) if with_lp else None,
                "finish_reason": finish}
        got = completion_choice_json(case % 3, text, tokens if with_lp else None, lps, offset, finish)
        assert got == json.dumps(want, ensure_ascii=False, separators=(",", ":"))
        assert enc.encoded(f"[{got}]") == enc([want])


def test_admission_window():
    assert Admission(graphs=False).window == 0.0  # no CUDA graphs: a prompt step costs no more for being alone
    auto = Admission(graphs=True, max_window=0.02)
    auto.hold(0.0, first=True)
    assert auto.window == 0.0 and auto.due(0.0, busy=True)  # nothing measured yet
    assert not auto.due(0.0, busy=False) and auto.due(0.002, busy=False)  # idle: arrivals paused for QUIET
    for t in (0.002, 0.003, 0.002):
        auto.observe(False, t)
    for t in (0.009, 0.008, 5.0):  # a compile-time outlier does not move the median
        auto.observe(True, t)
    assert auto.window == pytest.approx(0.009 - 0.002)
    auto.hold(1.0, first=True)
    assert not auto.due(1.005, busy=True) and auto.due(1.008, busy=True)
    # An idle engine waits only for arrivals to pause (QUIET), at most the window from the first.
    assert not auto.due(1.001, busy=False) and auto.due(1.0021, busy=False)
    auto.hold(1.002, first=False)
    auto.hold(1.004, first=False)
    assert not auto.due(1.0055, busy=False) and auto.due(1.0061, busy=False)
    auto.hold(1.019, first=False)
    assert auto.wait(1.0195, busy=False) == pytest.approx(0.0005)  # max_window from the first ends first
    assert auto.drain_steps() == 3  # decode steps (median 2 ms) in the window (7 ms)
    auto.observe(True, 1.0)
    auto.observe(True, 1.0)
    assert auto.window == 0.02 and auto.drain_steps() == 10  # capped
    assert Admission(60.0, graphs=False).drain_steps() == 0  # no graphs: no drain rule
    zero = Admission(0.0, graphs=True)
    zero.hold(0.0, first=True)
    assert zero.due(0.0, busy=False) and zero.due(0.0, busy=True)  # window 0: at once
    assert Admission(0.5, graphs=False).window == 0.5
    cpu = Admission(graphs=False)
    cpu.hold(0.0, first=True)
    assert cpu.due(0.0, busy=True) and not cpu.due(0.001, busy=False)  # idle: a burst is batched on CPU too
    assert auto.steps == {"prompt": [5, pytest.approx(7.017)], "decode": [3, pytest.approx(0.007)]}
    # While the HTTP process still works on received requests, held ones wait for them, up to the cap.
    short = Admission(graphs=True, max_window=0.02)
    short.observe(False, 0.002)
    short.observe(True, 0.005)  # window 3 ms
    for busy, due_without in ((False, 2.0021), (True, 2.003)):
        short.hold(2.0, first=True)
        short.parsing = 2
        assert not short.due(2.019, busy) and short.due(2.02, busy)  # max_window 20 ms from the first
        short.parsing = 0
        assert short.due(due_without, busy) and not short.due(due_without - 0.0005, busy)
    zero.parsing = cpu.parsing = 1
    assert zero.due(0.0, busy=False) and zero.due(0.0, busy=True)  # window 0: no waiting at all
    assert not cpu.due(0.049, busy=True) and cpu.due(0.05, busy=True)  # automatic: max_window on CPU too


def test_held_requests_wait_for_a_batch_about_to_drain():
    """While every running sequence ends within the window's decode steps, held requests wait for
    the batch to drain (then start together) instead of becoming a second cohort."""
    from types import SimpleNamespace as NS
    running = [NS(params=NS(max_tokens=64), output_token_ids=[0] * 62)]
    sched = NS(running=running, waiting=[])
    engine = NS(runner=NS(graphs=object()), scheduler=sched, has_work=lambda: bool(sched.running))
    core = EngineCore(engine, conns=[])
    for mixed, t in ((False, 0.002), (True, 0.012)):  # window 10 ms: 5 decode steps
        core.admission.observe(mixed, t)
    core.admission.hold(time.monotonic() - 1.0, first=True)
    assert not core._due()  # 2 tokens left: drain first
    running.append(NS(params=NS(max_tokens=64), output_token_ids=[0] * 50))
    assert core._due()      # one sequence has 14 left: join now
    sched.waiting = [object()]
    running.pop()
    assert core._due()      # a prompt step is coming anyway
    sched.running, sched.waiting = [], []
    assert core._due()      # idle (arrivals paused long ago)


def _post_async(url: str, prompt: str, out: dict) -> threading.Thread:
    def run():
        out[prompt] = httpx.post(url + "/v1/completions", timeout=60, headers=headers(),
                                 json={"model": MINI, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                                       "logprobs": 0}).json()
    t = threading.Thread(target=run)
    t.start()
    return t


def until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


LONG = {"model": MINI, "prompt": "the long one", "max_tokens": 1500, "ignore_eos": True, "stream": True,
        "logprobs": 0}


@pytest.mark.parametrize("window,prompt_steps", [(60.0, 2), (0.0, 4)])
def test_requests_arriving_during_decode_are_admitted_together(mini, ref, window, prompt_steps):
    """With an admission window, requests that arrive one by one while another decodes are held,
    then their prompts are computed in one step; with none, each arrival costs a prompt step of
    its own. The answers are the same either way."""
    prompts = ["late one", "late two", "late three"]
    want = ref.generate(prompts, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    wait_idle(mini)
    mini.engine.call(set_window, window)
    before = mini.engine.call(engine_state)["prompt_steps"]
    answers, threads = {}, []
    try:
        with httpx.Client(timeout=60) as client, \
                client.stream("POST", mini.url + "/v1/completions", headers=headers(), json=LONG) as r:
            lines = (line for line in r.iter_lines() if line.startswith("data: {"))
            next(lines)
            for i, p in enumerate(prompts):
                threads.append(_post_async(mini.url, p, answers))
                if window:  # arrivals at different steps, all held while the long request decodes
                    until(lambda: mini.engine.call(engine_state)["held"] == i + 1)
                    for _ in range(3):
                        next(lines)
                else:
                    threads[-1].join()
            if window:
                mini.engine.call(set_window, 0.0)  # the window ends: all three go in at the next step
            for t in threads:
                t.join()
            state = mini.engine.call(engine_state)
            assert state["running"] == 1  # the long one still decodes
            assert state["prompt_steps"] - before == prompt_steps
    finally:
        mini.engine.call(set_window, None)
    for p, w in zip(prompts, want):
        assert answers[p]["choices"][0]["logprobs"]["tokens"] == [token_str(ref.tokenizer, t) for t in w.token_ids]


def test_held_request_is_admitted_when_the_window_ends(mini, ref):
    want = ref.generate(["short"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    wait_idle(mini)
    mini.engine.call(set_window, 0.2)
    try:
        with httpx.Client(timeout=60) as client, \
                client.stream("POST", mini.url + "/v1/completions", headers=headers(), json=LONG) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            t0 = time.monotonic()
            got = httpx.post(mini.url + "/v1/completions", timeout=60, headers=headers(),
                             json={"model": MINI, "prompt": "short", "max_tokens": 4, "temperature": 0}).json()
            assert time.monotonic() - t0 >= 0.2
            assert mini.engine.call(engine_state)["running"] == 1  # the long request is still decoding
    finally:
        mini.engine.call(set_window, None)
    assert got["choices"][0]["text"] == want.text


def test_stream_behind_the_engine_gets_merged_chunks(mini, ref):
    """When the event loop falls behind the engine, the tokens queued for a stream go out as one
    chunk; text, tokens and log-probs are those of LLM.generate all the same."""
    want = ref.generate(["merge me"], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=True),
                        use_tqdm=False)[0]
    wait_idle(mini)  # alone in its batch, as the reference was: fast-mode bits depend on the batch
    body = {"model": MINI, "prompt": "merge me", "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    with httpx.Client(timeout=60) as client, \
            client.stream("POST", mini.url + "/v1/completions", headers=headers(), json=body) as r:
        data = (line for line in r.iter_lines() if line.startswith("data: {"))
        lines = [next(data)]
        mini.engine._loop.call_soon_threadsafe(time.sleep, 0.5)  # stall the event loop; the engine goes on
        lines += list(data)
    chunks = [json.loads(line[6:])["choices"][0] for line in lines]
    assert max(len(c["logprobs"]["tokens"]) for c in chunks) > 1
    assert sum((c["logprobs"]["tokens"] for c in chunks), []) == [token_str(ref.tokenizer, t) for t in want.token_ids]
    assert sum((c["logprobs"]["token_logprobs"] for c in chunks), []) == want.logprobs
    assert "".join(c["text"] for c in chunks) == want.text
    assert chunks[-1]["finish_reason"] == "length"
    text = httpx.get(mini.url + "/metrics").text
    assert 'exactllm_engine_steps_total{kind="decode"}' in text and "exactllm_admission_window_seconds 0" in text
