"""Shared-prefix forward passes against the plain per-pair ones: each state's prefix once for its M
actions (stepdapo.logprobs.grouped_sequence_logprobs, models.critic_logits) versus the prefix
repeated in every s + a_j row.

    OMP_NUM_THREADS=1 python bench/bench_shared_prefix.py [--repeats 3] [--threads 1]

Workloads, each a batch of `--states` states of ragged lengths (P and 7/8 P tokens) with M actions
of 32 tokens (ragged: 32 and 24), M = 2, 4, 8, 16, long (P = 512) and short (P = 96) states:
  (a) critic scoring: the critic's values of every s + a_j, forward only (advantages stage);
  (b) actor step: DAPO loss on log pi(a_j | s) with forward AND backward (the optimizer step, the
      same for both, is left out).
Both implementations of a cell run alternately (`--repeats` times each, after one warm-up of each),
the median wall time is reported and the ratio plain / shared. Random weights: the cost, not the
values, is measured. Writes bench/results/shared-prefix.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stepdapo.logprobs import sequence_logprobs
from stepdapo.losses import dapo_loss
from stepdapo.models import critic_logits

RESULTS = Path(__file__).parent / "results"
ACTION = 32


def config() -> LlamaConfig:
    # a small Llama with SmolLM2's shape ratios: GQA 2:1, SiLU MLP 2.7x wide, tied embeddings
    return LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                       tie_word_embeddings=True, pad_token_id=0, num_labels=1)


def batch(n_states: int, prefix: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(1, 8192, (n,), generator=g).tolist()  # noqa: E731
    states = [rand(prefix if i % 2 == 0 else prefix * 7 // 8) for i in range(n_states)]
    actions = [[rand(ACTION if j % 2 == 0 else ACTION * 3 // 4) for j in range(m)] for _ in states]
    prompts = [s for s, acts in zip(states, actions) for _ in acts]
    completions = [a for acts in actions for a in acts]
    return states, prompts, completions


def critic_scoring(critic, states, prompts, completions, shared: bool):
    seqs = [p + c for p, c in zip(prompts, completions)]
    lens = [len(p) for p in prompts] if shared else None
    with torch.no_grad():
        critic_logits(critic, seqs, 0, lens)


def actor_step(policy, states, prompts, completions, shared: bool):
    policy.zero_grad(set_to_none=True)
    logps = sequence_logprobs(policy, prompts, completions, 0, shared_prefix=shared)
    n = len(logps)
    loss = dapo_loss(logps, logps.detach() + 0.1, torch.linspace(-1, 1, n), 0.3, torch.ones(n))
    loss.backward()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--states", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config()).train()
    critic = LlamaForSequenceClassification(config()).eval()
    params = sum(p.numel() for p in policy.parameters())
    rows = []
    t_start = time.perf_counter()
    for work, model, fn in (("critic scoring (forward)", critic, critic_scoring),
                            ("actor step (forward+backward)", policy, actor_step)):
        for prefix in (512, 96):
            for m in (2, 4, 8, 16):
                data = batch(args.states, prefix, m, seed=m)
                times = {True: [], False: []}
                for r in range(args.repeats + 1):  # the first round warms up
                    for shared in ((True, False) if r % 2 == 0 else (False, True)):  # alternate who goes first
                        t = timed(lambda: fn(model, *data, shared))
                        if r:
                            times[shared].append(t)
                plain, shared = statistics.median(times[False]), statistics.median(times[True])
                states, prompts, completions = data  # tokens through the model, padding excluded
                tokens = (sum(map(len, prompts)) + sum(map(len, completions))) / (
                    sum(map(len, states)) + sum(map(len, completions)))
                rows.append({"work": work, "prefix": prefix, "action": ACTION, "m": m, "states": args.states,
                             "plain_s": plain, "shared_s": shared, "speedup": plain / shared, "token_ratio": tokens})
                print(f"{work:30s} P={prefix:4d} M={m:2d}  plain {plain:6.3f}s  shared {shared:6.3f}s  "
                      f"x{plain / shared:5.2f}", flush=True)
    total = time.perf_counter() - t_start
    meta = {"model": f"Llama, hidden 256, 4 layers, 8 heads (4 kv), MLP 688, vocab 8192, {params / 1e6:.1f}M params",
            "dtype": "float32", "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "seconds": total}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shared-prefix.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Shared-prefix forward passes vs plain per-pair rows",
        "",
        "`python bench/bench_shared_prefix.py` (OMP_NUM_THREADS=1). Each cell: a batch of "
        f"{args.states} states (P and 7/8 P tokens) with M actions each (32 and 24 tokens); "
        "plain = every s + a_j its own row (today's `sequence_logprobs` / right-padded critic call); "
        "shared = each prefix once, actions on its cached keys/values. Median of "
        f"{args.repeats} interleaved repeats after a warm-up; speedup = plain / shared wall time.",
        "",
        f"Model: {meta['model']}, {meta['dtype']}, CPU, {args.threads} thread(s), torch {meta['torch']}. "
        f"Whole benchmark: {total:.0f} s.",
        "",
        "| work | prefix P | M | plain s | shared s | speedup | tokens plain / shared |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['work']} | {r['prefix']} | {r['m']} | {r['plain_s']:.3f} | {r['shared_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['token_ratio']:.1f} |" for r in rows]
    lines += ["", "The last column is the ratio of tokens run through the model (padding excluded), the "
              "speedup to expect (padding makes plain rows costlier, attention over the prefix's keys stays per "
              "continuation). Measured on a "
              "2-core machine shared with other jobs: single cells are noisy, the trend is not."]
    (RESULTS / "shared-prefix.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
