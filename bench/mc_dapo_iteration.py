"""DAPO on Monte-Carlo advantages at any iteration of a finished run, for comparison with the run's
own (critic) actor there: the `mc_dapo` baseline runs at iteration 1 only.

    python bench/mc_dapo_iteration.py runs/smollm2-seed0 --iteration 2

Trains `mc_dapo` from the iteration's pi_ref (the previous iteration's actor, the SFT model for 1) on
that iteration's labels into RUN/bench-methods/mc_dapo-iter{K}, evaluates it as the run evaluates, and
prints the evaluation next to the run's own: greedy pass@1 with its 95% interval, well-formed rate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepdapo.config import load_config
from stepdapo.models import set_threads
from stepdapo.stages.baselines import BASELINES
from stepdapo.stages.evaluate import run_evaluate
from stepdapo.summaries import read_report
from stepdapo.tasks import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--iteration", type=int, default=2)
    args = ap.parse_args()
    run, k = args.run, args.iteration
    cfg = load_config(run / "config.yaml")
    set_threads(cfg.threads)
    policy = run / "sft" if k == 1 else run / f"iter-{k - 1}" / "actor"
    out = run / "bench-methods" / f"mc_dapo-iter{k}"
    BASELINES["mc_dapo"].train(cfg, policy, run / f"iter-{k}", out, progress=True)
    ev = run_evaluate(cfg, out, out.with_name(out.name + "-eval"), get_task(cfg.task), progress=True)
    own = read_report(run / "report.json").iterations[k].eval
    keys = ("accuracy", "ci95", "greedy_well_formed", "greedy_flaw_step_accuracy")
    print(json.dumps({"mc_dapo": {x: ev.get(x) for x in keys},
                      "run's DAPO": {x: getattr(own, x) for x in keys}}, indent=1))


if __name__ == "__main__":
    main()
