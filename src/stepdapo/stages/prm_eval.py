"""`iter-K/prm-eval`: the iteration's critic as a process reward model at test time.

N samples of each of the first `prm.problems` test problems from pi_ref (the policy whose values the
critic learnt), verified, and every sample's step values from the critic in one forward pass
(stepdapo.prm.sample_scores); then, for each N of `prm.best_of_n` (the first N samples): best-of-N by
the critic (its step values aggregated by min, last and product), the critic-weighted and the plain
majority vote, pass@N and random@1, each with a 95% bootstrap interval over problems
(stepdapo.prm.best_of_n_table). Written in shards of problems like the evaluation, resumable.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from transformers import AutoTokenizer

from stepdapo.config import RunConfig, to_dict
from stepdapo.generation import SamplingParams, policy_generator, release_engine, sampler_fingerprint
from stepdapo.models import is_log_ratio_critic, load_critic, model_fingerprint
from stepdapo.precision import training_bf16
from stepdapo.prm import AGGREGATIONS, best_of_n_table, sample_scores
from stepdapo.runner import ShardedStage, device, shard_seed
from stepdapo.training import release_memory
from stepdapo.tasks import task_settings

SCHEMA = pa.schema([("problem_id", pa.string()), ("correct", pa.list_(pa.bool_())), ("answer", pa.list_(pa.string())),
                    *[(f"score_{g}", pa.list_(pa.float64())) for g in AGGREGATIONS]])
PROBLEMS_PER_SHARD = 256


def fingerprint(cfg: RunConfig, policy: str | Path, critic_dir: str | Path) -> dict:
    return {"policy": model_fingerprint(policy), "critic": model_fingerprint(critic_dir), "task": cfg.task.name,
            "task_settings": task_settings(cfg.task), "prm": to_dict(cfg.prm), "seed": cfg.seed,
            **sampler_fingerprint(cfg.generation)}


def run_prm_eval(cfg: RunConfig, policy: str | Path, critic_dir: str | Path, out_dir: str | Path, task,
                 progress: bool = True) -> dict:
    """The test-time table of the critic at `critic_dir` on samples of `policy`, into `out_dir`
    (summary.json); split by shards of problems across processes."""
    c = cfg.prm
    stage = ShardedStage(out_dir, "prm-eval", SCHEMA, fingerprint(cfg, policy, critic_dir))
    if (done := stage.done()) is not None:
        return done
    problems = task.problems("test")[:c.problems]
    n = max(c.best_of_n)
    sampler = policy_generator(policy, task.step_delimiter, c.batch_size, progress, engine=cfg.generation)
    loaded: list = []
    # vLLM keeps gpu_memory_utilization of the GPU while it is up: with it the engine is shut down
    # before the critic is loaded to score, and the critic dropped before the next shard samples
    gives_way = cfg.generation.backend == "vllm"
    tok = AutoTokenizer.from_pretrained(critic_dir)  # the critic's (its pad id pads its batches)

    def critic_on_device():
        if gives_way:
            release_engine()
            sampler.loaded.clear()
            loaded.clear()
        if not loaded:
            critic = load_critic(critic_dir)[0]
            if is_log_ratio_critic(critic):
                critic.logits_chunk = cfg.logits_chunk_tokens
            loaded.append(critic.to(device()).eval())
        return loaded[0]

    def make_shard(si: int) -> tuple[dict, dict]:
        chunk = problems[si * PROBLEMS_PER_SHARD:(si + 1) * PROBLEMS_PER_SHARD]
        params = SamplingParams(temperature=c.temperature, max_new_tokens=c.max_new_tokens,
                                seed=shard_seed(cfg.seed, "prm-eval", si))
        # the critic scores at the precision it was judged in (the trainers')
        rows = sample_scores(sampler(), critic_on_device, tok, task, chunk, n, params, batch_size=c.batch_size,
                             max_batch_tokens=cfg.max_batch_tokens, bf16=training_bf16(cfg.bf16))
        if gives_way:
            loaded.clear()
            release_memory()
        return {f: [r[f] for r in rows] for f in SCHEMA.names}, {}

    def summarize(table: pa.Table, infos: list[dict]) -> dict:
        rows = table.to_pylist()
        return {"problems": len(rows), "samples_per_problem": n, "best_of_n": c.best_of_n,
                "policy": str(policy), "critic": str(critic_dir),
                "table": best_of_n_table(rows, c.best_of_n, seed=cfg.seed)}

    n_shards = (len(problems) + PROBLEMS_PER_SHARD - 1) // PROBLEMS_PER_SHARD
    return stage.run(n_shards, make_shard, summarize)
