"""`stepdapo run`: the whole method in one run directory, resumable stage by stage.

    DIR/
      config.yaml                  the resolved config of the run
      sft/                         the bootstrapped tiny model (when no model is given)
      base-model/                  the starting model converted to an HF directory (when a GGUF file is given)
      iter-0/eval.json             the starting model's evaluation
      iter-1/states/ labels/ critic/ advantages/ actor/ eval.json
      iter-1/dpo/ dpo-eval.json    the outcome-level DPO baseline on the same samples
      iter-2/...                   pi_ref <- iter-1's actor; the critic continues from iter-1's
      report.json report.md *.png

Each stage writes its output atomically and is skipped when complete, so a killed run resumes at
the stage (and, inside the labelling stage, the shard) where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from transformers import AutoTokenizer

from stepdapo.config import ConfigError, RunConfig, dump_yaml, from_dict, to_dict
from stepdapo.models import import_model, load_policy, set_threads
from stepdapo.stages.actor import run_actor, train_dpo
from stepdapo.stages.advantages import run_advantages
from stepdapo.stages.bootstrap import bootstrap
from stepdapo.stages.critic import run_critic
from stepdapo.stages.evaluate import evaluate, format_table
from stepdapo.stages.labels import run_labels
from stepdapo.stages.states import read_solutions, run_states
from stepdapo.store import atomic_write_text, read_json, write_json
from stepdapo.tasks import get_task


def _evaluate_to(path: Path, model_dir: Path, task, cfg: RunConfig, console, title: str) -> dict:
    if path.is_file():
        return read_json(path)
    t0 = time.perf_counter()
    model, tok = load_policy(model_dir)
    ev = evaluate(model, tok, task, cfg.eval, seed=cfg.seed)
    ev["seconds"] = time.perf_counter() - t0
    write_json(path, {"eval": ev})
    console.print(format_table(ev, title=title))
    return {"eval": ev}


def _check_resume(out: Path, cfg: RunConfig) -> None:
    """A run directory belongs to one config: resuming with another is an error, not a mix."""
    saved = out / "config.yaml"
    if saved.is_file():
        import yaml

        old = from_dict(yaml.safe_load(saved.read_text()))
        if to_dict(old) != to_dict(cfg):
            diff = [k for k in _flat(to_dict(cfg)) if _flat(to_dict(cfg))[k] != _flat(to_dict(old)).get(k)]
            raise ConfigError(f"{saved}: this run directory was started with a different config "
                              f"(differs in: {', '.join(diff)}); use another --out or delete it")
    else:
        atomic_write_text(saved, dump_yaml(cfg))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def run(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> dict:
    from rich.console import Console

    from stepdapo.report import write_report

    console = Console(stderr=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out, cfg)
    set_threads(cfg.threads)
    task = get_task(cfg.task)
    timings: dict[str, float] = read_json(out / "timings.json") if (out / "timings.json").is_file() else {}

    def stage(name: str, fn):
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        result = fn()
        if name not in timings:  # the time of the run that did the work, not of a skip
            timings[name] = time.perf_counter() - t0
            write_json(out / "timings.json", timings)
        return result

    if cfg.model is None:
        policy = out / "sft"
        stage("bootstrap", lambda: bootstrap(cfg, policy, progress=progress))
    else:  # a GGUF file becomes an HF directory once; an HF directory is used where it is
        policy = stage("import", lambda: import_model(cfg.model, out / "base-model"))
    iterations = [{"iteration": 0, "model": str(policy),
                   **stage("iter-0/eval", lambda: _evaluate_to(out / "iter-0" / "eval.json", policy, task, cfg,
                                                                console, "iteration 0 (pi_ref)"))}]

    def _baseline(it: dict) -> None:
        """The outcome-level DPO baseline from pi_ref (`policy` when called) on iteration 1's samples."""
        if not cfg.baseline.dpo:
            return
        solutions = read_solutions(out / "iter-1" / "states")
        if not any(r["correct"] for r in solutions.select(["correct"]).to_pylist()):
            it["dpo_skipped"] = "no correct solution among the sampled ones: no (correct, incorrect) pair"
            console.print(f"[yellow]DPO baseline: {it['dpo_skipped']}")
        else:
            dpo = stage("iter-1/dpo", lambda: train_dpo(cfg, policy, solutions, out / "iter-1" / "dpo", progress))
            dpo_eval = stage("iter-1/dpo-eval", lambda: _evaluate_to(
                out / "iter-1" / "dpo-eval.json", out / "iter-1" / "dpo", task, cfg, console,
                "DPO baseline (outcome-level, same samples)"))
            it["dpo"] = {"summary": {key: v for key, v in dpo.items() if key not in ("fingerprint", "log")}, **dpo_eval}

    critic_init: Path = policy
    for k in range(1, cfg.iterations + 1):
        d = out / f"iter-{k}"
        it: dict = {"iteration": k}
        it["states"] = stage(f"iter-{k}/states", lambda: run_states(cfg, policy, d / "states", task, progress))
        it["labels"] = stage(f"iter-{k}/label", lambda: run_labels(cfg, policy, d / "states", d / "labels", task,
                                                                  progress))
        init = critic_init if cfg.critic.init == "previous" else policy
        critic = stage(f"iter-{k}/critic", lambda: run_critic(cfg, init, d / "labels", d / "critic", task, progress))
        it["critic"] = {key: v for key, v in critic.items() if key != "fingerprint"}
        tok = AutoTokenizer.from_pretrained(policy) if cfg.advantages.source == "mc" else None
        it["advantages"] = stage(f"iter-{k}/advantages", lambda: run_advantages(
            cfg, d / "critic", d / "labels", d / "advantages", task, tokenizer=tok, progress=progress))
        if it["advantages"]["states_kept"] == 0:
            # No training signal (e.g. every rollout failed: MC = 0 everywhere). Training on nothing
            # would change nothing, and so would further iterations: say so and stop here.
            why = (f"no state passed the advantage-gap filter (min_gap {cfg.advantages.min_gap}; mean MC "
                   f"{it['labels']['mean_mc']:.3f}): the actor was not trained and the policy is unchanged")
            console.print(f"[yellow]iteration {k}: {why}; stopping the iterations")
            it["skipped"] = why
            it["eval"] = iterations[-1]["eval"]
            if k == 1:
                _baseline(it)
            iterations.append(it)
            break
        actor = stage(f"iter-{k}/actor", lambda: run_actor(cfg, policy, d / "advantages", d / "actor", progress))
        it["actor"] = {key: v for key, v in actor.items() if key != "fingerprint"}
        it.update(stage(f"iter-{k}/eval", lambda: _evaluate_to(d / "eval.json", d / "actor", task, cfg, console,
                                                               f"iteration {k} (DAPO)")))
        if k == 1:
            _baseline(it)
        iterations.append(it)
        policy, critic_init = d / "actor", d / "critic"
    report = {"config": to_dict(cfg), "iterations": iterations, "timings": timings, "final_model": str(policy)}
    write_report(report, out)
    return report
