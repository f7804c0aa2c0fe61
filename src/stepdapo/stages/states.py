"""`stepdapo states` (stage 1): pi_ref samples solutions; kept solutions are cut into steps.

For every training problem the policy samples `samples_per_problem` solutions and keeps
`keep_per_problem`, balancing correct and incorrect ones as far as possible (distinct solutions
first). The output is one row per kept solution with its token ids and step boundaries; the states
(every prefix of a kept solution that ends at a step boundary, deduplicated within a problem) are
derived from it by `unique_states`, so the step split is computed in one place.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from stepdapo.config import RunConfig, to_dict
from stepdapo.generation import Generator, SamplingParams, encode_prompts, policy_generator, sampler_fingerprint
from stepdapo.steps import check_step_delimiter, split_steps
from stepdapo.models import model_fingerprint
from stepdapo.runner import ShardedStage, read_stage, shard_seed
from stepdapo.tasks import task_settings, verify_all

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
            "task_settings": task_settings(cfg.task), "states": to_dict(cfg.states),
            "seed": cfg.seed, **sampler_fingerprint(cfg.generation)}


def run_states(cfg: RunConfig, policy: str | Path, out_dir: str | Path, task, progress: bool = True,
               generator: Generator | None = None) -> dict:
    """Run stage 1 into `out_dir` (resuming if interrupted; a no-op if complete). On several
    processes each samples its own shards. `generator` replaces the HF policy at `policy` (tests
    use a scripted one)."""
    stage = ShardedStage(out_dir, "states", SCHEMA, fingerprint(cfg, policy))
    if (done := stage.done()) is not None:
        return done
    c = cfg.states
    problems = task.problems("train")  # read before the stage is marked started
    if c.n_problems is not None:
        problems = problems[:c.n_problems]
    n_shards = (len(problems) + PROBLEMS_PER_SHARD - 1) // PROBLEMS_PER_SHARD
    sampler = policy_generator(policy, task.step_delimiter, c.batch_size, progress, generator, cfg.generation)

    def make_shard(si: int) -> tuple[dict, dict]:
        gen = sampler()
        check_step_delimiter(gen.tokenizer, task.step_delimiter, gen.is_delim)  # one the tokenizer splits ends no step
        chunk = problems[si * PROBLEMS_PER_SHARD:(si + 1) * PROBLEMS_PER_SHARD]
        prompts = encode_prompts(gen.tokenizer, [task.prompt(p, gen.tokenizer) for p in chunk])
        out = gen.generate(prompts, c.samples_per_problem, SamplingParams(
            temperature=c.temperature, max_new_tokens=c.max_new_tokens, stop="solution",
            seed=shard_seed(cfg.seed, "states", si)), desc=f"states {si + 1}/{n_shards}")
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
        return rows, {"tokens": sum(len(x.token_ids) for samples in out for x in samples)}

    def summarize(table: pa.Table, infos: list[dict]) -> dict:
        correct = table.column("correct").to_pylist()
        n_correct_of = dict(zip(table.column("problem_id").to_pylist(),
                                table.column("problem_n_correct").to_pylist()))
        return {
            "problems": len(problems),
            "backend": cfg.generation.backend,
            "solutions_kept": table.num_rows,
            "kept_correct_fraction": sum(correct) / max(len(correct), 1),
            "sampled_accuracy": sum(n_correct_of.values()) / max(len(problems) * c.samples_per_problem, 1),
            "problems_with_correct_and_incorrect": sum(0 < n < c.samples_per_problem for n in n_correct_of.values()),
            "states": len(unique_states(table)),
            "seconds": sum(i["seconds"] for i in infos),  # sampling time, added over shards and processes
            "tokens_sampled": sum(i["tokens"] for i in infos),
        }

    return stage.run(n_shards, make_shard, summarize)


def read_solutions(states_dir: str | Path) -> pa.Table:
    return read_stage(states_dir, "states", SCHEMA)


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
