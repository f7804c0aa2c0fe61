"""What lets a real model (128k-152k vocabularies, 8B parameters) fit: log-probs from hidden states a
chunk of positions at a time (stepdapo.logprobs.token_logprobs), forward-only passes batched by a
token budget, gradient checkpointing in every trainer, float32 master weights whatever the
checkpoint's dtype, reference log-probs at the trainers' precision and split over processes.

Each test compares against the plain computation (values AND gradients) or measures the bound
(peak memory of a subprocess), so a wrong chunk boundary, a dropped position, a checkpoint that
changes the gradient or a path that still builds the [N, T, V] float32 logits fails here.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stepdapo.logprobs import (
    batched_grouped_logprobs,
    batched_sequence_logprobs,
    sequence_logprobs,
    token_batches,
    token_logprobs,
)
from stepdapo.models import LogRatioCritic, critic_logits, critic_values

V, PAD = 40, 0


def _policy(seed=0, vocab=V, tie=False):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        pad_token_id=PAD, initializer_range=0.2, tie_word_embeddings=tie)).eval()


def _pairs(seed=1, n=7):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(1, V, (k,), generator=g).tolist()  # noqa: E731
    prompts = [rand(k) for k in (5, 9, 5, 12, 3, 9, 1)][:n]
    prompts[2] = prompts[0]  # a shared prompt
    completions = [rand(k) for k in (3, 6, 2, 1, 7, 4, 5)][:n]
    return prompts, completions


def _value_and_grads(model, fn):
    model.zero_grad()
    values = fn(model)
    (values.float() * torch.linspace(-1.0, 2.0, len(values))).sum().backward()
    return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol=1e-5):
    va, ga = a
    vb, gb = b
    assert torch.allclose(va, vb, rtol=tol, atol=tol), (va - vb).abs().max()
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.allclose(ga[k], gb[k], rtol=1e-4, atol=1e-5 * (1 + gb[k].abs().max())), k


# -- chunked log-probs --------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_token_logprobs_equal_log_softmax_values_and_gradients(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    feats = torch.randn(5, 7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (5, 7))

    def plain():
        return torch.log_softmax(head(feats).float(), -1).gather(-1, targets[..., None]).squeeze(-1)

    def chunked():
        return token_logprobs(feats, targets, head, chunk)

    got = []
    for fn in (plain, chunked):
        head.zero_grad()
        feats.grad = None
        out = fn()
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        got.append((out.detach(), feats.grad.clone(), head.weight.grad.clone()))
    for a, b in zip(*got):
        assert torch.allclose(a, b, atol=1e-5)
    assert got[0][0].shape == (5, 7)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_chunked_sequence_logprobs_equal_the_models_own_logits(shared, tie):
    """logits_chunk_tokens=0 takes HF's logits (the old path); chunks of 1 and 5 positions must give
    the same log-probs and the same gradient w.r.t. every parameter (tied embeddings included)."""
    model, (prompts, completions) = _policy(tie=tie), _pairs()
    plain = _value_and_grads(model, lambda m: sequence_logprobs(m, prompts, completions, PAD, shared, logits_chunk=0))
    for chunk in (1, 5):
        _close(_value_and_grads(model, lambda m: sequence_logprobs(m, prompts, completions, PAD, shared,
                                                                    logits_chunk=chunk)), plain)


def test_log_ratio_critic_chunked_equals_plain():
    policy = _policy()
    critic = LogRatioCritic(policy, _policy(), torch.nn.Linear(32, 1), 0.5, ".")
    seqs = [p + c for p, c in zip(*_pairs())]
    plens = [len(p) for p in _pairs()[0]]
    got = {}
    for chunk in (0, 2):
        critic.logits_chunk = chunk
        got[chunk] = _value_and_grads(critic, lambda m: critic_logits(m, seqs, PAD, prompt_lens=plens))
    _close(got[2], got[0])


def test_an_architecture_with_scaled_logits_is_refused_not_silently_wrong():
    """A model whose logits are not its output projection of the last hidden state (e.g. a logit
    scale or soft cap) would get wrong log-probs from the chunked path: it is detected."""
    model, (prompts, completions) = _policy(), _pairs()
    orig = model.forward

    def scaled(*a, **kw):  # e.g. Cohere's logit_scale, applied after the output projection
        out = orig(*a, **kw)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled
    with pytest.raises(ValueError, match="logits_chunk_tokens=0"):
        sequence_logprobs(model, prompts, completions, PAD)
    assert sequence_logprobs(model, prompts, completions, PAD, logits_chunk=0).shape == (len(prompts),)


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from stepdapo.logprobs import batched_sequence_logprobs
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab, chunk, grad = 128256, int(sys.argv[1]), sys.argv[2] == "grad"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024))
    rows, length = 8, 256  # 2048 scored positions: their float32 logits are 1.05 GB
    prompts = torch.randint(1, vocab, (rows, 1)).tolist()
    completions = torch.randint(1, vocab, (rows, length)).tolist()
    from stepdapo.logprobs import sequence_logprobs
    sequence_logprobs(model, prompts[:1], [completions[0][:4]], logits_chunk=chunk)  # warm up the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if grad:
        model.train()
        sequence_logprobs(model, prompts, completions, logits_chunk=chunk).sum().backward()
    else:
        batched_sequence_logprobs(model, prompts, completions, logits_chunk=chunk)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mb": (after - before) / 1024}))
""")


def _peak_growth_mb(chunk: int, mode: str) -> float:
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(chunk), mode], capture_output=True, text=True,
                       timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **_pythonpath()})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_growth_mb"]


def _pythonpath():
    import os

    return {"PYTHONPATH": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"),
            "HOME": os.environ.get("HOME", "/tmp")}


@pytest.mark.parametrize("mode", ["scoring", "grad"])
def test_peak_memory_is_bounded_by_the_chunk_not_by_the_vocabulary_times_tokens(mode):
    """2048 positions x a 128k vocabulary: their float32 logits alone are 1.05 GB, and the old path
    (HF's logits, then log_softmax) holds two or three such tensors. With chunks of 128 positions
    (66 MB of logits each) the pass must stay under 450 MB of growth in the process's peak; the old
    path must exceed 2 GB (so the probe measures what it claims)."""
    chunked = _peak_growth_mb(128, mode)
    plain = _peak_growth_mb(0, mode)
    assert chunked < 450, chunked
    assert plain > 2000, plain


# -- token budgets ------------------------------------------------------------------------------------

def test_token_batches_respect_the_budget_and_cover_every_row():
    lengths = [5, 300, 17, 17, 90, 1, 64, 64, 64, 2000, 3]
    batches = token_batches(lengths, 256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 256
    assert [9] in batches and [1] in batches or any(9 in b for b in batches)
    assert all(len(b) <= 2 for b in token_batches(lengths, 10**6, max_rows=2))


def test_forward_only_passes_stay_within_max_batch_tokens(monkeypatch):
    """Every batch the scoring passes run (plain, shared-prefix and critic) is within the budget;
    the values do not depend on it."""
    import stepdapo.logprobs as lp
    import stepdapo.models as models

    model, (prompts, completions) = _policy(), _pairs()
    seen = []
    real = lp.forward_hidden

    def spy(m, chunk, keep, **inputs):
        seen.append(inputs["input_ids"].numel())
        return real(m, chunk, keep, **inputs)

    monkeypatch.setattr(lp, "forward_hidden", spy)
    wide = batched_sequence_logprobs(model, prompts, completions, PAD, max_batch_tokens=10**6)
    seen.clear()
    narrow = batched_sequence_logprobs(model, prompts, completions, PAD, max_batch_tokens=24)
    assert len(seen) > 2 and max(seen) <= max(24, max(len(p) + len(c) for p, c in zip(prompts, completions)))
    assert narrow == pytest.approx(wide, abs=1e-5)
    grouped = batched_grouped_logprobs(model, prompts, completions, PAD, max_batch_tokens=24)
    assert grouped == pytest.approx(wide, abs=1e-5)

    shapes = []
    real_logits = models.critic_logits

    def spy_logits(m, seqs, pad, *a, **kw):
        shapes.append(len(seqs) * max(len(s) for s in seqs))
        return real_logits(m, seqs, pad, *a, **kw)

    monkeypatch.setattr(models, "critic_logits", spy_logits)
    critic = LogRatioCritic(_policy(), _policy(), torch.nn.Linear(32, 1), 0.5, ".")
    seqs = [p + c for p, c in zip(prompts, completions)]
    plens = [len(p) for p in prompts]
    all_at_once = critic_values(critic, seqs, PAD, prompt_lens=plens, max_batch_tokens=10**6)
    shapes.clear()
    budgeted = critic_values(critic, seqs, PAD, prompt_lens=plens, max_batch_tokens=30)
    assert len(shapes) > 2 and max(shapes) <= max(30, max(len(s) for s in seqs))
    assert budgeted == pytest.approx(all_at_once, abs=1e-5)
    shapes.clear()
    lens = [len(p) for p in prompts]
    grouped = critic_values(critic, seqs, PAD, prompt_lens=plens, prefix_lens=lens, max_batch_tokens=30)
    assert max(shapes) <= max(30, max(len(s) for s in seqs))
    assert grouped == pytest.approx(all_at_once, abs=1e-5)


# -- gradient checkpointing ---------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_prefixes_equal_per_pair_rows(attention):
    """Each prefix and its continuations packed into one row under a 4-D mask (an empty continuation
    included): the per-pair values and gradients, with either attention implementation."""
    from stepdapo.logprobs import group_pairs, packed_sequence_logprobs

    model, (prompts, completions) = _policy(), _pairs()
    model.config._attn_implementation = attention
    completions[3] = []
    prefixes, members = group_pairs(prompts)
    order = [i for m in members for i in m]
    plain = _value_and_grads(model, lambda m: sequence_logprobs(m, [prompts[i] for i in order],
                                                                [completions[i] for i in order], PAD))
    packed = _value_and_grads(model, lambda m: packed_sequence_logprobs(
        m, prefixes, [[completions[i] for i in g] for g in members], PAD, logits_chunk=3))
    _close(packed, plain)


@pytest.mark.parametrize("shared", [False, True, "rows"])
def test_checkpointed_training_equals_uncheckpointed(shared, monkeypatch):
    """Loss and gradients with every layer checkpointed equal those without; shared prefixes (no KV
    cache under checkpointing) are packed into one row per prefix, or ("rows": an attention that
    takes no 4-D mask) run a row per pair, with the same result."""
    import stepdapo.logprobs as lp

    if shared == "rows":
        monkeypatch.setattr(lp, "packs", lambda model: False)
    shared = bool(shared)
    model, (prompts, completions) = _policy().train(), _pairs()
    plain = _value_and_grads(model, lambda m: sequence_logprobs(m, prompts, completions, PAD, shared, logits_chunk=3))
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5.2x
    enable({"use_reentrant": False}) if enable else \
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = _value_and_grads(model, lambda m: sequence_logprobs(m, prompts, completions, PAD, shared,
                                                                        logits_chunk=3))
    _close(checkpointed, plain)


def test_checkpointed_log_ratio_critic_equals_uncheckpointed():
    critic = LogRatioCritic(_policy(), _policy(), torch.nn.Linear(32, 1), 0.5, ".").train()
    seqs = [p + c for p, c in zip(*_pairs())]
    plens = [len(p) for p in _pairs()[0]]
    plain = _value_and_grads(critic, lambda m: critic_logits(m, seqs, PAD, prompt_lens=plens))
    critic.activation_checkpointing_enable({"use_reentrant": False})
    assert critic.policy.is_gradient_checkpointing if not hasattr(type(critic.policy), "is_activation_checkpointing") \
        else critic.policy.is_activation_checkpointing
    _close(_value_and_grads(critic, lambda m: critic_logits(m, seqs, PAD, prompt_lens=plens)), plain)


def test_training_args_turn_checkpointing_on_in_the_trainer(tmp_path):
    """The config's `gradient_checkpointing` reaches the model through the Trainer (under the
    argument's name in the installed transformers), non-reentrant."""
    from transformers import Trainer

    from stepdapo.training import training_args

    name = "is_activation_checkpointing" if hasattr(LlamaForCausalLM, "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    data = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]
    for on in (True, False):
        model = _policy()
        args = training_args(tmp_path / str(on), steps=1, batch_size=1, lr=1e-3, seed=0, report_to=[],
                             progress=False, run_name="t", gradient_checkpointing=on, use_cpu=True)
        Trainer(model=model, args=args, train_dataset=data).train()  # the Trainer enables it when training starts
        assert getattr(model, name) == on


# -- precision ----------------------------------------------------------------------------------------

def test_training_loads_float32_master_weights_from_a_bf16_checkpoint(tmp_path):
    """Checkpoints on the hub are bf16; transformers 5 loads them as bf16 by default, and AdamW on
    bf16 weights loses updates of 1e-5. Every loader a trainer uses gives float32."""
    from transformers import AutoModelForSequenceClassification

    from stepdapo.models import char_tokenizer, load_critic, load_policy
    from stepdapo.stages.critic import new_critic
    from stepdapo.config import CriticConfig

    d = tmp_path / "bf16"
    _policy().to(torch.bfloat16).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    assert json.loads((d / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    models = {"policy": load_policy(d)[0],
              "log_ratio_critic": new_critic(d, PAD, CriticConfig(log_ratio_beta=0.5), 0.5, False),
              "value_critic": new_critic(d, PAD, CriticConfig(log_ratio_beta=0.0), 0.5, False)}
    models["log_ratio_critic"].save_pretrained(tmp_path / "lrc")
    char_tokenizer().save_pretrained(tmp_path / "lrc")
    models["reloaded_log_ratio_critic"] = load_critic(tmp_path / "lrc")[0]
    models["value_critic"].save_pretrained(tmp_path / "vc")
    char_tokenizer().save_pretrained(tmp_path / "vc")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "vc")  # loadable as saved
    models["reloaded_value_critic"] = load_critic(tmp_path / "vc")[0]
    for name, m in models.items():
        assert {p.dtype for p in m.parameters()} == {torch.float32}, name


def test_reference_logprobs_are_computed_at_the_trainers_precision(tmp_path):
    """Under bf16 training the policy's log-probs are bf16-autocast; a float32 reference would start
    the log-ratio away from 0 by the bf16 rounding. `ref_logprobs` uses the trainers' precision."""
    from stepdapo.config import load_config
    from stepdapo.runner import ModelStage
    from stepdapo.stages.actor import ref_logprobs

    model, (prompts, completions) = _policy(), _pairs()
    stage = ModelStage(tmp_path / "actor", "actor", {})
    stage.work_dir.mkdir(parents=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        training = sequence_logprobs(model, prompts, completions, PAD, True).float()
    float32 = sequence_logprobs(model, prompts, completions, PAD, True)
    ref = torch.tensor(ref_logprobs(stage, model, prompts, completions, PAD, "cpu", True,
                                    load_config(None, ["bf16=true"])))
    assert (training - float32).abs().max() > 1e-3  # bf16 rounding: what a float32 reference would be off by
    assert torch.allclose(ref, training, atol=1e-4)


def test_reference_logprobs_split_over_processes_equal_one_process(tmp_path, monkeypatch):
    """Every process scores whole prompts of its own (cached per rank in the work dir) and all get
    every value: with 3 ranks simulated, the assembled values are one process's."""
    import stepdapo.stages.actor as actor
    from stepdapo.config import load_config
    from stepdapo.runner import ModelStage

    model, (prompts, completions) = _policy(), _pairs()
    cfg = load_config(None, [])
    one = ModelStage(tmp_path / "one", "actor", {})
    one.work_dir.mkdir(parents=True)
    want = actor.ref_logprobs(one, model, prompts, completions, PAD, "cpu", True, cfg)
    parts = {}
    monkeypatch.setattr(actor, "world_size", lambda: 3)
    stage = ModelStage(tmp_path / "three", "actor", {})
    stage.work_dir.mkdir(parents=True)
    for r in range(3):  # each rank alone: it keeps its own share (the others' are not there yet)
        def own_share(value, r=r):
            parts[r] = value
            return [value]

        monkeypatch.setattr(actor, "rank", lambda r=r: r)
        monkeypatch.setattr(actor, "gather", own_share)
        actor.ref_logprobs(stage, model, prompts, completions, PAD, "cpu", True, cfg)
    monkeypatch.setattr(actor, "gather", lambda value: [parts[r] for r in range(3)])
    got = actor.ref_logprobs(stage, model, prompts, completions, PAD, "cpu", True, cfg)  # from the rank caches
    assert sorted(p.name for p in stage.work_dir.glob("ref_logprobs.*")) == \
        [f"ref_logprobs.{r}-of-3.json" for r in range(3)]
    assert all(parts[r][0] for r in range(3))  # every rank had prompts to score
    assert {i for r in range(3) for i in parts[r][0]} == set(range(len(prompts)))
    assert got == pytest.approx(want, abs=1e-5)


# -- refusals at the start of a run -------------------------------------------------------------------

@pytest.mark.parametrize("env, overrides, refused", [
    ({"ACCELERATE_USE_FSDP": "true"}, [], "critic.log_ratio_beta"),
    ({"ACCELERATE_USE_FSDP": "true"}, ["critic.log_ratio_beta=0", "actor.lora_r=8"], "actor.lora_r=8"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     ["critic.log_ratio_beta=0", "critic.lora_r=4"], "critic.lora_r=4"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
     ["critic.log_ratio_beta=0", "critic.lora_r=4"], None),  # ZeRO-2 keeps whole parameters: LoRA merges
    ({"ACCELERATE_USE_FSDP": "true"}, ["critic.log_ratio_beta=0"], None),
    ({}, ["actor.lora_r=8"], None),  # DDP / one process: everything runs
])
def test_what_a_trainer_would_refuse_hours_in_is_refused_before_the_run_starts(tmp_path, monkeypatch, env,
                                                                              overrides, refused):
    from stepdapo import pipeline
    from stepdapo.config import load_config
    from stepdapo.errors import ConfigError

    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(None, overrides)
    if refused is None:
        pipeline.check_run_supported(cfg)
        return
    with pytest.raises(ConfigError, match=refused.replace(".", r"\.")):
        pipeline.run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_the_trainers_ddp_timeout_is_the_sync_timeout(tmp_path, monkeypatch):
    """A rank waiting inside a Trainer collective (e.g. on rank 0 evaluating the critic) waits as long
    as at our own synchronisation points: STEPDAPO_SYNC_TIMEOUT_S, not the Trainer's 30 minutes."""
    from stepdapo.training import training_args

    for seconds in ("7200", "600"):
        monkeypatch.setenv("STEPDAPO_SYNC_TIMEOUT_S", seconds)
        args = training_args(tmp_path, steps=1, batch_size=1, lr=1e-3, seed=0, report_to=[], progress=False,
                             run_name="t", use_cpu=True)
        assert args.ddp_timeout == int(seconds)
