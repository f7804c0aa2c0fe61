"""Sampling throughput of stepdapo's HF generator against plain `model.generate`, same prompts.

    python bench/bench_sampling.py [--model DIR] [--prompts 256] [--n 4] [--repeats 3]

Two workloads, each run by both implementations, interleaved:
- "solution": n full solutions per test prompt (evaluation, stage 1);
- "rollouts": the labelling stage's work: m = 16 completions from each of many states (prompt plus
  0..3 steps of a clean solution), where the shared prefill and early-finishing rows matter.

Writes bench/results/sampling.json and sampling.md. Throughput counts generated tokens (padding
excluded) per wall-clock second; the ratio, not the absolute number, is what carries across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from stepdapo.config import load_config
from stepdapo.generation import HFGenerator, SamplingParams, encode_prompts
from stepdapo.models import load_policy, set_threads
from stepdapo.stages.bootstrap import bootstrap
from stepdapo.tasks import get_task

RESULTS = Path(__file__).parent / "results"


def hf_generate(model, tok, prompts, n, max_new, batch_size, seed):
    """The obvious alternative: model.generate(num_return_sequences=n), batch by batch."""
    torch.manual_seed(seed)
    tokens = 0
    per_batch = max(1, batch_size // n)
    for s in range(0, len(prompts), per_batch):
        chunk = prompts[s:s + per_batch]
        L = max(len(p) for p in chunk)
        ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in chunk])
        attn = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in chunk])[:, None]).long()
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, num_return_sequences=n, max_new_tokens=max_new,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, L:]
        for row in new.tolist():
            tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/bench-model")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config("configs/arithmetic.yaml")
    set_threads(cfg.threads)
    if not Path(args.model, "config.json").exists():
        bootstrap(cfg, args.model)
    model, tok = load_policy(args.model)
    task = get_task(cfg.task)
    problems = task.problems("test")[:args.prompts]
    prompts = encode_prompts(tok, [task.prompt(p) for p in problems])
    gen = HFGenerator(model, tok, task.step_delimiter, batch_size=args.batch_size, progress=False)

    # states as the labelling stage sees them: every step-boundary prefix of a clean solution
    states = []
    for p, ids in zip(problems[:args.prompts // 2], prompts):
        lines = task.demonstration(p).split("\n")
        for d in range(len(lines) - 1):
            states.append(ids + tok("".join(x + "\n" for x in lines[:d]), add_special_tokens=False)["input_ids"])
    m = 16

    rows = []
    for rep in range(args.repeats):  # interleaved, so drift on a noisy machine hits both alike
        for mode, n in (("solution", args.n), ("step", args.n), ("greedy", 1)):
            params = SamplingParams(temperature=0 if mode == "greedy" else 1.0, max_new_tokens=64,
                                    stop="step" if mode == "step" else "solution", seed=rep)
            t0 = time.perf_counter()
            out = gen.generate(prompts, n, params)
            dt = time.perf_counter() - t0
            toks = sum(len(s.token_ids) for ss in out for s in ss)
            rows.append({"impl": "stepdapo", "mode": mode, "n": n, "tokens": toks, "seconds": dt,
                         "tokens_per_s": toks / dt})
        t0 = time.perf_counter()
        toks = hf_generate(model, tok, prompts, args.n, 64, args.batch_size, rep)
        dt = time.perf_counter() - t0
        rows.append({"impl": "hf-generate", "mode": "solution", "n": args.n, "tokens": toks,
                     "seconds": dt, "tokens_per_s": toks / dt})
        t0 = time.perf_counter()
        out = gen.generate(states, m, SamplingParams(temperature=1.0, max_new_tokens=64, seed=rep))
        dt = time.perf_counter() - t0
        toks = sum(len(s.token_ids) for ss in out for s in ss)
        rows.append({"impl": "stepdapo", "mode": "rollouts", "n": m, "tokens": toks, "seconds": dt,
                     "tokens_per_s": toks / dt, "states": len(states)})
        t0 = time.perf_counter()
        toks = hf_generate(model, tok, states, m, 64, args.batch_size, rep)
        dt = time.perf_counter() - t0
        rows.append({"impl": "hf-generate", "mode": "rollouts", "n": m, "tokens": toks, "seconds": dt,
                     "tokens_per_s": toks / dt, "states": len(states)})

    def median(impl, mode):
        v = sorted(r["tokens_per_s"] for r in rows if r["impl"] == impl and r["mode"] == mode)
        return v[len(v) // 2]

    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "prompts": args.prompts, "n": args.n, "batch_size": args.batch_size,
        "median_tokens_per_s": {f"{i}/{m}": median(i, m) for i, m in
                                {(r["impl"], r["mode"]) for r in rows}},
        "speedup_vs_hf_generate": median("stepdapo", "solution") / median("hf-generate", "solution"),
        "rollout_speedup_vs_hf_generate": median("stepdapo", "rollouts") / median("hf-generate", "rollouts"),
        "rollout_states": len(states),
        "runs": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sampling.json").write_text(json.dumps(summary, indent=2))
    md = ["# Sampling throughput", "", f"{summary['machine']}; {summary['model_parameters']:,}-parameter "
          f"tiny Llama; {args.prompts} test prompts x {args.n} samples; batch {args.batch_size} rows; "
          f"median of {args.repeats} interleaved repeats.", "", "| implementation / mode | tokens/s |",
          "|---|---|"]
    md += [f"| {k} | {v:,.0f} |" for k, v in sorted(summary["median_tokens_per_s"].items())]
    md += ["", f"stepdapo full-solution sampling is **{summary['speedup_vs_hf_generate']:.2f}x** "
           "`model.generate(num_return_sequences=n)` on the same prompts.",
           f"Labelling rollouts ({len(states)} states x {m}): **{summary['rollout_speedup_vs_hf_generate']:.2f}x** "
           "`model.generate(num_return_sequences=16)` on the same states (shared prefill, finished rows "
           "dropped from the batch)."]
    (RESULTS / "sampling.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
