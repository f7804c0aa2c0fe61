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
