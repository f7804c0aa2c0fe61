"""The log-ratio critic (stepdapo.models.LogRatioCritic) against a plain per-sequence reference:
its logits and their gradients, every position's logit against the prefix alone, the start equal to
the head alone, saving / loading (the reference found again after a move, refused when gone
or changed), and its shared-prefix scoring (each state once through both language models) against
whole sequences."""

import json
import shutil

import pytest
import torch

from stepdapo.config import TinyModelConfig
from stepdapo.errors import ModelPathError
from stepdapo.models import (
    LogRatioCritic,
    char_tokenizer,
    critic_logits,
    critic_token_logits,
    critic_values,
    load_critic,
    tiny_llama,
)
from stepdapo.stages.advantages import action_values

PAD = 0
TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture
def critic(tmp_path):
    """A critic whose pi_theta differs from pi_ref (as after training), beta 0.7."""
    tok = char_tokenizer()
    ref = tiny_llama(tok, TINY, seed=1)
    ref.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    c = LogRatioCritic.start(tmp_path / "policy", beta=0.7, initial_value=0.3)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in c.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        c.head.weight.normal_(0, 0.3)
    return c.eval()


SEQS = [[1, 5, 6, 20, 7, 8, 9, 20], [1, 7, 20, 9], [1, 5, 8, 9, 20, 11, 12, 13, 20, 14, 15]]
PROMPT_LENS = [4, 3, 5]


def reference_logit(c: LogRatioCritic, x: list[int], prompt_len: int) -> torch.Tensor:
    """By hand, one unpadded sequence at a time: the head on the last hidden state plus beta times
    the sum over tokens t >= prompt_len of log pi_theta(x_t | x_<t) - log pi_ref(x_t | x_<t)."""
    ids = torch.tensor([x])
    out = c.policy(input_ids=ids, output_hidden_states=True)
    with torch.no_grad():
        ref = c.reference(input_ids=ids).logits
    total = torch.zeros(())
    for t in range(prompt_len, len(x)):
        total = total + torch.log_softmax(out.logits[0, t - 1], -1)[x[t]] - torch.log_softmax(ref[0, t - 1], -1)[x[t]]
    return c.head(out.hidden_states[-1][0, -1]).squeeze() + c.beta * total


def grads(c: LogRatioCritic, loss: torch.Tensor) -> dict:
    c.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in c.named_parameters() if p.grad is not None}


def test_logits_and_gradients_match_the_per_sequence_reference(critic):
    weights = torch.tensor([0.3, -1.2, 0.8])  # a loss that weighs the sequences differently
    batched = critic_logits(critic, SEQS, PAD, prompt_lens=PROMPT_LENS)
    plain = torch.stack([reference_logit(critic, x, p) for x, p in zip(SEQS, PROMPT_LENS)])
    # float32 sums of ~10 log-probs, padded against unpadded attention: 1e-5 is far above the
    # rounding (~1e-6) and far below what a wrong token, position or sign does (>= 1e-2 here)
    assert batched.detach() == pytest.approx(plain.detach().tolist(), abs=1e-5)
    head_only = torch.stack([reference_logit(critic, x, len(x)) for x in SEQS])  # nothing counted
    assert (plain - head_only).abs().min() > 1e-2  # the log-ratio term is not 0 in any row
    g_batched, g_plain = grads(critic, (weights * batched).sum()), grads(critic, (weights * plain).sum())
    assert g_batched.keys() == g_plain.keys() and not any(n.startswith("reference.") for n in g_batched)
    for n in g_plain:
        assert torch.allclose(g_batched[n], g_plain[n], atol=1e-5, rtol=1e-4), n
    values = critic_values(critic, SEQS, PAD, batch_size=2, prompt_lens=PROMPT_LENS)
    assert values == pytest.approx(torch.sigmoid(plain).tolist(), abs=1e-5)


def test_every_position_is_the_value_of_its_prefix(critic):
    logits = critic_token_logits(critic, SEQS, PAD, prompt_lens=PROMPT_LENS)
    for i, (x, p) in enumerate(zip(SEQS, PROMPT_LENS)):
        for end in range(p, len(x) + 1):  # prefixes that hold the prompt
            alone = reference_logit(critic, x[:end], p)
            assert logits[i, end - 1].item() == pytest.approx(alone.item(), abs=1e-5)


def test_the_prompt_is_not_counted_and_a_prompt_length_is_required(critic):
    longer_prompt = critic_logits(critic, SEQS, PAD, prompt_lens=[len(x) for x in SEQS])  # no solution tokens
    head_only = torch.stack([reference_logit(critic, x, len(x)) for x in SEQS])
    assert longer_prompt.detach() == pytest.approx(head_only.detach().tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="prompt length"):
        critic_logits(critic, SEQS, PAD)


def test_a_new_critic_is_the_head_alone_at_the_mean(tmp_path, critic):
    c = LogRatioCritic.start(tmp_path / "policy", beta=1.0, initial_value=0.3)
    logits = critic_logits(c, SEQS, PAD, prompt_lens=PROMPT_LENS)
    head = torch.stack([c.head(h[0, -1]) for h in (c.policy(input_ids=torch.tensor([x]), output_hidden_states=True)
                                                .hidden_states[-1] for x in SEQS)]).squeeze(-1)
    assert logits.detach() == pytest.approx(head.detach().tolist(), abs=1e-6)  # pi_theta = pi_ref: no log-ratio
    assert torch.sigmoid(logits).detach() == pytest.approx([0.3] * 3, abs=0.05)  # a small head: V ~ the mean
    assert not any(p.requires_grad for p in c.reference.parameters())


def test_saved_critic_reloads_finds_its_moved_reference_and_refuses_a_changed_one(tmp_path, critic):
    critic.save_pretrained(tmp_path / "critic")
    char_tokenizer().save_pretrained(tmp_path / "critic")
    want = critic_values(critic, SEQS, PAD, prompt_lens=PROMPT_LENS)
    loaded, _ = load_critic(tmp_path / "critic")
    assert isinstance(loaded, LogRatioCritic) and loaded.beta == 0.7
    assert critic_values(loaded, SEQS, PAD, prompt_lens=PROMPT_LENS) == pytest.approx(want, abs=1e-6)
    meta = json.loads((tmp_path / "critic" / LogRatioCritic.META).read_text())
    assert meta["reference"] == "../policy"

    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("critic", "policy"):  # a whole run directory moved: found by the relative path
        shutil.move(tmp_path / name, moved / name)
    assert critic_values(load_critic(moved / "critic")[0], SEQS, PAD, prompt_lens=PROMPT_LENS) == \
        pytest.approx(want, abs=1e-6)

    for other in (TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=64), TINY):
        # another model where the reference was: another size, or the same one with other weights
        tiny_llama(char_tokenizer(), other, seed=7).save_pretrained(moved / "policy")
        with pytest.raises(ModelPathError, match="not the one the critic was trained against"):
            load_critic(moved / "critic")
    shutil.rmtree(moved / "policy")
    with pytest.raises(ModelPathError, match="reference model ../policy .* is missing"):
        load_critic(moved / "critic")



# -- shared prefix: each state once through pi_theta and pi_ref, its actions on its keys/values ------

# (state, its prompt's length), ragged, and each state's sampled actions, as the advantage stage scores them
STATES = [([1, 5, 6, 20, 7, 8, 20], 4), ([1, 7, 20], 3), ([1, 5, 8, 9, 20, 11, 12, 13, 20, 14, 15], 5),
          ([1, 9, 9, 20, 4, 11], 3)]
ACTIONS = [[[9, 10, 20], [11], [12, 13, 14, 20]], [[9, 20], [9, 21, 4, 20], [17]],
           [[16, 20], [17, 20, 18, 19, 12]], [[10, 20], [10, 20]]]  # the last state: one action sampled twice


def _state_actions():
    """Every s + a with its state's length and its prompt's, and, last, two the shared path must run
    whole: a cut that would fall inside the prompt, and a state that is its prompt (nothing to split)."""
    seqs, state_lens, prompt_lens = [], [], []
    for (s, plen), acts in zip(STATES, ACTIONS):
        for a in acts:
            seqs.append(s + a)
            state_lens.append(len(s))
            prompt_lens.append(plen)
    seqs += [[1, 5, 6, 20, 7, 8], [1, 7, 20]]
    state_lens += [2, 3]
    prompt_lens += [4, 3]
    return seqs, state_lens, prompt_lens


def test_shared_prefix_logits_and_gradients_match_whole_sequences(critic):
    """Tolerance, from a measurement (float32, 1 thread): the whole-sequence path against itself with
    each sequence in a batch of its own (another padding, other matmul shapes) moves the logits by
    1.3e-6 and the gradients by 8e-7 of a parameter's gradient scale; the shared path is 9.5e-7 /
    7.6e-7 from the batched whole-sequence one. 1e-5 (values; gradients: of their scale) is ~10x
    that noise and 10^4x below what a dropped or doubled state part does (>= 0.1 here,
    test_shared_prefix_counts_each_state_part_once)."""
    seqs, state_lens, prompt_lens = _state_actions()
    weights = torch.linspace(-1.0, 2.0, len(seqs))
    shared = critic_logits(critic, seqs, PAD, state_lens, prompt_lens)
    plain = critic_logits(critic, seqs, PAD, prompt_lens=prompt_lens)
    by_hand = torch.stack([reference_logit(critic, x, p) for x, p in zip(seqs, prompt_lens)])
    assert shared.detach() == pytest.approx(plain.detach().tolist(), abs=1e-5)
    assert shared.detach() == pytest.approx(by_hand.detach().tolist(), abs=1e-5)
    g_shared, g_plain = grads(critic, (weights * shared).sum()), grads(critic, (weights * plain).sum())
    assert g_shared.keys() == g_plain.keys() and not any(n.startswith("reference.") for n in g_shared)
    for n in g_plain:
        assert torch.allclose(g_shared[n], g_plain[n], atol=1e-5 * g_plain[n].abs().max().item(), rtol=0), n

    values = critic_values(critic, seqs, PAD, batch_size=4, prefix_lens=state_lens, prompt_lens=prompt_lens)
    assert values == pytest.approx(torch.sigmoid(plain).tolist(), abs=1e-5)  # groups split across batches too


def test_shared_prefix_runs_each_state_once_through_both_models(critic):
    """advantages.shared_prefix is not ignored for this critic: pi_theta and pi_ref each see the
    states once (4 rows), then only the actions' tokens; the two whole ones run as rows of their own."""
    seqs, state_lens, prompt_lens = _state_actions()
    calls = {"policy": [], "reference": []}
    hooks = [getattr(critic, name).register_forward_pre_hook(
        lambda _m, _a, kw, seen=seen: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
        for name, seen in calls.items()]
    try:
        critic_values(critic, seqs, PAD, prefix_lens=state_lens, prompt_lens=prompt_lens)
    finally:
        for h in hooks:
            h.remove()
    n_actions = sum(map(len, ACTIONS))
    longest_state, longest_action = max(len(s) for s, _ in STATES), max(len(a) for acts in ACTIONS for a in acts)
    for seen in calls.values():  # the whole ones first (plain), then the states, then the actions
        assert seen == [(2, 6), (len(STATES), longest_state), (n_actions, longest_action)]


@pytest.mark.parametrize("bug", ["state_part_dropped", "state_part_doubled"])
def test_shared_prefix_counts_each_state_part_once(critic, monkeypatch, bug):
    """The log-ratio sum of s + a is its state part (from the prompt's end to the state's end,
    computed once per state) plus its action part: with the state part dropped or counted twice,
    every s + a whose state has solution tokens moves far beyond the tolerance (> 1e-2), and only those."""
    import stepdapo.logprobs as lp

    seqs, state_lens, prompt_lens = _state_actions()
    plain = critic_logits(critic, seqs, PAD, prompt_lens=prompt_lens)
    real = lp.grouped_logprobs

    def broken(*args, **kwargs):
        prefix_logp, logp, out = real(*args, **kwargs)
        return (0.0 if bug == "state_part_dropped" else 2.0) * prefix_logp, logp, out

    monkeypatch.setattr(lp, "grouped_logprobs", broken)
    moved = (critic_logits(critic, seqs, PAD, state_lens, prompt_lens) - plain).abs()
    has_state_part = torch.tensor([n > p for n, p in zip(state_lens, prompt_lens)])
    has_state_part[-2:] = False  # the two run whole
    assert moved[has_state_part].min() > 1e-2 and moved[~has_state_part].max() < 1e-5


def test_a_wrapped_critic_refuses_prefix_lens(critic):
    """Data-parallel training calls go through the wrapper's forward, which runs whole sequences."""
    seqs, state_lens, prompt_lens = _state_actions()
    wrapper = torch.nn.Module()
    wrapper.module = critic
    with pytest.raises(ValueError, match="runs whole sequences"):
        critic_logits(wrapper, seqs, PAD, state_lens, prompt_lens)


def test_advantage_stage_shared_prefix_scores_like_whole_sequences(tmp_path, critic):
    """advantages.action_values with the default critic: the same values with and without the switch."""
    import pyarrow as pa

    critic.save_pretrained(tmp_path / "critic")
    char_tokenizer().save_pretrained(tmp_path / "critic")
    terminal = [[False, True, False], [False, True, False], [False, True], [False, False]]  # not scored
    labels = pa.table({"ids": [s for s, _ in STATES], "prompt_len": [p for _, p in STATES], "action_ids": ACTIONS,
                       "action_terminal": terminal})
    shared = action_values(labels, "critic", tmp_path / "critic", None, None, shared_prefix=True)
    plain = action_values(labels, "critic", tmp_path / "critic", None, None, shared_prefix=False)
    assert shared.keys() == plain.keys() and len(plain) == 2 + 2 + 1 + 1  # the repeated action once
    for k in plain:
        assert shared[k] == pytest.approx(plain[k], abs=1e-5)
