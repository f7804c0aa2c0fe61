"""`stepdapo label` (stage 2): Monte-Carlo value labels and the candidate actions.

From every state s, pi_ref samples `rollouts` completions to the end; each is verified, and
MC(s) = the fraction that end correct (Math-Shepherd's soft estimate of V^{pi_ref}(s)). The first
step of each completion is kept as a candidate action for the actor, with its exact token ids, its
summed log pi_ref and the outcome of the completion it began.

Cost: each state is prefilled once and its KV cache shared by its `rollouts` samples (see
generation.py; bench/bench_sampling.py measures it against generate(num_return_sequences=m)).
Work is written in shards of `shard_size` states with a per-shard seed: a killed run resumes at the
first missing shard and reproduces exactly what an uninterrupted run would have written.
Also exported: `stepwise.parquet` in TRL's stepwise-supervision format (prompt, completions,
labels) with the soft values alongside, one row per kept solution.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from stepdapo.config import RunConfig, to_dict
from stepdapo.generation import Generator, SamplingParams, policy_generator, sampler_fingerprint
from stepdapo.steps import split_steps
from stepdapo.models import load_tokenizer, model_fingerprint
from stepdapo.runner import ShardedStage, read_stage, shard_seed, stage_fingerprint
from stepdapo.stages.states import IDS, read_solutions, unique_states
from stepdapo.store import write_parquet
from stepdapo.tasks import verify_all

SCHEMA = pa.schema([
    ("state_index", pa.int32()),
    ("problem_id", pa.string()),
    ("ids", IDS),                              # the state's tokens: prompt + steps so far
    ("prompt_len", pa.int32()),
    ("depth", pa.int32()),                     # steps taken
    ("count", pa.int32()),                     # kept solutions passing through the state
    ("mc", pa.float64()),                      # MC(s): fraction of rollouts that end correct
    ("n_correct", pa.int32()),
    ("action_ids", pa.list_(IDS)),             # first step of each rollout (EOS included if it ended)
    ("action_logprob", pa.list_(pa.float64())),  # log pi_ref(action | state), summed over tokens
    ("action_terminal", pa.list_(pa.bool_())),   # the action ends the solution
    ("action_text", pa.list_(pa.string())),
    ("outcome", pa.list_(pa.bool_())),         # the rollout that began with the action ended correct
    ("rollout_ids", pa.list_(IDS)),            # each whole rollout (its later prefixes train the critic)
])


def label_shard(states: list[dict], problems: dict, task, gen: Generator, rollouts: int,
                params: SamplingParams, desc: str = "label") -> dict[str, list]:
    """Roll out `rollouts` completions from each state; the columns of one shard."""
    tok = gen.tokenizer
    out = gen.generate([s["ids"] for s in states], rollouts, params, desc=desc)
    rows: dict[str, list] = {f: [] for f in SCHEMA.names}
    for s, samples in zip(states, out):
        problem = problems[s["problem_id"]]
        prefix = s["ids"][s["prompt_len"]:]
        acts, lps, terms, texts, outs, full = [], [], [], [], [], []
        for x in samples:
            # decode prefix + completion together: decoding them apart can differ at the seam
            text = tok.decode(prefix + x.token_ids, skip_special_tokens=True)
            end = split_steps(x.token_ids, gen.is_delim)[0]
            acts.append(x.token_ids[:end])
            lps.append(float(sum(x.token_logprobs[:end])))
            terms.append(end == len(x.token_ids) and x.finish == "eos")
            texts.append(tok.decode(x.token_ids[:end], skip_special_tokens=True))
            outs.append(text)  # verified below, all of the state's rollouts at once
            full.append(x.token_ids)
        outs = [v.correct for v in verify_all(task, [problem] * len(outs), outs)]
        for k, v in (("state_index", s["index"]), ("problem_id", s["problem_id"]), ("ids", s["ids"]),
                     ("prompt_len", s["prompt_len"]), ("depth", s["depth"]), ("count", s["count"]),
                     ("mc", sum(outs) / len(outs)), ("n_correct", sum(outs)), ("action_ids", acts),
                     ("action_logprob", lps), ("action_terminal", terms), ("action_text", texts),
                     ("outcome", outs), ("rollout_ids", full)):
            rows[k].append(v)
    return rows


def fingerprint(cfg: RunConfig, policy: str | Path, states_dir: str | Path) -> dict:
    return {"policy": model_fingerprint(policy), "states": stage_fingerprint(states_dir, "states"),
            "label": to_dict(cfg.label), "seed": cfg.seed, **sampler_fingerprint(cfg.generation)}


def run_labels(cfg: RunConfig, policy: str | Path, states_dir: str | Path, out_dir: str | Path, task,
               progress: bool = True, generator: Generator | None = None) -> dict:
    """Run stage 2 into `out_dir` (resuming if interrupted; a no-op if complete). On several
    processes each labels its own shards."""
    solutions = read_solutions(states_dir)
    stage = ShardedStage(out_dir, "labels", SCHEMA, fingerprint(cfg, policy, states_dir))
    if (done := stage.done()) is not None:
        return done
    c = cfg.label
    states = unique_states(solutions)
    for i, s in enumerate(states):
        s["index"] = i
    problems = {p.id: p for p in task.problems("train")}
    n_shards = (len(states) + c.shard_size - 1) // c.shard_size
    sampler = policy_generator(policy, task.step_delimiter, c.batch_size, progress, generator, cfg.generation)

    def make_shard(si: int) -> tuple[dict, dict]:
        gen = sampler()
        chunk = states[si * c.shard_size:(si + 1) * c.shard_size]
        params = SamplingParams(temperature=c.temperature, max_new_tokens=c.max_new_tokens, stop="solution",
                                seed=shard_seed(cfg.seed, "label", si))
        rows = label_shard(chunk, problems, task, gen, c.rollouts, params, desc=f"label {si + 1}/{n_shards}")
        return rows, {"states": len(chunk), "tokens": getattr(gen, "last_stats", {}).get("tokens", 0)}

    def summarize(table: pa.Table, infos: list[dict]) -> dict:
        tokenizer = sampler.loaded[0].tokenizer if sampler.loaded else load_tokenizer(policy)
        export_stepwise(solutions, table, task, tokenizer, Path(out_dir) / "stepwise.parquet")
        mc = table.column("mc").to_pylist()
        seconds, tokens = sum(i["seconds"] for i in infos), sum(i["tokens"] for i in infos)
        return {
            "states": len(states),
            "backend": cfg.generation.backend,
            "rollouts_per_state": c.rollouts,
            "mean_mc": sum(mc) / max(len(mc), 1),
            "fraction_mc_0": sum(v == 0 for v in mc) / max(len(mc), 1),
            "fraction_mc_1": sum(v == 1 for v in mc) / max(len(mc), 1),
            "fraction_mc_between": sum(0 < v < 1 for v in mc) / max(len(mc), 1),
            "seconds": seconds,  # sampling and verifying, added over shards and processes
            "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
        }

    return stage.run(n_shards, make_shard, summarize)


def read_labels(labels_dir: str | Path) -> pa.Table:
    return read_stage(labels_dir, "labels", SCHEMA)


def export_stepwise(solutions: pa.Table, labels: pa.Table, task, tokenizer, path: Path) -> None:
    """TRL stepwise supervision: per kept solution the prompt, its steps as `completions`, and
    `labels[t]` = MC(state after step t) > 0 (Math-Shepherd's hard estimate; the last step's is the
    verifier's verdict), with the soft values in `values`. `prompt` is the task's prompt text, the
    chat template's special tokens (<|im_start|>, <|im_end|>) included: the prompt's ids decoded
    without special tokens would leave "system\n...user\n...assistant\n", which a trainer
    re-tokenizing the export would read as plain text."""
    problems = {p.id: p for p in task.problems("train")}
    mc = {tuple(ids): v for ids, v in zip(labels.column("ids").to_pylist(), labels.column("mc").to_pylist())}
    rows: dict[str, list] = {"problem_id": [], "prompt": [], "completions": [], "labels": [], "values": []}
    cols = {n: solutions.column(n).to_pylist() for n in ("problem_id", "prompt_ids", "solution_ids", "step_ends", "correct")}
    for pid, prompt, sol, ends, correct in zip(*cols.values()):
        steps = [tokenizer.decode(sol[a:b], skip_special_tokens=True) for a, b in zip([0] + ends[:-1], ends)]
        values = [mc[tuple(prompt + sol[:e])] for e in ends[:-1]] + [float(correct)]
        rows["problem_id"].append(pid)
        rows["prompt"].append(task.prompt(problems[pid], tokenizer))
        rows["completions"].append(steps)
        rows["values"].append(values)
        rows["labels"].append([v > 0 for v in values])
    write_parquet(path, pa.table(rows))
