"""`stepdapo evaluate`: greedy pass@1 (the paper's metric) and sampled metrics, with 95% intervals.

- greedy pass@1: one greedy solution per problem; Wilson score interval.
- sampled pass@1: `samples` solutions per problem at `temperature`; the mean over problems of the
  per-problem success rate; a percentile bootstrap interval over problems.
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), n samples, c correct.
- maj@k: the most frequent extracted answer among the first k samples is correct.
Task-specific step diagnostics (e.g. the arithmetic task's flaw-case step accuracy) are added when
the task offers `analyze(problem, completion)`.

Problems are seeded in blocks of 256 (`PROBLEMS_PER_SHARD`), a seed per block, so the numbers do not
depend on how many processes share the work, and a killed evaluation resumes at its missing shards.
With several processes the stage's shards are smaller where that cannot change the numbers, so that
every process gets one (500 problems on 8 GPUs: 8 shards of 63, not 2 of 256; `shard_size`).
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
from stepdapo.runner import MANIFEST, STARTED, ShardedStage, on_main, shard_seed, world_size
from stepdapo.store import read_json
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
"""problems per seed block, and per shard of one process."""


def shard_size(n_problems: int, processes: int, splittable: bool) -> int:
    """Problems per shard of `run_evaluate`: `PROBLEMS_PER_SHARD`, or ceil(n / processes) where that
    is smaller and a finer split cannot change the numbers (`splittable`), so that no process waits
    while others work (500 problems, 8 processes: 63, 8 shards). One process, or a size that leaves
    one shard anyway, keeps `PROBLEMS_PER_SHARD`: the layout of a one-process run does not change."""
    if not splittable or processes <= 1:
        return PROBLEMS_PER_SHARD
    size = -(-n_problems // processes)
    return size if size < min(PROBLEMS_PER_SHARD, n_problems) else PROBLEMS_PER_SHARD


def splittable(cfg: RunConfig) -> bool:
    """Whether shards smaller than a seed block give the same samples: greedy only (no seed is
    used), or a backend that seeds each prompt on its own (`make.seeds_each_prompt`, vLLM: a
    block's part is sampled with the seed offset of its first prompt). The HF sampler draws one
    random stream per call: a smaller call would draw other samples, so it keeps blocks of 256."""
    from stepdapo.generation import BACKENDS

    return cfg.eval.samples == 0 or getattr(BACKENDS[cfg.generation.backend].make, "seeds_each_prompt", False)


def shard_blocks(lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Problems [lo, hi) cut at the seed blocks' bounds: (block, start, end) for each part."""
    parts = []
    while lo < hi:
        block = lo // PROBLEMS_PER_SHARD
        end = min(hi, (block + 1) * PROBLEMS_PER_SHARD)
        parts.append((block, lo, end))
        lo = end
    return parts


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


def fingerprint(cfg: RunConfig, model_path: str | Path, problems_per_shard: int = PROBLEMS_PER_SHARD) -> dict:
    """The stage's fingerprint; the shard size only where it is not the one-process one (so the
    directories of earlier runs resume): it fixes which problems each shard file holds."""
    layout = {} if problems_per_shard == PROBLEMS_PER_SHARD else {"problems_per_shard": problems_per_shard}
    return {"model": model_fingerprint(model_path), "task": cfg.task.name,
            "task_settings": task_settings(cfg.task), "eval": to_dict(cfg.eval), "seed": cfg.seed,
            **sampler_fingerprint(cfg.generation), **layout}


def _recorded_shard_size(out_dir: Path) -> int | None:
    """The shard size of the evaluation already in `out_dir` (complete or interrupted), None if none."""
    for name in (MANIFEST, STARTED):
        if (out_dir / name).is_file():
            recorded = read_json(out_dir / name).get("fingerprint")
            if isinstance(recorded, dict):
                size = recorded.get("problems_per_shard", PROBLEMS_PER_SHARD)
                return size if isinstance(size, int) and size >= 1 else None
            return None
    return None


def run_evaluate(cfg: RunConfig, model_path: str | Path, out_dir: str | Path, task, progress: bool = True) -> dict:
    """Evaluate the model at `model_path` into the stage directory `out_dir` (summary.json is the
    `eval` object); resumable, and split by shards of problems across processes.

    The shard size (`shard_size`) is chosen when the stage starts and recorded in its fingerprint;
    a resumed or rerun stage keeps the size it was started with, whatever the number of processes
    now, so its finished shards are used and shards of two layouts are never mixed (the numbers are
    the same with either)."""
    c = cfg.eval
    out_dir = Path(out_dir)
    problems = None
    size = on_main(lambda: _recorded_shard_size(out_dir))
    if size is None:  # a new stage
        problems = eval_problems(task, c)
        size = shard_size(len(problems), world_size(), splittable(cfg))
    stage = ShardedStage(out_dir, "eval", SCHEMA, fingerprint(cfg, model_path, size))
    if (done := stage.done()) is not None:
        return done
    problems = problems if problems is not None else eval_problems(task, c)
    n_shards = (len(problems) + size - 1) // size
    sampler = policy_generator(model_path, task.step_delimiter, c.batch_size, progress, engine=cfg.generation)

    def make_shard(si: int) -> tuple[dict, dict]:
        # a part of a seed block is sampled with the seed of its block, shifted to its first prompt
        # (`seeds_each_prompt`): the samples of a whole block's call (one process, shards of 256)
        cols: dict[str, list] = {}
        info: dict = {}
        for block, start, end in shard_blocks(si * size, min((si + 1) * size, len(problems))):
            seed = shard_seed(cfg.seed, "eval", block) + (start - block * PROBLEMS_PER_SHARD) * c.samples
            part, part_info = evaluate_shard(sampler(), task, problems[start:end], c, seed)
            for k, v in part.items():
                cols.setdefault(k, []).extend(v)
            for k, v in part_info.items():
                info[k] = info.get(k, 0) + v
        return cols, info

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
