import pytest
import torch

from stepdapo.config import ArithmeticConfig
from stepdapo.generation import HFGenerator, SamplingParams, encode_prompts
from stepdapo.generation.hf import _choose
from stepdapo.logprobs import batched_sequence_logprobs
from stepdapo.models import load_policy
from stepdapo.tasks.arithmetic import ArithmeticTask


@pytest.fixture(scope="module")
def setup(small_model_dir):
    model, tok = load_policy(small_model_dir)
    task = ArithmeticTask(ArithmeticConfig(n_test=40))
    problems = task.problems("test")
    prompts = encode_prompts(tok, [task.prompt(p) for p in problems])
    return model, tok, task, problems, prompts


def test_one_step_stopping_returns_exactly_one_step(setup):
    model, tok, task, problems, prompts = setup
    gen = HFGenerator(model, tok, "\n", batch_size=64, progress=False)
    # from the prompt and from deeper states (prompt + first steps of a clean solution)
    states = list(prompts)
    for p, ids in zip(problems, prompts):
        steps = task.demonstration(p).split("\n")
        states.append(ids + tok("\n".join(steps[:2]) + "\n", add_special_tokens=False)["input_ids"])
    out = gen.generate(states, 4, SamplingParams(stop="step", max_new_tokens=30, seed=0))
    n_step = 0
    for samples in out:
        for s in samples:
            assert s.finish in ("step", "eos")
            if s.finish == "step":
                n_step += 1
                assert s.text.count("\n") == 1 and s.text.endswith("\n")
                assert tok.decode(s.token_ids[-1:]) == "\n"
            else:
                assert "\n" not in s.text and s.token_ids[-1] == tok.eos_token_id
    assert n_step > len(states)  # most samples are intermediate steps
    # full solutions, by contrast, have several steps
    full = gen.generate(prompts, 1, SamplingParams(stop="solution", max_new_tokens=64, seed=0))
    assert sum(f[0].text.count("\n") >= 2 for f in full) > 0.9 * len(full)


@pytest.mark.parametrize("stop,temperature,top_p", [("solution", 1.0, 1.0), ("step", 1.0, 1.0),
                                                    ("solution", 0.0, 1.0), ("solution", 0.7, 0.9)])
def test_logprobs_equal_a_separate_forward_pass(setup, stop, temperature, top_p):
    model, tok, task, problems, prompts = setup
    # prompts of different lengths in one batch exercise the left padding
    gen = HFGenerator(model, tok, "\n", batch_size=24, progress=False)
    out = gen.generate(prompts, 3, SamplingParams(temperature=temperature, top_p=top_p, stop=stop,
                                                  max_new_tokens=40, seed=5))
    flat_p = [p for p, samples in zip(prompts, out) for _ in samples]
    flat_s = [s for samples in out for s in samples]
    ref = batched_sequence_logprobs(model, flat_p, [s.token_ids for s in flat_s], tok.pad_token_id)
    got = [s.logprob for s in flat_s]
    assert torch.allclose(torch.tensor(got), torch.tensor(ref), atol=1e-3, rtol=1e-4)


def test_same_seed_same_samples(setup):
    model, tok, task, problems, prompts = setup
    gen = HFGenerator(model, tok, "\n", batch_size=64, progress=False)
    a = gen.generate(prompts, 4, SamplingParams(seed=11))
    b = gen.generate(prompts, 4, SamplingParams(seed=11))
    c = gen.generate(prompts, 4, SamplingParams(seed=12))
    key = lambda out: [[s.token_ids for s in ss] for ss in out]
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_greedy_is_argmax_and_independent_of_batching(setup):
    """Greedy decoding picks, at every position, the argmax of the model's logits given the prompt
    and the tokens before it (checked on a separate teacher-forced pass, one unpadded sequence at a
    time, with no KV cache), and gives the same tokens whatever the batch size."""
    model, tok, task, problems, prompts = setup
    g1 = HFGenerator(model, tok, "\n", batch_size=64, progress=False)
    g2 = HFGenerator(model, tok, "\n", batch_size=5, progress=False)
    params = SamplingParams(temperature=0, max_new_tokens=40)
    a = g1.generate(prompts, 1, params)
    b = g2.generate(prompts, 1, params)
    assert [x[0].token_ids for x in a] == [x[0].token_ids for x in b]
    n_tokens = 0
    for i, (prompt, (s,)) in enumerate(zip(prompts, a)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + s.token_ids])).logits[0].float()
        logits = logits[len(prompt) - 1:-1]  # row t: the logits that chose token t of the sample
        chosen = logits.gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
        best, argmax = logits.max(-1)
        # a near-tie may break either way between the cached, padded pass and this one
        bad = (chosen < best - 1e-4).nonzero().squeeze(-1).tolist()
        assert not bad, (f"prompt {i}, sample token {bad[0]}: greedy chose {s.token_ids[bad[0]]} "
                         f"(logit {chosen[bad[0]]:.4f}), the argmax is {int(argmax[bad[0]])} "
                         f"(logit {best[bad[0]]:.4f})")
        n_tokens += len(s.token_ids)
    assert n_tokens > 5 * len(prompts)  # whole solutions, not a token or two each


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(_choose(logits, SamplingParams(top_p=0.7), gen)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 alone is below 0.7; 0.5 + 0.3 reaches it
    seen = {int(_choose(logits, SamplingParams(top_p=0.1), gen)) for _ in range(50)}
    assert seen == {0}
    seen = {int(_choose(logits, SamplingParams(temperature=0), gen)) for _ in range(5)}
    assert seen == {0}


def test_generation_dtype_applies_to_the_hf_sampler_and_its_fingerprint(small_model_dir):
    from stepdapo.config import GenerationConfig
    from stepdapo.generation import hf_sampling_dtype, policy_generator, sampler_fingerprint

    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert hf_sampling_dtype(GenerationConfig(dtype=name)) == dtype  # "auto": tests/test_precision.py
    # float32 keeps the old (empty) fingerprint, so runs made before the key existed still resume
    assert sampler_fingerprint(GenerationConfig()) == {} == sampler_fingerprint(GenerationConfig(dtype="float32"))
    assert sampler_fingerprint(GenerationConfig(dtype="bfloat16")) == {"generation": {"dtype": "bfloat16"}}
    get = policy_generator(small_model_dir, "\n", 8, progress=False, engine=GenerationConfig(dtype="bfloat16"))
    gen = get()
    assert next(gen.model.parameters()).dtype == torch.bfloat16
    tok = gen.tokenizer
    out = gen.generate([tok("3+4\n")["input_ids"]], 2, SamplingParams(max_new_tokens=6, seed=0))
    assert all(len(s.token_ids) >= 1 for s in out[0])
    # its sampled log-probs are close to a float32 teacher-forced pass (bf16 rounding only)
    model32, _ = load_policy(small_model_dir)
    prompt = tok("3+4\n")["input_ids"]
    for s in out[0]:
        lp = batched_sequence_logprobs(model32, [prompt], [s.token_ids], tok.pad_token_id)[0]
        assert abs(float(lp) - s.logprob) < 0.1 * max(1.0, abs(float(lp)))


# -- the vLLM engine's start: memory given back and checked first (no real engine: vllm is faked) --

GiB = 2**30


@pytest.fixture
def fake_engine(monkeypatch):
    """A fake `vllm` module and CUDA: `calls` records, in order, what was freed, queried and built;
    `gpu["free"]` / `gpu["total"]` are what torch.cuda.mem_get_info answers."""
    import gc
    import sys
    import types

    import stepdapo.generation.vllm as vllm_backend

    calls, gpu = [], {"free": 79 * GiB, "total": 80 * GiB, "allocated": 0, "available": True, "initialized": True}

    class LLM:
        def __init__(self, **kw):
            calls.append(("LLM", kw))

    class HeldEngine:  # an engine this process already holds
        def close(self):
            calls.append("close")

    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", fake)
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: (calls.append("gc.collect"), collect(*a))[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu["available"])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: gpu["initialized"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gpu["allocated"])

    def mem_get_info(device=None):
        calls.append(("mem_get_info", device))
        return gpu["free"], gpu["total"]

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setitem(vllm_backend._ENGINE, "gen", HeldEngine())
    monkeypatch.setitem(vllm_backend._ENGINE, "key", "an earlier policy")
    yield calls, gpu
    vllm_backend._ENGINE.clear()


def _engine_settings(**kw):
    from stepdapo.config import GenerationConfig

    return GenerationConfig(backend="vllm", dtype="float32", **kw)


def test_vllm_engine_start_frees_memory_then_builds_with_the_configured_utilization(small_model_dir, fake_engine):
    from stepdapo.generation import vllm_generator

    calls, gpu = fake_engine
    gen = vllm_generator(small_model_dir, "\n", _engine_settings(gpu_memory_utilization=0.6), progress=False)
    names = [c if isinstance(c, str) else c[0] for c in calls]
    # the held engine is shut down, unreferenced objects and torch's cache freed, then free memory read
    assert names.index("close") < names.index("gc.collect") < names.index("empty_cache") \
        < names.index("mem_get_info") < names.index("LLM") == len(names) - 1
    assert ("mem_get_info", 0) in calls  # the engine's GPU: the first, for one process
    assert calls[-1][1]["gpu_memory_utilization"] == 0.6
    gen.close()


def test_vllm_engine_start_with_too_little_free_memory_says_what_to_change(small_model_dir, fake_engine):
    from stepdapo.errors import ConfigError
    from stepdapo.generation.vllm import VLLMGenerator

    calls, gpu = fake_engine
    gpu.update(free=40 * GiB, allocated=30 * GiB)  # a trainer's model, still referenced, holds 30 GiB
    with pytest.raises(ConfigError) as e:
        VLLMGenerator(small_model_dir, "\n", _engine_settings(gpu_memory_utilization=0.85), progress=False)
    msg = str(e.value)
    # needed: 0.85 x 80 + 1 (the engine's CUDA context) = 69.0 GiB; fits: (40 - 1) / 80 = 0.4875 -> 0.48
    for part in ("generation.gpu_memory_utilization=0.85", "69.0 GiB free on GPU 0", "its 80.0 GiB",
                 "40.0 GiB is free", "30.0 GiB of tensors", "at most 0.48", "generation.gpu_memory_utilization=0.48",
                 "rerun the same command", "stepdapo evaluate"):
        assert part in msg, (part, msg)
    assert not any(c[0] == "LLM" for c in calls if not isinstance(c, str))  # no engine was started
    assert "close" in calls  # the held engine was given back before the check
    # exactly enough (0.48 x 80 + 1 <= 40) starts; nearly nothing free: no value to suggest
    VLLMGenerator(small_model_dir, "\n", _engine_settings(gpu_memory_utilization=0.48), progress=False).close()
    gpu.update(free=int(1.5 * GiB), allocated=0)
    with pytest.raises(ConfigError, match="no lower value leaves the engine room") as e:
        VLLMGenerator(small_model_dir, "\n", _engine_settings(), progress=False)
    assert "of tensors" not in str(e.value)


@pytest.mark.parametrize("available,initialized", [(False, False), (True, False)])
def test_vllm_engine_start_checks_nothing_without_cuda_or_cuda_memory_of_ours(small_model_dir, fake_engine,
                                                                               available, initialized):
    """Without CUDA nothing is checked; nor in a process that never used CUDA (it holds nothing, and
    querying would create a CUDA context)."""
    from stepdapo.generation.vllm import VLLMGenerator

    calls, gpu = fake_engine
    gpu.update(free=0, available=available, initialized=initialized)
    VLLMGenerator(small_model_dir, "\n", _engine_settings(), progress=False)
    assert not [c for c in calls if c[0] == "mem_get_info"] and calls[-1][0] == "LLM"


def test_vllm_engine_gpus_checked_are_the_engines_own(monkeypatch):
    from stepdapo.generation.vllm import _engine_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert _engine_gpus(1) == [0] and _engine_gpus(2) == [0, 1]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _engine_gpus(1) == [1] and _engine_gpus(2) == [2, 3]
