"""The server as processes: `exactllm serve` drains on SIGTERM, fails clearly when its engine
cannot start, and never leaves its engine process behind; the default SmolLM2 model served
gives LLM.generate's greedy results (real BPE text, stop strings across token boundaries).
test_server.py covers the API itself over one shared server.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from exactllm import LLM, SamplingParams
from exactllm.server.app import create_app
from exactllm.server.engine_client import EngineClient
from exactllm.server.engine_core import EngineSpec
from exactllm.server.runner import ServerThread, served_model_name
from serve_process import children, engine_pid, gone, start_serve

MINI = "random:llama-mini"
GOOD = {"model": MINI, "prompt": "hi", "max_tokens": 2}


def test_sigterm_drains_in_flight_stream():
    proc, url = start_serve("--model", MINI)
    try:
        engine = engine_pid(proc.pid)
        others = children(proc.pid)
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
        assert all(gone(pid) for pid in others) and engine in others
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_process_dies_with_the_server():
    """However the server process ends (here SIGKILL, no chance to clean up), its engine
    process does not outlive it."""
    proc, url = start_serve("--model", MINI)
    try:
        engine = engine_pid(proc.pid)
        others = children(proc.pid)
        assert httpx.post(url + "/v1/completions", json=GOOD, timeout=30).status_code == 200
        proc.kill()
        proc.wait()
        assert all(gone(pid) for pid in others) and engine in others
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_start_failure_is_a_clear_error_exit():
    proc = subprocess.run([sys.executable, "-m", "exactllm", "serve", "--model", "/nonexistent/model.gguf",
                           "--log-level", "warning"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "the engine could not start" in proc.stderr and "/nonexistent/model.gguf" in proc.stderr


def test_default_model_greedy_equals_llm_generate():
    """Real text (BPE, multi-byte pieces, stop strings) through the server equals LLM.generate."""
    engine = EngineClient(EngineSpec())
    llm = LLM()
    prompt = "The capital of France is"
    want = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert want.text.strip()
    name = served_model_name(None)
    with ServerThread(create_app(engine, name)) as srv:
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


def test_engine_process_death_fails_requests_and_health():
    """An engine process that dies under a running server: in-flight requests get a 500 body,
    /health reports it, and new requests get 503 instead of hanging."""
    client = EngineClient(EngineSpec(MINI, max_num_seqs=4))
    with ServerThread(create_app(client, MINI)) as srv:
        body = {**GOOD, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            client.proc.kill()
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["type"] == "server_error"
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and "engine process exited" in health.json()["detail"]
        r = httpx.post(srv.url + "/v1/completions", json=GOOD)
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]
