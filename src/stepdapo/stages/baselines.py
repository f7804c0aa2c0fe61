"""The baselines a run trains beside DAPO, on iteration 1's pi_ref and samples: a plain table.

A baseline is a stage that trains a policy from pi_ref on what iteration 1 sampled and labelled (its
own file under stages/, like stages/dpo.py); the pipeline trains each one the config's `baselines`
lists into `iter-1/<name>/`, evaluates it into `iter-1/<name>-eval/` as it does DAPO's policy, and the
report gives it a row; `stepdapo plan` counts its work where the entry says how. A new baseline is
one file, one entry here and, where it has settings, one config section (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stepdapo.stages import dpo, mc_dapo, rft, step_dpo


@dataclass(frozen=True)
class Baseline:
    title: str
    """its name in the report and the console (e.g. "DPO baseline")."""
    train: Callable[..., dict]
    """train(cfg, policy, iteration, out_dir, progress) -> the stage's summary: trains from `policy`
    (pi_ref) on what the iteration directory `iteration` holds (`states/`, `labels/`) into `out_dir`,
    resumable, through stepdapo.runner."""
    cannot_train: Callable[..., str | None] = lambda cfg, iteration: None
    """cannot_train(cfg, iteration) -> why the baseline has nothing to train on in the iteration
    directory (the run reports it and goes on), or None."""
    work: Callable[..., object] | None = None
    """work(cfg, train_shapes, n_problems, assumptions) -> plan.Work: its cost for `stepdapo plan`;
    None: not estimated."""
    trains_on: str = "samples"
    """what of iteration 1 it learns from, for the report: "samples" (the states stage's solutions) or
    "samples + rollouts" (also the label stage's Monte-Carlo rollouts, as DAPO)."""
    kind: str = "training"
    """"training": a sampling engine is shut down first, to give the trainer the accelerator's memory."""


BASELINES: dict[str, Baseline] = {
    "dpo": Baseline(title=dpo.TITLE, train=dpo.train, cannot_train=dpo.cannot_train, work=dpo.work),
    "step_dpo": Baseline(title=step_dpo.TITLE, train=step_dpo.train, cannot_train=step_dpo.cannot_train,
                         work=step_dpo.work, trains_on="samples + rollouts"),
    "rft": Baseline(title=rft.TITLE, train=rft.train, cannot_train=rft.cannot_train, work=rft.work),
    "mc_dapo": Baseline(title=mc_dapo.TITLE, train=mc_dapo.train, cannot_train=mc_dapo.cannot_train,
                        work=mc_dapo.work, trains_on="samples + rollouts"),
}
