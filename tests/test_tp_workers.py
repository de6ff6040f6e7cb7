"""The persistent tensor-parallel worker pool (engine/tp_workers.py) on CPU with gloo.

One LLM at TP=2 keeps its worker processes across calls, streams, reports a worker's failure as
an exception carrying the worker's traceback, and leaves no process behind on close(). One
process can hold one pool at a time, so the tests below run in file order: the shared pool is
broken (and thereby closed) by the failure test before the close test opens a new one.
"""
import json
import os

import httpx
import pytest
import torch
import torch.distributed as dist

from exactllm import LLM, SamplingParams
from exactllm.distributed.launch import WorkerError
from serve_process import start_serve

MINI = "random:llama-mini"
PROMPTS = ["Tensor parallel", "gives the same bits"]
PARAMS = SamplingParams(max_tokens=4, temperature=0.8, seed=7, ignore_eos=True)


def _bits(outs):
    return [(o.token_ids, o.logprobs) for o in outs]


def _pid(engine):
    return os.getpid()


def _fail_next_forward(engine):
    def boom(inputs):
        raise ValueError("injected worker failure")
    engine.runner.forward_logits = boom


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def reference():
    return LLM(MINI, numerics="tp_invariant")


@pytest.fixture(scope="module")
def tp2():
    llm = LLM(MINI, numerics="tp_invariant", tensor_parallel_size=2)
    yield llm
    llm.close()


def test_one_pool_serves_several_calls_without_respawning(tp2, reference):
    pids = tp2.pool.pids
    assert len(pids) == 1 and tp2.pool.call(_pid) == pids
    first = tp2.generate(PROMPTS, PARAMS, use_tqdm=False)
    second = tp2.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
    assert tp2.pool.pids == pids and tp2.pool.call(_pid) == pids
    want = reference.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert _bits(first) == _bits(want)
    assert _bits(second) == _bits(want[:1])


def test_stream_at_tp2_steps_the_shared_engine(tp2):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    before = tp2.engine.stats["generation_tokens"]
    text = "".join(tp2.stream("stream me", params))
    assert tp2.engine.stats["generation_tokens"] - before == 6
    assert text == tp2.generate("stream me", params, use_tqdm=False)[0].text


def test_server_at_tp2_matches_generate_at_tp1(reference):
    """`exactllm serve --tp 2` (own process, own pool): a streamed greedy completion has the
    same log-probs, bit for bit, as LLM.generate at TP 1 in tp_invariant mode."""
    proc, url = start_serve("--model", MINI, "--tp", "2", "--numerics", "tp_invariant")
    try:
        body = {"model": MINI, "prompt": "serve it", "max_tokens": 8, "ignore_eos": True, "temperature": 0,
                "logprobs": 0, "stream": True}
        logprobs = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line and line != "data: [DONE]":
                    logprobs += json.loads(line[len("data: "):])["choices"][0]["logprobs"]["token_logprobs"]
        want = reference.generate("serve it", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                  use_tqdm=False)[0]
        assert logprobs == want.logprobs and len(logprobs) == 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_worker_failure_raises_with_its_traceback_and_closes_the_pool(tp2):
    pids = tp2.pool.pids
    tp2.pool.call(_fail_next_forward)
    with pytest.raises(WorkerError, match="(?s)rank 1 of 2 failed.*injected worker failure"):
        tp2.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(_gone(pid) for pid in pids) and not dist.is_initialized()
    with pytest.raises(WorkerError, match="failed earlier"):
        tp2.generate(PROMPTS, PARAMS, use_tqdm=False)


def test_close_leaves_no_processes():
    threads = torch.get_num_threads()
    with LLM(MINI, tensor_parallel_size=2) as llm:
        pids = llm.pool.pids
        assert len(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == 2
    assert all(_gone(pid) for pid in pids) and not dist.is_initialized()
    assert torch.get_num_threads() == threads  # the pool shared this process's CPU threads out, and gave them back
