"""Shared-prefix forward passes (stepdapo.logprobs.grouped_sequence_logprobs, models.critic_logits)
against the plain per-pair computation: values AND gradients w.r.t. every parameter, with ragged
prefix and continuation lengths, on a tiny Llama in fp32, LoRA-wrapped, and in bf16.

Tolerances. fp32: both sides compute the same attention scores over the same keys, only in a different
batch layout (different matmul shapes, so different summation orders); float32 rounding
(2^-24 ~ 6e-8 per op) accumulated over a few layers and ~10 summed tokens stays far below 1e-5
relative, so 1e-5 would catch any real error (a wrong position id, a pad key attended, a token
scored by the wrong logit moves a log-prob by > 1e-2). bf16 keeps 8 mantissa bits (2^-8 ~ 4e-3
relative per rounding); both computations are compared with the fp32 reference, and the shared one
must be about as close to it as the plain one is.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stepdapo.logprobs import (
    batched_sequence_logprobs,
    grouped_sequence_logprobs,
    sequence_logprobs,
)
from stepdapo.models import critic_logits, critic_token_logits, critic_values

V, PAD = 40, 0


def _config(**kw):
    # 2 query heads per key/value head (grouped-query attention, as in SmolLM2); weights 10x the
    # default scale, so attention is sharp and a wrong position or mask shows in the outputs
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=PAD, initializer_range=0.2, **kw)


def _policy(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config()).eval()


def _data(seed=1):
    """Ragged prefixes (1..13 tokens) with 1, 2 or 3 continuations of 0..6 tokens (one empty)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(1, V, (n,), generator=g).tolist()  # noqa: E731
    prefixes = [rand(n) for n in (7, 1, 13, 4)]
    conts = [[rand(n) for n in ns] for ns in ((2, 5), (4,), (1, 3, 6), (0, 2))]
    return prefixes, conts


def _flat(prefixes, conts):
    return [p for p, cs in zip(prefixes, conts) for _ in cs], [c for cs in conts for c in cs]


def _value_and_grads(model, fn):
    """fn(model) -> 1-D tensor; its values and the gradient of a random weighting of them w.r.t.
    every trainable parameter (a weighting, so each value's gradient counts separately)."""
    model.zero_grad()
    values = fn(model)
    w = torch.linspace(-1.0, 2.0, len(values))
    (values.float() * w).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for n, g in grads.items() if "embed" not in n)
    return values.detach().float(), grads


def _assert_close(a, b, rtol, atol=0.0):
    va, ga = a
    vb, gb = b
    torch.testing.assert_close(va, vb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys()
    for n in ga:  # relative to the gradient's scale: single tiny entries are rounding noise
        scale = gb[n].abs().max().item()
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol + rtol * scale, msg=n)


def _relative_difference(a, b) -> float:
    """The largest difference between two (values, gradients), relative to each one's scale."""
    (va, ga), (vb, gb) = a, b
    worst = ((va - vb).abs() / vb.abs().clamp_min(1e-12)).max().item()
    for n in ga:
        worst = max(worst, ((ga[n] - gb[n]).abs().max() / gb[n].abs().max().clamp_min(1e-12)).item())
    return worst


def _shared(prefixes, conts):
    return lambda m: grouped_sequence_logprobs(m, prefixes, conts, PAD)


def _plain(prefixes, conts):
    return lambda m: sequence_logprobs(m, *_flat(prefixes, conts), PAD)


def test_logprobs_and_gradients_match_plain_fp32():
    model, (prefixes, conts) = _policy(), _data()
    shared = _value_and_grads(model, _shared(prefixes, conts))
    plain = _value_and_grads(model, _plain(prefixes, conts))
    assert shared[0][6] == 0  # the empty continuation
    _assert_close(shared, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bug", ["positions_restart", "pad_keys_attended"])
def test_the_comparison_has_teeth(bug):
    """Continuation positions restarting at 0, or the prefixes' left padding attended, change the
    values far beyond the tolerance."""
    import stepdapo.logprobs as lp

    model, (prefixes, conts) = _policy(), _data()
    plain = sequence_logprobs(model, *_flat(prefixes, conts), PAD)
    real = lp._run_continuations

    def broken(model, cache, attn, next_pos, *a, **kw):
        if bug == "positions_restart":
            next_pos = torch.zeros_like(next_pos)
        else:
            attn = torch.ones_like(attn)
        return real(model, cache, attn, next_pos, *a, **kw)

    lp._run_continuations = broken
    try:
        bad = grouped_sequence_logprobs(model, prefixes, conts, PAD)
    finally:
        lp._run_continuations = real
    assert (bad - plain).abs().max() > 1e-2


def test_gradient_checkpointing_is_refused_not_silently_wrong():
    """Gradient checkpointing makes HF layers drop the KV cache: the continuations would see no prefix."""
    model, (prefixes, conts) = _policy().train(), _data()
    model.gradient_checkpointing_enable()
    with pytest.raises(RuntimeError, match="turn shared_prefix off"):
        grouped_sequence_logprobs(model, prefixes, conts, PAD)


def test_flat_pairs_with_repeated_prompts_keep_their_order():
    model, (prefixes, conts) = _policy(), _data()
    prompts, completions = _flat(prefixes, conts)
    order = [5, 0, 7, 2, 1, 4, 3, 6]  # prompts repeated, not adjacent
    prompts, completions = [prompts[i] for i in order], [completions[i] for i in order]
    shared = _value_and_grads(model, lambda m: sequence_logprobs(m, prompts, completions, PAD, shared_prefix=True))
    plain = _value_and_grads(model, lambda m: sequence_logprobs(m, prompts, completions, PAD))
    _assert_close(shared, plain, rtol=1e-5, atol=1e-6)
    batched = batched_sequence_logprobs(model, prompts, completions, PAD, batch_size=3, shared_prefix=True)
    torch.testing.assert_close(torch.tensor(batched), plain[0], rtol=1e-5, atol=1e-6)


def test_lora_wrapped_policy():
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: random B, so the adapters change the outputs and have gradients
    model = get_peft_model(_policy(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    prefixes, conts = _data()
    shared = _value_and_grads(model, _shared(prefixes, conts))
    plain = _value_and_grads(model, _plain(prefixes, conts))
    assert all("lora" in n for n in shared[1])
    _assert_close(shared, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["bf16_weights", "bf16_autocast"])
def test_bf16_as_close_to_fp32_as_plain(mode):
    prefixes, conts = _data()
    ref = _value_and_grads(_policy(), _plain(prefixes, conts))
    model = _policy()
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
            return _value_and_grads(model, fn)

    shared, plain = run(_shared(prefixes, conts)), run(_plain(prefixes, conts))
    # 8 mantissa bits: ~4e-3 relative per rounding, a few roundings deep; log-probs are O(10)
    _assert_close(shared, ref, rtol=5e-2, atol=5e-2)
    _assert_close(plain, ref, rtol=5e-2, atol=5e-2)
    # and not systematically worse than the plain computation
    err = lambda x: (x[0] - ref[0]).abs().max().item()  # noqa: E731
    assert err(shared) <= 2 * err(plain) + 1e-2


# -- the critic ----------------------------------------------------------------------------------

def _critic(seed=0, pad=PAD):
    torch.manual_seed(seed)
    cfg = _config()
    cfg.num_labels, cfg.pad_token_id = 1, pad
    return LlamaForSequenceClassification(cfg).eval()


def _critic_data(pad=PAD):
    """States and their s + a (ragged), as the critic sees them; one s + a ends in pad tokens (eos
    used as pad), so its value is read before its end, inside the state for the last one."""
    prefixes, conts = _data(seed=2)
    seqs, lens = [], []
    for s, cs in zip(prefixes, conts):
        for x in [s] + [s + c for c in cs]:
            seqs.append(x)
            lens.append(len(s) - 1)  # the state's own value shares s[:-1] with its actions
    seqs += [prefixes[0] + [5, pad, pad], prefixes[2] + [pad, pad]]
    lens += [len(prefixes[0]) - 1, len(prefixes[2]) - 1]
    return seqs, lens


def test_critic_values_and_gradients_match_plain():
    model = _critic()
    seqs, lens = _critic_data()
    shared = _value_and_grads(model, lambda m: critic_logits(m, seqs, PAD, lens))
    plain = _value_and_grads(model, lambda m: critic_logits(m, seqs, PAD))
    # the plain path is HF's own: one right-padded call reads each logit where the head does
    ids = torch.full((len(seqs), max(map(len, seqs))), PAD)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=(torch.arange(ids.shape[1]) < torch.tensor(
            [len(s) for s in seqs])[:, None]).long()).logits.squeeze(-1)
    torch.testing.assert_close(plain[0], hf, rtol=1e-5, atol=1e-6)
    _assert_close(shared, plain, rtol=1e-5, atol=1e-6)
    batched = critic_values(model, seqs, PAD, batch_size=4, prefix_lens=lens)
    torch.testing.assert_close(torch.tensor(batched), torch.sigmoid(plain[0]), rtol=1e-5, atol=1e-6)


def test_critic_lora_and_bf16():
    from peft import LoraConfig, get_peft_model

    seqs, lens = _critic_data()
    model = get_peft_model(_critic(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False, task_type="SEQ_CLS"))
    shared = _value_and_grads(model, lambda m: critic_logits(m, seqs, PAD, lens))
    plain = _value_and_grads(model, lambda m: critic_logits(m, seqs, PAD))
    assert any("score" in n for n in shared[1])  # the value head trains next to the adapters
    _assert_close(shared, plain, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _value_and_grads(model, lambda m: critic_logits(m, seqs, PAD, lens))
    _assert_close(low, plain, rtol=5e-2, atol=5e-2)


# -- the trainers: the switch changes how a batch is computed, not its loss or gradients ------------

def _args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             remove_unused_columns=False)


def _trainer_loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach()[None], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_actor_and_dpo_loss_and_gradients_unchanged_by_the_switch(tmp_path):
    from stepdapo.stages.actor import DAPOTrainer, _StateCollator, group_by_state
    from stepdapo.stages.dpo import OutcomeDPOTrainer, _PairCollator

    prefixes, conts = _data()
    rows = [{"state_index": g, "state_ids": s, "action_ids": a, "advantage": 0.3 * (j - 1), "weight": 1.0 + j,
             "ref_logprob": -5.0 + j} for g, (s, cs) in enumerate(zip(prefixes, conts)) for j, a in enumerate(cs)]
    batch = _StateCollator()(group_by_state(rows))
    pairs = [{"prompt": s, "chosen": cs[0] + [3], "rejected": cs[-1] + [4], "ref_chosen": -4.0, "ref_rejected": -6.0}
             for s, cs in zip(prefixes, conts)] + [{"prompt": prefixes[0], "chosen": [5, 6], "rejected": [7],
                                                    "ref_chosen": -3.0, "ref_rejected": -2.0}]
    dpo_batch = _PairCollator()(pairs)
    for cls, b in ((DAPOTrainer, batch), (OutcomeDPOTrainer, dpo_batch)):
        results = [_trainer_loss_and_grads(cls(model=_policy(), args=_args(tmp_path), beta=0.3, pad_id=PAD,
                                               shared_prefix=shared), b) for shared in (True, False)]
        _assert_close(*results, rtol=1e-5, atol=1e-6)


def test_critic_trainer_loss_and_gradients_unchanged_by_the_switch(tmp_path):
    from stepdapo.algorithms import ValueExample
    from stepdapo.stages.critic import CriticTrainer, _StateGroupedSampler, _ValueCollator

    seqs, lens = _critic_data()
    examples = [ValueExample(tuple(x), (i % 3) / 2, 1, "p", False, n + 1) for i, (x, n) in enumerate(zip(seqs, lens))]
    results = []
    for shared in (True, False):
        trainer = CriticTrainer(model=_critic(), args=_args(tmp_path), pad_id=PAD, shared_prefix=shared)
        results.append(_trainer_loss_and_grads(trainer, _ValueCollator(shared)(examples)))
    _assert_close(*results, rtol=1e-5, atol=1e-6)

    # the grouped order: every example once, each state's examples consecutive, reshuffled per epoch
    sampler = _StateGroupedSampler(examples, seed=0)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(examples)))
        states = [examples[i].input_ids[:examples[i].state_len] for i in order]
        assert sum(a != b for a, b in zip(states, states[1:])) == len(set(states)) - 1
        orders.append(order)
    assert orders[0] != orders[1]


# -- per-token values (critic.token_targets): one pass gives the value of every prefix ---------------

def _every_prefix(seqs):
    return [(i, p) for i, x in enumerate(seqs) for p in range(len(x))]


@pytest.mark.parametrize("lora", [False, True])
def test_token_logits_equal_each_prefix_alone(lora):
    """Position p of a right-padded batch gives the logit the head gives x[:p + 1] on its own, with
    the same gradients: causal attention and right padding leave earlier positions untouched."""
    seqs = [x for x in _critic_data()[0] if PAD not in x]
    model = _critic()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False, task_type="SEQ_CLS"))
    where = _every_prefix(seqs)
    one_pass = _value_and_grads(model, lambda m: torch.stack([critic_token_logits(m, seqs, PAD)[i, p]
                                                              for i, p in where]))
    alone = _value_and_grads(model, lambda m: critic_logits(m, [seqs[i][:p + 1] for i, p in where], PAD))
    if lora:
        assert any("score" in n for n in one_pass[1])  # the head trains next to the adapters
    _assert_close(one_pass, alone, rtol=1e-5, atol=1e-6)


def test_critic_trainer_token_targets_loss_by_hand(tmp_path):
    """The token-target loss is the mean BCE over every (sequence, position) target, each logit the
    prefix's own: checked against a loop over the prefixes, loss and gradients."""
    from stepdapo.algorithms import TokenValueExample
    from stepdapo.stages.critic import CriticTrainer, _ValueCollator

    seqs = [x for x in _critic_data()[0] if PAD not in x][:6]
    examples = [TokenValueExample(tuple(x), i % 3, tuple((j % 4) / 3 for j in range(len(x) - i % 3)), "p")
                for i, x in enumerate(seqs) if len(x) > i % 3]
    trainer = CriticTrainer(model=_critic(), args=_args(tmp_path), pad_id=PAD)
    got = _trainer_loss_and_grads(trainer, _ValueCollator(False)(examples))

    model = trainer.model
    model.zero_grad()
    prefixes = [list(e.input_ids[:e.start + j + 1]) for e in examples for j in range(len(e.targets))]
    targets = torch.tensor([t for e in examples for t in e.targets])
    logits = critic_logits(model, prefixes, PAD)
    loss = -(targets * torch.nn.functional.logsigmoid(logits)
             + (1 - targets) * torch.nn.functional.logsigmoid(-logits)).mean()
    loss.backward()
    want = (loss.detach()[None], {n: p.grad.clone() for n, p in model.named_parameters()})
    _assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- a real LM --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_logprobs_and_gradients():
    """SmolLM2-135M (LlamaForCausalLM, GQA 9:3, 30 layers, tied 49k vocabulary) on real text.
    Tolerance: the plain computation itself moves by 3e-6 relative (values) and 2.5e-5 of a
    parameter's gradient scale when only its padding changes (measured: 30 layers of float32
    summation-order noise); 1e-4 is 4x that, and 100x below what a wrong position or mask does."""
    from smollm2 import GGUF

    from stepdapo.models import load_policy

    if not GGUF.is_file():
        pytest.skip(f"SmolLM2 not found at {GGUF}: run ../shared/tools/get-smollm2")
    model, tok = load_policy(GGUF)
    model.train()
    states = ["Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
              "in May. How many clips did Natalia sell altogether?\nAnswer: ",
              "Question: Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes of babysitting. "
              "How much did she earn?\nAnswer: Weng earns 12/60 = $"]
    actions = [["In April she sold 48.", "She sold 48/2 = 24 clips in May.", "48+24=72"], ["0.2 per minute.", "10"]]
    prefixes = [tok(s)["input_ids"] for s in states]
    conts = [[tok(a, add_special_tokens=False)["input_ids"] for a in acts] for acts in actions]
    shared = _value_and_grads(model, lambda m: grouped_sequence_logprobs(m, prefixes, conts, tok.pad_token_id))
    plain = _value_and_grads(model, lambda m: sequence_logprobs(m, *_flat(prefixes, conts), tok.pad_token_id))
    # the control: the plain computation against itself with each pair padded alone (another batch
    # layout, so other summation orders). How far that moves depends on the CPU's kernels (1e-4
    # held on a Xeon with AMX, not on an AMD EPYC), so the shared path must stay within 4x of this
    # machine's own noise, never looser than 1e-3: a wrong position or mask moves it by > 1e-2
    fp, fc = _flat(prefixes, conts)
    alone = _value_and_grads(model, lambda m: torch.cat([sequence_logprobs(m, [a], [b], tok.pad_token_id)
                                                         for a, b in zip(fp, fc)]))
    rtol = min(1e-3, max(1e-4, 4 * _relative_difference(alone, plain)))
    _assert_close(shared, plain, rtol=rtol)


def test_advantage_stage_scores_the_same_with_and_without_the_switch(tmp_path):
    """advantages.action_values: each state's s + a_j scored on one pass of s equals one row each."""
    import pyarrow as pa

    from stepdapo.models import char_tokenizer
    from stepdapo.stages.advantages import action_values

    tok = char_tokenizer()
    critic = _critic(pad=tok.pad_token_id)
    critic.save_pretrained(tmp_path / "critic")
    tok.save_pretrained(tmp_path / "critic")
    prefixes, conts = _data(seed=3)
    prefixes = [[tok.bos_token_id] + [4 + t % 18 for t in p] for p in prefixes]  # valid character ids
    conts = [[[4 + t % 18 for t in c] or [5] for c in cs] for cs in conts]
    labels = pa.table({"ids": prefixes, "action_ids": conts,
                       "action_terminal": [[j == 1 for j in range(len(cs))] for cs in conts]})  # some terminal
    shared = action_values(labels, "critic", tmp_path / "critic", None, None, shared_prefix=True)
    plain = action_values(labels, "critic", tmp_path / "critic", None, None, shared_prefix=False)
    assert shared.keys() == plain.keys() and len(shared) == sum(len(cs) for cs in conts) - 3
    for k in plain:
        assert shared[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-6)
