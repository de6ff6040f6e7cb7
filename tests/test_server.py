"""The OpenAI-compatible server, driven over loopback HTTP.

Normal use goes through the official `openai` client; malformed requests through raw httpx.
Most tests share one server over random:llama-mini (fast); one test serves the default
SmolLM2 model and checks greedy results against LLM.generate; one runs `exactllm serve` in a
subprocess to check the SIGTERM drain.

References come from a second LLM over the same random weights. The server runs numerics
"fast", so a reference could in principle differ from a server answer by a last-bit logit
change that flips a greedy argmax between batch shapes; with random weights the top-2 logit
gaps are far above that, and the prompts here were checked to agree.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time

import httpx
import openai
import pytest

from exactllm import LLM, SamplingParams
from exactllm.engine.llm_engine import RequestOutput
from exactllm.server.app import create_app
from exactllm.server.engine_loop import Admission, Event, merge_events
from exactllm.server.protocol import ChunkEncoder, chat_body, completion_body
from exactllm.server.runner import ServerThread
from serve_process import start_serve

MINI = "random:llama-mini"
KEY = "sk-test-7f3a9c"  # the mini server requires it


def token_str(tok, t: int) -> str:
    return tok.token_bytes(t).decode("utf-8", "replace")


@pytest.fixture(scope="module")
def mini():
    llm = LLM(MINI, max_num_seqs=16)
    app = create_app(llm.engine, MINI, api_key=KEY, max_queue=16)
    with ServerThread(app) as srv:
        srv.llm, srv.loop = llm, app.state.engine_loop
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield srv


@pytest.fixture(scope="module")
def ref():
    """An offline LLM over the same random weights (seeded), for reference answers."""
    return LLM(MINI)


def headers(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def metric(url: str, series: str) -> float:
    """One sample from /metrics by its exact series text, e.g. 'x_total{reason="abort"}'; 0 if absent."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == series:
            return float(value)
    return 0.0


def wait_idle(srv, timeout=30.0):
    """Until the engine holds no sequence and no KV block, and the server admits none."""
    engine = srv.llm.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (not engine.scheduler.running and not engine.scheduler.waiting and srv.loop.in_flight == 0
                and engine.block_manager.usage() == 0.0):
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: running={len(engine.scheduler.running)} waiting={len(engine.scheduler.waiting)} "
                         f"in_flight={srv.loop.in_flight} kv={engine.block_manager.usage()}")


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
    engine = mini.llm.engine
    wait_idle(mini)
    aborted = metric(mini.url, 'exactllm_sequences_total{reason="abort"}')
    body = {**GOOD, "max_tokens": 1500, "ignore_eos": True, "stream": True, "logprobs": 0}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", mini.url + "/v1/completions", headers=headers(), json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.block_manager.usage() > 0 and len(engine.scheduler.running) == 1
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
    old = mini.loop.max_in_flight
    mini.loop.max_in_flight = 2
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
        mini.loop.max_in_flight = old
    wait_idle(mini)
    mini.loop.draining = True
    try:
        r = httpx.post(mini.url + "/v1/completions", headers=headers(), json=GOOD)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "error" in r.json()
        assert httpx.get(mini.url + "/health").status_code == 503
    finally:
        mini.loop.draining = False
    assert httpx.post(mini.url + "/v1/completions", headers=headers(), json=GOOD).status_code == 200


def test_engine_fault_is_a_500_body_and_server_recovers(mini, monkeypatch):
    engine = mini.llm.engine
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device fault")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
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


def test_admission_window():
    assert Admission(graphs=False).window == 0.0  # no CUDA graphs: a prompt step costs no more for being alone
    auto = Admission(graphs=True, max_window=0.02)
    assert auto.window == 0.0 and auto.due(0.0, busy=True)  # nothing measured yet
    for t in (0.002, 0.003, 0.002):
        auto.observe(False, t)
    for t in (0.009, 0.008, 5.0):  # a compile-time outlier does not move the median
        auto.observe(True, t)
    assert auto.window == pytest.approx(0.009 - 0.002)
    auto.first_held = 1.0
    assert not auto.due(1.005, busy=True) and auto.due(1.008, busy=True) and auto.due(1.001, busy=False)
    auto.observe(True, 1.0)
    auto.observe(True, 1.0)
    assert auto.window == 0.02  # capped
    assert Admission(0.5, graphs=False).window == 0.5
    assert auto.steps == {"prompt": [5, pytest.approx(7.017)], "decode": [3, pytest.approx(0.007)]}


def _post_async(url: str, prompt: str, out: dict) -> threading.Thread:
    def run():
        out[prompt] = httpx.post(url + "/v1/completions", timeout=60,
                                 json={"model": MINI, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                                       "logprobs": 0}).json()
    t = threading.Thread(target=run)
    t.start()
    return t


def slowed(llm: LLM, seconds: float = 0.005) -> LLM:
    """Each engine step takes at least `seconds` more, so that a 1500-token request keeps decoding
    (>= 7.5 s) for as long as a test needs it, however fast the machine runs the tiny model."""
    step = llm.engine.step

    def slow_step():
        time.sleep(seconds)
        return step()
    llm.engine.step = slow_step
    return llm


def until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_requests_arriving_during_decode_are_admitted_together(ref):
    """With an admission window, requests that arrive one by one while another decodes are held,
    then their prompts are computed in one step; with none, each arrival costs a prompt step of
    its own. The answers are the same either way."""
    prompts = ["late one", "late two", "late three"]
    want = ref.generate(prompts, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    long = {"model": MINI, "prompt": "the long one", "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    for window, prompt_steps in ((60.0, 2), (0.0, 4)):
        llm = slowed(LLM(MINI, max_num_seqs=16))
        app = create_app(llm.engine, MINI, admission_window=window)
        loop, answers, threads = app.state.engine_loop, {}, []
        with ServerThread(app) as srv, httpx.Client(timeout=60) as client:
            with client.stream("POST", srv.url + "/v1/completions", json=long) as r:
                lines = (line for line in r.iter_lines() if line.startswith("data: {"))
                next(lines)
                for i, p in enumerate(prompts):
                    threads.append(_post_async(srv.url, p, answers))
                    if window:  # arrivals at different steps, all held while the long request decodes
                        until(lambda: len(loop._held) == i + 1)
                        for _ in range(3):
                            next(lines)
                    else:
                        threads[-1].join()
                if window:
                    loop.admission.fixed = 0.0  # the window ends: all three go in at the next step
                for t in threads:
                    t.join()
                assert len(llm.engine.scheduler.running) == 1  # the long one still decodes
            assert loop.admission.steps["prompt"][0] == prompt_steps
        for p, w in zip(prompts, want):
            assert answers[p]["choices"][0]["logprobs"]["tokens"] == [token_str(ref.tokenizer, t) for t in w.token_ids]


def test_held_request_is_admitted_when_the_window_ends(ref):
    want = ref.generate(["short"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    llm = slowed(LLM(MINI, max_num_seqs=16))
    app = create_app(llm.engine, MINI, admission_window=0.2)
    engine = llm.engine
    long = {"model": MINI, "prompt": "the long one", "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "logprobs": 0}
    with ServerThread(app) as srv, httpx.Client(timeout=60) as client:
        with client.stream("POST", srv.url + "/v1/completions", json=long) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            t0 = time.monotonic()
            got = httpx.post(srv.url + "/v1/completions", timeout=60,
                             json={"model": MINI, "prompt": "short", "max_tokens": 4, "temperature": 0}).json()
            assert time.monotonic() - t0 >= 0.2
            assert len(engine.scheduler.running) == 1  # the long request is still decoding
        assert got["choices"][0]["text"] == want.text


def test_stream_behind_the_engine_gets_merged_chunks(mini, ref):
    """When the event loop falls behind the engine, the tokens queued for a stream go out as one
    chunk; text, tokens and log-probs are those of LLM.generate all the same."""
    want = ref.generate(["merge me"], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=True),
                        use_tqdm=False)[0]
    body = {"model": MINI, "prompt": "merge me", "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    with httpx.Client(timeout=60) as client, \
            client.stream("POST", mini.url + "/v1/completions", headers=headers(), json=body) as r:
        data = (line for line in r.iter_lines() if line.startswith("data: {"))
        lines = [next(data)]
        mini.loop._loop.call_soon_threadsafe(time.sleep, 0.5)  # stall the event loop; the engine goes on
        lines += list(data)
    chunks = [json.loads(line[6:])["choices"][0] for line in lines]
    assert max(len(c["logprobs"]["tokens"]) for c in chunks) > 1
    assert sum((c["logprobs"]["tokens"] for c in chunks), []) == [token_str(ref.tokenizer, t) for t in want.token_ids]
    assert sum((c["logprobs"]["token_logprobs"] for c in chunks), []) == want.logprobs
    assert "".join(c["text"] for c in chunks) == want.text
    assert chunks[-1]["finish_reason"] == "length"
    text = httpx.get(mini.url + "/metrics").text
    assert 'exactllm_engine_steps_total{kind="decode"}' in text and "exactllm_admission_window_seconds 0" in text


def test_sigterm_drains_in_flight_stream():
    proc, url = start_serve("--model", MINI)
    try:
        body = {"model": MINI, "prompt": "drain me", "max_tokens": 48, "ignore_eos": True, "temperature": 0,
                "logprobs": 0, "stream": True}
        tokens, done, termed = 0, False, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[len("data: "):])
                tokens += len(chunk["choices"][0]["logprobs"]["tokens"])
                if not termed:
                    proc.send_signal(signal.SIGTERM)
                    termed = True
                    time.sleep(0.3)
                    with pytest.raises(httpx.TransportError):  # no new connections while draining
                        httpx.get(url + "/health", timeout=2)
        assert done and tokens == 48
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- default model
def test_default_model_greedy_equals_llm_generate():
    """Real text (BPE, multi-byte pieces, stop strings) through the server equals LLM.generate."""
    llm = LLM()
    prompt = "The capital of France is"
    want = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert want.text.strip()
    from exactllm.server.runner import served_model_name
    name = served_model_name(None)
    app = create_app(llm.engine, name)
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
        assert r.choices[0].text == want.text
        assert r.choices[0].logprobs.token_logprobs == want.logprobs
        # Streaming with a stop string that straddles the 3rd/4th token boundary: the stream
        # must hold back the 3rd token's last character until it knows whether the stop string
        # completes, never show any part of it, and agree with the engine's own cut.
        b = len(llm.tokenizer.decode(want.token_ids[:3]))
        stop = want.text[b - 1:b + 1]
        cut = want.text[:want.text.find(stop)]
        pieces = [(ch.choices[0].text, ch.choices[0].finish_reason)
                  for ch in client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0,
                                                      stop=[stop], stream=True)]
        assert "".join(p for p, _ in pieces) == cut
        assert pieces[-1][1] == "stop"
