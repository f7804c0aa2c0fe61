"""A config end to end, for several seeds: accuracy per iteration, DPO baseline, critic quality, time per stage.

    python bench/bench_pipeline.py [--seeds 0 1 2] [--config configs/arithmetic.yaml] [key=value ...]
    python bench/bench_pipeline.py --config configs/arithmetic-smollm2.yaml --name smollm2-arithmetic \
        --out-pattern runs/smollm2-seed{seed} --seeds 0 1

Runs `stepdapo run CONFIG --seed S --out OUT` (OUT from --out-pattern; resumable: finished runs are
read back, not redone) and writes bench/results/NAME.json and NAME.md. A run finished before this
call has no wall time of its own here: give it with `--wall S=SECONDS` (e.g. from `time`).
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

RESULTS = Path(__file__).parent / "results"


def pct(x):
    return f"{100 * x:.1f}"


def spct(ev):  # sampled accuracy, absent when eval.samples = 0
    return "" if ev.get("sampled_accuracy") is None else pct(ev["sampled_accuracy"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="configs/arithmetic.yaml")
    ap.add_argument("--out-pattern", default="runs/bench-pipeline-seed{seed}")
    ap.add_argument("--name", default="pipeline", help="results file stem under bench/results/")
    ap.add_argument("--wall", nargs="*", default=[], metavar="SEED=SECONDS",
                    help="wall time of runs finished before this call")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    walls_given = {int(k): float(v) for k, v in (w.split("=") for w in args.wall)}
    runs = []
    for seed in args.seeds:
        out = Path(args.out_pattern.format(seed=seed))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stepdapo.cli", "run", args.config, "--seed", str(seed),
                        "--out", str(out), *args.overrides], check=True)
        report = json.loads((out / "report.json").read_text())
        runs.append({"seed": seed, "out": str(out),
                     "wall_seconds": walls_given.get(seed, time.perf_counter() - t0),
                     "timings": report["timings"],
                     "iterations": [{"iteration": it["iteration"], "eval": it["eval"],
                                     "critic_heldout": {k: v for k, v in it.get("critic", {}).get("heldout", {}).items()
                                                        if k != "calibration"},
                                     "critic_warning": it.get("critic", {}).get("warning"),
                                     "advantages": {k: v for k, v in it.get("advantages", {}).items()
                                                    if k != "advantage_histogram"},
                                     "dpo_eval": it.get("dpo", {}).get("eval")} for it in report["iterations"]]})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": f"{platform.machine()}, 2 threads",
                                                       "config": args.config, "overrides": args.overrides,
                                                       "runs": runs}, indent=2))
    md = [f"# {args.config} end to end", "",
          f"`stepdapo run {args.config}` {' '.join(args.overrides)} on {platform.machine()} (2 cores), "
          f"seeds {args.seeds}. Greedy pass@1 on {runs[0]['iterations'][0]['eval']['n']} test problems "
          "(95% Wilson interval), sampled pass@1 at T=1, and the share of flaw-case steps the greedy solution gets right.",
          "", "| seed | model | greedy % | 95% CI | sampled % | flaw-case steps % | critic BCE (constant) | critic AUC | right>wrong | advantages from |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for it in r["iterations"]:
            ev, q = it["eval"], it["critic_heldout"]
            name = "SFT (start)" if it["iteration"] == 0 else f"DAPO iter {it['iteration']}"
            sr = (q.get("step_ranking") or {}).get("right_above_wrong")
            bce = f"{q['bce']:.3f} ({q['bce_constant']:.3f})" if q.get("bce") is not None else ""
            source = it["advantages"].get("source", "")
            if it.get("critic_warning"):
                source += " (critic check failed)"
            md.append(f"| {r['seed']} | {name} | {pct(ev['accuracy'])} | [{pct(ev['ci95'][0])}, {pct(ev['ci95'][1])}] | "
                      f"{spct(ev)} | {pct(ev.get('greedy_flaw_step_accuracy', 0))} | {bce} | "
                      f"{q.get('auc_mc0_vs_positive', float('nan')):.3f} | {'' if sr is None else f'{sr:.2f}'} | {source} |"
                      if it["iteration"] else
                      f"| {r['seed']} | {name} | {pct(ev['accuracy'])} | [{pct(ev['ci95'][0])}, {pct(ev['ci95'][1])}] | "
                      f"{spct(ev)} | {pct(ev.get('greedy_flaw_step_accuracy', 0))} | | | | |")
            if it["dpo_eval"]:
                d = it["dpo_eval"]
                md.append(f"| {r['seed']} | DPO baseline (iter-1 samples) | {pct(d['accuracy'])} | "
                          f"[{pct(d['ci95'][0])}, {pct(d['ci95'][1])}] | {spct(d)} | "
                          f"{pct(d.get('greedy_flaw_step_accuracy', 0))} | | | | |")
    stages = list(runs[0]["timings"])
    md += ["", "Seconds per stage (as measured by the run that did the work):", "",
           "| stage | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |", "|---|" + "---|" * len(runs)]
    md += [f"| {s} | " + " | ".join(f"{r['timings'].get(s, float('nan')):.0f}" for r in runs) + " |" for s in stages]
    md.append("| **total** | " + " | ".join(f"**{sum(r['timings'].values()):.0f}**" for r in runs) + " |")
    walls = sorted(r["wall_seconds"] for r in runs)
    final = [r["iterations"][-1]["eval"]["accuracy"] for r in runs]
    md += ["", f"Wall time of `stepdapo run` (process start to exit, runs that did all their work): median "
           f"{statistics.median(walls):.0f} s, range {walls[0]:.0f}-{walls[-1]:.0f} s. Final greedy accuracy: "
           f"{sum(a >= 0.95 for a in final)} of {len(runs)} seeds at >= 95% (min {pct(min(final))}%)."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
