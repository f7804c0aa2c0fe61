"""The baselines a run trains beside DAPO, on iteration 1's pi_ref and samples: a plain table.

A baseline is a stage that trains a policy from pi_ref on what the states stage sampled (its own
file under stages/, like stages/dpo.py); the pipeline trains each one the config's `baselines` lists
into `iter-1/<name>/`, evaluates it into `iter-1/<name>-eval/` as it does DAPO's policy, and the
report gives it a row; `stepdapo plan` counts its work where the entry says how. A new baseline is
one file, one entry here and, where it has settings, one config section (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stepdapo.stages import dpo


@dataclass(frozen=True)
class Baseline:
    title: str
    """its name in the report and the console (e.g. "DPO baseline")."""
    train: Callable[..., dict]
    """train(cfg, policy, states_dir, out_dir, progress) -> the stage's summary: trains from `policy`
    (pi_ref) on the solutions of `states_dir` into `out_dir`, resumable, through stepdapo.runner."""
    cannot_train: Callable[[Path], str | None] = lambda states_dir: None
    """why the baseline has nothing to train on in `states_dir` (the run reports it and goes on), or None."""
    work: Callable[..., object] | None = None
    """work(cfg, train_shapes, n_problems, assumptions) -> plan.Work: its cost for `stepdapo plan`;
    None: not estimated."""
    kind: str = "training"
    """"training": a sampling engine is shut down first, to give the trainer the accelerator's memory."""


BASELINES: dict[str, Baseline] = {
    "dpo": Baseline(title=dpo.TITLE, train=dpo.train, cannot_train=dpo.cannot_train, work=dpo.work),
}
