"""The command line: generate, info, quantize, errors as one line (never a traceback)."""
import os
import subprocess
import sys

import pytest

from exactllm.models.loader import default_model_path


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "exactllm", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_generate_streams_text_and_reports_speed():
    r = cli("generate", "--model", "random:llama-mini", "--max-tokens", "4", "hello")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr


def test_info_describes_the_default_model():
    r = cli("info", default_model_path())
    assert r.returncode == 0, r.stderr
    assert "30 layers" in r.stdout and "Q4_1" in r.stdout and "Q8_0" in r.stdout


@pytest.mark.parametrize("make_bad, message", [
    (lambda d: os.path.join(d, "missing.gguf"), "no such file"),
    (lambda d: _write(d, "garbage.gguf", b"not a gguf file at all" * 10), "not a readable GGUF"),
    (lambda d: _write(d, "trunc.gguf", open(default_model_path(), "rb").read(1_000_000)), "GGUF"),
])
def test_bad_model_files_give_one_line_errors(tmp_path, make_bad, message):
    path = make_bad(str(tmp_path))
    r = cli("info", path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and message in lines[0]


def _write(d, name, data):
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_unsupported_architecture_is_named(tmp_path):
    import gguf
    import numpy as np
    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    r = cli("info", path)
    assert r.returncode == 2 and "unsupported architecture 'gpt2'" in r.stderr


def test_quantize_round_trip_keeps_the_model_working(tmp_path):
    out = str(tmp_path / "smol-q8_0.gguf")
    r = cli("quantize", default_model_path(), out, "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    info = cli("info", out)
    assert "Q8_0 x211" in info.stdout
    from exactllm import LLM, SamplingParams
    text = LLM(out).generate(["The capital of France is"], SamplingParams(max_tokens=3, temperature=0),
                             use_tqdm=False)[0].text
    assert "Paris" in text


def test_bench_runs_the_named_script():
    r = cli("bench", "cpu", "--help")
    assert r.returncode == 0, r.stderr
    assert "--threads" in r.stdout and "cpu_generate.py" in r.stdout
