"""Extending stepdapo touches one place: a toy task, a toy baseline and a toy sampling backend, each
defined here (the "one new file") and registered by one table entry, run through a tiny pipeline.

What each must show: the config accepts the new name (it is validated against the table, not a
hard-coded list), the pipeline uses the new piece where the built-in one would be (the task's
problems and demonstrations, the backend's sampler in every sampling stage, the baseline trained,
evaluated and reported beside DPO), and nothing else had to change."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stepdapo import pipeline
from stepdapo.config import load_config
from stepdapo.errors import ConfigError
from stepdapo.generation import BACKENDS, Backend, hf
from stepdapo.stages.baselines import BASELINES, Baseline
from stepdapo.summaries import read_report
from stepdapo.tasks import TASKS, Task
from stepdapo.tasks.arithmetic import ArithmeticConfig, ArithmeticTask


# -- a toy task: one file (here), one entry in stepdapo.tasks.TASKS ------------------------------

class ShortChainsTask(Task):
    """Two-operation arithmetic chains, as a task of its own: only the Task interface, with the
    demonstrations hook (so `stepdapo run` can bootstrap a tiny model for it)."""

    name = "short-chains"
    step_delimiter = "\n"

    def __init__(self):
        self.inner = ArithmeticTask(ArithmeticConfig(n_ops_min=2, n_ops_max=2, n_train=60, n_test=40, n_demos=3000))
        self.n_demonstrations = 3000
        self.problems_asked: set[str] = set()

    def problems(self, split):
        self.problems_asked.add(split)
        return self.inner.problems(split)

    def prompt(self, problem, tokenizer=None):
        return self.inner.prompt(problem, tokenizer)

    def verify(self, problem, completion):
        return self.inner.verify(problem, completion)

    def demonstrations(self, n=None, seed=None, exclude=frozenset()):
        return self.inner.demonstrations(n, seed, exclude)

    def sft_check_problems(self, n):
        return self.inner.sft_check_problems(n)


# -- a toy baseline: one file, one entry in stepdapo.stages.baselines.BASELINES -------------------

def copy_reference(cfg, policy, iteration, out_dir, progress=True) -> dict:
    """The "do nothing" baseline: pi_ref itself, so its evaluation must equal iteration 0's."""
    if not out_dir.is_dir():
        shutil.copytree(policy, out_dir)
    return {"copied_from": str(policy), "solutions_seen": sum(1 for _ in (iteration / "states").glob("*.parquet"))}


# -- a toy backend: one file, one entry in stepdapo.generation.BACKENDS ----------------------------

CALLS: dict[str, int] = {"make": 0, "generate": 0}


class CountingGenerator:
    """The HF sampler, counted: the samples are the HF backend's own."""

    def __init__(self, inner):
        self.inner, self.tokenizer, self.is_delim = inner, inner.tokenizer, inner.is_delim

    @property
    def last_stats(self):
        return self.inner.last_stats

    def generate(self, prompts, n, params, desc="sampling"):
        CALLS["generate"] += 1
        return self.inner.generate(prompts, n, params, desc)


def make_counting(policy, step_delimiter, engine, batch_size, progress=True):
    CALLS["make"] += 1
    return CountingGenerator(hf.make(policy, step_delimiter, engine, batch_size, progress))


TINY = ["task.name=short-chains", "generation.backend=counting", "baselines=[dpo,reference]",
        "bootstrap.max_rounds=1", "bootstrap.check_problems=20", "bootstrap.batch_size=32",
        "bootstrap.model.hidden_size=64", "bootstrap.model.num_heads=2", "bootstrap.model.num_layers=2",
        "bootstrap.model.intermediate_size=128", "states.n_problems=20", "label.rollouts=4", "eval.limit=40",
        "eval.samples=0", "critic.epochs=1", "actor.epochs=1", "dpo.epochs=1", "iterations=1"]


@pytest.fixture(scope="module")
def registered():
    task = ShortChainsTask()
    TASKS["short-chains"] = lambda task_cfg: task
    BASELINES["reference"] = Baseline(title="pi_ref itself", train=copy_reference)
    BACKENDS["counting"] = Backend(make=make_counting)
    yield task
    del TASKS["short-chains"], BASELINES["reference"], BACKENDS["counting"]


@pytest.fixture(scope="module")
def run(registered, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster
    try:
        out = tmp_path_factory.mktemp("ext") / "run"
        report = pipeline.run(load_config(None, TINY), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, report


def test_unknown_names_are_config_errors():
    for override, msg in (("task.name=nope", "unknown task 'nope'"), ("generation.backend=nope", "unknown backend"),
                          ("baselines=[dpo,nope]", "unknown baseline 'nope'"), ("baselines=[dpo,dpo]", "twice")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, [override])


def test_toy_task_runs_the_whole_method(registered, run):
    out, report = run
    assert {"train", "test"} <= registered.problems_asked  # the pipeline asked the task, not the built-in one
    boot = json.loads((out / "sft" / "stepdapo_bootstrap.json").read_text())
    assert boot["demonstrations"] == 3000  # the task's own n_demonstrations
    assert [it.iteration for it in report.iterations] == [0, 1]
    assert report.iterations[0].eval.n == 40  # 40 test problems of the toy task
    assert "short-chains" in (out / "config.yaml").read_text()


def test_toy_backend_samples_every_sampling_stage(run):
    out, _ = run
    # one sampler per (stage, policy): iteration 0's eval, states, labels, iteration 1's eval, 2 baseline evals
    assert CALLS["make"] >= 6 and CALLS["generate"] >= 6, CALLS
    states = json.loads((out / "iter-1" / "states" / "summary.json").read_text())
    assert states.get("backend") == "counting"


def test_toy_baseline_is_trained_evaluated_and_reported(run):
    out, report = run
    base = report.iterations[1].baselines
    assert list(base) == ["dpo", "reference"]
    ref = base["reference"]
    assert ref.summary["copied_from"].endswith("sft")
    # pi_ref itself, evaluated with the same seeds: iteration 0's numbers exactly
    assert ref.eval.accuracy == report.iterations[0].eval.accuracy
    assert read_report(out / "report.json").iterations[1].baselines["reference"].eval == ref.eval
    md = (out / "report.md").read_text()
    assert "| pi_ref itself (same samples as iteration 1) |" in md and "| DPO baseline (same samples" in md
    assert (out / "iter-1" / "reference-eval" / "summary.json").is_file()
