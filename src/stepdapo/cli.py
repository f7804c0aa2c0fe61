"""The `stepdapo` command: one subcommand per pipeline stage, each reading a YAML config with
`key=value` overrides (see config.py). Errors in user input exit with status 2 and one clear line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stepdapo.config import ConfigError, load_config


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults: the built-in arithmetic task)")
    p.add_argument("--seed", type=int, help="overrides the config's seed")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. eval.limit=200 task.arithmetic.n_ops_max=5")


def _load(args, extra: list[str] = ()):
    overrides = list(extra) + list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.config, overrides)


def cmd_bootstrap(args) -> int:
    from stepdapo.models import set_threads
    from stepdapo.stages.bootstrap import bootstrap

    cfg = _load(args)
    set_threads(cfg.threads)
    summary = bootstrap(cfg, args.out)
    print(f"bootstrapped {summary['parameters']:,}-parameter model in {summary['seconds']:.0f} s "
          f"-> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from rich.console import Console

    from stepdapo.models import load_policy, set_threads
    from stepdapo.stages.evaluate import evaluate, format_table
    from stepdapo.store import write_json
    from stepdapo.tasks import get_task

    extra = [f"task.name={args.task}", f"eval.split={args.split}"]
    if args.limit is not None:
        extra.append(f"eval.limit={args.limit}")
    cfg = _load(args, extra)
    set_threads(cfg.threads)
    task = get_task(cfg.task)
    model, tokenizer = load_policy(args.model)
    ev = evaluate(model, tokenizer, task, cfg.eval, seed=cfg.seed)
    Console(stderr=True).print(format_table(ev, title=f"{args.model} on {cfg.task.name}/{cfg.eval.split}"))
    if args.out:
        write_json(args.out, {"eval": ev})
    else:
        print(json.dumps({"eval": ev}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepdapo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bootstrap", help="SFT a tiny model on the built-in task's flawed demonstrations")
    p.add_argument("--out", required=True, help="output model directory")
    _common(p)
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("evaluate", help="greedy and sampled pass@1 of a model on a task")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--task", default="arithmetic", help="task name (default: arithmetic)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="first N problems only")
    p.add_argument("--out", help="write {'eval': {...}} JSON here (default: stdout)")
    _common(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"stepdapo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepdapo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
