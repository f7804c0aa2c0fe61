"""A config end to end over a grid of run seeds x task data seeds: the distribution of what a user gets.

    python bench/bench_pipeline.py --seeds 10 11 12 13 --task-seeds 1 2 3          # the report set (12 runs)
    python bench/bench_pipeline.py --config configs/arithmetic-smollm2.yaml --name smollm2-arithmetic \
        --out-pattern runs/smollm2-seed{seed} --seeds 0 1

Runs `stepdapo run CONFIG --seed S [task.arithmetic.seed=T] --out OUT` for every pair (OUT from
--out-pattern, which may use {seed} and {task_seed}; resumable: finished runs are read back, not
redone) and writes bench/results/NAME.json and NAME.md: per run, the SFT model (and the bootstrap
criterion it reached), greedy accuracy per iteration, the DPO baseline, each iteration's critic
check outcome (passed, passed after its second try, or failed and replaced by Monte-Carlo values)
and the wall time; then min / median / max, the share of runs at >= 95%, and seconds per stage. A
run finished before this call has no wall time of its own here: give it with `--wall S:T=SECONDS`.

The defaults of configs/arithmetic.yaml were chosen on run seeds 0-4 with task seed 0 (the tuning
set); the report set's seeds (10-13 x 1-3 above) were used for nothing else.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stepdapo.summaries import Iteration, RunReport, read_report

RESULTS = Path(__file__).parent / "results"
TUNING_NOTE = ("Tuning set and report set: the defaults of configs/arithmetic.yaml (and issue 21's bootstrap "
               "criterion and critic check) were chosen on run seeds 0-4 with task seed 0, the wall-time cut of "
               "2026-12-07 (600 training problems instead of 750, 12 rollouts instead of 16, 1.5 critic epochs "
               "instead of 2, prm-eval on 200 test problems instead of 300) on run seeds 0-1 with task seed 0 "
               "(bench/results/bootstrap-budget.md says why the bootstrap was not cut); the report set, run seeds "
               "10-13 x task seeds 1-3, was used for nothing but this table.")


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def machine() -> dict:
    """What the numbers were measured on: CPU model, its bf16 support, library versions."""
    import torch
    import transformers

    from stepdapo.precision import cpu_model, fast_bf16

    ok, why = fast_bf16()
    return {"cpu": cpu_model(), "cores": len(__import__("os").sched_getaffinity(0)), "fast_bf16": ok, "bf16_why": why,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def critic_outcome(it: Iteration) -> str:
    c = it.critic
    if c is None:
        return ""
    if c.warning:
        return f"failed -> {it.advantages.source if it.advantages else '?'}"
    return "passed after 2nd try" if c.recovery else "passed"


def summarize_run(report: RunReport) -> dict:
    its = report.iterations
    boot = report.bootstrap or {}
    dpo = next((it.baselines["dpo"].eval for it in its if "dpo" in it.baselines and it.baselines["dpo"].eval), None)
    return {
        "sft": its[0].eval.accuracy,
        "sft_other_steps": its[0].eval.greedy_other_step_accuracy,
        "sft_flaw_steps": its[0].eval.greedy_flaw_step_accuracy,
        "bootstrap_rounds": boot.get("rounds"),
        "bootstrap_criterion": boot.get("criterion"),
        "greedy": [it.eval.accuracy for it in its[1:]],
        "sampled": [it.eval.sampled_accuracy for it in its[1:]],
        "flaw_steps": [it.eval.greedy_flaw_step_accuracy for it in its[1:]],
        "other_steps": [it.eval.greedy_other_step_accuracy for it in its[1:]],
        "dpo": None if dpo is None else dpo.accuracy,
        "baselines": {name: b.eval.accuracy for it in its for name, b in it.baselines.items() if b.eval is not None},
        "critic": [critic_outcome(it) for it in its[1:]],
        "critic_heldout": [{k: v for k, v in (it.critic.heldout if it.critic else {}).items() if k != "calibration"}
                           for it in its[1:]],
        "advantages_source": [it.advantages.source if it.advantages else None for it in its[1:]],
        "precision": report.precision,
    }


def spread(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{pct(min(xs))} / {pct(statistics.median(xs))} / {pct(max(xs))}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13], help="run seeds (--seed)")
    ap.add_argument("--task-seeds", type=int, nargs="*", default=[],
                    help="task.arithmetic.seed values, crossed with --seeds (none: the config's)")
    ap.add_argument("--config", default="configs/arithmetic.yaml")
    ap.add_argument("--out-pattern", default="runs/bench-pipeline-seed{seed}-task{task_seed}")
    ap.add_argument("--name", default="pipeline", help="results file stem under bench/results/")
    ap.add_argument("--wall", nargs="*", default=[], metavar="S:T=SECONDS",
                    help="wall time of runs finished before this call")
    ap.add_argument("--rewrite", action="store_true", help="only re-render NAME.md from NAME.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.rewrite:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        return write_markdown(args, saved["runs"], saved["machine"])
    walls_given = {k: float(v) for k, v in (w.split("=") for w in args.wall)}
    pairs = [(s, t) for t in (args.task_seeds or [None]) for s in args.seeds]
    runs = []
    for seed, task_seed in pairs:
        out = Path(args.out_pattern.format(seed=seed, task_seed=task_seed))
        extra = [] if task_seed is None else [f"task.arithmetic.seed={task_seed}"]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stepdapo.cli", "run", args.config, "--seed", str(seed),
                        "--out", str(out), *extra, *args.overrides], check=True)
        report = read_report(out / "report.json")
        runs.append({"seed": seed, "task_seed": task_seed, "out": str(out),
                     "wall_seconds": walls_given.get(f"{seed}:{task_seed}", time.perf_counter() - t0),
                     "timings": report.timings, **summarize_run(report)})
    m = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": m, "config": args.config,
                                                           "overrides": args.overrides, "runs": runs}, indent=2))
    write_markdown(args, runs, m)


def write_markdown(args, runs: list[dict], m: dict) -> None:
    seeds = sorted({r["seed"] for r in runs})
    task_seeds = sorted({r["task_seed"] for r in runs if r["task_seed"] is not None})
    n_it = max(len(r["greedy"]) for r in runs)
    md = [f"# {args.config} end to end: {len(runs)} runs", "",
          f"`python bench/bench_pipeline.py --seeds {' '.join(map(str, seeds))}"
          + (f" --task-seeds {' '.join(map(str, task_seeds))}" if task_seeds else "")
          + (f" {' '.join(args.overrides)}" if args.overrides else "") + "`", "",
          f"Machine: {m['cpu']}, {m['cores']} cores, fast bf16: {m['fast_bf16']} ({m['bf16_why']}); torch "
          f"{m['torch']}, transformers {m['transformers']}, Python {m['python']}.", "",
          TUNING_NOTE, "",
          "Greedy pass@1 on the task's test problems. SFT: the bootstrapped starting model (its ordinary-step "
          "accuracy and the rounds it took to meet the bootstrap criterion). Critic: the outcome of each "
          "iteration's critic check (stages/critic.py `check_critic`).", "",
          "| run seed | task seed | SFT % (ordinary steps %, rounds) | "
          + " | ".join(f"DAPO iter {k + 1} %" for k in range(n_it))
          + " | DPO baseline % | critic check per iteration | wall s |",
          "|---|---|---|" + "---|" * n_it + "---|---|---|"]
    for r in runs:
        md.append(f"| {r['seed']} | {'' if r['task_seed'] is None else r['task_seed']} | {pct(r['sft'])} "
                  f"({pct(r['sft_other_steps'])}, {r['bootstrap_rounds'] or '–'}) | "
                  + " | ".join(pct(g) for g in r["greedy"]) + f" | {pct(r['dpo'])} | {'; '.join(r['critic'])} | "
                  f"{r['wall_seconds']:.0f} |")
    md += ["", "| | min / median / max % | runs >= 95% |", "|---|---|---|",
           f"| SFT | {spread(r['sft'] for r in runs)} | |"]
    for k in range(n_it):
        acc = [r["greedy"][k] for r in runs if len(r["greedy"]) > k]
        md.append(f"| DAPO iteration {k + 1} | {spread(acc)} | {sum(a >= 0.95 for a in acc)} of {len(acc)} |")
    dpo = [r["dpo"] for r in runs if r["dpo"] is not None]
    if dpo:
        md.append(f"| DPO baseline | {spread(dpo)} | {sum(a >= 0.95 for a in dpo)} of {len(dpo)} |")
        above = sum(r["greedy"][-1] > r["dpo"] for r in runs if r["dpo"] is not None)
        md += ["", f"DAPO (last iteration) above the DPO baseline in {above} of {len(dpo)} runs."]
    outcomes = [o for r in runs for o in r["critic"]]
    md += ["", "Critic checks: " + ", ".join(f"{o}: {outcomes.count(o)}" for o in sorted(set(outcomes)))
           + f" (of {len(outcomes)})."]
    stages = list(dict.fromkeys(s for r in runs for s in r["timings"]))
    md += ["", "Seconds per stage (as measured by the run that did the work), over the runs:", "",
           "| stage | min | median | max |", "|---|---|---|---|"]
    for s in stages:
        v = [r["timings"][s] for r in runs if s in r["timings"]]
        md.append(f"| {s} | {min(v):.0f} | {statistics.median(v):.0f} | {max(v):.0f} |")
    walls = sorted(r["wall_seconds"] for r in runs)
    md += ["", f"Wall time of `stepdapo run` (process start to exit): median {statistics.median(walls):.0f} s, "
           f"range {walls[0]:.0f}-{walls[-1]:.0f} s, on the machine above."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
