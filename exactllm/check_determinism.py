"""``exactllm check-determinism``: run prompts under every (TP size, batch size) combination and
count tokens and log-probs that differ from the TP=1, batch-1 run (the TBIK paper's "probability
divergence"). Batches are filled with other prompts, so each target prompt shares its batch with
strangers, as in a server."""
from __future__ import annotations

import json
import sys

FILLER = ["Filler request number {i}: tell me something about the number {i}.",
          "{i} {i} {i} repeat after me", "Translate to French: good morning, friend #{i}"]


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _row(tp: int, bs: int, outs, base, trainer) -> dict:
    pairs = list(zip(outs, base))
    row = {"tp": tp, "batch_size": bs, "tokens": sum(len(o.token_ids) for o in outs),
           "differing_tokens": sum(a != b for o, r in pairs for a, b in zip(o.token_ids, r.token_ids)),
           "differing_logprobs": sum(a != b for o, r in pairs for a, b in zip(o.logprobs, r.logprobs)),
           "max_abs_logprob_diff": max((abs(a - b) for o, r in pairs for a, b in zip(o.logprobs, r.logprobs)),
                                       default=0.0)}
    if trainer is not None:
        row["train_vs_serve_differing_logprobs"] = train_differences(trainer, outs)
    return row


def train_differences(trainer, outs) -> int:
    """How many served log-probs the training forward (exactllm.train, this process, one pass
    over each whole sequence) does not reproduce bit for bit."""
    import torch
    with torch.no_grad():
        scored = trainer([o.prompt_token_ids + o.token_ids for o in outs])
    return sum(a != b for o, lp in zip(outs, scored) for a, b in zip(lp[-len(o.token_ids):].tolist(), o.logprobs))


def check_rows(model, prompts, tps, batch_sizes, numerics, device, max_tokens, temperature, seed,
               train: bool = False):
    """Yield one report row per (TP size, batch size) as soon as its run is done, so that a long
    check shows progress and a cut-off one keeps what it measured. The first run is the baseline."""
    from exactllm import LLM, SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=True)
    trainer = None
    if train:
        from exactllm.train import TrainModel
        trainer = TrainModel(model, numerics=numerics, device=device)
    base = None
    for tp in tps:
        llm = LLM(model, device=device, numerics=numerics, tensor_parallel_size=tp)
        try:
            for bs in batch_sizes:
                outs = []
                for p in prompts:
                    batch = [p] + [FILLER[i % len(FILLER)].format(i=i) for i in range(bs - 1)]
                    outs.append(llm.generate(batch, params, use_tqdm=False)[0])
                base = base or outs
                yield _row(tp, bs, outs, base, trainer)
        finally:
            llm.close()


def run_check(model, prompts, tps, batch_sizes, numerics, device, max_tokens, temperature, seed,
              train: bool = False) -> dict:
    rows = list(check_rows(model, prompts, tps, batch_sizes, numerics, device, max_tokens, temperature, seed, train))
    return _report(model, numerics, device, tps, batch_sizes, rows)


def _report(model, numerics, device, tps, batch_sizes, rows) -> dict:
    return {"model": model, "numerics": numerics, "device": device, "baseline": {"tp": tps[0], "batch_size": batch_sizes[0]},
            "rows": rows}


def cmd_check(args) -> int:
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    tps, batch_sizes = _int_list(args.tp), _int_list(args.batch_sizes)
    print(f"{'tp':>3} {'batch':>6} {'tokens':>7} {'diff tokens':>12} {'diff logprobs':>14} {'max |dlogp|':>12}"
          + (f" {'train != serve':>15}" if args.train else ""), flush=True)
    rows = []
    for r in check_rows(args.model, prompts, tps, batch_sizes, args.numerics, args.device, args.max_tokens,
                        args.temperature, args.seed, train=args.train):
        rows.append(r)
        print(f"{r['tp']:>3} {r['batch_size']:>6} {r['tokens']:>7} {r['differing_tokens']:>12} "
              f"{r['differing_logprobs']:>14} {r['max_abs_logprob_diff']:>12.3g}"
              + (f" {r['train_vs_serve_differing_logprobs']:>15}" if args.train else ""), flush=True)
        if args.json:  # rewritten after every run: a cut-off check keeps its finished rows
            with open(args.json, "w") as f:
                json.dump(_report(args.model, args.numerics, args.device, tps, batch_sizes, rows), f, indent=2)
    exact = all(r["differing_logprobs"] == 0 and r.get("train_vs_serve_differing_logprobs", 0) == 0 for r in rows)
    return 0 if exact or args.numerics == "fast" else 1


def add_parser(sub) -> None:
    p = sub.add_parser("check-determinism", help="count log-probs that change with TP size or batch size")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--numerics", default="tp_invariant", choices=["fast", "batch_invariant", "tp_invariant"])
    p.add_argument("--tp", default="1,2", help="comma-separated TP sizes (first is the baseline)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (first is the baseline)")
    p.add_argument("--prompts", default=None, help="file with one prompt per line")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", action="store_true",
                   help="also rescore every run with the training forward (exactllm.train) and count "
                        "log-probs it does not reproduce")
    p.add_argument("--json", default=None, help="write the report here")
    p.set_defaults(func=cmd_check)


if __name__ == "__main__":
    from exactllm.cli import main
    sys.exit(main(["check-determinism", *sys.argv[1:]]))
