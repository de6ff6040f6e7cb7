"""A/B of two source trees on the batch-1 decode step, alternating processes in one script run.

Between two calls to the device (and even between processes of one call) the same code's graph
step moved by up to 8% (profile_decode: 1,195 vs 1,293 us), more than the changes being judged.
So each tree runs in its own process, the trees alternate ``--rounds`` times, and the medians
over rounds and their ratio are reported. Per process: the model is built, the decode graph of
batch 1 captured, its replay timed (CUDA events, median of 50), and one greedy batch-1 generate
of --prompt-len + --gen tokens timed end to end (tokens/s, the issue's batch-1 figure); its tokens
and log-probs are compared with the baseline tree's (same bits or not).

  PYTHONPATH=. python bench/ab_step.py --trees /tmp/base,/tmp/new --models 'random:tinyllama-1.1b' --rounds 3
Writes bench/results/ab_step_<tag>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, "bench")
from exactllm import LLM, SamplingParams
from throughput import graph_step_seconds
model, prompt_len, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=model, device="cuda", seed=0)
warm, ids = torch.randint(100, 20000, (2, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
llm.generate([warm], params, use_tqdm=False)  # warm-up: compiles, graphs (another prompt: no prefix-cache hit)
torch.cuda.synchronize()
t = time.perf_counter()
out = llm.generate([ids], params, use_tqdm=False)
torch.cuda.synchronize()
seconds = time.perf_counter() - t
print("RESULT", json.dumps({"graph_step_us": graph_step_seconds(llm) * 1e6, "tokens_per_s": gen / seconds,
                            "tokens": out[0].token_ids, "logprobs": out[0].logprobs}))
"""


def run_child(tree: str, model: str, a) -> dict | None:
    """One process's result, or None (its error printed) when it failed: the other trees still run."""
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(a.prompt_len), str(a.gen)], cwd=tree, env=env,
                          capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"{tree} {model} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", required=True, help="comma-separated source trees; the first is the baseline")
    ap.add_argument("--models", default="random:tinyllama-1.1b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--tag", default="ab")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    trees = a.trees.split(",")
    report = {"argv": sys.argv, "trees": trees, "models": {}}
    for model in a.models.split(","):
        runs = {tree: [] for tree in trees}
        failed = set()
        for r in range(a.rounds):
            for tree in trees:
                got = None if tree in failed else run_child(tree, model, a)
                if got is None:
                    failed.add(tree)
                    continue
                runs[tree].append(got)
                first = runs[trees[0]][0] if runs[trees[0]] else None
                same = first is not None and (got["tokens"], got["logprobs"]) == (first["tokens"], first["logprobs"])
                got["same_bits_as_baseline"] = same
                print(f"{model} round {r} {tree}: graph step {got['graph_step_us']:.1f} us, "
                      f"{got['tokens_per_s']:.0f} tok/s, same bits as baseline: {same}", flush=True)
        ok = [tree for tree in trees if runs[tree]]
        med = {tree: {k: statistics.median(x[k] for x in runs[tree]) for k in ("graph_step_us", "tokens_per_s")}
               for tree in ok}
        report["models"][model] = {"runs": runs, "median": med, "failed": sorted(failed)}
        if trees[0] not in med:
            continue
        base = med[trees[0]]
        for tree in ok:
            m = med[tree]
            print(f"{model:40s} {tree:24s} graph step {m['graph_step_us']:7.0f} us "
                  f"({m['graph_step_us'] / base['graph_step_us']:.3f}x)  {m['tokens_per_s']:7.0f} tok/s "
                  f"({m['tokens_per_s'] / base['tokens_per_s']:.3f}x)")
    import torch
    report["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"ab_step_{a.tag}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
