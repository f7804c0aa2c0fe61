"""kill -9 at points inside a whole `stepdapo run` (2 iterations, a small config), then the same
command again: the resumed run must end with the report of an uninterrupted run.

    python bench/kill_resume.py [--out runs/kill-resume]

Kill points: the middle of iteration 2's labelling, critic training, actor training and
evaluation, and of iteration 1's DPO baseline (each run is killed once, at the first point it
reaches that has not been tried yet, then resumed; then killed again at the next point ...).
Writes bench/results/kill-resume.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["threads=2", "task.arithmetic.n_demos=20000", "states.n_problems=200", "label.rollouts=8",
         "label.shard_size=100", "critic.epochs=3", "actor.epochs=2", "dpo.epochs=1", "eval.limit=300",
         "eval.samples=2", "eval.k=2", "iterations=2"]
# (name, the file whose appearance means the stage is in its middle)
POINTS = [
    ("iter-1 DPO baseline, training", "iter-1/dpo.work/checkpoints"),
    ("iter-2 labels, between shards", "iter-2/labels/shard-00000.parquet"),
    ("iter-2 critic, training", "iter-2/critic.work/checkpoints"),
    ("iter-2 actor, training", "iter-2/actor.work/checkpoints"),
    ("iter-2 evaluation, between shards", "iter-2/eval/shard-00000.parquet"),
]


def start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "a")  # a file, not a pipe: a full pipe would block the run
    return subprocess.Popen([sys.executable, "-m", "stepdapo", "run", "configs/arithmetic.yaml", "--out", str(out),
                             *SMALL], cwd=ROOT, env=env, stdout=log, stderr=log, text=True)


def comparable(report: dict) -> list:
    drop = ("seconds", "tokens_per_s", "greedy_tokens_per_s", "sampled_tokens_per_s", "log", "resumed_from_step",
            "train_seconds", "tokens", "model", "init", "policy", "final_model")

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return round(x, 4) if isinstance(x, float) else x
    return clean(report["iterations"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/kill-resume")
    args = ap.parse_args()
    root = ROOT / args.out
    ref, killed = root / "uninterrupted", root / "killed"
    t0 = time.time()
    assert start(ref).wait() == 0, "the uninterrupted run failed"
    results = []
    for name, marker in POINTS:
        p = start(killed)
        while p.poll() is None and not (killed / marker).exists():
            time.sleep(0.05)
        if p.poll() is not None:
            results.append({"point": name, "killed": False, "why": "the run got past it before it was seen"})
            continue
        p.send_signal(signal.SIGKILL)
        p.wait()
        results.append({"point": name, "killed": True})
    final = start(killed)
    ok = final.wait() == 0
    same = ok and comparable(json.loads((killed / "report.json").read_text())) == comparable(
        json.loads((ref / "report.json").read_text()))
    summary = {"kill_points": results, "resumed_run_finished": ok, "report_equals_uninterrupted": same,
               "seconds": time.time() - t0, "config": SMALL}
    out = ROOT / "bench" / "results"
    (out / "kill-resume.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# kill -9 inside a 2-iteration run, then resume", "",
             f"`python bench/kill_resume.py` ({time.strftime('%Y-%m-%d')}); config `configs/arithmetic.yaml` with "
             f"`{' '.join(SMALL)}`.", "", "| kill point | killed there |", "|---|---|"]
    lines += [f"| {r['point']} | {'yes' if r['killed'] else 'no: ' + r['why']} |" for r in results]
    lines += ["", f"Resumed run finished: {ok}. Its report.json equals the uninterrupted run's (times and paths "
                  f"aside, floats to 4 decimals): **{same}**.", ""]
    (out / "kill-resume.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if not ok:
        print((root / "killed.log").read_text()[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main()
