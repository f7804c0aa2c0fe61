"""The learned critic's quality on SmolLM2, critic by critic, as its check judges it (issue 24).

    python bench/critic_smollm2.py --name smollm2-critic RUN [RUN ...]

For every critic a run trained (`iter-k/critic`, and `iter-k/critic-more` where the first failed and
was trained one more epoch), reads its summary (`stepdapo_critic.json`) and the run's config, and
writes bench/results/NAME.json and NAME.md: the labels it learned from (training examples, problems
held out), its held-out Brier score against the constant's with the 95% interval of the gain over
held-out problems, raw and after the cross-fitted Platt map, the sibling ranking with its interval,
AUC, ECE, the training states' Brier score (how far it overfits), whether the check passed, and the
stage's seconds; and, for every finished run (its report.json), what each iteration's advantages did:
greedy pass@1 with its 95% interval and the flaw-case steps right, next to the SFT model and to DAPO on
Monte-Carlo advantages of the same samples (the `mc_dapo` baseline) where the run trained it.
Nothing is trained here: run `stepdapo run` first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_pipeline import machine  # noqa: E402

from stepdapo.config import load_config  # noqa: E402
from stepdapo.stages.critic import check_critic, heldout  # noqa: E402
from stepdapo.stages.labels import read_labels  # noqa: E402
from stepdapo.summaries import CriticSummary, read_report  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STAGE_KINDS = ("bootstrap", "states", "label", "critic", "critic-more", "prm-eval", "advantages", "actor", "eval", "mc_dapo")


def ci(lo_hi) -> str:
    return "–" if not lo_hi else f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"


def critic_row(run: Path, stage: Path) -> dict:
    cfg = load_config(run / "config.yaml")
    s = json.loads((stage / "stepdapo_critic.json").read_text())
    problems = set(read_labels(stage.parent / "labels").column("problem_id").to_pylist())
    held = {p for p in problems if heldout(p, cfg.critic.heldout_fraction)}
    problem = check_critic(CriticSummary(**s).judged(), cfg.critic.min_brier_gain, cfg.critic.min_step_ranking)
    h, hc, rank = s["heldout"], s.get("heldout_calibrated") or {}, s["heldout"].get("step_ranking") or {}
    return {"run": str(run), "critic": f"{stage.parent.name}/{stage.name}", "seed": cfg.seed,
            "bf16": str(cfg.bf16),
            "labelled_problems": len(problems), "heldout_problems": len(held), "heldout_fraction": cfg.critic.heldout_fraction,
            "log_ratio_beta": cfg.critic.log_ratio_beta, "train_examples": s["train_examples"],
            "heldout_states": s["heldout_states"], "steps": s["steps"],
            "brier": h["brier"], "brier_constant": h["brier_constant"], "brier_gain": h.get("brier_gain"),
            "brier_gain_ci95": h.get("brier_gain_ci95"), "calibrated_brier_gain": hc.get("brier_gain"),
            "calibrated_brier_gain_ci95": hc.get("brier_gain_ci95"), "ranking": rank.get("right_above_wrong"),
            "ranking_ci95": rank.get("right_above_wrong_ci95"), "ranking_pairs": rank.get("pairs"),
            "auc": h.get("auc_mc0_vs_positive"), "ece": h.get("ece"), "train_brier": s["train_subset"]["brier"],
            "passed": problem is None, "check": problem or "passed", "seconds": s.get("seconds")}


def accuracy(ev) -> str:
    if ev is None:
        return "–"
    flaw, wf = ev.greedy_flaw_step_accuracy, ev.greedy_well_formed
    return (f"{100 * ev.accuracy:.1f} [{100 * ev.ci95[0]:.1f}, {100 * ev.ci95[1]:.1f}] "
            f"({'–' if flaw is None else f'{100 * flaw:.1f}'}; {'–' if wf is None else f'{100 * wf:.1f}'})")


def iteration_rows(run: Path, report) -> list[dict]:
    sft = report.iterations[0].eval
    rows = []
    for it in report.iterations[1:]:
        mc = it.baselines.get("mc_dapo")
        rows.append({"run": str(run), "iteration": it.iteration, "sft": accuracy(sft), "dapo": accuracy(it.eval),
                     "advantages": it.advantages.source if it.advantages else None,
                     "critic_check": None if it.critic is None else (it.critic.warning or "passed"),
                     "mc_dapo": accuracy(mc.eval) if mc else "–",
                     "dapo_greedy": it.eval.accuracy, "mc_dapo_greedy": mc.eval.accuracy if mc and mc.eval else None})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--name", default="smollm2-critic")
    args = ap.parse_args()
    rows = [critic_row(run, stage) for run in args.runs
            for stage in sorted(run.glob("iter-*/critic*")) if (stage / "stepdapo_critic.json").is_file()]
    reports = {run: read_report(run / "report.json") for run in args.runs if (run / "report.json").is_file()}
    iterations = [r for run, report in reports.items() for r in iteration_rows(run, report)]
    m = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": m, "critics": rows, "iterations": iterations},
                                                          indent=2) + "\n")
    md = ["# The learned critic on SmolLM2-135M-Instruct, as its check judges it", "",
          f"`python bench/critic_smollm2.py --name {args.name} {' '.join(map(str, args.runs))}`. Machine: {m['cpu']}, "
          f"{m['cores']} cores, fast bf16: {m['fast_bf16']}; torch {m['torch']}, transformers {m['transformers']}.", "",
          "Brier gain: the constant prediction's held-out Brier score minus the critic's, with its 95% interval over "
          "held-out problems (the check needs its lower end above 0, on the calibrated values); ranking: how often "
          "the critic values the right of two sibling next steps above the wrong one (the check needs its lower end "
          "above 0.5).", "",
          "| run | critic | labelled / held-out problems | train examples | held-out states | Brier (constant) "
          "| Brier gain [95%] | calibrated gain [95%] | ranking [95%] (pairs) | AUC | ECE | train Brier | check | s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['run']} | {r['critic']} | {r['labelled_problems']} / {r['heldout_problems']} | {r['train_examples']} "
                  f"| {r['heldout_states']} | {r['brier']:.3f} ({r['brier_constant']:.3f}) | {r['brier_gain']:.3f} "
                  f"{ci(r['brier_gain_ci95'])} | "
                  + ("–" if r["calibrated_brier_gain"] is None else
                     f"{r['calibrated_brier_gain']:.3f} {ci(r['calibrated_brier_gain_ci95'])}")
                  + f" | {'–' if r['ranking'] is None else format(r['ranking'], '.2f')} {ci(r['ranking_ci95'])} "
                  f"({r['ranking_pairs']}) | {r['auc']:.2f} | {r['ece']:.3f} | {r['train_brier']:.3f} | "
                  f"{'passed' if r['passed'] else 'failed'} | {r['seconds']:.0f} |")
    md += ["", "What the advantages did, per finished run and iteration: greedy pass@1 on the test problems % [95% "
           "Wilson interval] (flaw-case steps right %; well-formed solutions %); DAPO trains on the critic's advantages where its check "
           "passed, on Monte-Carlo ones where it failed; MC-DAPO on Monte-Carlo ones of the same samples always.", "",
           "| run | iteration | SFT | DAPO | advantages from | MC-DAPO (same samples) |", "|---|---|---|---|---|---|"]
    md += [f"| {r['run']} | {r['iteration']} | {r['sft']} | {r['dapo']} | {r['advantages']} | {r['mc_dapo']} |"
           for r in iterations]
    md += ["", "Seconds per stage kind, summed over iterations (as measured by the run that did the work; a run "
           "resumed in another process or from another run's SFT model counts only what it did):", "",
           "| run | precision | " + " | ".join(STAGE_KINDS) + " | all stages |", "|---|---|" + "---|" * len(STAGE_KINDS) + "---|"]
    for run, report in reports.items():
        kinds = {k: sum(v for s, v in report.timings.items() if s.split("/")[-1] == k) for k in STAGE_KINDS}
        prec = ((report.precision or {}).get("bf16") or {}).get("used")
        md.append(f"| {run} | {'bf16' if prec else 'float32'} | " + " | ".join(f"{v:.0f}" for v in kinds.values())
                  + f" | {sum(report.timings.values()):.0f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
