"""report.json, report.md and the plots of a run (see pipeline.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from stepdapo.store import atomic_write_text, write_json
from stepdapo.summaries import EvalSummary, Iteration, RunReport


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def plot_reliability(q: dict, path: Path, title: str) -> None:
    """The critic's reliability diagram (predicted value against the mean Monte-Carlo value, per
    bin, and the states per bin): written by the critic stage beside the saved critic."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in q["calibration"] if b["n"]]
    if not bins:
        return
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(4.5, 5.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax.plot([b["mean_pred"] for b in bins], [b["mean_target"] for b in bins], "o-", label="critic")
    ax.set_ylabel("mean Monte-Carlo value")
    ax.set_title(f"{title}\nECE {q['ece']:.3f} (constant {q['ece_constant']:.3f})", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax2.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["n"] for b in bins], width=0.09)
    ax2.set_xlabel("predicted V(s)")
    ax2.set_ylabel("states")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plots(report: RunReport, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    its = [it for it in report.iterations if it.skipped is None]  # a skipped iteration has no new model
    xs = [it.iteration for it in its]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key, ci_key, label in (("accuracy", "ci95", "greedy pass@1"), ("sampled_accuracy", "sampled_ci95",
                                                                        "sampled pass@1 (T=1)")):
        ys = [getattr(it.eval, key) for it in its]
        if any(y is None for y in ys):
            continue
        # max(0, .): at 100% the Wilson bound can sit a rounding error below the estimate
        lo = [max(0.0, y - getattr(it.eval, ci_key)[0]) for y, it in zip(ys, its)]
        hi = [max(0.0, getattr(it.eval, ci_key)[1] - y) for y, it in zip(ys, its)]
        ax.errorbar(xs, [100 * y for y in ys], yerr=[[100 * v for v in lo], [100 * v for v in hi]],
                    marker="o", capsize=3, label=label)
    trained = [b for it in report.iterations for b in it.baselines.values() if b.eval is not None]
    for i, b in enumerate(trained):  # beside iteration 1, whose samples they trained on
        ev = b.eval
        ax.errorbar([1.08 + 0.08 * i], [100 * ev.accuracy], yerr=[[100 * max(0.0, ev.accuracy - ev.ci95[0])],
                    [100 * max(0.0, ev.ci95[1] - ev.accuracy)]], marker="sD^v<>"[i % 6],
                    color="gray" if i == 0 else f"C{i + 2}", capsize=3, linestyle="none", label=f"{b.title}, greedy")
    ax.set_xticks(xs)
    ax.set_xlabel("DAPO iteration (0 = starting model)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    made.append("accuracy.png")

    for it in its[1:]:
        k = it.iteration
        src = Path(it.critic.dir if it.critic and it.critic.dir else out / f"iter-{k}" / "critic") / "reliability.png"
        if src.is_file():
            shutil.copy(src, out / f"critic-reliability-iter-{k}.png")
            made.append(f"critic-reliability-iter-{k}.png")
        sc = it.actor.scatter if it.actor else None
        if sc and sc["target"]:
            fig, ax = plt.subplots(figsize=(4.5, 4))
            ax.scatter(sc["target"], sc["log_ratio"], s=4, alpha=0.3)
            lim = max(abs(min(sc["target"])), abs(max(sc["target"])))
            ax.plot([-lim, lim], [-lim, lim], "k--", lw=1, label="log-ratio = A/beta (loss minimum)")
            ax.set_xlabel("A(s,a) / beta")
            ax.set_ylabel("log pi(a|s) - log pi_ref(a|s) after training")
            corr = it.actor.final_corr_log_ratio_target
            ax.set_title(f"iteration {k}: corr {corr:.2f}" if corr is not None else f"iteration {k}", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / f"log-ratio-iter-{k}.png", dpi=110)
            plt.close(fig)
            made.append(f"log-ratio-iter-{k}.png")
    return made


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _interval(x, ci, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}" + ("" if not ci else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


def _check_row(it: Iteration) -> str:
    """One iteration's critic check: the intervals it was judged on and what the run did."""
    c = it.critic
    q, rec = c.judged(), c.recovery
    sr = q.get("step_ranking") or {}
    if c.warning is not None:
        outcome = f"failed: {c.warning}"
    elif rec:
        outcome = f"failed first ({rec['first_check']}); passed after {rec['epochs']:g} more epoch(s)"
    else:
        outcome = "passed"
    ranking = _interval(sr.get("right_above_wrong"), sr.get("right_above_wrong_ci95"), 2)
    return (f"| {it.iteration} | {_interval(q.get('brier_gain'), q.get('brier_gain_ci95'), 4)} | "
            f"{_interval(q.get('bce_gain'), q.get('bce_gain_ci95'))} | "
            f"{ranking} ({sr.get('pairs', 0)}) | {outcome} |")


def _bootstrap_line(b: dict) -> str:
    """What the bootstrap SFT reached against its criterion (stages/bootstrap.py)."""
    crit = b.get("criterion")
    if not crit:
        return f"Bootstrapped SFT model: {b.get('steps')} steps."
    met = "met" if crit["met"] else "**NOT met**"
    return (f"Bootstrapped SFT model: {b['rounds']} round(s), {b['steps']} steps, {b['demonstrations']} demonstrations. "
            f"Criterion {met}: ordinary-step accuracy {_pct(crit['other_step_accuracy'])}% (needs >= "
            f"{_pct(crit['min_step_accuracy'])}%), flaw-case steps right {_pct(crit['flaw_step_accuracy'])}% "
            f"(the flaw is visible at <= {_pct(crit['max_flaw_step_accuracy'])}%), greedy accuracy "
            f"{_pct(crit['accuracy'])}% on {crit['n']} held-out problems.")


_DAPO_STAGES = ("critic", "critic-more", "advantages", "actor")  # DAPO's own stages, after the shared sampling


def _methods_table(report: RunReport) -> list[str]:
    """Every method trained on iteration 1's pi_ref and samples, side by side (when there are baselines)."""
    first = next((it for it in report.iterations if it.iteration == 1), None)
    if first is None or not first.baselines or first.eval is None or first.skipped is not None:
        return []
    t = report.timings

    def row(name, ev: EvalSummary, tokens, seconds, data):
        return (f"| {name} | {_pct(ev.accuracy)} {_ci(ev.ci95)} | {_pct(ev.sampled_accuracy)} {_ci(ev.sampled_ci95)} | "
                f"{_pct(ev.greedy_flaw_step_accuracy)} | {_pct(ev.greedy_other_step_accuracy)} | "
                f"{_pct(ev.greedy_well_formed)} | {'–' if tokens is None else f'{tokens:,.0f}'} | "
                f"{'–' if seconds is None else f'{seconds:.0f}'} | {data} |")

    start = report.iterations[0].eval
    dapo_s = sum(t.get(f"iter-1/{s}", 0.0) for s in _DAPO_STAGES) or None
    md = ["", "## Methods on the same samples", "",
          "Every method trains from iteration 1's pi_ref on what it sampled: its solutions (`iter-1/states`) and, "
          "where marked, the Monte-Carlo rollouts from their steps (`iter-1/labels`). Greedy and sampled pass@1 "
          "with 95% intervals; step accuracies and the well-formed rate of the greedy solutions; tokens trained "
          "(unpadded, a shared prefix once, times the epochs; the critic's not counted for DAPO); seconds of the "
          "method's own stages (DAPO: critic, advantages and actor), not of the shared sampling.", "",
          "| method | greedy % [95% CI] | sampled % [95% CI] | flaw-case steps % | ordinary steps % | well formed % "
          "| tokens trained | seconds | trains on |",
          "|---|---|---|---|---|---|---|---|---|",
          row("starting model (pi_ref)", start, None, None, "–"),
          row("DAPO, critic advantages", first.eval, first.actor.tokens if first.actor else None, dapo_s,
              "samples + rollouts")]
    for name, b in first.baselines.items():
        data = b.trains_on or "?"
        if b.skipped is not None:
            md.append(f"| {b.title}: not trained ({b.skipped}) | | | | | | | | {data} |")
        else:
            md.append(row(b.title, b.eval, (b.summary or {}).get("tokens"), t.get(f"iter-1/{name}"), data))
    return md


def write_report(report: RunReport, out: Path) -> None:
    """report.json (the contract: iterations[k].eval.accuracy / .n; `summaries.RunReport`), report.md
    and plots."""
    data = report.model_dump(mode="json", exclude_unset=True)
    for it in data["iterations"]:  # the actor's training log and scatter are in its own summary
        if "actor" in it:
            it["actor"] = {k: v for k, v in it["actor"].items() if k not in ("log", "scatter")}
    write_json(out / "report.json", data)
    plots = _plots(report, out)
    its, config = report.iterations, report.config
    md = ["# stepdapo run report", "",
          f"Task `{config['task']['name']}`, {len(its) - 1} DAPO iteration(s), seed {config['seed']}, "
          f"sampling backend `{config.get('generation', {}).get('backend', 'hf')}`. "
          f"Final model: `{report.final_model}`.", "", "## Test accuracy", "",
          "| model | greedy pass@1 % | 95% CI | sampled pass@1 % (T=1) | 95% CI | flaw-case steps right (greedy) % | n |",
          "|---|---|---|---|---|---|---|"]
    warnings = [f"- **iteration {it.iteration}**: {it.critic.warning}" for it in its
                if it.critic is not None and it.critic.warning]
    if warnings:  # before the tables: a result built on a failed critic must not read as a normal one
        md[4:4] = ["## WARNING: critic check failed", "", *warnings, ""]

    def acc_row(name, ev: EvalSummary):
        return (f"| {name} | {_pct(ev.accuracy)} | {_ci(ev.ci95)} | {_pct(ev.sampled_accuracy)} | "
                f"{_ci(ev.sampled_ci95)} | {_pct(ev.greedy_flaw_step_accuracy)} | {ev.n} |")

    for it in its:
        if it.skipped is not None:
            md.append(f"| DAPO iteration {it.iteration}: not trained ({it.skipped}) | | | | | | |")
        else:
            md.append(acc_row("starting model" if it.iteration == 0 else f"DAPO iteration {it.iteration}", it.eval))
        for b in it.baselines.values():
            if b.skipped is not None:
                md.append(f"| {b.title}: not trained ({b.skipped}) | | | | | | |")
            else:
                md.append(acc_row(f"{b.title} (same samples as iteration 1)", b.eval))
    md += _methods_table(report)
    if report.bootstrap:
        md += ["", "## Starting model", "", _bootstrap_line(report.bootstrap)]
    if report.precision:
        pr = report.precision
        md += ["", "## Precision", "",
               f"Training bf16: {pr['bf16']['used']} (setting {pr['bf16']['setting']}: {pr['bf16']['why']}); "
               f"sampling dtype: {pr['generation_dtype']['used']} (setting {pr['generation_dtype']['setting']}: "
               f"{pr['generation_dtype']['why']})."]
    if len(its) > 1:
        md += ["", "## Critic check", "",
               "A critic is used when the 95% interval (over held-out problems) of its Brier-score gain over the "
               "constant "
               "(of its calibrated values, cross-fitted, with `critic.calibrate`) "
               "prediction lies above `critic.min_brier_gain` and, where single steps can be judged, that of its "
               "right>wrong sibling ranking lies above `critic.min_step_ranking`.", "",
               "| iteration | Brier gain [95% CI] | BCE gain [95% CI] | right>wrong [95% CI] (pairs) | outcome |",
               "|---|---|---|---|---|"]
        for it in its[1:]:
            md.append(_check_row(it))
        md += ["", "## Per iteration", "",
               "| iteration | states | MC=0 / 0<MC<1 / MC=1 | critic BCE (const) | Brier (const) | ECE (const) | AUC | right>wrong step | PRM F1 (ProcessBench) | states kept (gap) | mean abs A | actor corr(log-ratio, A/beta) |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for it in its[1:]:
            lab, q, adv = it.labels, it.critic.heldout, it.advantages
            sr = (q.get("step_ranking") or {}).get("right_above_wrong")
            auc = q.get("auc_mc0_vs_positive")
            corr = it.actor.final_corr_log_ratio_target if it.actor else None
            pb = it.critic.processbench or {}
            md.append(
                f"| {it.iteration} | {lab.states} | {lab.fraction_mc_0:.2f} / {lab.fraction_mc_between:.2f} / "
                f"{lab.fraction_mc_1:.2f} | {_num(q['bce'])} ({_num(q['bce_constant'])}) | {_num(q['brier'])} "
                f"({_num(q['brier_constant'])}) | {_num(q['ece'])} ({_num(q['ece_constant'])}) | "
                f"{_num(auc)} | {_num(sr, 2)} | {_num(pb.get('f1'), 2)} | "
                f"{adv.states_kept} ({adv.fraction_kept:.2f}) | {adv.advantage_abs_mean:.3f} | "
                f"{_num(corr, 2)} |")
    tested = [it for it in its if it.prm_eval is not None]
    if tested:
        md += ["", "## The critic at test time", "",
               "N samples of each test problem from the iteration's pi_ref, and the answer chosen by: any of N correct "
               "(pass), one at random (the mean), the most frequent answer (majority), answers weighted by the critic's "
               "last value (weighted vote), or the sample whose step values aggregate highest (best-of-N by min, last "
               "or product). % of problems right, with 95% bootstrap intervals."]
        for it in tested:
            pe = it.prm_eval
            md += ["", f"Iteration {it.iteration} ({pe.problems} problems):", "",
                   "| method | " + " | ".join(f"N={n}" for n in pe.best_of_n) + " |", "|---|" + "---:|" * len(pe.best_of_n)]
            for m in dict.fromkeys(key.rsplit("@", 1)[0] for key in pe.table):  # the methods, in the table's order
                cells = [pe.table.get(f"{m}@{n}") for n in pe.best_of_n]
                md.append(f"| {m} | " + " | ".join("–" if c is None else f"{_pct(c['mean'])} {_ci(c['ci95'])}"
                                                      for c in cells) + " |")
    md += ["", "## Time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in report.timings.items()]
    md += [f"| **total** | {sum(report.timings.values()):.1f} |", "", "## Plots", ""]
    md += [f"![{p}]({p})" for p in plots]
    md += ["", "Metrics: greedy pass@1 is the paper's metric (Wilson interval); sampled pass@1 averages "
           f"{config['eval']['samples']} samples per problem at temperature "
           f"{config['eval']['temperature']} (bootstrap interval over problems). The critic is measured "
           "on states of held-out problems against the constant prediction (the training mean); AUC separates "
           "MC=0 states from MC>0 ones; 'right>wrong step' is how often it scores a right next step above a wrong "
           "one at the same state; 'PRM F1' is ProcessBench's F1 of the critic finding the earliest wrong step of "
           "solutions with one planted error (or none), the threshold chosen on half of them (`stepdapo prm eval`)."]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
