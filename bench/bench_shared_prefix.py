"""Shared-prefix forward passes against the plain per-pair ones: each state's prefix once for its M
actions versus the prefix repeated in every s + a_j row, on the paths the stages use.

    OMP_NUM_THREADS=1 python bench/bench_shared_prefix.py [--repeats 3] [--threads 1] [--states 2]
        [--prefixes 512,96] [--ms 2,4,8,16] [--works log-ratio,value-head,actor] [--bf16 false]
        [--out bench/results/shared-prefix]

Workloads, each a batch of `--states` states of ragged lengths (P and 7/8 P tokens, the first
quarter of each its prompt) with M actions of 32 tokens (ragged: 32 and 24):
  log-ratio   critic scoring with the default critic (models.LogRatioCritic: pi_theta and pi_ref),
              `models.critic_values` with prefix_lens (shared) and without (plain), as the
              advantages stage calls it (no gradients, float32);
  value-head  the same with a value-head critic (LlamaForSequenceClassification);
  actor       one whole optimizer step of the actor: `logprobs.sequence_logprobs(...,
              shared_prefix=True/False)`, the DAPO loss, backward, gradient clipping (max norm 1),
              AdamW (fused, betas 0.9/0.95, no weight decay, as the Trainer's adamw_torch_fused),
              zero_grad; under bf16 autocast with --bf16 (weights stay float32, as in training).
Like for like: both paths of a cell use the same model, data, dtype and threads and run alternately
(plain first in even rounds, shared first in odd ones), `--repeats` rounds; reported are the median
and min-max wall times and median plain / median shared.

Correctness control: the cell's warm-up round runs both paths at the same weights and compares their
outputs (critic values; the actor's log-probs, loss and gradients, before the optimizer step). The
largest differences go into the results; a cell beyond tolerance is marked DISAGREE and the script
exits with status 1 after writing them. Random weights (the critic's pi_theta a perturbed copy of
pi_ref, so its log-ratio term is not 0): the cost, not the values, is measured.

Writes <out>.json and <out>.md (default bench/results/shared-prefix.*); every number in the .md's
prose comes from the measurement.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stepdapo.logprobs import sequence_logprobs
from stepdapo.losses import dapo_loss
from stepdapo.models import LogRatioCritic, critic_values
from stepdapo.precision import cpu_model, fast_bf16, training_bf16

RESULTS = Path(__file__).parent / "results"
ACTION = 32
ACTOR_BETA, ACTOR_LR, MAX_GRAD_NORM = 0.3, 1e-4, 1.0  # the actor config's defaults
CRITIC_BETA = 1.0  # critic.log_ratio_beta's default
WORKS = {"log-ratio": "critic scoring, log-ratio critic (default)",
         "value-head": "critic scoring, value-head critic",
         "actor": "actor optimizer step"}
# largest |plain - shared| allowed, relative to the largest |plain| of its kind: float noise passes
# (measured: under 1e-5 in float32 at P=512), a dropped or doubled term does not. The loss is
# 0.5 * (A / beta - log-ratio)^2, with relative errors about twice the log-ratio's absolute ones.
TOLERANCE = {"float32": {"values": 1e-4, "logprobs": 1e-5, "loss": 1e-3, "grads": 1e-3},
             "bf16 autocast": {"logprobs": 1e-3, "loss": 1e-1, "grads": 1e-1}}


def config() -> LlamaConfig:
    # a small Llama with SmolLM2's shape ratios: GQA 2:1, SiLU MLP 2.7x wide, tied embeddings
    return LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                       tie_word_embeddings=True, pad_token_id=0, num_labels=1)


def log_ratio_critic() -> LogRatioCritic:
    """A LogRatioCritic as `LogRatioCritic.start` makes one, with pi_theta moved away from pi_ref."""
    reference = LlamaForCausalLM(config())
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.1 * p.std())
    hidden = config().hidden_size
    head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.1 / hidden ** 0.5)
        head.bias.zero_()
    return LogRatioCritic(policy, reference, head, CRITIC_BETA, "(random weights)")


def batch(n_states: int, prefix: int, m: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(1, 8192, (n,), generator=g).tolist()  # noqa: E731 (0 is the pad id)
    states = [rand(prefix if i % 2 == 0 else prefix * 7 // 8) for i in range(n_states)]
    actions = [[rand(ACTION if j % 2 == 0 else ACTION * 3 // 4) for j in range(m)] for _ in states]
    prompts = [s for s, acts in zip(states, actions) for _ in acts]
    completions = [a for acts in actions for a in acts]
    n = len(prompts)
    return {"states": states, "prompts": prompts, "completions": completions,
            "prompt_lens": [max(1, len(p) // 4) for p in prompts],  # the problem's prompt within each state
            "advantages": (torch.rand(n, generator=g) - 0.5) * 0.2, "weights": torch.ones(n)}


class CriticScoring:
    """critic_values of every s + a_j, with prefix_lens (shared) or without (plain)."""

    def __init__(self, critic):
        self.critic = critic

    def prepare(self, data: dict) -> None:
        self.data = data

    def run(self, shared: bool) -> list[float]:
        d = self.data
        log_ratio = isinstance(self.critic, LogRatioCritic)
        return critic_values(self.critic, [p + c for p, c in zip(d["prompts"], d["completions"])], 0,
                             prefix_lens=[len(p) for p in d["prompts"]] if shared else None,
                             prompt_lens=d["prompt_lens"] if log_ratio else None)

    def control(self) -> dict:
        plain, shared = torch.tensor(self.run(False)), torch.tensor(self.run(True))
        return {"values": diff(plain, shared), "value_range": [plain.min().item(), plain.max().item()]}


class ActorStep:
    """One optimizer step of the actor with the shared-prefix log-probs or the plain ones."""

    def __init__(self, policy, bf16: bool):
        self.policy, self.bf16 = policy.train(), bf16
        self.opt = torch.optim.AdamW(policy.parameters(), lr=ACTOR_LR, betas=(0.9, 0.95), weight_decay=0.0,
                                     fused=True)

    def prepare(self, data: dict) -> None:
        self.data = data
        with torch.no_grad(), self.autocast():  # pi_ref's log-probs: fixed, as the actor stage caches them;
            # log-ratios of about 1, so that the loss is not a small difference of large numbers
            self.ref = sequence_logprobs(self.policy, data["prompts"], data["completions"], 0).float() - 1.0

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def loss(self, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.data
        with self.autocast():
            logps = sequence_logprobs(self.policy, d["prompts"], d["completions"], 0, shared_prefix=shared)
            return logps, dapo_loss(logps, self.ref, d["advantages"], ACTOR_BETA, d["weights"])

    def run(self, shared: bool) -> None:
        _, loss = self.loss(shared)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def control(self) -> dict:
        """Both paths' log-probs, loss and gradients at the same weights; then one (untimed) step, so
        the optimizer's state exists before the first timed one."""
        out = {}
        for shared in (False, True):
            logps, loss = self.loss(shared)
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in self.policy.parameters() if p.grad is not None])
            out[shared] = (logps.detach().float(), loss.detach().float().reshape(1), grads)
            if not shared:
                self.opt.zero_grad(set_to_none=True)
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {name: diff(out[False][k], out[True][k]) for k, name in enumerate(("logprobs", "loss", "grads"))}


def diff(plain: torch.Tensor, shared: torch.Tensor) -> dict:
    """max |plain - shared|, and relative to max |plain|."""
    d = (plain - shared).abs().max().item()
    return {"max_abs": d, "rel": d / max(plain.abs().max().item(), 1e-30)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0




def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def seconds(r: dict, which: str) -> str:
    return f"{r[which + '_s']:.3f} ({r[which + '_min_s']:.3f}-{r[which + '_max_s']:.3f})"


def control_text(r: dict) -> str:
    c = r["control"]
    if r["work"] == "actor":
        return (f"logp {c['logprobs']['max_abs']:.1e}, loss {c['loss']['max_abs']:.1e}, "
                f"grad {c['grads']['max_abs']:.1e}")
    return f"value {c['values']['max_abs']:.1e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per cell (each runs plain and shared)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--states", type=int, default=2, help="states per batch")
    ap.add_argument("--prefixes", type=ints, default=[512, 96], help="state lengths P, comma-separated")
    ap.add_argument("--ms", type=ints, default=[2, 4, 8, 16], help="actions per state M, comma-separated")
    ap.add_argument("--works", default=",".join(WORKS), help=f"comma-separated, of {', '.join(WORKS)}")
    ap.add_argument("--bf16", default="false", choices=["false", "true", "auto"],
                    help="the actor step under bf16 autocast (auto: where the CPU computes bf16 natively)")
    ap.add_argument("--out", type=Path, default=RESULTS / "shared-prefix",
                    help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    works = [w for w in args.works.split(",") if w]
    if unknown := set(works) - set(WORKS):
        ap.error(f"unknown --works {sorted(unknown)}")
    if args.repeats < 3:
        print("note: fewer than 3 repeats: a smoke run, not a measurement", file=sys.stderr)
    bf16 = training_bf16({"false": False, "true": True, "auto": "auto"}[args.bf16])
    command = " ".join(([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ
                        else []) + ["python", "bench/bench_shared_prefix.py"] + [shlex.quote(a) for a in sys.argv[1:]])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"log-ratio": lambda: CriticScoring(log_ratio_critic()),
              "value-head": lambda: CriticScoring(LlamaForSequenceClassification(config())),
              "actor": lambda: ActorStep(LlamaForCausalLM(config()), bf16)}
    params = sum(p.numel() for p in LlamaForCausalLM(config()).parameters())
    rows = []
    load_before, t_start = os.getloadavg(), time.perf_counter()
    for work in works:
        bench = models[work]()
        for prefix in args.prefixes:
            for m in args.ms:
                data = batch(args.states, prefix, m, seed=m)
                bench.prepare(data)
                control = bench.control()  # also the cell's warm-up of both paths
                tol = TOLERANCE["bf16 autocast" if bf16 and work == "actor" else "float32"]
                agree = all(v["rel"] <= tol[k] for k, v in control.items() if isinstance(v, dict))
                times = {True: [], False: []}
                for r in range(args.repeats):
                    for shared in ((False, True) if r % 2 == 0 else (True, False)):
                        times[shared].append(timed(lambda: bench.run(shared)))
                plain, shared = statistics.median(times[False]), statistics.median(times[True])
                states, prompts, completions = data["states"], data["prompts"], data["completions"]
                tokens = (sum(map(len, prompts)) + sum(map(len, completions))) / (  # padding excluded
                    sum(map(len, states)) + sum(map(len, completions)))
                row = {"work": work, "prefix": prefix, "action": ACTION, "m": m, "states": args.states,
                       "plain_s": plain, "plain_min_s": min(times[False]), "plain_max_s": max(times[False]),
                       "shared_s": shared, "shared_min_s": min(times[True]), "shared_max_s": max(times[True]),
                       "plain_times_s": times[False], "shared_times_s": times[True],
                       "speedup": plain / shared, "token_ratio": tokens, "control": control, "agree": agree}
                rows.append(row)
                print(f"{work:10s} P={prefix:4d} M={m:2d}  plain {seconds(row, 'plain')}  "
                      f"shared {seconds(row, 'shared')}  x{plain / shared:5.2f}  |plain-shared| {control_text(row)}"
                      f"{'' if agree else '  DISAGREE'}", flush=True)
    total, load_after = time.perf_counter() - t_start, os.getloadavg()
    fast, why = fast_bf16()
    meta = {"model": f"Llama, hidden 256, 4 layers, 8 heads (4 kv), MLP 688, vocab 8192, {params / 1e6:.1f}M params",
            "critic_dtype": "float32", "actor_dtype": "bf16 autocast (float32 weights)" if bf16 else "float32",
            "bf16_setting": args.bf16, "fast_bf16": fast, "fast_bf16_why": why,
            "threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "repeats": args.repeats, "states": args.states, "action_tokens": ACTION,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "loadavg_1m_before": load_before[0], "loadavg_1m_after": load_after[0],
            "command": command, "seconds": total, "tolerance": TOLERANCE}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(meta, rows, works))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')} ({total:.0f} s)")
    if not all(r["agree"] for r in rows):
        print("shared and plain disagree beyond tolerance in: "
              + ", ".join(f"{r['work']} P={r['prefix']} M={r['m']}" for r in rows if not r["agree"]), file=sys.stderr)
        sys.exit(1)


def report(meta: dict, rows: list[dict], works: list[str]) -> str:
    def worst(work: str, key: str) -> float:
        return max((r["control"][key]["max_abs"] for r in rows if r["work"] == work), default=float("nan"))

    lines = [
        "# Shared-prefix forward passes vs plain per-pair rows",
        "",
        f"`{meta['command']}`, {meta['seconds']:.0f} s in all.",
        "",
        f"Each cell: a batch of {meta['states']} states (P and 7/8 P tokens, the first quarter of each its "
        f"prompt) with M actions each ({meta['action_tokens']} and {meta['action_tokens'] * 3 // 4} tokens). "
        "Plain = every s + a_j its own row; shared = each state once, its actions on its cached keys/values.",
        "",
    ]
    described = {
        "log-ratio": "*critic scoring, log-ratio critic* (the default critic): `critic_values` of every s + a_j "
                     "with `prefix_lens` (shared) and without (plain), both language models (pi_theta and pi_ref) "
                     f"and the value head, {meta['critic_dtype']}, no gradients;",
        "value-head": "*critic scoring, value-head critic*: the same call on a sequence-classification critic;",
        "actor": "*actor optimizer step*: `sequence_logprobs(..., shared_prefix=True/False)`, the DAPO loss, "
                 f"backward, gradient clipping, fused AdamW step and zero_grad, {meta['actor_dtype']};",
    }
    lines += [f"- {described[w]}" for w in works]
    lines += [
        "",
        f"Both paths of a cell run alternately (plain first in even rounds, shared first in odd ones), "
        f"{meta['repeats']} rounds after a warm-up round; times are the median (min-max) in seconds, "
        "speedup = median plain / median shared. Random weights: the cost, not the values, is measured.",
        "",
        f"Model: {meta['model']}. Machine: {meta['cpu']}, {meta['cpu_count']} CPU(s), "
        f"{meta['threads']} torch thread(s) (OMP_NUM_THREADS={meta['omp_num_threads']}), 1-minute load average "
        f"{meta['loadavg_1m_before']:.2f} before and {meta['loadavg_1m_after']:.2f} after; fast bf16: "
        f"{'yes' if meta['fast_bf16'] else 'no'} ({meta['fast_bf16_why']}); torch {meta['torch']}, "
        f"transformers {meta['transformers']}, Python {meta['python']}.",
        "",
        "| work | prefix P | M | plain s | shared s | speedup | tokens plain / shared | max abs diff plain - shared |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {WORKS[r['work']]} | {r['prefix']} | {r['m']} | {seconds(r, 'plain')} | {seconds(r, 'shared')} | "
              f"{r['speedup']:.2f}x | {r['token_ratio']:.1f} | {control_text(r)}{'' if r['agree'] else ' DISAGREE'} |"
              for r in rows]
    control = []
    for w in works:
        if w == "actor":
            control.append(f"the actor's summed log-probs {worst(w, 'logprobs'):.1e}, its loss {worst(w, 'loss'):.1e} "
                           f"and its gradients {worst(w, 'grads'):.1e} (before the optimizer step)")
        else:
            lo = min(r["control"]["value_range"][0] for r in rows if r["work"] == w)
            hi = max(r["control"]["value_range"][1] for r in rows if r["work"] == w)
            control.append(f"the {w} critic's values {worst(w, 'values'):.1e} (values from {lo:.3f} to {hi:.3f})")
    bad = [r for r in rows if not r["agree"]]
    lines += [
        "",
        "Correctness control (each cell's warm-up runs both paths at the same weights): the largest "
        "|plain - shared| is " + "; ".join(control) + ". "
        + ("Every cell agrees within its tolerance, relative to the largest |plain| of its kind ("
           + "; ".join(f"{dtype}: " + ", ".join(f"{k} {v:g}" for k, v in tol.items())
                       for dtype, tol in meta["tolerance"].items()
                       if dtype == "float32" or "autocast" in meta["actor_dtype"]) + ")." if not bad else
           f"{len(bad)} cell(s) DISAGREE beyond tolerance: their speedups do not count."),
        "",
        "The tokens column is the ratio of tokens run through the model (padding excluded), about the speedup "
        "to expect; padding makes plain rows costlier, attention over a state's keys stays per action, and the "
        "actor's optimizer step costs the same on both paths.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
