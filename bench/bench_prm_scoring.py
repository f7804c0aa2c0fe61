"""Per-step critic scoring: one forward pass per solution (stepdapo.prm.score_ids, every step's value
read from the per-token outputs) against one forward per step (`models.critic_values` on every
step's prefix: what scoring each state alone costs).

    python bench/bench_prm_scoring.py [--solutions 256] [--repeats 5] [--threads 2]
        [--out bench/results/prm-scoring.md]

Workload: built-in-task problems of 7 to 11 operations (8 to 12 steps, the answer line included)
with their worked solutions (`ArithmeticTask.demonstration`, flaws and all), on the tiny model of the
default config (TinyModelConfig, the char tokenizer), random weights: the cost, not the values, is
measured. Both critic kinds, built as the critic stage builds them from a policy: the log-ratio
critic (the default, beta 1, its pi_theta a perturbed copy of pi_ref) and a value-head critic.
Both paths start from token ids (tokenizing is the same for both), float32, no gradients, and run
alternately (one-pass first in even rounds, per-step first in odd ones) after an untimed warm-up
round that also compares their values. Reported: median (min-max) seconds and median per-step /
median one-pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from stepdapo.config import ArithmeticConfig, TinyModelConfig
from stepdapo.models import LogRatioCritic, char_tokenizer, critic_values, tiny_llama
from stepdapo.precision import cpu_model
from stepdapo.prm import encode, score_ids
from stepdapo.tasks.arithmetic import ArithmeticTask


def solutions(n: int) -> list[tuple[str, list[str]]]:
    import random

    task = ArithmeticTask(ArithmeticConfig(n_ops_min=7, n_ops_max=11, n_test=n))
    rng = random.Random(0)
    out = []
    for p in task.problems("test")[:n]:
        lines = task.demonstration(p, rng).split("\n")
        out.append((task.prompt(p), [s + "\n" for s in lines[:-1]] + lines[-1:]))
    return out


def critics(tok, d: Path) -> dict:
    policy = tiny_llama(tok, TinyModelConfig(), seed=0)
    policy.save_pretrained(d)
    torch.manual_seed(1)
    lr = LogRatioCritic.start(d, beta=1.0, initial_value=0.5)
    vh = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1)
    vh.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        for p in lr.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
        lr.head.weight.normal_(0, 0.3)  # values that vary from token to token: a real control
        vh.score.weight.normal_(0, 0.3)
    return {"log-ratio critic (default)": lr.eval(), "value-head critic": vh.eval()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--solutions", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="solutions per forward pass (one-pass)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prm-scoring.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()

    tok = char_tokenizer()
    items = solutions(args.solutions)
    enc = [encode(tok, p, s) for p, s in items]
    prefixes = [p + x[:e] for p, x, ends in enc for e in ends]
    plens = [len(p) for p, x, ends in enc for _ in ends]
    n_steps = [len(s) for _, s in items]
    one_pass_tokens = sum(len(p) + len(x) for p, x, _ in enc)
    per_step_tokens = sum(map(len, prefixes))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, critic in critics(tok, Path(tmp)).items():
            log_ratio = isinstance(critic, LogRatioCritic)
            one = lambda: score_ids(critic, tok.pad_token_id, enc, args.batch_size)  # noqa: E731
            per = lambda: critic_values(critic, prefixes, tok.pad_token_id,  # noqa: E731
                                        prompt_lens=plens if log_ratio else None)
            fast, slow = [v for vs in one() for v in vs], per()  # warm-up and control
            diff = max(abs(a - b) for a, b in zip(fast, slow))
            times = {"one": [], "per": []}
            for r in range(args.repeats):
                for which in (("one", "per") if r % 2 == 0 else ("per", "one")):
                    t0 = time.perf_counter()
                    (one if which == "one" else per)()
                    times[which].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append((name, times, med, diff))
            print(f"{name}: one-pass {med['one']:.3f} s, per-step {med['per']:.3f} s, "
                  f"{med['per'] / med['one']:.2f}x, max diff {diff:.1e}", flush=True)

    cfg = TinyModelConfig()
    n_params = sum(p.numel() for p in tiny_llama(tok, cfg).parameters())
    fmt = lambda v: f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"  # noqa: E731
    lines = [
        "# Per-step critic scoring: one forward pass per solution vs one per step", "",
        f"`python bench/bench_prm_scoring.py --solutions {args.solutions} --repeats {args.repeats} "
        f"--threads {args.threads}`, {time.perf_counter() - t_start:.0f} s in all.", "",
        f"{args.solutions} built-in-task solutions of {min(n_steps)} to {max(n_steps)} steps "
        f"({sum(n_steps)} steps in all; `ArithmeticTask.demonstration` on problems of 7-11 operations). "
        f"One-pass: `stepdapo.prm.score_ids`, {args.batch_size} whole solutions per forward, every step's "
        f"value read from the per-token outputs ({one_pass_tokens:,} tokens). Per-step: `critic_values` on "
        f"each step's prefix, as the advantages stage scores states ({per_step_tokens:,} tokens). Both from "
        f"token ids, float32, no gradients, alternating (one-pass first in even rounds), {args.repeats} "
        f"rounds after a warm-up round; median (min-max) seconds; speed-up = median per-step / median "
        f"one-pass. Random weights: the cost is measured; the control column is the largest difference "
        f"between the two paths' values.", "",
        f"Model: the default tiny Llama (hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} "
        f"heads, MLP {cfg.intermediate_size}, char vocabulary of {len(tok)}), {n_params / 1e6:.2f}M params; "
        f"the log-ratio critic runs it twice (pi_theta and pi_ref). Machine: {cpu_model()}, "
        f"{os.cpu_count()} CPU(s), {torch.get_num_threads()} torch thread(s), 1-minute load average "
        f"{load_before:.2f} before and {os.getloadavg()[0]:.2f} after; torch {torch.__version__}, "
        f"Python {platform.python_version()}.", "",
        "| critic | one-pass s | per-step s | speed-up | tokens one-pass / per-step | max abs diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, times, med, diff in rows:
        lines.append(f"| {name} | {fmt(times['one'])} | {fmt(times['per'])} | "
                     f"{med['per'] / med['one']:.2f}x | {one_pass_tokens:,} / {per_step_tokens:,} | {diff:.1e} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
