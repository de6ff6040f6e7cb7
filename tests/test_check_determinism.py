"""``exactllm check-determinism`` on CPU (gloo): the TP x batch report, its --train column, and
what it says when ranks outnumber GPUs.

tp_invariant must report 0 differing log-probs at TP 2 and batch 3 and the training forward
must reproduce every served log-prob; the same command in fast mode must find differences
(otherwise the zeros prove nothing)."""
import json

import pytest
import torch

from exactllm.check_determinism import run_check
from exactllm.cli import main
from exactllm.config import EngineConfig
from exactllm.engine import tp_workers
from exactllm.models.loader import resolve_model

MINI = "random:llama-mini"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def _check(numerics: str) -> dict:
    return run_check(MINI, PROMPTS, [1, 2], [1, 3], numerics, "cpu", max_tokens=3, temperature=0.0, seed=0,
                     train=True)


def test_tp_invariant_reports_no_difference_and_train_equals_serve():
    rows = _check("tp_invariant")["rows"]
    assert [(r["tp"], r["batch_size"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["tokens"] == len(PROMPTS) * 3 for r in rows)
    assert all(r["differing_logprobs"] == 0 and r["train_vs_serve_differing_logprobs"] == 0 for r in rows)


def test_fast_mode_does_differ_so_the_check_can_fail():
    rows = _check("fast")["rows"]
    assert any(r["differing_logprobs"] > 0 for r in rows)
    assert any(r["train_vs_serve_differing_logprobs"] > 0 for r in rows)


def test_cli_writes_the_json_report_and_exits_zero_when_exact(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["check-determinism", "--model", MINI, "--tp", "1", "--batch-sizes", "1,2", "--max-tokens", "3",
                 "--train", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["numerics"] == "tp_invariant" and len(report["rows"]) == 2
    assert "train != serve" in capsys.readouterr().out


def test_more_ranks_than_gpus_says_how_to_share(monkeypatch):
    monkeypatch.delenv(tp_workers.SHARE_GPUS_ENV, raising=False)
    assert tp_workers._backend("cuda") == "nccl" and tp_workers._backend("cpu") == "gloo"
    cfg = EngineConfig(device="cuda", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=tp_workers.SHARE_GPUS_ENV):
        tp_workers.TPWorkerPool(resolve_model(MINI, torch.float32), cfg)
    monkeypatch.setenv(tp_workers.SHARE_GPUS_ENV, "1")
    assert tp_workers.shares_gpus("cuda") and not tp_workers.shares_gpus("cpu")
    assert tp_workers._backend("cuda") == "gloo"
