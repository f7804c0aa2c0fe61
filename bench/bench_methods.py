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

The sweep gives every method the same budget: a grid of settings (2 learning rates for the tiny model, 3 for
SmolLM2, x 2 betas, or x 2 epoch counts for RFT, which has no beta), judged by the mean greedy accuracy over the tuning runs,
then one step past each edge of the grid that the method's best grid setting sits at (`beyond_edges`: the
next learning rate or beta on LADDERS, the other value kept), by the same rule for every method, so that
no method is judged by where its grid happened to end; the report then
runs each method's chosen setting on the report runs, seeds the sweep never saw (another task data
seed too). Writes bench/results/methods-sweep.{json,md} and methods.{json,md}.

`--model smollm2` sweeps SmolLM2's grid (learning rates 3e-6 / 1e-5 / 3e-5, around the 2e-5 its config's
actor uses, which 5e-5 overshot there: configs/arithmetic-smollm2.yaml) and writes methods-sweep-smollm2.* and
methods-smollm2.* instead; its report also evaluates 4 samples per problem (sampled pass@1), which the
config's own evaluation skips:

    python bench/bench_methods.py sweep --model smollm2 --runs runs/smol-tune-s7
    python bench/bench_methods.py report --model smollm2 --runs runs/smol-report-s1 runs/smol-report-s2
    python bench/bench_methods.py report --model smollm2 --add --runs runs/smol-report-s3  # one more, later
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


# each axis's values in order: a grid's "next value beyond its edge" is the neighbour on this ladder
LADDERS = {"lr": ("1e-6", "3e-6", "1e-5", "3e-5", "1e-4", "3e-4", "1e-3"),
           "beta": ("0.03", "0.1", "0.3", "1.0", "3.0"), "epochs": ("1", "3", "5")}


def grid_axes(lrs: tuple[str, ...]) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """method -> its two axes (config key, values): the same count (2 per learning rate) for every method."""
    return {
        "dapo": [("actor.lr", lrs), ("actor.beta", ("0.3", "1.0"))],
        "mc_dapo": [("mc_dapo.lr", lrs), ("mc_dapo.beta", ("0.3", "1.0"))],
        "step_dpo": [("step_dpo.lr", lrs), ("step_dpo.beta", ("0.1", "0.3"))],
        "dpo": [("dpo.lr", lrs), ("dpo.beta", ("0.1", "0.3"))],
        "rft": [("rft.lr", lrs), ("rft.epochs", ("1", "3"))],
    }


def grid(axes: list[tuple[str, tuple[str, ...]]]) -> list[list[str]]:
    """The settings (config overrides) of a method's grid: every value of the first axis x every value of the second."""
    (k1, v1), (k2, v2) = axes
    return [[f"{k1}={a}", f"{k2}={b}"] for a in v1 for b in v2]


def beyond_edges(axes: list[tuple[str, tuple[str, ...]]], setting: list[str]) -> list[list[str]]:
    """One step past every edge of the grid that `setting` sits at, the other axis kept at its value: a
    setting at the grid's lowest learning rate gets the next lower one on LADDERS, at its highest beta the
    next higher beta. The same rule for every method, so a method whose best lies just outside its grid is
    not judged by the grid's edge."""
    out = []
    for i, (key, values) in enumerate(axes):
        ladder = LADDERS[key.rsplit(".", 1)[1]]
        v = setting[i].split("=", 1)[1]
        at = ladder.index(v)
        for end, step in ((values[0], -1), (values[-1], +1)):
            if v == end and 0 <= at + step < len(ladder):
                beyond = list(setting)
                beyond[i] = f"{key}={ladder[at + step]}"
                out.append(beyond)
    return out


# model -> (its grids' axes, the suffix of its result files, the report's evaluation overrides)
# SmolLM2's grid reaches down to 3e-6 because at 1e-5 both DPO losses chose the grid's lowest rate and an
# extra run at 3e-6 gained 9-17 points (bench/results/methods-sweep-smollm2.md): a 2-rate grid was unfair to them.
# The report's evaluation overrides: SmolLM2's config evaluates greedy only (`eval.samples: 0`, for its runs'
# time), and the report's table also gives sampled pass@1 (~1 min more per method and run at 4 samples).
MODELS = {"tiny": (grid_axes(("1e-4", "3e-4")), "", []),
          "smollm2": (grid_axes(("3e-6", "1e-5", "3e-5")), "-smollm2", ["eval.samples=4"])}
TITLES = {"sft": "pi_ref (the SFT model every method starts from)", "dapo": "DAPO, critic advantages",
          **{k: b.title for k, b in BASELINES.items()}}


def tag(setting: list[str]) -> str:
    return ",".join(s.split(".", 1)[1] for s in setting)


def eval_dir(out: Path, eval_overrides: list[str]) -> Path:
    """Where a model's evaluation goes: `<model>-eval`, or `<model>-eval-<overrides>` for other eval settings."""
    return out.with_name(out.name + "-eval" + (f"-{tag(eval_overrides)}" if eval_overrides else ""))


def train_and_eval(run: Path, method: str, setting: list[str], eval_overrides: list[str] = ()) -> dict:
    """Train `method` with `setting` from the run's iteration-1 pi_ref on its iteration-1 data, evaluate
    (with the run's eval settings, `eval_overrides` applied)."""
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
    ecfg = load_config(run / "config.yaml", setting + list(eval_overrides))
    ev = run_evaluate(ecfg, out, eval_dir(out, eval_overrides), get_task(cfg.task), progress=False)
    return row(run, cfg, method, setting, ev, summary.get("tokens"), summary.get("seconds", train_s))


def sft_row(run: Path, eval_overrides: list[str] = ()) -> dict:
    """pi_ref itself, untrained: where every method starts (the run's own iteration-0 evaluation, or with
    `eval_overrides` its evaluation with those settings)."""
    cfg = load_config(run / "config.yaml", list(eval_overrides))
    it0 = json.loads((run / "report.json").read_text())["iterations"][0]
    ev = it0["eval"] if not eval_overrides else run_evaluate(
        cfg, it0["model"], eval_dir(run / "bench-methods" / "sft", eval_overrides), get_task(cfg.task), progress=False)
    return row(run, cfg, "sft", [], ev, None, None)


def row(run: Path, cfg, method: str, setting: list[str], ev: dict, tokens, seconds) -> dict:
    return {"run": str(run), "seed": cfg.seed, "task_seed": cfg.task.arithmetic.seed, "method": method,
            "setting": setting, "n_test": ev["n"], "greedy": ev["accuracy"], "greedy_ci95": ev["ci95"],
            "sampled": ev.get("sampled_accuracy"), "sampled_ci95": ev.get("sampled_ci95"),
            "flaw_steps": ev.get("greedy_flaw_step_accuracy"), "other_steps": ev.get("greedy_other_step_accuracy"),
            "well_formed": ev.get("greedy_well_formed"), "tokens": tokens, "train_seconds": seconds}


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def machine_line() -> str:
    from bench_pipeline import machine

    m = machine()
    return (f"Machine: {m['cpu']}, {m['cores']} cores, fast bf16: {m['fast_bf16']}; torch {m['torch']}, "
            f"transformers {m['transformers']}, Python {m['python']}.")


def model_flag(model: str) -> str:
    return "" if model == "tiny" else f" --model {model}"


def of(rows: list[dict], method: str, setting) -> list[dict]:
    return [r for r in rows if r["method"] == method and list(r["setting"]) == list(setting)]


def edges_reached(settings: list[list[str]], chosen: list[str]) -> list[str]:
    """'the lowest lr', 'the highest beta', ...: where the chosen setting sits at the end of the values tried on an axis."""
    out = []
    for i, override in enumerate(chosen):
        key, v = override.split("=", 1)
        tried = sorted({float(st[i].split("=", 1)[1]) for st in settings})
        name = key.rsplit(".", 1)[1]
        out += [f"the lowest {name}"] if float(v) == tried[0] else [f"the highest {name}"] if float(v) == tried[-1] else []
    return out


def choose(rows: list[dict], method: str, settings: list[list[str]]) -> tuple[list[str], float]:
    """The setting with the best mean greedy accuracy over the runs (ties: the first in `settings`), and that mean."""
    means = [statistics.mean(r["greedy"] for r in of(rows, method, st)) for st in settings]
    best = max(range(len(settings)), key=lambda i: (means[i], -i))
    return settings[best], means[best]


def n_test(rows: list[dict]) -> str:
    return "/".join(sorted({str(r["n_test"]) for r in rows}))


def sweep(runs: list[Path], model: str) -> None:
    """Every method's grid on the tuning runs, then one step past each grid edge its best setting sits at
    (`beyond_edges`; skipped when that best is already 100%, which nothing can beat as ties go to the
    first), once; the choice is the best of all these."""
    rows, edges = [], {}

    def train_all(method, settings):
        for setting in settings:
            for run in runs:
                rows.append(train_and_eval(run, method, setting))
                print(f"{method} {tag(setting)} {run.name}: greedy {pct(rows[-1]['greedy'])}", flush=True)

    for method, axes in MODELS[model][0].items():
        train_all(method, grid(axes))
    for method, axes in MODELS[model][0].items():
        best, mean = choose(rows, method, grid(axes))
        edges[method] = [] if mean == 1.0 else beyond_edges(axes, best)
        train_all(method, edges[method])
    path = RESULTS / f"methods-sweep{MODELS[model][1]}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    # extras of an earlier sweep on the same runs stay, unless this sweep now ran them
    extras = [r for r in saved.get("extra", []) if saved["runs"] == [str(x) for x in runs]
              and not of(rows, r["method"], r["setting"])]
    write_sweep(runs, rows, extras, model, edges)


def extra(runs: list[Path], model: str, method: str, setting: list[str]) -> None:
    """One more setting of a method on the tuning runs, OUTSIDE the equal budget: shown under the grid
    (e.g. to see whether the best setting at a grid's edge hides a better one beyond it), never chosen."""
    path = RESULTS / f"methods-sweep{MODELS[model][1]}.json"
    saved = json.loads(path.read_text())
    if [str(r) for r in runs] != saved["runs"]:
        raise SystemExit(f"{path} was swept on {saved['runs']}: an extra setting must run on the same runs")
    extras = [r for r in saved.get("extra", []) if r not in of(saved.get("extra", []), method, setting)]
    for run in runs:
        extras.append(train_and_eval(run, method, setting))
        print(f"{method} {tag(setting)} {run.name}: greedy {pct(extras[-1]['greedy'])}", flush=True)
    write_sweep(runs, saved["rows"], extras, model, saved.get("edges"))


def write_sweep(runs: list[Path], rows: list[dict], extras: list[dict], model: str,
                edges: dict[str, list[list[str]]] | None) -> None:
    """The sweep's tables (every method's grid and the settings past its edges, the chosen one in bold) and
    JSON (rows, edges, chosen, extras). `edges` None: a sweep from before the edge step, its grid alone."""
    grids_, suffix = MODELS[model][:2]
    alone = len(runs) == 1
    chosen = {}
    md = ["# The methods' tuning sweep (issue 24)", "",
          f"`python bench/bench_methods.py sweep{model_flag(model)} --runs {' '.join(map(str, runs))}`", "", machine_line(),
          "", "Each method trained from the same iteration-1 pi_ref on the same samples of each tuning run, with each "
          f"of its {len(grid(next(iter(grids_.values()))))} grid settings"
          + (", then with one step past each edge of the grid that its best grid setting sat at (the next learning "
             "rate, beta or epoch count on the ladder, the other value kept; not when that best was already 100%, "
             "which nothing can beat)" if edges is not None else "")
          + f"; greedy pass@1 % on the run's test problems ({n_test(rows)}), mean over the runs. The "
          "chosen setting (bold) is the best mean of all these; ties go to the first in the table."
          + (" In brackets: the greedy solutions' well-formed rate, flaw-case and ordinary steps right (%), and "
             "seconds of the method's training." if alone else ""), ""]

    def cells(rs):
        return [pct(r["greedy"]) + (f" ({pct(r['well_formed'])}; {pct(r['flaw_steps'])}; {pct(r['other_steps'])}; "
                                    f"{r['train_seconds']:.0f} s)" if alone else "") for r in rs]

    for method, axes in grids_.items():
        md += [f"## {TITLES[method]}", "", "| setting | " + " | ".join(r.name for r in runs) + " | mean |",
               "|---|" + "---|" * (len(runs) + 1)]
        past = (edges or {}).get(method, [])
        settings = grid(axes) + past
        best, best_mean = choose(rows, method, settings)
        chosen[method] = best
        for setting in settings:
            rs = of(rows, method, setting)
            name = f"**{tag(setting)}**" if setting == best else tag(setting)
            md.append(f"| {name}{' (past the grid edge)' if setting in past else ''} | " + " | ".join(cells(rs))
                      + f" | {pct(statistics.mean(r['greedy'] for r in rs))} |")
        for setting in dict.fromkeys(tuple(r["setting"]) for r in extras if r["method"] == method):  # in run order
            rs = of(extras, method, setting)
            md.append(f"| {tag(list(setting))} (extra, not chosen) | " + " | ".join(cells(rs))
                      + f" | {pct(statistics.mean(r['greedy'] for r in rs))} |")
        md.append("")
        if edges is not None and not past and edges_reached(grid(axes), best):
            md += ["Nothing was run past the grid's edges: its best grid setting was already at 100%.", ""]
        if (reached := edges_reached(settings, best)) and best_mean == 1.0:
            md += [f"The chosen setting has {' and '.join(reached)} tried, at 100% on these runs: the tuning runs "
                   "cannot tell it from the settings that tie with it or lie beyond it.", ""]
        elif reached:
            md += [f"The chosen setting has {' and '.join(reached)} tried"
                   + (" (past the grid's edge included)" if past else
                      ", and this sweep predates the step past the grid's edges" if edges is None else "")
                   + ": a better one may lie beyond it.", ""]
    if extras:
        md += ["Rows marked extra ran outside the equal budget (`python bench/bench_methods.py extra ...`): they show "
               "what lies beyond a grid's edge and are never chosen.", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"methods-sweep{suffix}.json").write_text(json.dumps(
        {"runs": [str(r) for r in runs], "rows": rows, "chosen": chosen, "extra": extras,
         **({"edges": edges} if edges is not None else {})}, indent=2))
    (RESULTS / f"methods-sweep{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def report(runs: list[Path], model: str, add: bool) -> None:
    """`add`: keep the rows of the report runs already in the results file (same chosen settings) and add
    these runs' rows, so report seeds can be run in different sessions (run directories are not kept)."""
    suffix, eval_overrides = MODELS[model][1:]
    chosen = json.loads((RESULTS / f"methods-sweep{suffix}.json").read_text())["chosen"]
    old_runs, rows = [], []
    saved_path = RESULTS / f"methods{suffix}.json"
    if add and saved_path.exists():
        saved = json.loads(saved_path.read_text())
        if saved["chosen"] != chosen or saved.get("eval_overrides", []) != eval_overrides:
            raise SystemExit(f"{saved_path} was made with other chosen settings than {RESULTS}/methods-sweep{suffix}.json"
                             f" or other evaluation settings than {eval_overrides}: report on all its runs again")
        old_runs = [r for r in saved["runs"] if r not in {str(x) for x in runs}]
        rows = [r for r in saved["rows"] if r["run"] in old_runs]
        # a results file from before the SFT row existed: add the row where the run is still here
        have = {x["run"] for x in of(rows, "sft", [])}
        rows += [sft_row(Path(r), eval_overrides) for r in old_runs
                 if r not in have and (Path(r) / "report.json").exists()]
    for run in runs:
        rows.append(sft_row(run, eval_overrides))
        for method, setting in chosen.items():
            rows.append(train_and_eval(run, method, setting, eval_overrides))
            print(f"{method} {tag(setting)} {run.name}: greedy {pct(rows[-1]['greedy'])}", flush=True)
    all_runs = [Path(r) for r in old_runs] + list(runs)
    saved_path.write_text(json.dumps({"runs": [str(r) for r in all_runs], "chosen": chosen, "rows": rows,
                                      "eval_overrides": eval_overrides}, indent=2))
    write_report(all_runs, chosen, rows, model, eval_overrides)


def write_report(runs, chosen, rows, model: str, eval_overrides: list[str]) -> None:
    suffix = MODELS[model][1]
    by = {(r["method"], r["run"]): r for r in rows}
    # pi_ref's own row where every run has one (results files made before it existed have none)
    methods = (["sft"] if all(("sft", str(r)) in by for r in runs) else []) + list(chosen)
    by = {(r["method"], r["run"]): r for r in rows}
    md = ["# DAPO against every baseline, equally tuned, on the same samples (issue 24)", "",
          f"`python bench/bench_methods.py report{model_flag(model)} --runs {' '.join(map(str, runs))}`", "", machine_line(), "",
          "Each method trains from the run's iteration-1 pi_ref (the bootstrapped SFT model) on what iteration 1 "
          "sampled (and, for DAPO, MC-DAPO and Step-DPO, the Monte-Carlo rollouts from it), with the setting the "
          f"sweep on the tuning runs chose (bench/results/methods-sweep{suffix}.md); these report runs (other run seeds "
          f"and task data seeds) were used for nothing else. Greedy pass@1 % on each run's {n_test(rows)} test "
          "problems" + (f", evaluated with the run's eval settings and {', '.join(eval_overrides)} (the sweep judged "
                        "greedy accuracy alone, with the run's own settings)" if eval_overrides else "") + ".", "",
          "| method (chosen setting) | " + " | ".join(f"{Path(r).name.replace('bench-pipeline-', '')}" for r in runs)
          + " | min / median / max | mean |", "|---|" + "---|" * (len(runs) + 2)]
    # the sweep may have moved on since this report was made (a later step past the grid's edges)
    now = json.loads((RESULTS / f"methods-sweep{suffix}.json").read_text())["chosen"]
    moved = [m for m in chosen if m in now and now[m] != chosen[m]]
    if moved:
        md[-2:-2] = ["**Not rerun with the sweep's current choices.** The sweep has chosen again since this report was "
                     "made: " + "; ".join(f"{TITLES[m]} {tag(now[m])} (this report: {tag(chosen[m])})" for m in moved)
                     + ". The rows below are of the settings in their names.", ""]
    for m in methods:
        accs = [by[(m, str(r))]["greedy"] for r in runs]
        md.append(f"| {TITLES[m]}{f' ({tag(chosen[m])})' if m in chosen else ''} | " + " | ".join(pct(a) for a in accs)
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
                  f"{'–' if (sec := avg(m, 'train_seconds')) is None else f'{sec:.0f}'} |")
    if "dapo" in methods:
        md += ["", "Runs where DAPO (critic) is at or above each method (greedy):", ""]
        for m in methods:
            if m not in ("dapo", "sft"):
                n = sum(by[("dapo", str(r))]["greedy"] >= by[(m, str(r))]["greedy"] for r in runs)
                md.append(f"- {TITLES[m]}: {n} of {len(runs)}")
    (RESULTS / f"methods{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["sweep", "extra", "report", "rewrite"],
                    help="rewrite: the sweep's and the report's files again from their JSON")
    ap.add_argument("--runs", nargs="+", type=Path, default=[])
    ap.add_argument("--model", choices=list(MODELS), default="tiny", help="whose grid and result files")
    ap.add_argument("--add", action="store_true", help="report: keep the report runs already in the results file")
    ap.add_argument("--method", help="extra: the method")
    ap.add_argument("--setting", nargs="+", default=[], help="extra: its config overrides, e.g. step_dpo.lr=3e-6")
    args = ap.parse_args()
    if args.phase == "sweep":
        sweep(args.runs, args.model)
    elif args.phase == "extra":
        if args.method not in MODELS[args.model][0] or not args.setting:
            ap.error("extra needs --method (one of the grid's methods) and --setting")
        extra(args.runs, args.model, args.method, args.setting)
    elif args.phase == "report":
        report(args.runs, args.model, args.add)
    else:
        suffix = MODELS[args.model][1]
        swept = json.loads((RESULTS / f"methods-sweep{suffix}.json").read_text())
        write_sweep([Path(r) for r in swept["runs"]], swept["rows"], swept.get("extra", []), args.model,
                    swept.get("edges"))
        if (RESULTS / f"methods{suffix}.json").exists():
            saved = json.loads((RESULTS / f"methods{suffix}.json").read_text())
            write_report([Path(r) for r in saved["runs"]], saved["chosen"], saved["rows"], args.model,
                         saved.get("eval_overrides", []))


if __name__ == "__main__":
    main()
