"""The Task base class: every task (built-in arithmetic, GSM8K/MATH, code) looks like this to the
stages.

A task gives the problems of a split with stable ids, turns a problem into the prompt text the policy
sees, names the step delimiter, and verifies a completion. Nothing else in the pipeline knows what
the task is about. Optional features have defaults here: batch verification (`verify_many`),
step-level diagnostics for the evaluation report (`analyze`) and single-step judgements for the
critic's step-ranking check (`step_is_correct`, where `supports_step_checks`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from stepdapo.errors import ConfigError


@dataclass(frozen=True)
class Problem:
    """One problem. `id` is stable across runs and machines; `answer` is the gold answer as text."""

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one completion."""

    correct: bool
    answer: str | None  # the answer extracted from the completion, None if there is none
    reason: str  # "correct", "wrong answer ...", "no answer line", ...


class Task(ABC):
    """Subclass it: set `name` and `step_delimiter`, implement `problems`, `prompt` and `verify`,
    and override the optional methods below where the task can do better than their defaults."""

    name: str
    step_delimiter: str  # a step ends with the token that contains this string (the paper: "\n")
    supports_step_checks = False  # True where `step_is_correct` is implemented

    @abstractmethod
    def problems(self, split: str) -> list[Problem]:
        """The problems of `split` ("train" or "test"), in a fixed order."""

    @abstractmethod
    def prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        """The text the policy is conditioned on (chat template applied where the model has one)."""

    @abstractmethod
    def verify(self, problem: Problem, completion: str) -> Verdict:
        """Is `completion` (the generated text after the prompt) a correct solution?"""

    def verify_many(self, pairs: Iterable[tuple[Problem, str]]) -> list[Verdict]:
        """`verify` for many (problem, completion) pairs, in order. Overridden where a batch is
        cheaper: the math tasks send one batch to their verifier process, the code task runs
        sandboxes in parallel."""
        return [self.verify(p, c) for p, c in pairs]

    def analyze(self, problem: Problem, completion: str) -> dict[str, int] | None:
        """Step-level diagnostics of one completion for the evaluation report, as counts (`steps`,
        `steps_correct`, `flaw_steps`, `flaw_steps_correct`, `well_formed`); None where the task
        has none."""
        return None

    def reference_solution(self, problem: Problem) -> str | None:
        """A worked solution of `problem` in the policy's format, if the data has one (`stepdapo
        plan` counts its steps and tokens when no pilot sampled any): by default a `solution` in
        the problem's metadata (GSM8K's worked answer, MATH's solution)."""
        solution = problem.meta.get("solution")
        return solution if isinstance(solution, str) else None

    def processbench_rows(self, split: str, n: int, seed: int = 0) -> list[dict] | None:
        """Solutions whose earliest wrong step is known exactly, in ProcessBench's format (`id`,
        `problem`, `steps`, `label`: that step's index or -1, `final_answer_correct`), to judge a
        critic as a process reward model (`stepdapo prm eval`, the critic stage's report); None
        where the task cannot make them."""
        return None

    n_demonstrations: int | None = None  # demonstrations a bootstrap round trains on; None: the task has none

    def demonstrations(self, n: int | None = None, seed: int | str | None = None,
                       exclude: set[str] = frozenset()) -> list[tuple[Problem, str]]:
        """`n` (default `n_demonstrations`) (problem, solution) pairs in the policy's format for the
        bootstrap SFT, none of whose question is in `exclude`; `seed` draws another set (the
        bootstrap's later rounds). Only for tasks with `n_demonstrations` set: the others need a
        starting model."""
        raise NotImplementedError(f"task {self.name!r} has no demonstrations")

    def sft_check_problems(self, n: int) -> list[Problem]:
        """`n` training-split problems the bootstrap judges its SFT model on (kept out of its
        demonstrations). Only for tasks with demonstrations."""
        raise NotImplementedError(f"task {self.name!r} has no demonstrations")

    def step_is_correct(self, problem: Problem, prefix: str, step: str) -> bool:
        """Is `step` the right next step after the solution text `prefix`? Only for tasks with
        `supports_step_checks`; the others cannot judge a single step."""
        raise NotImplementedError(f"task {self.name!r} cannot judge single steps")


def verify_all(task: Task, problems: list[Problem], completions: list[str]) -> list[Verdict]:
    """Verify many completions at once (see `Task.verify_many`)."""
    return task.verify_many(list(zip(problems, completions)))


def _arithmetic(task_cfg) -> Task:
    from stepdapo.tasks.arithmetic import ArithmeticTask

    return ArithmeticTask(task_cfg.arithmetic)


def _math(task_cfg) -> Task:
    from stepdapo.tasks.math import MathTask

    return MathTask(getattr(task_cfg, task_cfg.name), name=task_cfg.name)


def _code(task_cfg) -> Task:
    from stepdapo.tasks.code import CodeTask

    return CodeTask(task_cfg.code)


# The tasks `task.name` can name: a function building the task from the config's `task` section
# (its settings are the section's field of the same name, where the task has any). A new task is
# one file and one entry here (docs/extending.md); the modules are imported only when used.
TASKS: dict[str, Callable[[Any], Task]] = {
    "arithmetic": _arithmetic,
    "gsm8k": _math,
    "math": _math,
    "code": _code,
}


def get_task(task_cfg) -> Task:
    """Build the task named by a `TaskConfig`."""
    if task_cfg.name not in TASKS:
        raise ConfigError(f"unknown task {task_cfg.name!r}; known: {', '.join(TASKS)}")
    return TASKS[task_cfg.name](task_cfg)


def task_settings(task_cfg) -> dict:
    """The named task's own settings (its section of `task`, as a dict; {} for a task without
    any): what the stages' fingerprints hold of the task, so another task's settings change nothing."""
    section = getattr(task_cfg, task_cfg.name, None)
    return section.model_dump() if section is not None else {}
