"""``exactllm bench <name> [args]``: run a benchmark script of the source checkout's bench/ folder.

The scripts stay plain files (each prints a table and writes JSON/PNG under bench/results); this
only finds and runs them, passing the remaining arguments through.
"""
from __future__ import annotations

import argparse
import pathlib
import runpy
import sys

SCRIPTS = {
    "throughput": ("throughput.py", "GPU tokens/s vs batch size (JSON + PNG)"),
    "latency": ("latency.py", "batch-1 time to first token and inter-token latency (CPU or GPU)"),
    "kernels": ("kernels.py", "GPU kernels vs torch/cuBLAS and their rooflines"),
    "invariance": ("invariance_gpu.py", "bit differences across batch sizes, train vs serve, cost of the invariant modes"),
    "tbik": ("tbik_matmul.py", "TBIK tree matmul vs cuBLAS"),
    "cpu": ("cpu_generate.py", "exactllm vs llama.cpp on CPU, batch 1"),
    "moe": ("moe_layer.py", "MoE layer: none vs realb vs eplb (per-rank latency), FP8 vs BF16 grouped GEMM"),
    "moe-e2e": ("moe_e2e.py", "MoE model prefill throughput and accuracy proxy"),
    "server": ("server_load.py", "OpenAI server under concurrent streaming clients vs offline"),
    "profile": ("profile_decode.py", "GPU kernels per decode step and their time (eager profile, graph step)"),
    "linear": ("linear_kernels.py", "GPU linear kernels: bit classes of tile configs, invariant vs fast, GEMV vs bytes"),
    "moe-accuracy": ("moe_accuracy.py", "low-precision experts vs BF16: top-1 agreement and KL by logit margin"),
    "host": ("host_overhead.py", "engine host time per step with a stub model"),
}
BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "bench"


def cmd_bench(args) -> int:
    script = BENCH_DIR / SCRIPTS[args.name][0]
    if not script.exists():
        raise FileNotFoundError(f"{script}: exactllm bench runs the scripts of a source checkout's bench/ folder")
    sys.argv = [str(script), *args.rest]
    sys.path.insert(0, str(BENCH_DIR))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (tables, JSON and PNG under bench/results)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="\n".join(f"  {name:<13} {desc}" for name, (_, desc) in SCRIPTS.items()))
    p.add_argument("name", choices=sorted(SCRIPTS))
    p.add_argument("rest", nargs="...", help="arguments for the benchmark script (see: exactllm bench NAME --help)")
    p.set_defaults(func=cmd_bench)
