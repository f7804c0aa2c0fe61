"""`stepdapo run`: the whole method in one run directory, stage by stage, on one process or many.

    DIR/
      config.yaml                  the resolved config of the run
      sft/                         the bootstrapped tiny model (when no model is given)
      base-model/                  the starting model converted to an HF directory (when a GGUF file is given)
      iter-0/eval/                 the starting model's evaluation (summary.json is the `eval` object)
      iter-1/states/ labels/ critic/ prm-eval/ advantages/ actor/ eval/
      iter-1/dpo/ dpo-eval/        each baseline in `baselines` (dpo, step_dpo, rft, mc_dapo) on the
                                   same samples (mc-advantages/: Monte-Carlo advantages, for the last two)
      iter-2/...                   pi_ref <- iter-1's actor; the critic continues from iter-1's
                                   (from iter-1's actor if iter-1's critic failed its check)
      timings.json                 wall seconds of each stage (of the run that did its work)
      report.json report.md *.png

Every stage goes through `runner.py`: skipped when complete, resumed when interrupted (shards,
checkpoints), published atomically, and never written over anything the tool did not make. Under
`torchrun --nproc-per-node N -m stepdapo run ...` (or `accelerate launch`) every process runs this
same list: sampling stages split their shards, training stages train data-parallel, and rank 0
alone writes the config, timings and report.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from stepdapo.config import RunConfig, dump_yaml, from_dict, to_dict
from stepdapo.errors import ArtifactError, ConfigError, listing
from stepdapo.generation import release_engine
from stepdapo.models import check_model_dir, import_model, set_threads
from stepdapo.paths import existing_output_dir
from stepdapo.precision import describe
from stepdapo.runner import is_main, on_main
from stepdapo.training import check_run_supported
from stepdapo.stages.actor import run_actor
from stepdapo.stages.advantages import run_advantages
from stepdapo.stages.baselines import BASELINES
from stepdapo.stages.bootstrap import bootstrap
from stepdapo.stages.critic import check_critic, run_critic
from stepdapo.stages.evaluate import format_table, run_evaluate
from stepdapo.stages.labels import run_labels
from stepdapo.stages.prm_eval import run_prm_eval
from stepdapo.stages.states import run_states
from stepdapo.store import atomic_write_text, read_json, write_json
from stepdapo.summaries import CriticSummary, Iteration, RunReport
from stepdapo.tasks import get_task


# What each stage does with the machine: a "training" stage needs the accelerator's memory, so a
# sampling engine (vLLM) is shut down before it; "sampling" stages share one engine per policy;
# "forward" stages only score. A baseline's kind is in its table entry (stages/baselines.py).
STAGE_KINDS = {"bootstrap": "training", "import": "forward", "eval": "sampling", "states": "sampling",
               "label": "sampling", "critic": "training", "critic-more": "training", "prm-eval": "sampling",
               "advantages": "forward", "actor": "training"}


def run(cfg: RunConfig, out_dir: str | Path, progress: bool = True) -> RunReport:
    from rich.console import Console

    from stepdapo.report import write_report

    out = Path(out_dir)
    check_run_supported(cfg)  # what a trainer would refuse hours in, refused now
    if cfg.model is not None:  # a broken starting model is an error before the run directory is made
        check_model_dir(cfg.model)
    on_main(lambda: _claim(out, cfg))
    set_threads(cfg.threads)
    task = get_task(cfg.task)
    progress = progress and is_main()  # one set of progress bars, not one per process
    console = Console(stderr=True, quiet=not is_main())
    timings: dict[str, float] = on_main(lambda: read_json(out / "timings.json")
                                        if (out / "timings.json").is_file() else {})

    def stage(name: str, fn, kind: str | None = None):
        if (kind or STAGE_KINDS[name.rsplit("/", 1)[-1]]) == "training":
            release_engine()  # a vLLM engine holds its GPU memory: the trainer needs it back
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        result = fn()
        if name not in timings and is_main():  # the time of the run that did the work, not of a skip
            timings[name] = time.perf_counter() - t0
            write_json(out / "timings.json", timings)
        return result

    def judged(critic: dict) -> dict:  # the held-out metrics the check judges (CriticSummary.judged)
        return CriticSummary(**critic).judged()

    def check(critic: dict) -> str | None:
        return check_critic(judged(critic), cfg.critic.min_brier_gain, cfg.critic.min_step_ranking)

    def evaluation(name: str, model: Path, title: str) -> dict:
        ev = stage(name, lambda: run_evaluate(cfg, model, out / name, task, progress), kind="sampling")
        console.print(format_table(ev, title=title))
        return {"eval": ev}

    # the starting policy: the tiny SFT model, or the user's (a GGUF file becomes an HF directory once)
    precision = describe(cfg.bf16, cfg.generation.dtype)
    console.print(f"precision: training bf16 {precision['bf16']['used']} ({precision['bf16']['why']}); sampling "
                  f"{precision['generation_dtype']['used']} ({precision['generation_dtype']['why']})")
    boot = None
    if cfg.model is None:
        policy = out / "sft"
        boot = stage("bootstrap", lambda: bootstrap(cfg, policy, progress=progress))
    else:
        policy = stage("import", lambda: import_model(cfg.model, out / "base-model"))
        if cfg.bootstrap.finetune_model:  # the user's LM, fine-tuned on the built-in task's demonstrations
            base, policy = policy, out / "sft"
            boot = stage("bootstrap", lambda: bootstrap(cfg, policy, progress=progress, base=base))
    iterations = [Iteration(iteration=0, model=str(policy), **evaluation("iter-0/eval", policy, "iteration 0 (pi_ref)"))]

    critic_init: Path = policy
    for k in range(1, cfg.iterations + 1):
        d, it = out / f"iter-{k}", {"iteration": k}
        it["states"] = stage(f"iter-{k}/states", lambda: run_states(cfg, policy, d / "states", task, progress))
        it["labels"] = stage(f"iter-{k}/label", lambda: run_labels(
            cfg, policy, d / "states", d / "labels", task, progress))
        init = critic_init if cfg.critic.init == "previous" else policy
        critic_dir = d / "critic"
        critic = stage(f"iter-{k}/critic", lambda: run_critic(cfg, init, d / "labels", critic_dir, task, progress))
        problem = check(critic)
        recovery = None
        if problem is not None and cfg.critic.recovery_epochs > 0:
            # a critic that is close often passes with a little more training: a second try, continuing
            # from it on the same labels, before giving up step-level credit
            console.print(f"[yellow]iteration {k}: {problem}; training it {cfg.critic.recovery_epochs:g} more "
                          f"epoch(s) (critic.recovery_epochs) and checking again")
            more_cfg = cfg.model_copy(update={"critic": cfg.critic.model_copy(
                update={"continue_epochs": cfg.critic.recovery_epochs})})
            recovery = {"first_check": problem, "first_heldout": judged(critic),
                        "epochs": cfg.critic.recovery_epochs}
            critic_dir = d / "critic-more"
            critic = stage(f"iter-{k}/critic-more", lambda: run_critic(more_cfg, d / "critic", d / "labels",
                                                                        critic_dir, task, progress))
            problem = check(critic)
            recovery["passed"] = problem is None
        it["critic"] = {key: v for key, v in critic.items() if key != "fingerprint"}
        it["critic"]["dir"] = str(critic_dir)
        if recovery is not None:
            it["critic"]["recovery"] = recovery
        adv_cfg = cfg
        if problem is not None:
            fallback = cfg.critic.fallback == "mc" and cfg.advantages.source == "critic"
            it["critic"]["warning"] = problem + (
                f" (also after {cfg.critic.recovery_epochs:g} more epoch(s))" if recovery else "") + (
                "; the advantages use the Monte-Carlo values of s + a instead (critic.fallback=mc)" if fallback else "") + (
                "; the next iteration's critic starts afresh from the new policy" if k < cfg.iterations else "")
            console.print(f"[bold red]WARNING iteration {k}: {it['critic']['warning']}")
            if fallback:
                adv_cfg = cfg.model_copy(update={"advantages": cfg.advantages.model_copy(update={"source": "mc"})})
        elif recovery is not None:
            console.print(f"[green]iteration {k}: the critic passes its check after {cfg.critic.recovery_epochs:g} "
                          f"more epoch(s)")
        if cfg.prm.best_of_n:  # the critic as a process reward model at test time, on pi_ref's samples
            it["prm_eval"] = stage(f"iter-{k}/prm-eval", lambda: run_prm_eval(
                cfg, policy, critic_dir, d / "prm-eval", task, progress))
        tok = AutoTokenizer.from_pretrained(policy) if adv_cfg.advantages.source == "mc" else None
        it["advantages"] = stage(f"iter-{k}/advantages", lambda: run_advantages(
            adv_cfg, critic_dir, d / "labels", d / "advantages", task, tokenizer=tok, progress=progress))
        if it["advantages"]["states_kept"] == 0:
            # No training signal (e.g. every rollout failed: MC = 0 everywhere). Training on nothing
            # would change nothing, and so would further iterations: say so and stop here.
            it["skipped"] = (f"no state passed the advantage-gap filter (min_gap {cfg.advantages.min_gap}; "
                             f"mean MC {it['labels']['mean_mc']:.3f}): the actor was not trained and the "
                             f"policy is unchanged")
            console.print(f"[yellow]iteration {k}: {it['skipped']}; stopping the iterations")
            it["eval"] = iterations[-1].eval
        else:
            actor = stage(f"iter-{k}/actor", lambda: run_actor(cfg, policy, d / "advantages", d / "actor", progress))
            it["actor"] = {key: v for key, v in actor.items() if key != "fingerprint"}
            it.update(evaluation(f"iter-{k}/eval", d / "actor", f"iteration {k} (DAPO)"))
        if k == 1 and cfg.baselines:  # the baselines, from the same pi_ref and samples
            it["baselines"] = {name: _baseline(name, cfg, policy, d, stage, evaluation, console, progress)
                               for name in cfg.baselines}
        iterations.append(Iteration(**it))
        if "skipped" in it:
            break
        # a critic that failed its check is not continued: the next one starts from the new policy
        # (the paper's initialisation), with critic.epochs, not continue_epochs
        policy, critic_init = d / "actor", critic_dir if problem is None else d / "actor"

    release_engine()
    report = RunReport(config=to_dict(cfg), precision=precision, iterations=iterations, timings=timings,
                       final_model=str(policy))
    if boot is not None:
        report.bootstrap = {k: v for k, v in boot.items() if k in (
            "rounds", "steps", "demonstrations", "criterion", "rounds_log", "seconds")}
    if is_main():
        write_report(report, out)
    return report


def _baseline(name: str, cfg: RunConfig, policy: Path, d: Path, stage, evaluation, console, progress: bool) -> dict:
    """Train the baseline `name` from pi_ref on iteration `d`'s samples and evaluate it: its summary
    and evaluation, or why it was not trained."""
    b = BASELINES[name]
    if (why := b.cannot_train(cfg, d)) is not None:
        console.print(f"[yellow]{b.title}: {why}")
        return {"title": b.title, "trains_on": b.trains_on, "skipped": why}
    summary = stage(f"{d.name}/{name}", lambda: b.train(cfg, policy, d, d / name, progress), kind=b.kind)
    ev = evaluation(f"{d.name}/{name}-eval", d / name, f"{b.title} (same samples)")
    return {"title": b.title, "trains_on": b.trains_on,
            "summary": {k: v for k, v in summary.items() if k not in ("fingerprint", "log", "scatter")}, **ev}


def _claim(out: Path, cfg: RunConfig) -> None:
    """A run directory belongs to one config: a new one gets config.yaml; resuming with another
    config is an error, not a mix; a directory that is not a run's is never written into."""
    saved = out / "config.yaml"
    existing_output_dir(out, "run (--out)")
    if saved.is_file():
        try:
            old = from_dict(yaml.safe_load(saved.read_text()), source=str(saved))
        except ConfigError as e:
            raise ConfigError(f"{saved}: not a config of this stepdapo version ({e}); use another --out") from None
        if to_dict(old) != to_dict(cfg):
            new_flat, old_flat = _flat(to_dict(cfg)), _flat(to_dict(old))
            diff = [k for k in new_flat if new_flat[k] != old_flat.get(k)]
            raise ConfigError(f"{saved}: this run directory was started with a different config "
                              f"(differs in: {listing(diff)}); use another --out or delete it")
        return
    if out.is_dir() and any(out.iterdir()):
        raise ArtifactError(f"{out}: not empty and not a stepdapo run directory (no config.yaml); "
                            f"give --out a new or empty directory")
    atomic_write_text(saved, dump_yaml(cfg))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out
