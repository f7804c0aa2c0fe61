"""Ablations of the advantage and actor stages on one finished run's iteration-1 data.

    python bench/bench_ablations.py runs/bench-pipeline-seed0

Same states, labels and critic; only the advantages and the actor change: critic vs Monte-Carlo
advantages, count vs unique weighting of duplicate actions, and beta. Writes
bench/results/ablations.json and ablations.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from stepdapo.config import load_config
from stepdapo.models import load_policy, set_threads
from stepdapo.stages.actor import run_actor
from stepdapo.stages.dpo import train as train_dpo
from stepdapo.stages.advantages import run_advantages
from stepdapo.stages.evaluate import evaluate
from stepdapo.tasks import get_task

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "critic, count (default)": [],
    "critic, unique (paper)": ["advantages.weighting=unique"],
    "Monte-Carlo, count": ["advantages.source=mc"],
    "Monte-Carlo, unique": ["advantages.source=mc", "advantages.weighting=unique"],
    "critic, count, beta 0.1": ["actor.beta=0.1"],
    "critic, count, beta 1.0": ["actor.beta=1.0"],
    "critic, count, beta 3.0": ["actor.beta=3.0"],
}
# the outcome-level DPO baseline on the same stage-1 samples, at a few settings
DPO_VARIANTS = {
    "DPO beta 0.1, lr 1e-4 (default)": [],
    "DPO beta 0.1, lr 3e-5": ["dpo.lr=3e-5"],
    "DPO beta 0.5, lr 3e-5": ["dpo.beta=0.5", "dpo.lr=3e-5"],
}


def _eval(out: Path, model_dir: Path, task, cfg) -> dict:
    ev_path = out / "eval.json"
    if ev_path.is_file():
        return json.loads(ev_path.read_text())["eval"]
    model, tk = load_policy(model_dir)
    with torch.no_grad():
        ev = evaluate(model, tk, task, cfg.eval, seed=cfg.seed)
    ev_path.write_text(json.dumps({"eval": ev}))
    return ev


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    args = ap.parse_args()
    run = Path(args.run_dir)
    it1 = run / "iter-1"
    policy = run / "sft" if (run / "sft").is_dir() else Path(load_config(run / "config.yaml").model)
    base = json.loads((run / "iter-0" / "eval" / "summary.json").read_text())
    rows = []
    for name, overrides in VARIANTS.items():
        cfg = load_config(run / "config.yaml", overrides)
        set_threads(cfg.threads)
        task = get_task(cfg.task)
        out = run / "ablations" / _slug(name)
        tok = AutoTokenizer.from_pretrained(policy)
        adv = run_advantages(cfg, it1 / "critic", it1 / "labels", out / "advantages", task, tokenizer=tok)
        act = run_actor(cfg, policy, out / "advantages", out / "actor")
        ev = _eval(out, out / "actor", task, cfg)
        rows.append({"variant": name, "overrides": overrides, "eval": ev,
                     "advantages": {k: v for k, v in adv.items() if k != "advantage_histogram"},
                     "actor": {k: v for k, v in act.items() if k not in ("log", "scatter", "fingerprint")}})
        print(name, ev["accuracy"], ev.get("sampled_accuracy"))
    dpo_rows = []
    for name, overrides in DPO_VARIANTS.items():
        cfg = load_config(run / "config.yaml", overrides)
        out = run / "ablations" / _slug(name)
        summ = train_dpo(cfg, policy, it1, out / "dpo")  # iteration 1's states
        ev = _eval(out, out / "dpo", get_task(cfg.task), cfg)
        dpo_rows.append({"variant": name, "overrides": overrides, "eval": ev, "pairs": summ["pairs"]})
        print(name, ev["accuracy"], ev.get("sampled_accuracy"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ablations.json").write_text(json.dumps({"run": str(run), "base": base, "rows": rows,
                                                        "dpo": dpo_rows}, indent=2))
    md = ["# Ablations of the advantages and the actor (one iteration)", "",
          f"Data: iteration 1 of `{run}` (same states, labels and critic for every row). Start: greedy "
          f"{100 * base['accuracy']:.1f}%, sampled {100 * base['sampled_accuracy']:.1f}%, n={base['n']}.", "",
          "| variant | states kept | greedy % | 95% CI | sampled % | flaw-case steps % (greedy) | corr(log-ratio, A/beta) |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        ev, a, c = r["eval"], r["advantages"], r["actor"]
        corr = c.get("final_corr_log_ratio_target")
        md.append(f"| {r['variant']} | {a['states_kept']} | {100 * ev['accuracy']:.1f} | "
                  f"[{100 * ev['ci95'][0]:.1f}, {100 * ev['ci95'][1]:.1f}] | {100 * ev['sampled_accuracy']:.1f} | "
                  f"{100 * ev.get('greedy_flaw_step_accuracy', 0):.1f} | {'' if corr is None else f'{corr:.2f}'} |")
    md += ["", "Outcome-level DPO on (correct, incorrect) pairs of the same stage-1 solutions:", "",
           "| variant | pairs | greedy % | 95% CI | sampled % | flaw-case steps % (greedy) |", "|---|---|---|---|---|---|"]
    for r in dpo_rows:
        ev = r["eval"]
        md.append(f"| {r['variant']} | {r['pairs']} | {100 * ev['accuracy']:.1f} | [{100 * ev['ci95'][0]:.1f}, "
                  f"{100 * ev['ci95'][1]:.1f}] | {100 * ev['sampled_accuracy']:.1f} | "
                  f"{100 * ev.get('greedy_flaw_step_accuracy', 0):.1f} |")
    (RESULTS / "ablations.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
