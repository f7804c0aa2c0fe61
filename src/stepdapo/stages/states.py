"""`stepdapo states` (stage 1): pi_ref samples solutions; kept solutions are cut into steps.

For every training problem the policy samples `samples_per_problem` solutions and keeps
`keep_per_problem`, balancing correct and incorrect ones as far as possible (distinct solutions
first). The output is one row per kept solution with its token ids and step boundaries; the states
(every prefix of a kept solution that ends at a step boundary, deduplicated within a problem) are
derived from it by `unique_states`, so the step split is computed in one place.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pyarrow as pa

from stepdapo.config import RunConfig, to_dict
from stepdapo.generation import (
    Generator,
    HFGenerator,
    SamplingParams,
    encode_prompts,
    split_steps,
)
from stepdapo.models import load_policy, model_fingerprint
from stepdapo.store import ShardedStage, read_stage
from stepdapo.tasks import verify_all

IDS = pa.list_(pa.int32())
SCHEMA = pa.schema([
    ("problem_id", pa.string()),
    ("sample_index", pa.int32()),      # which of the problem's samples this is
    ("prompt_ids", IDS),
    ("solution_ids", IDS),             # sampled tokens, EOS included when it ended there
    ("step_ends", IDS),                # end offset of each step within solution_ids
    ("text", pa.string()),
    ("correct", pa.bool_()),
    ("finish", pa.string()),           # "eos" or "length" (cut at max_new_tokens)
    ("logprob", pa.float64()),         # log pi_ref(solution | prompt)
    ("problem_n_correct", pa.int32()), # correct solutions among all samples of the problem
])
PROBLEMS_PER_SHARD = 256


def shard_seed(seed: int, stage: str, index: int) -> int:
    """Each shard samples with its own seed, so a resumed run reproduces an uninterrupted one."""
    return int.from_bytes(hashlib.sha1(f"{seed}/{stage}/{index}".encode()).digest()[:4], "big")


def select_balanced(correct: list[bool], texts: list[str], keep: int) -> list[int]:
    """Indices of `keep` samples: half correct and half incorrect where possible (the rest filled
    from the other group), distinct texts before repeats, in sample order otherwise."""
    def ordered(group):
        seen, first, repeats = set(), [], []
        for i in group:
            (repeats if texts[i] in seen else first).append(i)
            seen.add(texts[i])
        return first + repeats

    good = ordered([i for i, c in enumerate(correct) if c])
    bad = ordered([i for i, c in enumerate(correct) if not c])
    n_good = min(len(good), max(keep - len(bad), (keep + 1) // 2))
    n_bad = min(len(bad), keep - n_good)
    return sorted(good[:n_good] + bad[:n_bad])


def fingerprint(cfg: RunConfig, policy: str | Path) -> dict:
    # only the settings of the task in use: adding another task's settings must not void old runs
    return {"policy": model_fingerprint(policy), "task": cfg.task.name,
            "task_settings": to_dict(getattr(cfg.task, cfg.task.name)), "states": to_dict(cfg.states),
            "seed": cfg.seed}


def run_states(cfg: RunConfig, policy: str | Path, out_dir: str | Path, task, progress: bool = True,
               generator: Generator | None = None) -> dict:
    """Run stage 1 into `out_dir` (resuming if interrupted; a no-op if complete). `generator`
    replaces the HF policy at `policy` (tests use a scripted one)."""
    stage = ShardedStage(out_dir, "states", SCHEMA, fingerprint(cfg, policy))
    if stage.is_complete():
        return read_summary(out_dir)
    stage.start()
    c = cfg.states
    problems = task.problems("train")
    if c.n_problems is not None:
        problems = problems[:c.n_problems]
    gen = generator or HFGenerator(*load_policy(policy), task.step_delimiter, batch_size=c.batch_size,
                                   progress=progress)
    tok = gen.tokenizer
    n_shards = (len(problems) + PROBLEMS_PER_SHARD - 1) // PROBLEMS_PER_SHARD
    t0, tokens = time.perf_counter(), 0
    for si in range(n_shards):
        if stage.has_shard(si):
            continue
        chunk = problems[si * PROBLEMS_PER_SHARD:(si + 1) * PROBLEMS_PER_SHARD]
        prompts = encode_prompts(tok, [task.prompt(p, tok) for p in chunk])
        out = gen.generate(prompts, c.samples_per_problem, SamplingParams(
            temperature=c.temperature, max_new_tokens=c.max_new_tokens, stop="solution",
            seed=shard_seed(cfg.seed, "states", si)), desc=f"states {si + 1}/{n_shards}")
        tokens += sum(len(x.token_ids) for samples in out for x in samples)
        rows: dict[str, list] = {f: [] for f in SCHEMA.names}
        for p, prompt_ids, samples in zip(chunk, prompts, out):
            correct = [v.correct for v in verify_all(task, [p] * len(samples), [s.text for s in samples])]
            for i in select_balanced(correct, [s.text for s in samples], c.keep_per_problem):
                s = samples[i]
                for k, v in (("problem_id", p.id), ("sample_index", i), ("prompt_ids", prompt_ids),
                             ("solution_ids", s.token_ids), ("step_ends", split_steps(s.token_ids, gen.is_delim)),
                             ("text", s.text), ("correct", correct[i]), ("finish", s.finish),
                             ("logprob", s.logprob), ("problem_n_correct", sum(correct))):
                    rows[k].append(v)
        stage.write_shard(si, rows)
    table = stage.read_shards(n_shards)
    states = unique_states(table)
    correct = table.column("correct").to_pylist()
    n_correct_per_problem = {}
    for pid, n in zip(table.column("problem_id").to_pylist(), table.column("problem_n_correct").to_pylist()):
        n_correct_per_problem[pid] = n
    summary = {
        "problems": len(problems),
        "solutions_kept": table.num_rows,
        "kept_correct_fraction": sum(correct) / max(len(correct), 1),
        "sampled_accuracy": sum(n_correct_per_problem.values()) / max(len(problems) * c.samples_per_problem, 1),
        "problems_with_correct_and_incorrect": sum(0 < n < c.samples_per_problem for n in n_correct_per_problem.values()),
        "states": len(states),
        "seconds": time.perf_counter() - t0,
        "tokens_sampled_this_run": tokens,
    }
    stage.finish(n_shards, summary)
    return summary


def read_solutions(states_dir: str | Path) -> pa.Table:
    return read_stage(states_dir, "states", SCHEMA)


def read_summary(directory: str | Path) -> dict:
    from stepdapo.store import read_json

    return read_json(Path(directory) / "summary.json")


def unique_states(solutions: pa.Table) -> list[dict]:
    """Every prefix of every kept solution that ends at a step boundary (the prompt included),
    deduplicated by its exact token ids; in a fixed order. Each state records how many kept
    solutions pass through it, its depth (steps taken) and its problem."""
    index: dict[tuple, int] = {}
    states: list[dict] = []
    cols = {n: solutions.column(n).to_pylist() for n in ("problem_id", "prompt_ids", "solution_ids", "step_ends")}
    for pid, prompt, sol, ends in zip(cols["problem_id"], cols["prompt_ids"], cols["solution_ids"], cols["step_ends"]):
        for depth, end in enumerate([0] + ends[:-1]):
            ids = prompt + sol[:end]
            key = tuple(ids)
            if key in index:
                states[index[key]]["count"] += 1
                continue
            index[key] = len(states)
            states.append({"problem_id": pid, "ids": ids, "prompt_len": len(prompt), "depth": depth, "count": 1})
    return states
