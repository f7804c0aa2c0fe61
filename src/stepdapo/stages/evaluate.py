"""`stepdapo evaluate`: greedy pass@1 (the paper's metric) and sampled metrics, with 95% intervals.

- greedy pass@1: one greedy solution per problem; Wilson score interval.
- sampled pass@1: `samples` solutions per problem at `temperature`; the mean over problems of the
  per-problem success rate; a percentile bootstrap interval over problems.
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), n samples, c correct.
- maj@k: the most frequent extracted answer among the first k samples is correct.
Task-specific step diagnostics (e.g. the arithmetic task's flaw-case step accuracy) are added when
the task offers `analyze(problem, completion)`.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from stepdapo.config import EvalConfig
from stepdapo.generation import HFGenerator, SamplingParams, encode_prompts
from stepdapo.tasks import verify_all

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # exact at the ends: the rounding error of centre +- half must not exclude p itself
    return (0.0 if successes == 0 else lo, 1.0 if successes == n else hi)


def bootstrap_interval(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-problem values."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn without replacement from n) is correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], gold_ok: list[bool]) -> bool:
    """Is the most frequent non-empty answer a correct one? Ties go to the first seen."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return False
    best = max(counts.values())
    top = next(a for a in answers if a is not None and counts[a] == best)
    return gold_ok[answers.index(top)]


def _diagnostics(task, problems, completions) -> dict:
    tot: Counter = Counter()
    for p, c in zip(problems, completions):
        stats = task.analyze(p, c)
        if stats is None:  # the task has no step-level diagnostics
            return {}
        tot.update(stats)
    out = {"well_formed": tot["well_formed"] / max(len(problems), 1)}
    if tot["steps"]:
        out["step_accuracy"] = tot["steps_correct"] / tot["steps"]
    if tot["flaw_steps"]:
        out["flaw_step_accuracy"] = tot["flaw_steps_correct"] / tot["flaw_steps"]
    other = tot["steps"] - tot["flaw_steps"]
    if other:
        out["other_step_accuracy"] = (tot["steps_correct"] - tot["flaw_steps_correct"]) / other
    return out


def _reason_kind(reason: str) -> str:
    """"wrong answer 16 (gold 64)" -> "wrong answer": the reason without its particulars."""
    m = re.match(r"[A-Za-z][A-Za-z ]*", reason)
    return m.group(0).strip() if m else reason


def evaluate(model, tokenizer, task, cfg: EvalConfig, seed: int = 0, progress: bool = True) -> dict:
    """Evaluate a loaded policy on `task`; returns the `eval` object of report.json."""
    problems = task.problems(cfg.split)
    if cfg.limit is not None:
        problems = problems[:cfg.limit]
    if not problems:
        raise ValueError(f"task {task.name!r} has no problems in split {cfg.split!r}")
    gen = HFGenerator(model, tokenizer, task.step_delimiter, batch_size=cfg.batch_size, progress=progress)
    prompts = encode_prompts(tokenizer, [task.prompt(p, tokenizer) for p in problems])

    greedy = gen.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=cfg.max_new_tokens,
                                                     seed=seed), desc="eval greedy")
    tok_s = gen.last_stats["tokens_per_s"]
    texts = [g[0].text for g in greedy]
    verdicts = verify_all(task, problems, texts)
    correct = sum(v.correct for v in verdicts)
    lo, hi = wilson_interval(correct, len(problems))
    result = {
        "accuracy": correct / len(problems),
        "n": len(problems),
        "ci95": [lo, hi],
        "split": cfg.split,
        "reasons": dict(Counter(_reason_kind(v.reason) if not v.correct else "correct"
                                for v in verdicts).most_common()),
        "greedy_truncated": sum(g[0].finish == "length" for g in greedy) / len(problems),
        "greedy_tokens_per_s": tok_s,
        # a few to read: what the model writes is the first thing to look at when accuracy is odd
        "greedy_examples": [{"id": p.id, "completion": t, "correct": v.correct, "reason": v.reason}
                            for p, t, v in list(zip(problems, texts, verdicts))[:5]],
    }
    result.update({f"greedy_{k}": v for k, v in _diagnostics(task, problems, texts).items()})

    if cfg.samples > 0:
        sampled = gen.generate(prompts, cfg.samples, SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
            seed=seed + 1), desc=f"eval T={cfg.temperature:g}")
        flat_v = verify_all(task, [p for p in problems for _ in range(cfg.samples)],
                            [s.text for samples in sampled for s in samples])
        verdicts_of = [flat_v[i * cfg.samples:(i + 1) * cfg.samples] for i in range(len(problems))]
        ok = [[v.correct for v in vs] for vs in verdicts_of]
        per_problem = [sum(o) / len(o) for o in ok]
        result["sampled_accuracy"] = float(np.mean(per_problem))
        result["sampled_ci95"] = list(bootstrap_interval(per_problem, seed=seed))
        result["sampled_temperature"] = cfg.temperature
        result["samples_per_problem"] = cfg.samples
        if cfg.k > 1:
            pk = [pass_at_k(len(o), sum(o), cfg.k) for o in ok]
            result[f"pass@{cfg.k}"] = float(np.mean(pk))
            result[f"pass@{cfg.k}_ci95"] = list(bootstrap_interval(pk, seed=seed))
            mj = []
            for vs in verdicts_of:
                vs = vs[:cfg.k]
                mj.append(float(majority_correct([v.answer for v in vs], [v.correct for v in vs])))
            result[f"maj@{cfg.k}"] = float(np.mean(mj))
            result[f"maj@{cfg.k}_ci95"] = list(bootstrap_interval(mj, seed=seed))
        flat = [s.text for samples in sampled for s in samples]
        flat_problems = [p for p in problems for _ in range(cfg.samples)]
        result.update({f"sampled_{k}": v for k, v in _diagnostics(task, flat_problems, flat).items()})
        result["sampled_tokens_per_s"] = gen.last_stats["tokens_per_s"]
    return result


def format_table(ev: dict, title: str = "evaluation"):
    """A rich table of the headline metrics."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")

    def row(name, key, ci_key=None):
        if key in ev:
            ci = ev.get(ci_key) if ci_key else None
            table.add_row(name, f"{100 * ev[key]:.1f}%", f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")

    row(f"greedy pass@1 (n={ev['n']})", "accuracy", "ci95")
    if "sampled_accuracy" in ev:
        row(f"sampled pass@1 (T={ev['sampled_temperature']:g}, {ev['samples_per_problem']}/problem)",
            "sampled_accuracy", "sampled_ci95")
    for k in [k for k in ev if k.startswith(("pass@", "maj@")) and not k.endswith("_ci95")]:
        row(k, k, k + "_ci95")
    for k in ("greedy_truncated", "greedy_well_formed", "greedy_step_accuracy", "greedy_flaw_step_accuracy",
              "greedy_other_step_accuracy", "sampled_flaw_step_accuracy"):
        row(k.replace("_", " "), k)
    return table
