"""The Task protocol: every task (built-in arithmetic, GSM8K/MATH, code) looks like this to the stages.

A task gives the problems of a split with stable ids, turns a problem into the prompt text the policy
sees, names the step delimiter, and verifies a completion. Nothing else in the pipeline knows what
the task is about.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


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


@runtime_checkable
class Task(Protocol):
    name: str
    step_delimiter: str  # a step ends with the token that contains this string (the paper: "\n")

    def problems(self, split: str) -> list[Problem]:
        """The problems of `split` ("train" or "test"), in a fixed order."""

    def prompt(self, problem: Problem, tokenizer: Any) -> str:
        """The text the policy is conditioned on (chat template applied where the model has one)."""

    def verify(self, problem: Problem, completion: str) -> Verdict:
        """Is `completion` (the generated text after the prompt) a correct solution?"""


def verify_all(task: Task, problems: list[Problem], completions: list[str]) -> list[Verdict]:
    """Verify many completions at once: through the task's `verify_many` where it has one (the math
    tasks send one batch to their verifier process, the code task runs sandboxes in parallel)."""
    if hasattr(task, "verify_many"):
        return list(task.verify_many(list(zip(problems, completions))))
    return [task.verify(p, c) for p, c in zip(problems, completions)]


TASKS = ("arithmetic", "gsm8k", "math", "code")


def get_task(task_cfg) -> Task:
    """Build the task named by a `TaskConfig`."""
    if task_cfg.name == "arithmetic":
        from stepdapo.tasks.arithmetic import ArithmeticTask

        return ArithmeticTask(task_cfg.arithmetic)
    if task_cfg.name in ("gsm8k", "math"):
        from stepdapo.tasks.math import MathTask

        return MathTask(getattr(task_cfg, task_cfg.name), name=task_cfg.name)
    if task_cfg.name == "code":
        from stepdapo.tasks.code import CodeTask

        return CodeTask(task_cfg.code)
    raise ValueError(f"unknown task {task_cfg.name!r}; known: {list(TASKS)}")
