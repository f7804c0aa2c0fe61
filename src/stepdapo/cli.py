"""The `stepdapo` command: one subcommand per pipeline stage, each reading a YAML config with
`key=value` overrides. Errors in user input (`StepdapoError`) exit with status 2 and one clear
message; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from stepdapo.config import load_config
from stepdapo.errors import ConfigError, StepdapoError, cap_message
from stepdapo.paths import check_output_file, json_with_keys

CONFIG_HELP = ("Every config key, with its value and documentation: `stepdapo config show [CONFIG] "
               "[key=value ...]`.")


def _common(p: argparse.ArgumentParser) -> None:
    p.epilog = CONFIG_HELP
    p.add_argument("--config", help="YAML config file (defaults: the built-in arithmetic task)")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. eval.limit=200 task.arithmetic.n_ops_max=5")


def _load(args, extra: list[str] = ()):
    overrides = list(extra) + list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.config, overrides)


def _quiet() -> bool:
    """Processes other than rank 0 print nothing: one copy of each result, not one per process."""
    from stepdapo.runner import is_main

    return not is_main()


def cmd_bootstrap(args) -> int:
    from stepdapo.models import set_threads
    from stepdapo.stages.bootstrap import bootstrap

    cfg = _load(args)
    set_threads(cfg.threads)
    base = None
    if cfg.bootstrap.finetune_model and cfg.model is not None:  # a GGUF file is converted once, beside --out
        from stepdapo.models import import_model

        out = Path(args.out)
        base = import_model(cfg.model, out.with_name(out.name + "-base-model"))
    summary = bootstrap(cfg, args.out, base=base)
    if _quiet():
        return 0
    print(f"bootstrapped {summary['parameters']:,}-parameter model in {summary['seconds']:.0f} s "
          f"-> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    import tempfile
    import time

    from rich.console import Console

    from stepdapo.generation import policy_generator, release_engine
    from stepdapo.models import check_model_dir, import_model, set_threads
    from stepdapo.runner import is_main, world_size
    from stepdapo.stages.evaluate import evaluate_with, format_table, run_evaluate
    from stepdapo.store import write_json
    from stepdapo.tasks import get_task

    extra = [f"task.name={args.task}"] if args.task else []
    extra += [f"eval.split={args.split}"] if args.split else []
    extra += [f"eval.limit={args.limit}"] if args.limit is not None else []
    cfg = _load(args, extra)
    model_path = args.model or cfg.model
    if model_path is None:
        raise ConfigError("evaluate: no model; pass --model or set `model` in the config")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise ConfigError(f"evaluate: --out {out} is a directory; give a JSON file path")
    if out is not None:
        check_output_file(out, json_with_keys({"eval"}), "evaluation result (--out)")
    if out is None and world_size() > 1:
        raise ConfigError("evaluate: several processes need --out FILE (they share its shard directory)")
    set_threads(cfg.threads)
    task = get_task(cfg.task)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stepdapo-evaluate-") as tmp:
        if cfg.generation.backend == "vllm" and check_model_dir(model_path).is_file():
            # vLLM loads HF directories: a GGUF is converted once, as `run` does (beside --out, kept
            # for the next call; without --out into a temporary directory)
            model_path = import_model(model_path, out.with_name(out.name + "-base-model") if out is not None
                                      else Path(tmp) / "base-model")
        try:
            if out is not None:  # resumable, and shared by the processes of torchrun / accelerate launch
                ev = run_evaluate(cfg, model_path, out.with_name(out.name + ".shards"), task, progress=is_main())
            else:  # the config's sampler (backend, dtype) in this process
                gen = policy_generator(model_path, task.step_delimiter, cfg.eval.batch_size, engine=cfg.generation)()
                ev = evaluate_with(gen, task, cfg.eval, seed=cfg.seed)
        finally:
            release_engine()
    ev = {**ev, "seconds": time.perf_counter() - t0}  # model loading included
    if _quiet():
        return 0
    Console(stderr=True).print(format_table(ev, title=f"{model_path} on {cfg.task.name}/{cfg.eval.split}"))
    if out is not None:
        write_json(out, {"eval": ev})
    else:
        print(json.dumps({"eval": ev}, indent=2))
    return 0


def _print_summary(name: str, summary: dict) -> None:
    if not _quiet():
        flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        print(json.dumps({name: flat}, indent=2))


def cmd_states(args) -> int:
    from stepdapo.models import set_threads
    from stepdapo.stages.states import run_states
    from stepdapo.tasks import get_task

    cfg = _load(args)
    set_threads(cfg.threads)
    _print_summary("states", run_states(cfg, args.model, args.out, get_task(cfg.task)))
    return 0


def cmd_label(args) -> int:
    from stepdapo.models import set_threads
    from stepdapo.stages.labels import run_labels
    from stepdapo.tasks import get_task

    cfg = _load(args)
    set_threads(cfg.threads)
    _print_summary("labels", run_labels(cfg, args.model, args.states, args.out, get_task(cfg.task)))
    return 0


def cmd_critic(args) -> int:
    from stepdapo.models import set_threads
    from stepdapo.stages.critic import run_critic
    from stepdapo.tasks import get_task

    cfg = _load(args)
    set_threads(cfg.threads)
    summary = run_critic(cfg, args.model, args.labels, args.out, get_task(cfg.task))
    q = summary["heldout"]
    if _quiet():
        return 0
    print(f"critic on {q['n']} held-out states: BCE {q['bce']:.4f} (constant {q['bce_constant']:.4f}), "
          f"Brier {q['brier']:.4f} ({q['brier_constant']:.4f}), ECE {q['ece']:.4f} ({q['ece_constant']:.4f}), "
          f"AUC {q['auc_mc0_vs_positive'] or float('nan'):.3f} (0.5)")
    if q.get("step_ranking"):
        print(f"right step scored above wrong step: {q['step_ranking']['right_above_wrong']} "
              f"over {q['step_ranking']['pairs']} pairs")
    return 0


def cmd_advantages(args) -> int:
    from transformers import AutoTokenizer

    from stepdapo.models import set_threads
    from stepdapo.stages.advantages import run_advantages
    from stepdapo.tasks import get_task

    cfg = _load(args)
    set_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(args.model) if args.model else None
    _print_summary("advantages", run_advantages(cfg, args.critic, args.labels, args.out, get_task(cfg.task),
                                                tokenizer=tok))
    return 0


def cmd_actor(args) -> int:
    from stepdapo.models import set_threads
    from stepdapo.stages.actor import run_actor

    cfg = _load(args)
    set_threads(cfg.threads)
    _print_summary("actor", run_actor(cfg, args.model, args.advantages, args.out))
    return 0


def cmd_prm_score(args) -> int:
    from stepdapo.models import set_threads
    from stepdapo.prm import OUTPUT_SUFFIXES, is_scores_file, score_file
    from stepdapo.runner import world_size
    from stepdapo.tasks import get_task

    cfg = _load(args)
    if world_size() > 1:  # every process would score every row and write the same file
        raise ConfigError("prm score runs in one process: start it without torchrun / accelerate launch")
    if Path(args.out).suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"prm score: --out {args.out}: write a {' or '.join(OUTPUT_SUFFIXES)} file")
    if args.batch_size < 1:
        raise ConfigError(f"prm score: --batch-size must be at least 1, got {args.batch_size}")
    check_output_file(args.out, is_scores_file, "step scores (--out)")
    set_threads(cfg.threads)
    s = score_file(args.critic, args.input, args.out, get_task(cfg.task), args.batch_size)
    print(f"scored {s['steps']:,} steps of {s['rows']:,} solutions ({s['tokens']:,} tokens) in "
          f"{s['seconds']:.1f} s -> {args.out}")
    return 0


def cmd_prm_eval(args) -> int:
    import tempfile

    from stepdapo.models import set_threads
    from stepdapo.prm import eval_file, write_scores
    from stepdapo.runner import world_size
    from stepdapo.tasks import get_task

    cfg = _load(args)
    if world_size() > 1:
        raise ConfigError("prm eval runs in one process: start it without torchrun / accelerate launch")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ConfigError(f"prm eval: --threshold must be a finite number, got {args.threshold}")
    if not 0 < args.calibration_fraction < 1:
        raise ConfigError(f"prm eval: --calibration-fraction must be in (0, 1), got {args.calibration_fraction}")
    if not 1 <= args.batch_size <= 2**20:
        raise ConfigError(f"prm eval: --batch-size must be in [1, {2**20}], got {args.batch_size}")
    if args.out:
        check_output_file(args.out, json_with_keys({"processbench"}), "PRM evaluation (--out)")
    task = get_task(cfg.task)
    set_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="stepdapo-prm-") as tmp:
        data = args.input
        if data is None:
            rows = task.processbench_rows("test", cfg.eval.limit or 1000, cfg.seed)
            if rows is None:
                raise ConfigError(f"prm eval: task {cfg.task.name!r} cannot make labelled solutions; give --in")
            data = str(Path(tmp) / "processbench.jsonl")
            write_scores(data, rows)
        r = eval_file(args.critic, data, task, args.threshold, args.calibration_fraction, args.batch_size,
                      rule=args.rule)
    if args.input is None:
        r["data"] = f"the built-in task's test split, first {cfg.eval.limit or 1000} problems (seed {cfg.seed})"

    def pct(x, ci):
        return "n/a" if x is None else f"{100 * x:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    print(f"ProcessBench protocol, {r['rows']} rows ({r['data']}); rule {r['rule']}, threshold {r['threshold']:.3f} "
          f"({r['threshold_how']}):\n  erroneous ({r['n_erroneous']}): {pct(r['acc_erroneous'], r['acc_erroneous_ci95'])}"
          f"\n  correct ({r['n_correct']}): {pct(r['acc_correct'], r['acc_correct_ci95'])}\n  F1: "
          + ("n/a" if r["f1"] is None else f"{100 * r['f1']:.1f}"))
    if args.out:
        from stepdapo.store import write_json

        write_json(args.out, {"processbench": r})
    return 0


def cmd_prm_processbench(args) -> int:
    from stepdapo.prm import is_processbench_file, write_scores
    from stepdapo.tasks import get_task

    cfg = _load(args)
    task = get_task(cfg.task)
    if not str(args.out).endswith(".jsonl"):
        raise ConfigError(f"prm processbench: --out {args.out}: write a .jsonl file")
    if args.n < 1:
        raise ConfigError(f"prm processbench: --n must be at least 1, got {args.n}")
    check_output_file(args.out, is_processbench_file, "ProcessBench rows (--out)")
    rows = task.processbench_rows(args.split, args.n, cfg.seed)
    if rows is None:
        raise ConfigError(f"prm processbench: task {cfg.task.name!r} cannot make labelled solutions")
    write_scores(args.out, rows)
    print(f"{len(rows)} rows ({sum(r['label'] == -1 for r in rows)} correct) -> {args.out}")
    return 0


def cmd_prm_import(args) -> int:
    from stepdapo.models import set_threads
    from stepdapo.prm_data import import_file
    from stepdapo.runner import world_size
    from stepdapo.tasks import get_task

    cfg = _load(args)
    if world_size() > 1:
        raise ConfigError("prm import runs in one process: start it without torchrun / accelerate launch")
    for name, v in (("--hard-above", args.hard_above), ("--neutral", args.neutral)):
        if not math.isfinite(v):
            raise ConfigError(f"prm import: {name} must be a finite number, got {v}")
    set_threads(cfg.threads)
    s = import_file(args.input, args.format, args.model, args.out, get_task(cfg.task), prompt=args.prompt,
                    targets=args.targets, hard_above=args.hard_above, final_step=args.final_step, neutral=args.neutral)
    print(f"imported {s['states']:,} labelled states ({s['targets']} targets, mean {s['mean_mc']:.3f}) of "
          f"{s['solutions']:,} solutions, {s['problems']:,} problems -> {args.out}")
    return 0


def cmd_prm_export(args) -> int:
    from stepdapo.prm_data import export_labels
    from stepdapo.tasks import get_task

    cfg = _load(args)
    s = export_labels(args.labels, args.format, args.out, get_task(cfg.task), license=args.license)
    print(f"exported {s['rows']:,} solutions ({args.format} format) -> {s['out']}; dataset card -> {s['card']}")
    return 0


def cmd_config(args) -> int:
    from stepdapo.config import dump_yaml
    from stepdapo.settings import describe

    if args.config and "=" in args.config and not os.path.lexists(args.config):  # `config show k=v`: no file
        args.overrides, args.config = [args.config] + list(args.overrides), None
    cfg = load_config(args.config, args.overrides)
    if args.no_docs:
        print(dump_yaml(cfg), end="")
    else:
        print(f"# resolved config: {args.config or 'the defaults'}"
              + (f" with {' '.join(args.overrides)}" if args.overrides else "") + "\n")
        print(describe(cfg), end="")
    return 0


def cmd_plan(args) -> int:
    from rich.console import Console

    from stepdapo.plan import (COUNTS, Throughput, default_throughput, format_plan, make_plan, model_info,
                               model_shape, parse_assumptions, pilot)
    from stepdapo.store import write_json

    cfg = load_config(args.config, args.overrides)
    if args.json:
        check_output_file(args.json, json_with_keys({"config", "stages", "total"}), "plan (--json)")
    # throughputs: --gpu-flops, or --probe, or the given tok/s (the rest from the defaults), or the defaults
    given = {"gen_tok_s": args.gen_tok_s, "train_tok_s": args.train_tok_s, "forward_tok_s": args.forward_tok_s}
    for name, v in list(given.items()) + [("gpu_flops", args.gpu_flops)]:
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"plan: --{name.replace('_', '-')} must be a positive finite number, got {v:g}")
    any_given = any(v is not None for v in given.values())
    if args.gpu_flops is not None and (args.probe or any_given):
        raise ConfigError("plan: --gpu-flops replaces the token throughputs and --probe; give one of them")
    if args.probe and any_given:
        raise ConfigError("plan: --probe measures the throughputs; do not also give --gen-tok-s etc.")
    if not 1 <= args.processes <= 2**20:
        raise ConfigError(f"plan: --processes must be in [1, {2**20}], got {args.processes}")
    if args.gpu_memory is not None and not (0 < args.gpu_memory <= 2**20 and math.isfinite(args.gpu_memory)):
        raise ConfigError(f"plan: --gpu-memory must be each GPU's memory in GB, a positive number (e.g. 80), "
                          f"got {args.gpu_memory:g}")
    if args.fsdp and args.processes < 2:
        raise ConfigError("plan: --fsdp shards over several processes: give --processes N (N >= 2)")
    shape = model_shape(cfg, args.model_shape) if args.model_shape is not None else None
    # a model that is not on this machine: a stand-in tokenizer and its parameter count (given, or
    # from --model-shape or a well-known name's shape)
    stand_in = {}
    if args.tokenizer is not None or args.params is not None:
        if args.params is not None and not 1 <= args.params <= 1e15:  # also refuses inf and nan
            raise ConfigError(f"plan: --params must be a parameter count in [1, 1e15], got {args.params:g}")
        params, params_from = (int(args.params) if args.params is not None else None), "given"
        if params is None and args.tokenizer is not None:
            shape = shape or model_shape(cfg)
            if shape is not None:
                params, params_from = shape.params(), f"from {shape.source}"
        tok, params, how = model_info(cfg, args.tokenizer, params, params_from)
        stand_in = {"tokenizer": tok, "params": params, "model_how": how}
    throughput = None
    if args.gpu_flops is not None:
        throughput = Throughput(gpu_flops=args.gpu_flops, source="--gpu-flops")
    elif any_given:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            base = default_throughput(stand_in.get("params") or model_info(cfg)[1])
            given.update({k: getattr(base, k) for k in missing})
        throughput = Throughput(**given, source="given" + (f"; {', '.join(missing)} from the defaults" if missing else ""))

    # assumptions: the upper bounds, or what a pilot measures (and the lengths of the solutions it
    # samples); --assume wins over both
    assumptions, notes, measured, sampled = parse_assumptions(args.assume or []), [], set(), None
    if args.pilot is not None:
        model = args.pilot_model or cfg.model
        if model is None:
            raise ConfigError("plan: --pilot samples with the run's starting model, and the tiny model does not "
                              "exist before bootstrap: run `stepdapo bootstrap --config CONFIG --out DIR` and "
                              "pass --pilot-model DIR")
        if args.pilot < 1:
            raise ConfigError(f"plan: --pilot needs at least 1 problem, got {args.pilot}")
        from_pilot, notes, sampled = pilot(cfg, model, args.pilot)
        given_names = {item.partition("=")[0] for item in args.assume or []}
        measured = set(vars(from_pilot)) - given_names - set(COUNTS)
        for name in measured:
            setattr(assumptions, name, getattr(from_pilot, name))

    plan = make_plan(cfg, throughput, assumptions, probe_throughput=args.probe, processes=args.processes,
                     sampled=sampled, gpu_memory=args.gpu_memory, fsdp=args.fsdp, shape=shape, **stand_in)
    plan["estimates"] += notes
    for name in measured:
        plan["assumptions"][name]["source"] = "pilot"
    Console(width=160).print(format_plan(plan, title=f"plan: {args.config}"
                                         + (f" {' '.join(args.overrides)}" if args.overrides else "")))
    if args.json:
        write_json(args.json, plan)
    return 0


def cmd_run(args) -> int:
    from stepdapo.pipeline import run

    cfg = load_config(args.config, list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else []))
    out = args.out or f"runs/{Path(args.config).stem}-seed{cfg.seed}"
    report = run(cfg, out)
    if _quiet():
        return 0
    accs = ", ".join(f"iter {it.iteration}: " + ("not trained" if it.skipped is not None else
                                                 f"{100 * it.eval.accuracy:.1f}%")
                     for it in report.iterations)
    print(f"greedy test accuracy: {accs}\nreport: {out}/report.md")
    return 0


def cmd_show(args) -> int:
    from stepdapo.show import write_show

    if args.overrides:
        raise ConfigError(f"show takes no key=value overrides (got {' '.join(args.overrides)}): it reads the run's config")
    if args.limit < 1:
        raise ConfigError(f"show: --limit must be at least 1, got {args.limit}")
    s = write_show(args.run, args.out, args.limit, critic_values=not args.no_critic)
    for w in s["warnings"]:
        print(f"stepdapo show: warning: {w}", file=sys.stderr)
    print(f"wrote {s['path']} ({s['bytes'] / 2**20:.1f} MB: {s['solutions']:,} solutions, {s['states']:,} states of "
          f"iteration(s) {', '.join(map(str, s['iterations']))}) in {s['seconds']:.1f} s; open it in a browser")
    return 0


# The commands that run one stage: (name, help, [(option, required, help)], handler).
STAGE_COMMANDS = [
    ("bootstrap", "SFT a tiny model (or, with bootstrap.finetune_model, the config's model) on the built-in task's flawed demonstrations",
     [("--out", True, "output model directory")], cmd_bootstrap),
    ("states", "stage 1: sample solutions, keep a balanced set, cut into steps",
     [("--model", True, "the policy (pi_ref), an HF model directory"),
      ("--out", True, "output stage directory")], cmd_states),
    ("label", "stage 2: Monte-Carlo value labels and candidate actions",
     [("--model", True, "the policy (pi_ref) that made the states"),
      ("--states", True, "the states stage directory"),
      ("--out", True, "output stage directory")], cmd_label),
    ("critic", "stage 3: train the value model on the Monte-Carlo labels",
     [("--model", True, "initialisation: the policy or a previous critic"),
      ("--labels", True, "the labels stage directory"),
      ("--out", True, "output critic directory")], cmd_critic),
    ("advantages", "stage 4: advantages of the candidate actions",
     [("--critic", False, "the critic directory (advantages.source=critic)"),
      ("--model", False, "the policy (its tokenizer is needed for advantages.source=mc)"),
      ("--labels", True, "the labels stage directory"),
      ("--out", True, "output stage directory")], cmd_advantages),
    ("actor", "stage 5: train the policy with the DAPO loss",
     [("--model", True, "pi_ref, the policy the advantages were computed for"),
      ("--advantages", True, "the advantages stage directory"),
      ("--out", True, "output model directory")], cmd_actor),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepdapo", description=__doc__.split("\n")[0], epilog=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print a resolved config with every key's documentation",
                       epilog=CONFIG_HELP)
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("show", help="the config after the file and the overrides, each key documented")
    c.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    c.add_argument("--no-docs", action="store_true", help="plain YAML, no comments")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.set_defaults(func=cmd_config)

    for name, help_, options, func in STAGE_COMMANDS:
        p = sub.add_parser(name, help=help_)
        for option, required, option_help in options:
            p.add_argument(option, required=required, help=option_help)
        _common(p)
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="greedy and sampled pass@1 of a model on a task")
    p.add_argument("--model", help="HF model directory or GGUF file (default: the config's `model`)")
    p.add_argument("--task", help="task name (default: the config's, else arithmetic)")
    p.add_argument("--split", help="split to evaluate (default: the config's eval.split)")
    p.add_argument("--limit", type=int, help="first N problems only")
    p.add_argument("--out", help="write {'eval': {...}} JSON here (default: stdout); its shards, which "
                                 "let it resume and split across processes, go to OUT.shards/")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("prm", help="the trained critic as a process reward model")
    psub = p.add_subparsers(dest="prm_command", required=True)
    p = psub.add_parser("score", help="the critic's value after every step of each solution in a file",
                        description="Each row: `prompt` (the text the policy saw, as in the labels stage's "
                        "stepwise.parquet) or `question` (formatted by the config's task), and `steps` / "
                        "`completions` (a list of step texts; the task's step delimiter is added to a step "
                        "that lacks it) or `completion` (one text, cut into steps as the pipeline cuts them). "
                        "Writes the rows with `step_values`: V(prompt + steps[:i+1]) for each step i, all "
                        "read from one forward pass per solution.")
    p.add_argument("--critic", required=True, help="a critic directory the critic stage saved")
    p.add_argument("--in", dest="input", required=True, help="the rows to score: .jsonl, .json or .parquet")
    p.add_argument("--out", required=True, help="the scored rows: .jsonl or .parquet (replaces only a file "
                                                "this command wrote)")
    p.add_argument("--batch-size", type=int, default=32, help="solutions per forward pass (default 32)")
    _common(p)
    p.set_defaults(func=cmd_prm_score)
    p = psub.add_parser("eval", help="ProcessBench's protocol: does the critic find the earliest wrong step?",
                        description="Rows in ProcessBench's format: `problem` (or `question` / `prompt`), `steps`, "
                        "and `label` (the index of the earliest wrong step, -1 when all are right). The critic "
                        "predicts the first step it values below a threshold; reported: accuracy on erroneous and "
                        "on correct solutions (95%% Wilson intervals) and their harmonic mean F1. The threshold is "
                        "chosen for the best F1 on a calibration part of the rows (a stable hash of each row's "
                        "id) and the scores come from the rest, unless --threshold is given.")
    p.add_argument("--critic", required=True, help="a critic directory the critic stage saved")
    p.add_argument("--in", dest="input", help="ProcessBench-format rows (.jsonl, .json, .parquet); default: the "
                   "built-in task's (`stepdapo prm processbench`), made in memory")
    p.add_argument("--rule", choices=["value", "advantage"], default="value",
                   help="score a step by its value V(prefix) (ProcessBench's rule, the default) or by its "
                   "advantage V(prefix) - V(prefix before it), what DAPO trains on")
    p.add_argument("--threshold", type=float, help="use this threshold on every row instead of choosing one")
    p.add_argument("--calibration-fraction", type=float, default=0.5,
                   help="share of the rows the threshold is chosen on (default 0.5)")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--batch-size", type=int, default=32, help="solutions per forward pass (default 32)")
    _common(p)
    p.set_defaults(func=cmd_prm_eval)
    p = psub.add_parser("processbench", help="write a task's solutions with known earliest wrong steps in "
                        "ProcessBench's format (the built-in task: half correct, half with one wrong step)")
    p.add_argument("--out", required=True, help="a .jsonl file")
    p.add_argument("--split", default="test", choices=["train", "test"], help="problems of this split (test)")
    p.add_argument("--n", type=int, default=1000, help="the first N problems (default 1000)")
    _common(p)
    p.set_defaults(func=cmd_prm_processbench)
    p = psub.add_parser("import", help="step-labelled data from another format as a labels directory the critic "
                        "stage trains on", description="Rows of TRL's stepwise supervision (prompt, completions, "
                        "labels: bools or numbers in [0, 1], kept as they are), Math-Shepherd's (input with a ки "
                        "after each step, label with + or - there) or PRM800K's (question.problem, label.steps with "
                        "rated completions) become labelled states (prompt + steps so far, tokenized as the pipeline "
                        "does with --model's tokenizer), written as a labels stage directory: `stepdapo critic "
                        "--labels OUT` trains on it. The formats carry no rollouts: the critic trains on the "
                        "labelled states alone. A solution's last step is dropped by default (its label is the "
                        "verdict on the finished solution, which the pipeline takes from the verifier).")
    p.add_argument("input", help="the rows: .jsonl, .jsonl.gz, .json or .parquet")
    p.add_argument("--format", required=True, choices=["trl", "math-shepherd", "prm800k"], help="the rows' format")
    p.add_argument("--model", required=True, help="the model whose tokenizer makes the states' token ids (the "
                   "critic's initialisation: the policy)")
    p.add_argument("--out", required=True, help="the labels directory to write (new or empty)")
    p.add_argument("--prompt", choices=["task", "raw"], help="the prompt: the config's task formats the question "
                   "(`task.prompt`, chat template included; default for math-shepherd and prm800k) or the text is "
                   "used as given (`raw`; default for trl, whose prompt is the text the policy saw)")
    p.add_argument("--targets", choices=["soft", "hard"], default="soft", help="train toward the labels as given "
                   "(soft, the default: a row's `values` where it has them) or hard ones (0 or 1)")
    p.add_argument("--hard-above", type=float, default=0.0, help="with --targets hard, a number label above this is "
                   "1 (default 0: Math-Shepherd's hard estimate, some rollout ends correct)")
    p.add_argument("--final-step", choices=["drop", "keep"], default="drop", help="a solution's last step: drop "
                   "its label (the default, as the pipeline) or keep it as a state (for use as a PRM)")
    p.add_argument("--neutral", type=float, default=1.0, help="prm800k: the label of a step rated 0 (neutral; "
                   "default 1.0)")
    _common(p)
    p.set_defaults(func=cmd_prm_import)
    p = psub.add_parser("export", help="a labels directory's step labels as TRL or Math-Shepherd rows, with a "
                        "Hugging Face dataset card", description="The labels stage's stepwise.parquet (one row per "
                        "kept solution: its steps, each step's hard label MC > 0 and soft value; the last step's "
                        "the verifier's verdict) written as TRL's stepwise supervision (prompt, completions, labels, "
                        "values) or Math-Shepherd's format (input, label; with question, problem_id and the soft "
                        "values beside them), and README.md (a dataset card: YAML front matter with the features, "
                        "license and data file; how the data was made) beside it.")
    p.add_argument("--labels", required=True, help="a labels directory (the labels stage's, or `prm import`'s)")
    p.add_argument("--format", required=True, choices=["trl", "math-shepherd"], help="the rows' format")
    p.add_argument("--out", required=True, help="a .jsonl or .parquet file (replaces only an export); README.md "
                   "is written beside it (replacing only a card this command wrote)")
    p.add_argument("--license", default="unknown", help="the card's license field (default: unknown)")
    _common(p)
    p.set_defaults(func=cmd_prm_export)

    p = sub.add_parser("run", help="the whole pipeline: [bootstrap] -> evaluate -> [states -> label -> critic "
                                   "-> advantages -> actor -> evaluate] x iterations -> report")
    p.add_argument("config", help="YAML config, e.g. configs/arithmetic.yaml")
    p.add_argument("--out", help="run directory (default runs/<config>-seed<N>)")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. actor.beta=0.5")
    p.epilog = CONFIG_HELP
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="what a run will generate, train and cost, before it runs")
    p.add_argument("config", help="YAML config, e.g. configs/arithmetic.yaml")
    p.add_argument("--gen-tok-s", type=float, help="generated tokens per second (all processes)")
    p.add_argument("--train-tok-s", type=float, help="trained tokens per second, forward + backward (all processes)")
    p.add_argument("--forward-tok-s", type=float, help="forward-only and prefill tokens per second (all processes)")
    p.add_argument("--probe", action="store_true", help="measure the throughputs on this machine (a few seconds)")
    p.add_argument("--processes", type=int, default=1, help="processes the run will use (torchrun / accelerate), "
                   "one a GPU; the throughputs are for all of them, but the critic's evaluation runs on one")
    p.add_argument("--gpu-flops", type=float, help="FLOP/s to divide the FLOPs by, e.g. 4e14 (peak x utilisation)")
    p.add_argument("--assume", action="append", metavar="NAME=VALUE",
                   help="set an assumption (default: its upper bound 1.0), e.g. distinct_states=0.5")
    p.add_argument("--pilot", type=int, metavar="N", help="measure the assumptions by running the states and "
                   "labels stages on N training problems (seconds on the tiny model, minutes on a real LM)")
    p.add_argument("--pilot-model", metavar="PATH", help="the policy the pilot samples (default: the config's "
                   "model; for the tiny model, a `stepdapo bootstrap` output)")
    p.add_argument("--tokenizer", metavar="PATH", help="count tokens with this tokenizer (an HF directory or "
                   ".gguf file) instead of the model's, for a model that is not on this machine; with --params")
    p.add_argument("--params", type=float, metavar="N", help="the model's parameter count (e.g. 8.03e9), for a "
                   "model that is not on this machine; with --tokenizer")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="each GPU's memory in GB, e.g. 80: marks every "
                   "stage whose estimated peak passes 90%% of it and says what setting fixes it")
    p.add_argument("--fsdp", action="store_true", help="the trainers shard parameters, gradients and optimizer "
                   "state over the --processes (accelerate's FSDP config); default DDP: each process holds them all")
    p.add_argument("--model-shape", metavar="CONFIG.json", help="the model's HF config.json (or a directory with "
                   "one), for a model that is not on this machine: its shape for the memory estimate (and, with "
                   "--tokenizer, its parameter count)")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. label.rollouts=8")
    p.epilog = CONFIG_HELP
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("show", help="write one self-contained HTML page to browse a run's states and solutions",
                       description="Each step coloured by the critic's value, its Monte-Carlo label, the critic's "
                       "step change or its DAPO advantage; sort and filter (wrong steps the critic missed, states "
                       "with the largest advantage gap); the report's tables and plots. No server, no network: "
                       "open the file in a browser.")
    p.add_argument("run", help="a run directory (the --out of `stepdapo run`)")
    p.add_argument("--out", help="the page (default RUN/show.html; replaces only a page this command wrote)")
    p.add_argument("--limit", type=int, default=1000, help="at most N solutions per iteration, whole problems "
                   "chosen by a hash of their id (default 1000)")
    p.add_argument("--no-critic", action="store_true", help="do not run the critics (no critic values; faster)")
    p.set_defaults(func=cmd_show, overrides=[])
    return parser


def _describe(e: Exception) -> str:
    if isinstance(e, StepdapoError) or not isinstance(e, OSError):
        return str(e)
    paths = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{paths}: {e.strerror or e}" if paths else str(e.strerror or e)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come before or after options (`run CONFIG --out D k=v` and `run CONFIG k=v --out D`)
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except (StepdapoError, OSError) as e:
        # the user's input, or the paths they gave (a symlink loop, a parent that is a file, a full
        # disk): one line naming it. Anything else is a bug and keeps its traceback.
        from stepdapo.runner import rank, world_size

        who = f" (rank {rank()})" if world_size() > 1 else ""
        print(f"stepdapo {args.command}{who}: error: {cap_message(_describe(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepdapo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
