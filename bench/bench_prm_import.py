"""A critic trained from our labels exported to Math-Shepherd's format and imported back, against one
trained from our own labels (issue 25 item 3's acceptance).

    python bench/bench_prm_import.py --run runs/plan-default [--iteration 1] [--seeds 0 1 2] [--threads 2]

From the run's iteration-k labels: `stepdapo prm export --format math-shepherd` (a .jsonl file), then
`stepdapo prm import` of that file twice, with the soft values the export writes beside the tags
(`values`) and with the +/- tags alone (hard labels, all a plain Math-Shepherd file has). Critics,
each from the policy the run's critic started from, with the run's config and seed S:

- ours as-is: the labels directory (states, plus action-extended states and rollouts' later prefixes);
- ours restricted to what the format carries: the labelled states after a first step, no rollouts;
- imported, soft: the Math-Shepherd file with its `values`;
- imported, hard: the Math-Shepherd file's +/- tags.

The restricted and soft imported ones have the same training examples (checked here); only their
order differs, so they differ by training noise. Every critic is judged the same way, on the run's
held-out problems (`critic.heldout_fraction`, by problem id): BCE, Brier score and AUC (MC = 0
against MC > 0) against the Monte-Carlo values of all held-out states and of those after a first
step, how often it ranks a right next step above a wrong one (sibling pairs), and ProcessBench's F1
on 500 of the task's exactly labelled solutions (the critic stage's check). Writes
bench/results/prm-import.md and .json; work files go to --work (kept: a rerun reuses the critics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_pipeline import machine  # noqa: E402

from stepdapo import prm_data  # noqa: E402
from stepdapo.config import load_config  # noqa: E402
from stepdapo.metrics import quality  # noqa: E402
from stepdapo.models import critic_values, load_critic, load_tokenizer, set_threads  # noqa: E402
from stepdapo.stages import critic as critic_stage  # noqa: E402
from stepdapo.stages.labels import read_labels  # noqa: E402
from stepdapo.steps import delimiter_token_mask  # noqa: E402
from stepdapo.tasks import get_task  # noqa: E402

RESULTS = ROOT / "bench" / "results"
VARIANTS = {
    "ours": "ours as-is",
    "restricted": "ours, restricted to what the format carries",
    "imported-soft": "imported Math-Shepherd, soft (`values`)",
    "imported-hard": "imported Math-Shepherd, hard (+/- tags)",
}


def run_config(run: Path, work: Path, seed: int | None = None):
    """The run's config, with only the sections this bench uses (task, critic, seed, ...): a config
    saved by an older stepdapo may hold sections that have since been renamed."""
    import yaml

    from stepdapo.config import RunConfig

    saved = yaml.safe_load((run / "config.yaml").read_text())
    keep = {k: v for k, v in saved.items() if k in ("seed", "threads", "bf16", "report_to", "task", "label", "critic")
            and k in RunConfig.model_fields}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(keep, sort_keys=False))
    return load_config(path, [f"seed={seed}"] if seed is not None else [])


def restricted_labels(labels, out: Path) -> None:
    """Our labels as a Math-Shepherd file carries them: the states after a first step, no rollouts."""
    rows = {k: v for k, v in labels.to_pydict().items()}
    keep = [i for i, d in enumerate(rows["depth"]) if d > 0]
    cols = {k: [v[i] for i in keep] for k, v in rows.items()}
    for k in ("action_ids", "action_logprob", "action_terminal", "action_text", "outcome", "rollout_ids"):
        cols[k] = [[] for _ in keep]
    cols["n_correct"] = [0] * len(keep)
    cols["state_index"] = list(range(len(keep)))
    prm_data.write_labels_dir(out, cols, {"restricted": "depth > 0, no rollouts"}, {"states": len(keep)})


def judge(critic_dir: Path, ours, cfg, task, tok, held, train_states) -> dict:
    """The critic on our held-out states (all, and those after a first step), its sibling ranking
    and ProcessBench's F1: the same protocol for every critic."""
    model = load_critic(critic_dir)[0]
    baseline = statistics.fmean(e.target for e in train_states)
    plen = critic_stage.prompt_lengths(ours)
    pred = critic_values(model, [list(e.input_ids) for e in held], tok.pad_token_id,
                         prompt_lens=[plen[e.problem_id] for e in held])
    out = {}
    for name, idx in (("all", range(len(held))),
                      ("after_first_step", [i for i, e in enumerate(held) if len(e.input_ids) > plen[e.problem_id]])):
        q = quality([pred[i] for i in idx], [held[i].target for i in idx], baseline,
                    groups=[held[i].problem_id for i in idx])
        out[name] = {k: q[k] for k in ("n", "bce", "bce_constant", "brier", "brier_constant", "brier_gain_ci95",
                                       "ece", "auc_mc0_vs_positive")}
    problems = {p.id: p for p in task.problems("train")}
    out["step_ranking"] = critic_stage.step_ranking(model, tok, ours, task, problems, {e.problem_id for e in held})
    out["processbench"] = critic_stage.processbench_quality(model, tok, task)
    return out


def example_differences(a_dir: Path, b_dir: Path, cfg, is_delim) -> dict:
    """How many of the critic's (train, held-out) examples, as (token ids, target), one side has and
    the other not."""
    ex = [critic_stage.critic_examples(read_labels(d), cfg.critic, is_delim, cfg.seed) for d in (a_dir, b_dir)]
    out = {}
    for name, x, y in zip(("train", "heldout"), ex[0], ex[1]):
        x, y = {(e.input_ids, e.target) for e in x}, {(e.input_ids, e.target) for e in y}
        out[name] = {"both": len(x & y), "only_first": len(x - y), "only_second": len(y - x)}
    return out


METRICS = [("Brier", ("all", "brier"), 4), ("Brier after step 1", ("after_first_step", "brier"), 4),
           ("AUC", ("all", "auc_mc0_vs_positive"), 3), ("sibling ranking", ("step_ranking", "right_above_wrong"), 3),
           ("PRM F1", ("processbench", "f1"), 3)]


def _get(r: dict, path) -> float | None:
    for p in path:
        r = None if r is None else r.get(p)
    return r


def reading(results: dict, seeds: list[int], run_seed: int) -> list[str]:
    """Each variant against ours restricted to the same states: the mean paired difference over
    seeds next to the restricted critics' seed-to-seed standard deviation."""
    def values(name, path):
        return [_get(results[f"{name}/{s}"], path) for s in seeds]

    out = []
    n = len(seeds)
    for name, what in (("imported-soft", "The soft import against ours restricted to the same states (the acceptance "
                                         "comparison: the same examples, in another order)"),
                       ("imported-hard", "The hard import (a plain Math-Shepherd file: +/- only) against ours "
                                         "restricted (Monte-Carlo values). A hard target is 1 wherever some rollout "
                                         "ended correct: such a critic estimates P(MC > 0), not MC, so its Brier score "
                                         "against the Monte-Carlo values is expected to be worse; the rankings (AUC, "
                                         "siblings, F1) need not be"),
                       ("ours", "Ours as-is against ours restricted. As-is trains on about twice the examples: "
                                "the prompt states, the action-extended states and the rollouts' later prefixes, "
                                "which hold many of the wrong steps ProcessBench's rows are made of; a positive "
                                "Brier difference means the restricted critic fits the labelled states themselves "
                                "better")):
        parts, within = [], True
        for label, path, digits in METRICS:
            a, b = values(name, path), values("restricted", path)
            if None in a or None in b:
                continue
            diff = statistics.fmean(x - y for x, y in zip(a, b))
            sd = ((statistics.variance(a) + statistics.variance(b)) / 2) ** 0.5 if n > 1 else float("nan")
            noise = 2 * sd * (2 / n) ** 0.5 if n > 1 else float("nan")
            within &= abs(diff) <= noise
            parts.append(f"{label} {diff:+.{digits}f} (noise {noise:.{digits}f})")
        verdict = ("every difference is within noise" if within else "not every difference is within noise") \
            if n > 1 else "one seed: no noise estimate"
        out.append(f"- {what}: mean difference {'; '.join(parts)}: {verdict}.")
    out.append(f"- Noise: twice the standard error of the difference of two means of {n} seeds (the seed-to-seed "
               f"standard deviation pooled within the two variants). A rough yardstick with {n} seeds.")
    if f"ours/{run_seed}" in results:
        same = _get(results[f"ours/{run_seed}"], ("all", "brier")) == _get(results["reference"], ("all", "brier"))
        out.append(f"- Ours as-is with the run's seed ({run_seed}) "
                   + ("gives exactly the run's own critic's held-out Brier score: the critic stage is reproducible "
                      "here." if same else "differs from the run's own critic (another machine, thread count or "
                      "library version)."))
    return out


def fmt(values: list, digits: int = 4) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/plan-default")
    ap.add_argument("--iteration", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/stepdapo-bench-prm-import")
    ap.add_argument("--name", default="prm-import")
    args = ap.parse_args()
    t_start = time.perf_counter()
    set_threads(args.threads)
    run = Path(args.run)
    it = run / f"iter-{args.iteration}"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg0 = run_config(run, work)
    task = get_task(cfg0.task)
    init = Path(json.loads((it / "critic" / "stepdapo_critic.json").read_text())["init"])
    tok = load_tokenizer(init)
    is_delim = delimiter_token_mask(tok, task.step_delimiter)

    # export and import back
    t0 = time.perf_counter()
    ms = work / "labels.math-shepherd.jsonl"
    exported = prm_data.export_labels(it / "labels", "math-shepherd", ms, task)
    t_export = time.perf_counter() - t0
    dirs = {"ours": it / "labels", "restricted": work / "labels-restricted"}
    t_import = {}
    for targets in ("soft", "hard"):
        dirs[f"imported-{targets}"] = work / f"labels-imported-{targets}"
        prm_data.import_file(ms, "math-shepherd", init, dirs[f"imported-{targets}"], task, targets=targets)
        with tempfile.TemporaryDirectory(dir=work) as tmp:  # timed afresh (the one above may be a kept one)
            t0 = time.perf_counter()
            prm_data.import_file(ms, "math-shepherd", init, Path(tmp) / "labels", task, targets=targets)
            t_import[targets] = time.perf_counter() - t0
    ours = read_labels(it / "labels")
    if not (dirs["restricted"] / "manifest.json").is_file():
        restricted_labels(ours, dirs["restricted"])

    # the round trip, state by state
    mine = {tuple(r["ids"]): r for r in read_labels(dirs["imported-soft"]).to_pylist()}
    theirs = {tuple(r["ids"]): r for r in ours.to_pylist() if r["depth"] > 0}
    hard = {tuple(r["ids"]): r["mc"] for r in read_labels(dirs["imported-hard"]).to_pylist()}
    differ = sorted(set(theirs) - set(mine))
    trip = {"states_ours_after_first_step": len(theirs), "states_ours_prompts": ours.num_rows - len(theirs),
            "states_imported": len(mine), "same_ids": len(set(mine) & set(theirs)),
            "only_ours": len(differ), "only_imported": len(set(mine) - set(theirs)),
            "only_ours_with_a_special_token": sum(any(t in tok.all_special_ids for t in k[1:]) for k in differ),
            "example_difference": tok.decode(list(differ[0])) if differ else None,
            "same_soft_values": all(mine[k]["mc"] == theirs[k]["mc"] for k in mine.keys() & theirs.keys()),
            "hard_is_mc_above_0": all(hard[k] == float(theirs[k]["mc"] > 0) for k in hard.keys() & theirs.keys()),
            "same_count_depth_problem": all((mine[k]["count"], mine[k]["depth"], mine[k]["problem_id"]) ==
                                            (theirs[k]["count"], theirs[k]["depth"], theirs[k]["problem_id"])
                                            for k in mine.keys() & theirs.keys()),
            "critic_examples_restricted_vs_imported_soft": example_differences(dirs["restricted"],
                                                                               dirs["imported-soft"], cfg0, is_delim),
            "export": exported, "export_seconds": t_export, "import_seconds": t_import,
            "file_bytes": ms.stat().st_size}
    print(json.dumps(trip, indent=1), flush=True)

    # the common held-out set: our labels' held-out states
    _, held, train_states = critic_stage.critic_examples(ours, cfg0.critic, is_delim, cfg0.seed)
    results = {"reference": {"dir": str(it / "critic"), **judge(it / "critic", ours, cfg0, task, tok, held, train_states)}}
    print("reference", json.dumps({k: v for k, v in results["reference"].items() if k != "dir"})[:300], flush=True)
    for seed in args.seeds:
        cfg = run_config(run, work, seed)
        for name, labels_dir in dirs.items():
            out = work / f"critic-{name}-seed{seed}"
            reused = (out / "stepdapo_critic.json").is_file()
            t0 = time.perf_counter()
            s = critic_stage.run_critic(cfg, init, labels_dir, out, task, progress=False)
            r = {"variant": name, "seed": seed, "reused": reused, "train_examples": s["train_examples"],
                 "train_states": s["train_states"],
                 "train_seconds": s["train_seconds"], "wall_seconds": time.perf_counter() - t0,
                 **judge(out, ours, cfg, task, tok, held, train_states)}
            results[f"{name}/{seed}"] = r
            print(name, seed, r["train_examples"], f"brier {r['all']['brier']:.4f} auc {r['all']['auc_mc0_vs_positive']:.3f} "
                  f"rank {r['step_ranking']['right_above_wrong']:.3f} F1 {r['processbench']['f1']:.3f}", flush=True)
    total = time.perf_counter() - t_start
    m = machine()
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": m, "round_trip": trip, "results": results,
                                                           "seconds": total, "args": vars(args)}, indent=1) + "\n")

    # the markdown
    def rows_of(name):
        return [r for k, r in results.items() if k.startswith(name + "/")]

    def col(rows, *path):
        out = []
        for r in rows:
            v = r
            for p in path:
                v = None if v is None else v.get(p)
            out.append(v)
        return out

    ref = results["reference"]
    n_reused = sum(bool(r.get("reused")) for r in results.values())
    train_total = sum(r.get("train_seconds", 0) for r in results.values())
    lines = [
        "# Critics from imported Math-Shepherd labels against critics from our own",
        "",
        f"`python bench/bench_prm_import.py --run {args.run} --iteration {args.iteration} --seeds "
        f"{' '.join(map(str, args.seeds))} --threads {args.threads}` ({total / 60:.1f} min"
        + (f"; {n_reused} of the critics were trained by an earlier call and reused from `{work}`, training time "
           f"{train_total / 60:.1f} min in all)" if n_reused else ")"),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {args.threads} torch thread(s), fast bf16: {m['fast_bf16']} "
        f"({m['bf16_why']}); the critics train in float32 (the run's `bf16: {str(cfg0.bf16).lower()}`); torch "
        f"{m['torch']}, transformers {m['transformers']}, Python {m['python']}.",
        "",
        f"The run's iteration-{args.iteration} labels (`{it / 'labels'}`: {ours.num_rows:,} states, "
        f"{cfg0.label.rollouts} rollouts each) exported with `stepdapo prm export --format math-shepherd` "
        f"({exported['rows']:,} solutions, {trip['file_bytes'] / 1e6:.1f} MB, {t_export:.1f} s) and imported back "
        f"with `stepdapo prm import --format math-shepherd` ({t_import['soft']:.1f} s), once with the soft values "
        f"the export writes beside the tags (`values`) and once with the +/- tags alone (`--targets hard`: what a "
        f"plain Math-Shepherd file has). Every critic starts from `{init}` (as the run's did) with the run's config "
        f"(`{run / 'config.yaml'}`) and the seed shown.",
        "",
        "## The round trip",
        "",
        f"- Our states after a first step ({trip['states_ours_after_first_step']:,}; our "
        f"{trip['states_ours_prompts']:,} prompt states have no label in the format) come back with the same token "
        f"ids: {trip['same_ids']:,} of them; {trip['only_ours']} not ({trip['only_ours_with_a_special_token']} of those "
        f"hold a special token the policy sampled inside a step, e.g. `{trip['example_difference']!r}`: the export is "
        f"text, decoded without special tokens, so they come back without it, {trip['only_imported']} states of their "
        f"own).",
        f"- Soft values identical (float equality): **{trip['same_soft_values']}**; hard labels = (MC > 0): "
        f"**{trip['hard_is_mc_above_0']}**; count, depth and problem id identical: "
        f"**{trip['same_count_depth_problem']}**.",
        "- The critic's examples (token ids, target) from our labels restricted to what the format carries and "
        "from the soft import: "
        + "; ".join(f"{k}: {v['both']:,} the same, {v['only_first']} only ours, {v['only_second']} only imported"
                    for k, v in trip["critic_examples_restricted_vs_imported_soft"].items())
        + " (the rest differs only in their order, hence in the shuffling).",
        "",
        "## The critics",
        "",
        f"All judged on our labels' held-out problems ({len(held)} states, of which "
        f"{results['reference']['after_first_step']['n']} after a first step; targets: our Monte-Carlo values), "
        f"each metric's constant prediction (the training states' mean) in the header. Mean ± standard deviation "
        f"over seeds {', '.join(map(str, args.seeds))}; sibling ranking: right next step above a wrong one, "
        f"{ref['step_ranking']['pairs']} held-out pairs; PRM F1: ProcessBench's protocol on 500 built-in rows.",
        "",
        f"| critic | train examples | BCE ({ref['all']['bce_constant']:.4f}) | Brier ({ref['all']['brier_constant']:.4f}) "
        f"| AUC | BCE after step 1 ({ref['after_first_step']['bce_constant']:.4f}) | Brier after step 1 "
        f"({ref['after_first_step']['brier_constant']:.4f}) | sibling ranking | PRM F1 | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| the run's own critic (`{it / 'critic'}`) | – | {fmt([ref['all']['bce']])} | {fmt([ref['all']['brier']])} "
        f"| {fmt([ref['all']['auc_mc0_vs_positive']], 3)} | {fmt([ref['after_first_step']['bce']])} | "
        f"{fmt([ref['after_first_step']['brier']])} | {fmt([ref['step_ranking']['right_above_wrong']], 3)} | "
        f"{fmt([ref['processbench']['f1']], 3)} | – |",
    ]
    for name, title in VARIANTS.items():
        rs = rows_of(name)
        lines.append(
            f"| {title} | {fmt(col(rs, 'train_examples'), 0)} | {fmt(col(rs, 'all', 'bce'))} | {fmt(col(rs, 'all', 'brier'))} "
            f"| {fmt(col(rs, 'all', 'auc_mc0_vs_positive'), 3)} | {fmt(col(rs, 'after_first_step', 'bce'))} | "
            f"{fmt(col(rs, 'after_first_step', 'brier'))} | {fmt(col(rs, 'step_ranking', 'right_above_wrong'), 3)} | "
            f"{fmt(col(rs, 'processbench', 'f1'), 3)} | {fmt(col(rs, 'train_seconds'), 0)} |")
    lines += ["", "Per seed (the same config and seed, variant by variant):", "",
              "| seed | critic | Brier | AUC | sibling ranking | PRM F1 |", "|---:|---|---:|---:|---:|---:|"]
    for seed in args.seeds:
        for name, title in VARIANTS.items():
            r = results[f"{name}/{seed}"]
            lines.append(f"| {seed} | {title} | {r['all']['brier']:.4f} | {r['all']['auc_mc0_vs_positive']:.3f} | "
                         f"{r['step_ranking']['right_above_wrong']:.3f} | {r['processbench']['f1']:.3f} |")
    lines += ["", "## Reading it", ""] + reading(results, args.seeds, cfg0.seed) + [""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"{total:.0f} s -> {RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    main()
