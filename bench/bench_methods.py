"""DAPO against every baseline on the same pi_ref and samples, each method equally tuned (issue 24).

    # 1. the sweep, on runs of the TUNING seeds (finished `stepdapo run` directories):
    python bench/bench_methods.py sweep --runs runs/tune-seed0 runs/tune-seed1
    # 2. the chosen setting of each method on runs of the REPORT seeds (e.g. bench_pipeline.py's):
    python bench/bench_methods.py report --runs runs/bench-pipeline-seed1{0,1,2,3}-task{1,2,3}

Every method trains from the run's iteration-1 pi_ref on what iteration 1 sampled and labelled
(`iter-1/states`, `iter-1/labels`), through the stage functions a run uses (DAPO's actor on the run's
critic advantages; the baselines of `stepdapo.stages.baselines.BASELINES`), into
`RUN/bench-methods/<method>-<setting>/`, and is evaluated as the run evaluates (`eval` section:
greedy pass@1 on the test problems, sampled pass@1). Resumable: a finished training or evaluation
is read back.

The sweep gives every method the same budget: a grid of 4 settings (learning rate x beta, or x epochs
for RFT, which has no beta), judged by the mean greedy accuracy over the tuning runs; the report then
runs each method's chosen setting on the report runs, seeds the sweep never saw (another task data
seed too). Writes bench/results/methods-sweep.{json,md} and methods.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from stepdapo.config import load_config
from stepdapo.stages.actor import run_actor
from stepdapo.stages.baselines import BASELINES
from stepdapo.stages.evaluate import run_evaluate
from stepdapo.tasks import get_task

RESULTS = Path(__file__).parent / "results"
LRS = ("1e-4", "3e-4")
GRIDS = {  # method -> its settings (config overrides); the same count (4) for every method
    "dapo": [[f"actor.lr={lr}", f"actor.beta={b}"] for lr in LRS for b in ("0.3", "1.0")],
    "mc_dapo": [[f"mc_dapo.lr={lr}", f"mc_dapo.beta={b}"] for lr in LRS for b in ("0.3", "1.0")],
    "step_dpo": [[f"step_dpo.lr={lr}", f"step_dpo.beta={b}"] for lr in LRS for b in ("0.1", "0.3")],
    "dpo": [[f"dpo.lr={lr}", f"dpo.beta={b}"] for lr in LRS for b in ("0.1", "0.3")],
    "rft": [[f"rft.lr={lr}", f"rft.epochs={e}"] for lr in LRS for e in ("1", "3")],
}
TITLES = {"dapo": "DAPO, critic advantages", **{k: b.title for k, b in BASELINES.items()}}


def tag(setting: list[str]) -> str:
    return ",".join(s.split(".", 1)[1] for s in setting)


def train_and_eval(run: Path, method: str, setting: list[str]) -> dict:
    """Train `method` with `setting` from the run's iteration-1 pi_ref on its iteration-1 data, evaluate."""
    cfg = load_config(run / "config.yaml", setting)
    report = json.loads((run / "report.json").read_text())
    policy = Path(report["iterations"][0]["model"])
    it1, out = run / "iter-1", run / "bench-methods" / f"{method}-{tag(setting)}"
    t0 = time.perf_counter()
    if method == "dapo":  # the run's own critic advantages, the actor retrained with the setting
        summary = run_actor(cfg, policy, it1 / "advantages", out, progress=False)
    else:
        summary = BASELINES[method].train(cfg, policy, it1, out, progress=False)
    train_s = time.perf_counter() - t0
    ev = run_evaluate(cfg, out, out.with_name(out.name + "-eval"), get_task(cfg.task), progress=False)
    return {"run": str(run), "seed": cfg.seed, "task_seed": cfg.task.arithmetic.seed, "method": method,
            "setting": setting, "greedy": ev["accuracy"], "greedy_ci95": ev["ci95"],
            "sampled": ev.get("sampled_accuracy"), "sampled_ci95": ev.get("sampled_ci95"),
            "flaw_steps": ev.get("greedy_flaw_step_accuracy"), "other_steps": ev.get("greedy_other_step_accuracy"),
            "well_formed": ev.get("greedy_well_formed"), "tokens": summary.get("tokens"),
            "train_seconds": summary.get("seconds", train_s)}


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def machine_line() -> str:
    from bench_pipeline import machine

    m = machine()
    return (f"Machine: {m['cpu']}, {m['cores']} cores, fast bf16: {m['fast_bf16']}; torch {m['torch']}, "
            f"transformers {m['transformers']}, Python {m['python']}.")


def sweep(runs: list[Path]) -> None:
    rows = []
    for method, grid in GRIDS.items():
        for setting in grid:
            for run in runs:
                rows.append(train_and_eval(run, method, setting))
                print(f"{method} {tag(setting)} {run.name}: greedy {pct(rows[-1]['greedy'])}", flush=True)
    chosen = {}
    md = ["# The methods' tuning sweep (issue 24)", "",
          f"`python bench/bench_methods.py sweep --runs {' '.join(map(str, runs))}`", "", machine_line(), "",
          "Each method trained from the same iteration-1 pi_ref on the same samples of each tuning run, with each "
          "of its 4 settings; greedy pass@1 % on the run's test problems (1000), mean over the runs. The chosen "
          "setting (bold) is the best mean; ties go to the first in the grid.", ""]
    for method, grid in GRIDS.items():
        md += [f"## {TITLES[method]}", "", "| setting | " + " | ".join(r.name for r in runs) + " | mean |",
               "|---|" + "---|" * (len(runs) + 1)]
        means = []
        for setting in grid:
            accs = [r["greedy"] for r in rows if r["method"] == method and r["setting"] == setting]
            means.append(statistics.mean(accs))
            md.append(f"| {tag(setting)} | " + " | ".join(pct(a) for a in accs) + f" | {pct(means[-1])} |")
        best = max(range(len(grid)), key=lambda i: (means[i], -i))
        chosen[method] = grid[best]
        md[-len(grid) + best] = md[-len(grid) + best].replace(f"| {tag(grid[best])} |", f"| **{tag(grid[best])}** |", 1)
        md.append("")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "methods-sweep.json").write_text(json.dumps({"runs": [str(r) for r in runs], "rows": rows,
                                                            "chosen": chosen}, indent=2))
    (RESULTS / "methods-sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def report(runs: list[Path]) -> None:
    chosen = json.loads((RESULTS / "methods-sweep.json").read_text())["chosen"]
    rows = []
    for run in runs:
        for method, setting in chosen.items():
            rows.append(train_and_eval(run, method, setting))
            print(f"{method} {tag(setting)} {run.name}: greedy {pct(rows[-1]['greedy'])}", flush=True)
    (RESULTS / "methods.json").write_text(json.dumps({"runs": [str(r) for r in runs], "chosen": chosen,
                                                      "rows": rows}, indent=2))
    write_report(runs, chosen, rows)


def write_report(runs, chosen, rows) -> None:
    methods = list(chosen)
    by = {(r["method"], r["run"]): r for r in rows}
    md = ["# DAPO against every baseline, equally tuned, on the same samples (issue 24)", "",
          f"`python bench/bench_methods.py report --runs {' '.join(map(str, runs))}`", "", machine_line(), "",
          "Each method trains from the run's iteration-1 pi_ref (the bootstrapped SFT model) on what iteration 1 "
          "sampled (and, for DAPO, MC-DAPO and Step-DPO, the Monte-Carlo rollouts from it), with the setting the "
          "sweep on the tuning runs chose (bench/results/methods-sweep.md); these report runs (other run seeds and "
          "task data seeds) were used for nothing else. Greedy pass@1 % on each run's 1000 test problems.", "",
          "| method (chosen setting) | " + " | ".join(f"{Path(r).name.replace('bench-pipeline-', '')}" for r in runs)
          + " | min / median / max | mean |", "|---|" + "---|" * (len(runs) + 2)]
    for m in methods:
        accs = [by[(m, str(r))]["greedy"] for r in runs]
        md.append(f"| {TITLES[m]} ({tag(chosen[m])}) | " + " | ".join(pct(a) for a in accs)
                  + f" | {pct(min(accs))} / {pct(statistics.median(accs))} / {pct(max(accs))} "
                  f"| {pct(statistics.mean(accs))} |")
    md += ["", "Means over the runs of each column (greedy and sampled pass@1 with the mean of the runs' 95% interval "
           "bounds; step accuracies and well-formed rate of the greedy solutions; tokens trained, unpadded, shared "
           "prefixes once, times the epochs, the critic's not counted for DAPO; seconds of the method's own training, "
           "not of the shared sampling and labelling):", "",
           "| method | greedy % [95% CI] | sampled % [95% CI] | flaw-case steps % | ordinary steps % | well formed % "
           "| tokens trained | train s |", "|---|---|---|---|---|---|---|---|"]

    def avg(m, key):
        vals = [by[(m, str(r))][key] for r in runs]
        return None if any(v is None for v in vals) else statistics.mean(vals)

    def ci(m, key):
        vals = [by[(m, str(r))][key] for r in runs]
        if any(v is None for v in vals):
            return ""
        return f" [{pct(statistics.mean(v[0] for v in vals))}, {pct(statistics.mean(v[1] for v in vals))}]"

    for m in methods:
        tok = avg(m, "tokens")
        md.append(f"| {TITLES[m]} | {pct(avg(m, 'greedy'))}{ci(m, 'greedy_ci95')} | {pct(avg(m, 'sampled'))}"
                  f"{ci(m, 'sampled_ci95')} | {pct(avg(m, 'flaw_steps'))} | {pct(avg(m, 'other_steps'))} | "
                  f"{pct(avg(m, 'well_formed'))} | {'–' if tok is None else f'{tok:,.0f}'} | "
                  f"{avg(m, 'train_seconds'):.0f} |")
    if "dapo" in methods:
        md += ["", "Runs where DAPO (critic) is at or above each method (greedy):", ""]
        for m in methods:
            if m != "dapo":
                n = sum(by[("dapo", str(r))]["greedy"] >= by[(m, str(r))]["greedy"] for r in runs)
                md.append(f"- {TITLES[m]}: {n} of {len(runs)}")
    (RESULTS / "methods.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["sweep", "report", "rewrite"])
    ap.add_argument("--runs", nargs="+", type=Path, default=[])
    args = ap.parse_args()
    if args.phase == "sweep":
        sweep(args.runs)
    elif args.phase == "report":
        report(args.runs)
    else:
        saved = json.loads((RESULTS / "methods.json").read_text())
        write_report([Path(r) for r in saved["runs"]], saved["chosen"], saved["rows"])


if __name__ == "__main__":
    main()
