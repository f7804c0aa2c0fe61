"""The log-ratio critic (stepdapo.models.LogRatioCritic) against a plain per-sequence reference:
its logits and their gradients, every position's logit against the prefix alone, the start equal to
the head alone, and saving / loading (the reference found again after a move, refused when gone
or changed)."""

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

