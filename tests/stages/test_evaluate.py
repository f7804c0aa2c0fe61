import itertools
import math

from stepdapo.metrics import majority_correct, pass_at_k, wilson_interval


def test_pass_at_k_matches_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                outcomes = [1] * c + [0] * (n - c)
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert math.isclose(pass_at_k(n, c, k), brute)


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3) and math.isclose(hi, 0.5962, abs_tol=1e-3)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0 and 0.1 < hi < 0.2


def test_majority():
    assert majority_correct(["3", "4", "3"], [True, False, True])
    assert not majority_correct(["4", "3", "4"], [False, True, False])
    assert not majority_correct([None, None], [False, False])
    assert majority_correct(["3", "4"], [True, False])  # tie: the first seen


# -- shards sized to the number of processes ------------------------------------------------------

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from dataclasses import replace  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from scripted import ScriptedArithmeticPolicy  # noqa: E402

import stepdapo.stages.evaluate as evaluate_module  # noqa: E402
from stepdapo.config import load_config  # noqa: E402
from stepdapo.models import char_tokenizer  # noqa: E402
from stepdapo.stages.evaluate import PROBLEMS_PER_SHARD, run_evaluate, shard_blocks, shard_size, splittable  # noqa: E402
from stepdapo.tasks import get_task  # noqa: E402


def test_shard_size_gives_every_process_a_shard_where_the_numbers_cannot_change():
    def sizes(n, procs, ok=True):
        s = shard_size(n, procs, ok)
        return [min(s, n - i) for i in range(0, n, s)]

    assert sizes(500, 8) == [63] * 7 + [59]  # 8 GPUs busy, not 2
    assert sizes(500, 1) == [256, 244] == sizes(500, 8, ok=False)  # one process: today's layout
    assert sizes(100, 1) == [100] and shard_size(100, 1, True) == PROBLEMS_PER_SHARD
    assert sizes(5, 8) == [1] * 5
    assert sizes(5000, 8) == [256] * 19 + [136]  # already more shards than processes
    assert sizes(2000, 8) == [250] * 8
    assert shard_blocks(252, 315) == [(0, 252, 256), (1, 256, 315)] and shard_blocks(0, 63) == [(0, 0, 63)]
    hf = load_config(None, ["eval.samples=4"])
    assert not splittable(hf)  # the HF sampler: one random stream per call
    assert splittable(load_config(None, ["eval.samples=0"]))  # greedy: no seed used
    assert splittable(load_config(None, ["eval.samples=4", "generation.backend=vllm"]))  # a seed per prompt


class PromptSeededPolicy(ScriptedArithmeticPolicy):
    """The scripted policy sampled as vLLM seeds it: prompt i of a call with seed + i*n alone;
    greedy depends on the prompt only. Counts the prompts it was given."""

    def __init__(self, task):
        super().__init__(task, char_tokenizer(), 0.3)
        self.prompts = 0

    def generate(self, prompts, n, params, desc=""):
        self.prompts += len(prompts)
        out = []
        for i, ids in enumerate(prompts):
            seed = hash(tuple(ids)) if params.temperature == 0 else params.seed + i * n
            out.append(super().generate([ids], n, replace(params, seed=seed))[0])
        self.last_stats = {"tokens": sum(len(s.token_ids) for ss in out for s in ss), "seconds": 0.01}
        return out


@pytest.fixture
def scripted_eval(monkeypatch):
    """run_evaluate on 500 problems with a prompt-seeded scripted policy (generation.backend=vllm);
    `procs(n)` sets the number of processes the stage sizes its shards for (this process still does
    every shard)."""
    cfg = load_config(None, ["eval.limit=500", "eval.samples=2", "eval.k=2", "generation.backend=vllm"])
    task = get_task(cfg.task)
    policy = PromptSeededPolicy(task)
    monkeypatch.setattr(evaluate_module, "policy_generator", lambda *a, **kw: lambda: policy)

    def run(out, procs):
        monkeypatch.setattr(evaluate_module, "world_size", lambda: procs)
        policy.prompts = 0
        return run_evaluate(cfg, "scripted", out, task, progress=False)

    return run, policy


def _rows(d):
    return [pq.read_table(f).num_rows for f in sorted(d.glob("shard-*.parquet"))]


def _same(a, b):
    drop = ("greedy_tokens_per_s", "sampled_tokens_per_s")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def test_eval_shards_sized_to_the_processes_give_the_one_process_numbers(scripted_eval, tmp_path):
    run, policy = scripted_eval
    one = run(tmp_path / "one", 1)
    assert _rows(tmp_path / "one") == [256, 244]
    started = json.loads((tmp_path / "one" / "started.json").read_text())["fingerprint"]
    assert "problems_per_shard" not in started  # the fingerprint of a run made before this change
    eight = run(tmp_path / "eight", 8)
    assert _rows(tmp_path / "eight") == [63] * 7 + [59]
    assert json.loads((tmp_path / "eight" / "manifest.json").read_text())["fingerprint"]["problems_per_shard"] == 63
    # shard 4 (problems 252-314) straddles the seed blocks: each part sampled with its block's seeds
    assert _same(one, eight) and 0 < one["sampled_accuracy"] < 1
    cols = ("problem_id", "greedy_text", "sampled_text")
    read = lambda d: [pq.read_table(f, columns=list(cols)).to_pylist() for f in sorted(d.glob("shard-*.parquet"))]
    assert sum(read(tmp_path / "one"), []) == sum(read(tmp_path / "eight"), [])


def test_eval_resumes_with_the_shard_size_it_started_with(scripted_eval, tmp_path):
    """A stage keeps its layout whatever the number of processes of the run that resumes it: its
    finished shards are used, no shard of another layout is written beside them."""
    run, policy = scripted_eval
    eight = run(tmp_path / "eight", 8)
    one = run(tmp_path / "one", 1)
    # a complete stage is skipped with either number of processes
    assert _same(run(tmp_path / "eight", 1), eight) and _same(run(tmp_path / "one", 8), one)
    assert policy.prompts == 0
    # interrupted stages: summary, manifest and the last shards gone
    for name, kept in (("eight", 5), ("one", 1)):
        shutil.copytree(tmp_path / name, tmp_path / f"{name}-killed")
        for f in ["manifest.json", "summary.json", *sorted(p.name for p in (tmp_path / name).glob("shard-*"))[kept:]]:
            (tmp_path / f"{name}-killed" / f).unlink()
    resumed = run(tmp_path / "eight-killed", 1)  # started on 8 processes, resumed on 1: shards of 63
    assert policy.prompts == (63 + 63 + 59) * 2  # the 3 missing shards only (a greedy and a sampled call)
    assert _rows(tmp_path / "eight-killed") == [63] * 7 + [59] and _same(resumed, eight)
    resumed = run(tmp_path / "one-killed", 8)  # started on 1 process, resumed on 8: shards of 256
    assert policy.prompts == 244 * 2
    assert _rows(tmp_path / "one-killed") == [256, 244] and _same(resumed, one)
