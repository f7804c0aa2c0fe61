"""The critic at test time on the built-in task: N solutions per test problem from a run's policy,
then best-of-N by the critic (aggregating its step values by min, last and product),
critic-weighted majority vote, plain majority vote, pass@N and random@1, N = 1, 4, 16, 64, with 95%
bootstrap intervals over problems. Writes bench/results/prm-bestofn.md (and .json).

    python bench/bench_prm_bestofn.py --run runs/plan-default [--problems 1000] [--threads 2]

For each iteration k, the policy is pi_ref of that iteration (iter-1: the SFT model, iter-2: the
first actor) and the critic is the one trained on that policy's states (`iter-k/critic`): the pairing
the critic was trained for. One set of 64 samples per problem (temperature 1); N takes the first N.
A solution's answer line is not scored (never a critic state: stepdapo.prm); "last" is the value
of the prefix before it, the critic's estimate that the solution so far ends correct.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from stepdapo.config import from_dict, load_config  # noqa: E402
from stepdapo.generation import SamplingParams, encode_prompts, policy_generator  # noqa: E402
from stepdapo.metrics import (best_of_n_correct, bootstrap_interval, majority_correct,  # noqa: E402
                              weighted_vote_correct)
from stepdapo.models import load_critic  # noqa: E402
from stepdapo.precision import cpu_model  # noqa: E402
from stepdapo.prm import score_ids  # noqa: E402
from stepdapo.steps import delimiter_token_mask, split_steps  # noqa: E402
from stepdapo.tasks import get_task, verify_all  # noqa: E402

NS = (1, 4, 16, 64)
AGGREGATIONS = {"min": min, "last": lambda v: v[-1], "product": lambda v: float(np.prod(v))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prm-bestofn"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import yaml

    run = Path(a.run)
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text())) if (run / "config.yaml").is_file() else load_config()
    task = get_task(cfg.task)
    problems = task.problems("test")[:a.problems]
    results, t_start = [], time.perf_counter()
    for critic_dir in sorted(run.glob("iter-*/critic")):
        k = int(critic_dir.parent.name.split("-")[1])
        policy = run / "sft" if k == 1 else run / f"iter-{k - 1}" / "actor"
        gen = policy_generator(policy, task.step_delimiter, 512, progress=False)()
        prompts = encode_prompts(gen.tokenizer, [task.prompt(p, gen.tokenizer) for p in problems])
        samples = gen.generate(prompts, max(NS), SamplingParams(temperature=1.0, max_new_tokens=64, seed=a.seed))
        flat = verify_all(task, [p for p in problems for _ in range(max(NS))], [s.text for ss in samples for s in ss])
        critic, tok = load_critic(critic_dir)
        is_delim = delimiter_token_mask(tok, task.step_delimiter)
        encoded = []
        for prompt, ss in zip(prompts, samples):
            for s in ss:  # V(prompt), then every step but the last (the answer line and EOS: terminal)
                encoded.append((prompt, s.token_ids, [0] + split_steps(s.token_ids, is_delim)[:-1]))
        values = score_ids(critic, tok.pad_token_id, encoded, batch_size=256)
        rows = {f"{name}@{n}": [] for n in NS for name in
                ["pass", "random", "majority", "weighted vote (last)"] + [f"best-of-N ({g})" for g in AGGREGATIONS]}
        for i in range(len(problems)):
            vs = values[i * max(NS):(i + 1) * max(NS)]
            vd = flat[i * max(NS):(i + 1) * max(NS)]
            for n in NS:
                ok, ans = [v.correct for v in vd[:n]], [v.answer for v in vd[:n]]
                steps = [v[1:] or v[:1] for v in vs[:n]]  # a one-step solution: the prompt's value
                rows[f"pass@{n}"].append(float(any(ok)))
                rows[f"random@{n}"].append(float(np.mean(ok)))
                rows[f"majority@{n}"].append(float(majority_correct(ans, ok)))
                rows[f"weighted vote (last)@{n}"].append(float(weighted_vote_correct(ans, [s[-1] for s in steps], ok)))
                for g, f in AGGREGATIONS.items():
                    rows[f"best-of-N ({g})@{n}"].append(float(best_of_n_correct([f(s) for s in steps], ok)))
        table = {key: {"mean": float(np.mean(v)), "ci95": list(bootstrap_interval(v))} for key, v in rows.items()}
        results.append({"iteration": k, "policy": str(policy), "critic": str(critic_dir), "table": table})
        print(f"iteration {k}: " + ", ".join(f"{key} {100 * t['mean']:.1f}" for key, t in table.items() if key.endswith("@16")),
              flush=True)

    methods = ["pass", "random", "majority", "weighted vote (last)"] + [f"best-of-N ({g})" for g in AGGREGATIONS]
    md = [f"# The critic at test time on the built-in task: {run}", "",
          f"`python bench/bench_prm_bestofn.py --run {a.run} --problems {a.problems} --threads {a.threads} --seed {a.seed}`"
          f" ({time.perf_counter() - t_start:.0f} s)", "", __doc__.split("\n\n", 2)[2].strip().replace("\n", " "), "",
          "pass@N: any of N correct (an oracle's ceiling); random: the mean over the N (the expected accuracy of one "
          "sample); majority: the most frequent answer; weighted vote: each answer's votes weighted by the critic's "
          "last value; best-of-N: the sample whose step values aggregate highest. The share of problems whose chosen answer is correct, in %, with 95% "
          "bootstrap intervals over problems.", "",
          f"Machine: {cpu_model()}, {a.threads} torch thread(s); torch {torch.__version__}.", ""]
    for r in results:
        md += [f"## Iteration {r['iteration']}: policy `{r['policy']}`, critic `{r['critic']}`", "",
               "| method | " + " | ".join(f"N={n}" for n in NS) + " |", "|---|" + "---:|" * len(NS)]
        for m in methods:
            cells = [r["table"][f"{m}@{n}"] for n in NS]
            md.append(f"| {m} | " + " | ".join(f"{100 * c['mean']:.1f} [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]"
                                              for c in cells) + " |")
        md.append("")
    Path(a.out + ".md").write_text("\n".join(md))
    Path(a.out + ".json").write_text(json.dumps({"run": str(run), "problems": a.problems, "results": results}, indent=2) + "\n")
    print(f"-> {a.out}.md")


if __name__ == "__main__":
    main()
