"""`stepdapo evaluate`: greedy pass@1 (the paper's metric) and sampled metrics, with 95% intervals.

- greedy pass@1: one greedy solution per problem; Wilson score interval.
- sampled pass@1: `samples` solutions per problem at `temperature`; the mean over problems of the
  per-problem success rate; a percentile bootstrap interval over problems.
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), n samples, c correct.
- maj@k: the most frequent extracted answer among the first k samples is correct.
Task-specific step diagnostics (e.g. the arithmetic task's flaw-case step accuracy) are added when
the task offers `analyze(problem, completion)`.

Problems are evaluated in shards of 256 with a seed per shard, so the numbers do not depend on how
many processes share the work, and a killed evaluation resumes at its first missing shard.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from stepdapo.config import EvalConfig, RunConfig, to_dict
from stepdapo.errors import StageInputError
from stepdapo.generation import HFGenerator, SamplingParams, encode_prompts, policy_generator, sampler_fingerprint
from stepdapo.metrics import bootstrap_interval, majority_correct, pass_at_k, wilson_interval
from stepdapo.models import model_fingerprint
from stepdapo.runner import ShardedStage, shard_seed
from stepdapo.tasks import task_settings, verify_all

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


SCHEMA = pa.schema([
    ("problem_id", pa.string()),
    ("greedy_text", pa.string()),
    ("greedy_correct", pa.bool_()),
    ("greedy_answer", pa.string()),          # the extracted answer (null: none)
    ("greedy_reason", pa.string()),
    ("greedy_finish", pa.string()),          # "eos" or "length"
    ("sampled_text", pa.list_(pa.string())),
    ("sampled_correct", pa.list_(pa.bool_())),
    ("sampled_answer", pa.list_(pa.string())),
])
PROBLEMS_PER_SHARD = 256


def eval_problems(task, cfg: EvalConfig) -> list:
    problems = task.problems(cfg.split)
    if cfg.limit is not None:
        problems = problems[:cfg.limit]
    if not problems:
        raise StageInputError(f"task {task.name!r} has no problems in split {cfg.split!r}")
    return problems


def evaluate_shard(gen, task, problems: list, cfg: EvalConfig, seed: int) -> tuple[dict, dict]:
    """Greedy and sampled completions of `problems`, verified: one shard's columns and its token
    counts. The sampling seed is the shard's, so the result does not depend on who evaluates it."""
    prompts = encode_prompts(gen.tokenizer, [task.prompt(p, gen.tokenizer) for p in problems])
    greedy = gen.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=cfg.max_new_tokens, seed=seed),
                          desc="eval greedy")
    info = {"greedy_tokens": gen.last_stats["tokens"], "greedy_seconds": gen.last_stats["seconds"]}
    verdicts = verify_all(task, problems, [g[0].text for g in greedy])
    cols = {"problem_id": [p.id for p in problems], "greedy_text": [g[0].text for g in greedy],
            "greedy_correct": [v.correct for v in verdicts], "greedy_answer": [v.answer for v in verdicts],
            "greedy_reason": [v.reason for v in verdicts], "greedy_finish": [g[0].finish for g in greedy],
            "sampled_text": [[] for _ in problems], "sampled_correct": [[] for _ in problems],
            "sampled_answer": [[] for _ in problems]}
    if cfg.samples > 0:
        sampled = gen.generate(prompts, cfg.samples, SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed + 1),
            desc=f"eval T={cfg.temperature:g}")
        info.update(sampled_tokens=gen.last_stats["tokens"], sampled_seconds=gen.last_stats["seconds"])
        flat = verify_all(task, [p for p in problems for _ in range(cfg.samples)],
                          [s.text for samples in sampled for s in samples])
        for i, samples in enumerate(sampled):
            vs = flat[i * cfg.samples:(i + 1) * cfg.samples]
            cols["sampled_text"][i] = [s.text for s in samples]
            cols["sampled_correct"][i] = [v.correct for v in vs]
            cols["sampled_answer"][i] = [v.answer for v in vs]
    return cols, info


def summarize(rows: dict[str, list], problems: list, task, cfg: EvalConfig, seed: int, infos: list[dict]) -> dict:
    """The `eval` object of report.json from every problem's row (rows in problem order)."""
    n = len(problems)
    correct = sum(rows["greedy_correct"])
    lo, hi = wilson_interval(correct, n)
    texts = rows["greedy_text"]
    result = {
        "accuracy": correct / n,
        "n": n,
        "ci95": [lo, hi],
        "split": cfg.split,
        "reasons": dict(Counter(_reason_kind(r) if not ok else "correct"
                                for r, ok in zip(rows["greedy_reason"], rows["greedy_correct"])).most_common()),
        "greedy_truncated": sum(f == "length" for f in rows["greedy_finish"]) / n,
        "greedy_tokens_per_s": _rate(infos, "greedy"),
        # a few to read: what the model writes is the first thing to look at when accuracy is odd
        "greedy_examples": [{"id": p.id, "completion": t, "correct": ok, "reason": r}
                            for p, t, ok, r in list(zip(problems, texts, rows["greedy_correct"],
                                                        rows["greedy_reason"]))[:5]],
    }
    result.update({f"greedy_{k}": v for k, v in _diagnostics(task, problems, texts).items()})
    if cfg.samples > 0:
        ok = rows["sampled_correct"]
        per_problem = [sum(o) / len(o) for o in ok]
        result["sampled_accuracy"] = float(np.mean(per_problem))
        result["sampled_ci95"] = list(bootstrap_interval(per_problem, seed=seed))
        result["sampled_temperature"] = cfg.temperature
        result["samples_per_problem"] = cfg.samples
        if cfg.k > 1:
            pk = [pass_at_k(len(o), sum(o), cfg.k) for o in ok]
            result[f"pass@{cfg.k}"] = float(np.mean(pk))
            result[f"pass@{cfg.k}_ci95"] = list(bootstrap_interval(pk, seed=seed))
            mj = [float(majority_correct(a[:cfg.k], o[:cfg.k])) for a, o in zip(rows["sampled_answer"], ok)]
            result[f"maj@{cfg.k}"] = float(np.mean(mj))
            result[f"maj@{cfg.k}_ci95"] = list(bootstrap_interval(mj, seed=seed))
        flat = [t for ts in rows["sampled_text"] for t in ts]
        flat_problems = [p for p in problems for _ in range(cfg.samples)]
        result.update({f"sampled_{k}": v for k, v in _diagnostics(task, flat_problems, flat).items()})
        result["sampled_tokens_per_s"] = _rate(infos, "sampled")
    return result


def _rate(infos: list[dict], kind: str) -> float:
    seconds = sum(i.get(f"{kind}_seconds", 0.0) for i in infos)
    return sum(i.get(f"{kind}_tokens", 0) for i in infos) / max(seconds, 1e-9)


def fingerprint(cfg: RunConfig, model_path: str | Path) -> dict:
    return {"model": model_fingerprint(model_path), "task": cfg.task.name,
            "task_settings": task_settings(cfg.task), "eval": to_dict(cfg.eval), "seed": cfg.seed,
            **sampler_fingerprint(cfg.generation)}


def run_evaluate(cfg: RunConfig, model_path: str | Path, out_dir: str | Path, task, progress: bool = True) -> dict:
    """Evaluate the model at `model_path` into the stage directory `out_dir` (summary.json is the
    `eval` object); resumable, and split by shards of problems across processes."""
    c = cfg.eval
    stage = ShardedStage(out_dir, "eval", SCHEMA, fingerprint(cfg, model_path))
    if (done := stage.done()) is not None:
        return done
    problems = eval_problems(task, c)
    n_shards = (len(problems) + PROBLEMS_PER_SHARD - 1) // PROBLEMS_PER_SHARD
    sampler = policy_generator(model_path, task.step_delimiter, c.batch_size, progress, engine=cfg.generation)

    def make_shard(si: int) -> tuple[dict, dict]:
        chunk = problems[si * PROBLEMS_PER_SHARD:(si + 1) * PROBLEMS_PER_SHARD]
        return evaluate_shard(sampler(), task, chunk, c, shard_seed(cfg.seed, "eval", si))

    return stage.run(n_shards, make_shard, lambda table, infos: summarize(
        table.to_pydict(), problems, task, c, cfg.seed, infos))


def evaluate(model, tokenizer, task, cfg: EvalConfig, seed: int = 0, progress: bool = True) -> dict:
    """Evaluate a loaded policy in this process (no stage directory); the same shards, seeds and
    numbers as `run_evaluate`."""
    gen = HFGenerator(model, tokenizer, task.step_delimiter, batch_size=cfg.batch_size, progress=progress)
    return evaluate_with(gen, task, cfg, seed)


def evaluate_with(gen, task, cfg: EvalConfig, seed: int = 0) -> dict:
    """`evaluate` with any sampler (`generation.Generator`: the HF sampler or a vLLM engine)."""
    problems = eval_problems(task, cfg)
    rows: dict[str, list] = {f: [] for f in SCHEMA.names}
    infos = []
    for si in range(0, len(problems), PROBLEMS_PER_SHARD):
        cols, info = evaluate_shard(gen, task, problems[si:si + PROBLEMS_PER_SHARD], cfg,
                                    shard_seed(seed, "eval", si // PROBLEMS_PER_SHARD))
        for k, v in cols.items():
            rows[k] += v
        infos.append(info)
    return summarize(rows, problems, task, cfg, seed, infos)


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
