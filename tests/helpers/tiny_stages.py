"""The model stages' shared test inputs: a tiny bootstrapped policy, and states, labels and
Monte-Carlo advantages from a scripted policy (no sampling), in a few seconds; `run` runs one model
stage on them."""

from __future__ import annotations

from pathlib import Path

from scripted import ScriptedArithmeticPolicy

from stepdapo.config import load_config
from stepdapo.models import char_tokenizer
from stepdapo.stages import actor, bootstrap, critic, dpo, rft, step_dpo
from stepdapo.stages.advantages import run_advantages
from stepdapo.stages.labels import run_labels
from stepdapo.stages.states import run_states
from stepdapo.tasks.arithmetic import ArithmeticTask

TINY = ["bootstrap.max_rounds=1", "bootstrap.check_problems=40", "task.arithmetic.n_demos=640", "bootstrap.batch_size=32",
        "bootstrap.model.hidden_size=32", "bootstrap.model.num_heads=2", "bootstrap.model.num_layers=1",
        "bootstrap.model.intermediate_size=64"]
DATA = ["states.n_problems=30", "label.rollouts=16", "advantages.source=mc"]
CFG = load_config(None, TINY + DATA + ["critic.epochs=1", "actor.epochs=1", "dpo.epochs=1", "step_dpo.epochs=1",
                                       "rft.epochs=1"])
# the module whose names a test patches (Step-DPO trains through the DPO baseline's trainer)
MODULES = {"bootstrap": bootstrap, "critic": critic, "actor": actor, "dpo": dpo, "rft": rft, "step_dpo": dpo}


def make_inputs(d: Path):
    """(dir, task, scripted policy): d/policy, d/states, d/labels, d/advantages."""
    bootstrap.bootstrap(CFG, d / "policy", progress=False)
    task = ArithmeticTask(CFG.task.arithmetic)
    scripted = ScriptedArithmeticPolicy(task, char_tokenizer(), 0.3)
    run_states(CFG, "scripted", d / "states", task, progress=False, generator=scripted)
    run_labels(CFG, "scripted", d / "states", d / "labels", task, progress=False, generator=scripted)
    run_advantages(CFG, None, d / "labels", d / "advantages", task, tokenizer=char_tokenizer(), progress=False)
    return d, task, scripted


def run(name: str, inputs, out: Path, cfg=CFG) -> dict:
    d, task, _ = inputs
    if name == "bootstrap":
        return bootstrap.bootstrap(cfg, out, progress=False)
    if name == "critic":
        return critic.run_critic(cfg, d / "policy", d / "labels", out, task, progress=False)
    if name == "actor":
        return actor.run_actor(cfg, d / "policy", d / "advantages", out, progress=False)
    baseline = {"dpo": dpo, "rft": rft, "step_dpo": step_dpo}[name]
    return baseline.train(cfg, d / "policy", d, out, progress=False)  # d holds states/ and labels/
