"""The DAPO-with-Monte-Carlo-advantages baseline: the paper's ablation, as a stage beside DAPO.

The same actor (stages/actor.py) from the same pi_ref on the same labels, with one change: each
sampled action s + a is valued by the pooled Monte-Carlo value of the rollouts through it
(`advantages.source: mc`) instead of the critic. A run that trains both measures what the learned
critic adds over the labels it was trained on. Its advantages are written to `iter-1/mc-advantages/`
(the Step-DPO baseline reads the same table); its config section `mc_dapo` may give the actor
another beta or learning rate, so that it can be tuned like every other baseline.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from stepdapo.config import RunConfig
from stepdapo.models import check_model_dir
from stepdapo.stages.actor import run_actor
from stepdapo.stages.advantages import run_advantages
from stepdapo.tasks import get_task

TITLE = "DAPO, Monte-Carlo advantages"


def mc_advantages(cfg: RunConfig, policy: str | Path, iteration: Path, progress: bool = True) -> Path:
    """The iteration's advantages from Monte-Carlo values, made once into `iteration/mc-advantages`
    (a second caller, or a resumed run, finds them done)."""
    out = Path(iteration) / "mc-advantages"
    mc_cfg = cfg.model_copy(update={"advantages": cfg.advantages.model_copy(update={"source": "mc"})})
    run_advantages(mc_cfg, None, Path(iteration) / "labels", out, get_task(cfg.task),
                   tokenizer=AutoTokenizer.from_pretrained(policy), progress=progress)
    return out


def actor_config(cfg: RunConfig) -> RunConfig:
    """The run config with the actor's beta and learning rate replaced by `mc_dapo`'s where given."""
    update = {k: v for k, v in (("beta", cfg.mc_dapo.beta), ("lr", cfg.mc_dapo.lr)) if v is not None}
    return cfg.model_copy(update={"actor": cfg.actor.model_copy(update=update)})


def train(cfg: RunConfig, policy: str | Path, iteration: str | Path, out_dir: str | Path,
          progress: bool = True) -> dict:
    """DAPO's actor from `policy` on Monte-Carlo advantages of the iteration's labels."""
    check_model_dir(policy)  # a broken model is an error before anything is read or written
    adv = mc_advantages(cfg, policy, Path(iteration), progress)
    return run_actor(actor_config(cfg), policy, adv, out_dir, progress)


def cannot_train(cfg: RunConfig, iteration: Path) -> str | None:
    if cfg.advantages.source == "mc":
        return "DAPO itself uses Monte-Carlo advantages here (advantages.source: mc): the baseline would be the same run"
    return None


def work(cfg: RunConfig, train_shapes: list, n_problems: int, a):
    """The actor's work (plan.iteration_work) under the baseline's settings; Monte-Carlo values
    need no forward pass."""
    from dataclasses import replace

    from stepdapo.plan import iteration_work

    actor = next(w for w in iteration_work(1, actor_config(cfg), train_shapes, n_problems, a)
                 if w.stage.endswith("/actor"))
    return replace(actor, stage="iter-1/mc_dapo", notes=actor.notes + ["the advantages from Monte-Carlo values"])
