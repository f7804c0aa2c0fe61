"""`stepdapo plan` against finished runs: predicted counts and wall times next to what each run recorded.

    python bench/plan_vs_measured.py runs/p1 runs/p2 [--pilot 100] [--out bench/results/plan-vs-measured.md]

For each run directory, the plan of its config.yaml, made as a user would make it before the run:
- throughputs from `--probe` on this machine with the run's threads (one process; a run on N
  processes gets N times the probed rates: linear scaling, an assumption, except for the
  forward-only work that rank 0 does alone);
- twice: with the default upper-bound assumptions and reference solution lengths, and with the
  assumptions and solution lengths measured by `--pilot` on
  the run's starting policy (RUN/sft, the bootstrapped model, which exists before iteration 1 but
  after the bootstrap stage; iteration 2's policy does not exist before the run, so its assumptions
  are iteration 1's).
Measured: each stage's summary (summary.json, or the model directory's stepdapo_<stage>.json) and
timings.json (wall seconds per stage). Writes the markdown report (every number in it generated
from the measurements, a summary line per run included) and a JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stepdapo.config import load_config
from stepdapo.plan import COUNTS, Throughput, make_plan, pilot, probe, shapes

ROOT = Path(__file__).resolve().parents[1]


def measured_counts(run: Path, stage: str) -> dict:
    """The counts a finished stage recorded, under the plan's names."""
    def summary(path: str) -> dict:
        p = run / path
        return json.loads(p.read_text()) if p.is_file() else {}

    it, _, name = stage.partition("/")
    if stage == "bootstrap":
        s = summary("sft/stepdapo_bootstrap.json")
        return {"demonstrations": s.get("demonstrations"), "steps": s.get("steps")}
    if name in ("eval", "dpo-eval"):
        return {"problems": summary(f"{stage}/summary.json").get("n")}
    if name == "states":
        s = summary(f"{it}/states/summary.json")
        return {"kept_solutions": s.get("solutions_kept"), "states": s.get("states"), "new_tokens": s.get("tokens_sampled")}
    if name == "label":
        s = summary(f"{it}/labels/summary.json")
        return {"states": s.get("states"), "rollouts": s["states"] * s["rollouts_per_state"] if s else None,
                "new_tokens": s.get("tokens")}
    if name == "critic":
        s = summary(f"{it}/critic/stepdapo_critic.json")
        return {"train_examples": s.get("train_examples"), "steps": s.get("steps")}
    if name == "advantages":
        return {"states_kept": summary(f"{it}/advantages/summary.json").get("states_kept")}
    if name == "actor":
        s = summary(f"{it}/actor/stepdapo_actor.json")
        return {"states": s.get("states"), "actions": s.get("actions"), "steps": s.get("steps")}
    if name == "dpo":
        s = summary(f"{it}/dpo/stepdapo_dpo.json")
        return {"pairs": s.get("pairs"), "steps": s.get("steps")}
    return {}


def fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.2f}"


def ratio(pred, meas) -> str:
    return f"{pred / meas:.2f}" if pred is not None and meas else "-"


def compare(run: Path, n_pilot: int, given: Throughput | None = None) -> tuple[str, dict]:
    # a run from before the shared-prefix options ran every (state, action) row in full
    saved = (run / "config.yaml").read_text()
    plain = [f"{sec}.shared_prefix=false" for sec in ("advantages", "actor", "baseline")
             if "shared_prefix" not in saved]
    cfg = load_config(run / "config.yaml", plain)
    processes = json.loads((run / "iter-1/critic/stepdapo_critic.json").read_text()).get("processes", 1)
    timings = json.loads((run / "timings.json").read_text())
    # the probe, as `stepdapo plan --probe` runs it (tokenizer and shapes as make_plan makes them)
    from stepdapo.models import char_tokenizer, load_tokenizer
    from stepdapo.tasks import get_task

    tok = char_tokenizer() if cfg.model is None else load_tokenizer(cfg.model)
    task = get_task(cfg.task)
    train, _ = shapes(task, tok, task.problems("train")[:cfg.states.n_problems], 8, cfg.states.max_new_tokens)
    load = os.getloadavg()[0]  # the probe shares the CPU with whatever else runs: say how busy it was
    t = given or probe(cfg, train, tok)
    thr = Throughput(t.gen_tok_s * processes, t.train_tok_s * processes, t.forward_tok_s * processes,
                     source=t.source + (f"; x {processes} processes" if processes > 1 else ""))
    # the starting policy: the bootstrapped model (the tiny one, or the config's model fine-tuned)
    policy = run / "sft" if cfg.model is None or cfg.bootstrap.finetune_model else Path(cfg.model)
    assumed, notes, sampled = pilot(cfg, str(policy), n_pilot)
    upper = make_plan(cfg, thr, processes=processes)
    piloted = make_plan(cfg, thr, assumed, processes=processes, sampled=sampled)

    lines = [f"## {run.name}: {processes} process(es), threads={cfg.threads}", "",
             f"Throughputs: {thr.source}: generate {thr.gen_tok_s:,.0f} tok/s, train {thr.train_tok_s:,.0f} "
             f"tok/s, forward {thr.forward_tok_s:,.0f} tok/s (1-minute load average before the probe: "
             f"{load:.2f} on {os.cpu_count()} cores).", "",
             f"Pilot ({n_pilot} problems of {policy}): " + ", ".join(f"{k} {v:.3f}" for k, v in vars(assumed).items()
                                                                if k not in COUNTS) + ".", "",
             "### Counts", "",
             "| stage | quantity | measured | plan, upper bounds | ratio | plan, pilot | ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    rows = []
    for wu, wp in zip(upper["stages"], piloted["stages"]):
        meas = measured_counts(run, wu["stage"])
        for key, m in meas.items():
            pu = wu["new_tokens"] if key == "new_tokens" else wu["counts"].get(key)
            pp = wp["new_tokens"] if key == "new_tokens" else wp["counts"].get(key)
            if m is None or pu is None:
                continue
            lines.append(f"| {wu['stage']} | {key} | {fmt(m)} | {fmt(pu)} | {ratio(pu, m)} | {fmt(pp)} | {ratio(pp, m)} |")
            rows.append({"stage": wu["stage"], "quantity": key, "measured": m, "upper": pu, "pilot": pp})

    lines += ["", "### Wall time (seconds)", "",
              "| stage | measured | plan, upper bounds | ratio | plan, pilot | ratio | pilot within 2x |",
              "|---|---:|---:|---:|---:|---:|:---:|"]
    times = []
    for wu, wp in zip(upper["stages"], piloted["stages"]):
        m = timings.get(wu["stage"])
        if m is None:
            continue
        r = wp["seconds"] / m
        lines.append(f"| {wu['stage']} | {m:.1f} | {wu['seconds']:.1f} | {wu['seconds'] / m:.2f} | {wp['seconds']:.1f} "
                     f"| {r:.2f} | {'yes' if 0.5 <= r <= 2 else '**no**'} |")
        times.append({"stage": wu["stage"], "measured": m, "upper": wu["seconds"], "pilot": wp["seconds"]})
    tm, tu, tp = (sum(x[k] for x in times) for k in ("measured", "upper", "pilot"))
    lines.append(f"| **total** | {tm:.1f} | {tu:.1f} | {tu / tm:.2f} | {tp:.1f} | {tp / tm:.2f} | "
                 f"{'yes' if 0.5 <= tp / tm <= 2 else '**no**'} |")
    outside = [f"{x['stage']} {x['pilot'] / x['measured']:.2f}x" for x in times
               if not 0.5 <= x["pilot"] / x["measured"] <= 2]
    lines += ["", f"Summary (generated): with the pilot the plan's total is {tp / tm:.2f}x the measured "
                  f"{tm:.0f} s, and {len(times) - len(outside)} of {len(times)} stages are within 2x"
                  + (f" (outside: {', '.join(outside)})" if outside else "")
                  + f"; with the upper-bound assumptions the total is {tu / tm:.2f}x (an upper bound by design)."]
    lines += ["", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines), {"run": str(run), "processes": processes, "throughput": vars(thr), "load": load,
                              "pilot": vars(assumed), "counts": rows, "times": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="finished run directories (config.yaml, timings.json)")
    ap.add_argument("--pilot", type=int, default=100, help="training problems of the pilot")
    ap.add_argument("--out", default=str(ROOT / "bench/results/plan-vs-measured.md"))
    ap.add_argument("--tok-s", nargs=3, type=float, metavar=("GEN", "TRAIN", "FORWARD"),
                    help="one process's throughputs instead of probing (e.g. a probe made on an idle machine)")
    args = ap.parse_args(argv)
    given = Throughput(*args.tok_s, source="given (--tok-s)") if args.tok_s else None
    parts, data = [], []
    for run in args.runs:
        text, d = compare(Path(run), args.pilot, given)
        parts.append(text)
        data.append(d)
        print(text, file=sys.stderr)
    out = Path(args.out)
    import platform

    import torch
    import transformers

    from stepdapo.precision import cpu_model, fast_bf16

    machine = (f"Machine: {cpu_model()}, {os.cpu_count()} cores, fast bf16: {fast_bf16()[0]} ({fast_bf16()[1]}); torch "
               f"{torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}.")
    out.write_text("# `stepdapo plan` vs measured runs\n\nMade by `python bench/plan_vs_measured.py "
                   + " ".join(sys.argv[1:] if argv is None else argv) + "`.\n\n" + machine + "\n\n" + "\n".join(parts))
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
