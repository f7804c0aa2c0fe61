"""Where each method's repair of the built-in task's planted flaw falls short, and why (issue 24).

    python bench/flaw_cases.py runs/smol-report-s10-t1 [RUN ...] --out bench/results/flaw-cases-smollm2.md

For finished runs of the built-in arithmetic task whose `bench/bench_methods.py` trainings are in
`RUN/bench-methods/`, three tables per run:

1. test: flaw-case steps right at test, greedy, by the flaw's trigger (running value + operand: the
   demonstrations wrote `+` steps whose sum reaches `flaw_min_sum` one too high), for pi_ref and every
   method's evaluation;
2. training states: iteration 1's labelled flaw-case states by trigger: how many, at how many a right
   step was among the sampled actions, the highest log-ratio a right step can reach (-log pi_ref(a):
   log pi(a) <= 0), and what the gap filter kept with which DAPO targets A/beta
   (mean over right and over wrong actions) from the critic's and the Monte-Carlo advantages;
3. the actor's fit: over all of its actions at the end of training, the mean target A/beta and the
   mean log-ratio it reached, separately for raised (target > 0.3) and lowered (< -0.3) actions.

Reads parquet and JSON only (and the SFT model's tokenizer): no model runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from stepdapo.config import load_config
from stepdapo.runner import read_stage
from stepdapo.stages import evaluate
from stepdapo.stages.advantages import read_advantages
from stepdapo.stages.labels import read_labels
from stepdapo.tasks import get_task
from stepdapo.tasks.arithmetic import _STEP_RE as STEP  # the task's own step line: "a+b=c"


def next_flaw_trigger(task, problem, prefix: str) -> int | None:
    """running value + operand where the step after `prefix` is a flaw case, else None."""
    chain = task.chain_of(problem)
    done = [line for line in prefix.split("\n") if line]
    running = chain.first % task.cfg.modulus
    if done:
        m = STEP.match(done[-1])
        if not m:
            return None
        running = int(m.group(4)) % task.cfg.modulus
    i = len(done)
    if i >= len(chain.ops) or not task.is_flaw_case(chain.ops[i][0], running, chain.ops[i][1]):
        return None
    return running + chain.ops[i][1]


def test_by_trigger(task, problems: dict, eval_dir: Path) -> dict[int, list[int]]:
    """trigger -> [right, all] over the greedy solutions' flaw-case steps (each judged from the line
    before it, as `ArithmeticTask.analyze` judges them)."""
    out: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r in read_stage(eval_dir, "eval", evaluate.SCHEMA).to_pylist():
        chain = task.chain_of(problems[r["problem_id"]])
        lines = r["greedy_text"].split("\n")
        running = chain.first % task.cfg.modulus
        for i, (op, x) in enumerate(chain.ops):
            m = STEP.match(lines[i]) if i < len(lines) else None
            if task.is_flaw_case(op, running, x):
                right = bool(m) and int(m.group(1)) == running and int(m.group(4)) == task.apply(op, running, x)
                out[running + x][0] += right
                out[running + x][1] += 1
            running = int(m.group(4)) % task.cfg.modulus if m else task.apply(op, running, x)
    return out


def one_run(run: Path) -> list[str]:
    cfg = load_config(run / "config.yaml", [])
    task = get_task(cfg.task)
    report = json.loads((run / "report.json").read_text())
    pi_ref = report["iterations"][0]["model"]
    md = [f"## {run.name} (run seed {cfg.seed}, task seed {cfg.task.arithmetic.seed})", ""]

    # 1. test
    test = {p.id: p for p in task.problems("test")}
    evals = {"pi_ref": run / "iter-0" / "eval"}
    evals.update({d.name[:-len("-eval")]: d for d in sorted((run / "bench-methods").glob("*-eval"))})
    counts = {name: test_by_trigger(task, test, d) for name, d in evals.items()}
    triggers = sorted({t for c in counts.values() for t in c})
    md += ["Test, greedy: flaw-case steps right / flaw-case steps, by trigger (running value + operand).", "",
           "| model | " + " | ".join(str(t) for t in triggers) + " | all |", "|---|" + "---|" * (len(triggers) + 1)]
    for name, c in counts.items():
        right, n = sum(v[0] for v in c.values()), sum(v[1] for v in c.values())
        md.append(f"| {name} | " + " | ".join(f"{c[t][0]}/{c[t][1]}" for t in triggers)
                  + f" | {100 * right / max(n, 1):.1f}% |")

    # 2. training states
    train = {p.id: p for p in task.problems("train")}
    tok = AutoTokenizer.from_pretrained(pi_ref)
    beta = cfg.actor.beta
    states = {}  # state_index -> (trigger, problem, prefix)
    stats: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in read_labels(run / "iter-1" / "labels").to_pylist():
        p, prefix = train[r["problem_id"]], tok.decode(r["ids"][r["prompt_len"]:])
        t = next_flaw_trigger(task, p, prefix)
        if t is None:
            continue
        states[r["state_index"]] = (t, p, prefix)
        rights = [task.step_is_correct(p, prefix, a) for a in r["action_text"]]
        stats[t]["states"].append(1)
        stats[t]["right sampled"].append(any(rights))
        stats[t]["share right"].append(sum(rights) / len(rights))
        # log pi(a) <= 0, so a log-ratio can rise at most to -log pi_ref(a): targets above it cannot be met
        stats[t]["ceiling"] += [-lp for lp, ok in zip(r["action_logprob"], rights) if ok]
    for source in ("advantages", "mc-advantages"):
        kept = set()
        for a in read_advantages(run / "iter-1" / source).to_pylist():
            if a["state_index"] not in states:
                continue
            t, p, prefix = states[a["state_index"]]
            kept.add(a["state_index"])
            side = "right" if task.step_is_correct(p, prefix, a["action_text"]) else "wrong"
            stats[t][f"{source} {side}"].append(a["advantage"] / beta)
        for s in kept:
            stats[states[s][0]][f"{source} kept"].append(1)

    def mean(xs):
        return "–" if not xs else f"{statistics.mean(xs):+.2f}"

    md += ["", f"Iteration 1's labelled flaw-case states by trigger; targets A/beta at the run's beta {beta:g}.", "",
           "| trigger | states | a right step sampled at | share of sampled steps right | right steps' ceiling -log pi_ref(a) "
           "| critic: kept, target right / wrong | Monte-Carlo: kept, target right / wrong |", "|---|---|---|---|---|---|---|"]
    for t in sorted(stats):
        s = stats[t]
        md.append(f"| {t} | {len(s['states'])} | {sum(s['right sampled'])} | {statistics.mean(s['share right']):.2f} | "
                  f"{mean(s['ceiling'])} | {len(s['advantages kept'])}, {mean(s['advantages right'])} / {mean(s['advantages wrong'])} | "
                  f"{len(s['mc-advantages kept'])}, {mean(s['mc-advantages right'])} / {mean(s['mc-advantages wrong'])} |")

    # 3. the actor's fit
    fits = []
    for d in sorted((run / "bench-methods").glob("*dapo-*")):
        f = d / "stepdapo_actor.json"
        if d.name.endswith("-eval") or not f.exists():
            continue
        sc = json.loads(f.read_text())["scatter"]
        t, lr = np.array(sc["target"]), np.array(sc["log_ratio"])
        up, down = t > 0.3, t < -0.3
        fits.append(f"| {d.name} | {len(t)} | {t[up].mean():+.2f} / {lr[up].mean():+.2f} | "
                    f"{t[down].mean():+.2f} / {lr[down].mean():+.2f} | {np.corrcoef(t, lr)[0, 1]:.2f} |")
    if fits:
        md += ["", "The actor's fit at the end of training (every trained action): mean target A/beta / mean log-ratio "
               "reached.", "", "| training | actions | raised (target > 0.3) | lowered (target < -0.3) | corr |",
               "|---|---|---|---|---|", *fits]
    return md + [""]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write the tables here (markdown) as well as printing them")
    args = ap.parse_args()
    md = ["# The planted flaw's repair, by trigger, per method", "",
          f"`python bench/flaw_cases.py {' '.join(map(str, args.runs))}" + (f" --out {args.out}`" if args.out else "`"), ""]
    for run in args.runs:
        md += one_run(run)
    text = "\n".join(md)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
