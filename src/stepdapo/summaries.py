"""The run report's types: what `stepdapo run` returns and writes to report.json, and what the
report, the CLI and the benches read back.

Each stage's summary is typed by the fields the run's consumers read (the report's tables and plots,
the pipeline's decisions, bench/), and keeps every other field it has (`extra="allow"`), so
report.json holds the whole summary. Reading a report.json of another shape is an error that names
the file and the field (`read_report`), not a KeyError deep in a bench.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from stepdapo.errors import ArtifactError


class Summary(BaseModel):
    model_config = ConfigDict(extra="allow")


class EvalSummary(Summary):
    """stages/evaluate.py: greedy pass@1 (the paper's metric) and sampled metrics."""

    n: int
    accuracy: float
    ci95: list[float]
    sampled_accuracy: float | None = None
    sampled_ci95: list[float] | None = None
    greedy_flaw_step_accuracy: float | None = None
    greedy_other_step_accuracy: float | None = None
    greedy_well_formed: float | None = None


class LabelsSummary(Summary):
    """stages/labels.py: the Monte-Carlo values of the states."""

    states: int
    mean_mc: float
    fraction_mc_0: float
    fraction_mc_between: float
    fraction_mc_1: float


class CriticSummary(Summary):
    """stages/critic.py, plus what the pipeline decided: its held-out quality (metrics.quality: bce,
    brier, ece, AUC, step ranking, each against the constant prediction, with intervals), the same of
    its calibrated values where it fitted a map, ProcessBench's scores, its directory, and the
    check's outcome."""

    heldout: dict
    heldout_calibrated: dict | None = None
    processbench: dict | None = None
    dir: str | None = None
    warning: str | None = None
    """why the critic failed its check (the advantages then used `critic.fallback`); None: passed."""
    recovery: dict | None = None
    """the second try (critic.recovery_epochs): first_check, epochs, passed."""

    def judged(self) -> dict:
        """The held-out metrics its check judges: of its calibrated values where the stage fitted a
        map (the advantages still use the raw values), else of its raw ones."""
        return self.heldout_calibrated or self.heldout


class AdvantagesSummary(Summary):
    """stages/advantages.py: what the gap filter kept."""

    states_kept: int
    fraction_kept: float
    advantage_abs_mean: float


class ActorSummary(Summary):
    """stages/actor.py: where the log-ratios ended against their targets A/beta."""

    final_corr_log_ratio_target: float | None = None
    scatter: dict | None = None
    tokens: float | None = None


class PRMEvalSummary(Summary):
    """stages/prm_eval.py: the critic at test time; `table["<method>@<N>"]` = {mean, ci95}."""

    problems: int
    best_of_n: list[int]
    table: dict[str, dict]


class BaselineResult(Summary):
    """One baseline of `baselines` (stages/baselines.py): its training summary and evaluation, or why
    it was not trained."""

    title: str
    trains_on: str | None = None
    summary: dict | None = None
    eval: EvalSummary | None = None
    skipped: str | None = None


class Iteration(Summary):
    """One iteration of the run; iteration 0 is the starting model's evaluation alone."""

    iteration: int
    model: str | None = None
    eval: EvalSummary
    states: dict | None = None
    labels: LabelsSummary | None = None
    critic: CriticSummary | None = None
    advantages: AdvantagesSummary | None = None
    actor: ActorSummary | None = None
    prm_eval: PRMEvalSummary | None = None
    baselines: dict[str, BaselineResult] = {}
    skipped: str | None = None
    """why the actor was not trained (no state passed the gap filter): `eval` is the previous policy's."""


class RunReport(Summary):
    """report.json: the resolved config, precision, every iteration, stage timings, the final model."""

    config: dict
    precision: dict | None = None
    iterations: list[Iteration]
    timings: dict[str, float]
    final_model: str
    bootstrap: dict | None = None


def read_report(path: str | Path) -> RunReport:
    """A run's report.json, typed; an ArtifactError naming the file and field if it is not one."""
    path = Path(path)
    try:
        return RunReport.model_validate_json(path.read_bytes())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ArtifactError(f"{path}: not a stepdapo run report ({where}: {err['msg']})") from None
