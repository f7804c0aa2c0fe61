import math

import numpy as np
import pytest
import torch

from stepdapo.algorithms import state_advantages
from stepdapo.losses import critic_loss, dapo_loss, dpo_loss
from stepdapo.metrics import auc, ece


def test_dapo_loss_value_and_gradient_match_hand_derivation():
    torch.manual_seed(0)
    n, beta = 7, 0.3
    lp = torch.randn(n, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(n, dtype=torch.float64)
    adv = torch.rand(n, dtype=torch.float64) - 0.5
    loss = dapo_loss(lp, ref, adv, beta)
    # by hand: L = 1/n sum 0.5 (A/beta - (lp - ref))^2 ; dL/dlp_i = -(A_i/beta - (lp_i - ref_i)) / n
    lpv, refv, advv = lp.detach().numpy(), ref.numpy(), adv.numpy()
    expected = sum(0.5 * (a / beta - (p - r)) ** 2 for p, r, a in zip(lpv, refv, advv)) / n
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    loss.backward()
    grad = [-(a / beta - (p - r)) / n for p, r, a in zip(lpv, refv, advv)]
    assert np.allclose(lp.grad.numpy(), grad, rtol=1e-12)


def test_dapo_loss_weighted_and_zero_at_optimum():
    lp = torch.tensor([0.0, -1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-0.5, -1.0, -1.0])
    adv = torch.tensor([0.1, 0.0, -0.2])
    w = torch.tensor([2.0, 1.0, 1.0])
    loss = dapo_loss(lp, ref, adv, 0.5, w)
    per = [0.5 * (0.2 - 0.5) ** 2, 0.0, 0.5 * (-0.4 + 1.0) ** 2]
    assert math.isclose(loss.item(), (2 * per[0] + per[1] + per[2]) / 4, rel_tol=1e-6)
    # weights equal to duplicating rows
    dup = dapo_loss(torch.tensor([0.0, 0.0, -1.0, -2.0]), torch.tensor([-0.5, -0.5, -1.0, -1.0]),
                    torch.tensor([0.1, 0.1, 0.0, -0.2]), 0.5)
    assert math.isclose(loss.item(), dup.item(), rel_tol=1e-6)
    # zero exactly when the log-ratio equals A / beta
    assert dapo_loss(ref + adv / 0.5, ref, adv, 0.5).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        dapo_loss(lp, ref[:2], adv, 0.5)


def _minimise(ref_logits, rewards, beta, mu):
    """Exact minimiser of the DAPO loss over a softmax policy at one state."""
    ref_logp = torch.log_softmax(ref_logits, -1)
    adv = torch.tensor(state_advantages_exact(ref_logp.exp(), rewards))
    theta = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = dapo_loss(torch.log_softmax(theta, -1), ref_logp, adv, beta, weights=mu)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return torch.softmax(theta.detach(), -1)


def state_advantages_exact(pi_ref, rewards):
    """A(a) = r(a) - E_{b ~ pi_ref} r(b): the sibling-mean baseline with infinitely many samples."""
    base = float((pi_ref * rewards).sum())
    return [float(r) - base for r in rewards]


@pytest.mark.parametrize("beta", [0.05, 0.3, 1.0, 5.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem_monotonic_improvement(beta, seed):
    """One state, a few actions with known rewards, a non-optimal pi_ref, full-support sampling
    distribution: the loss minimiser has strictly higher expected reward than pi_ref."""
    g = torch.Generator().manual_seed(seed)
    k = 5
    rewards = torch.rand(k, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(k, generator=g, dtype=torch.float64) * 2
    mu = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64), -1)  # any full-support sampler
    pi_ref = torch.softmax(ref_logits, -1)
    pi_new = _minimise(ref_logits, rewards, beta, mu)
    v_ref, v_new = float((pi_ref * rewards).sum()), float((pi_new * rewards).sum())
    assert v_new > v_ref + 1e-6
    assert v_new <= float(rewards.max()) + 1e-9


def test_theorem_equality_when_reference_is_optimal():
    """If every action is optimal (equal rewards), all advantages are 0 and the minimiser is pi_ref."""
    rewards = torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64)
    ref_logits = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    mu = torch.tensor([1 / 3] * 3, dtype=torch.float64)
    pi_new = _minimise(ref_logits, rewards, 0.3, mu)
    pi_ref = torch.softmax(ref_logits, -1)
    assert torch.allclose(pi_new, pi_ref, atol=1e-8)
    assert math.isclose(float((pi_new * rewards).sum()), float((pi_ref * rewards).sum()), abs_tol=1e-12)


def test_sibling_mean_advantages():
    assert state_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    adv = state_advantages([0.9, 0.2, 0.2, 0.5])
    assert math.isclose(sum(adv), 0.0, abs_tol=1e-12)


def test_critic_loss_and_gradient():
    z = torch.tensor([0.3, -2.0, 1.5], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.25, 0.0, 1.0], dtype=torch.float64)
    loss = critic_loss(z, t)
    v = torch.sigmoid(z.detach())
    expected = -(t * torch.log(v) + (1 - t) * torch.log(1 - v)).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(z.grad, ((v - t) / 3).float().double(), atol=1e-6)


def test_dpo_loss():
    c, r = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -2.0])
    beta = 0.5
    margins = [beta * ((-1.0 + 1.5) - (-3.0 + 2.0)), beta * ((-2.0 + 2.0) - (-1.0 + 2.0))]
    expected = np.mean([-math.log(1 / (1 + math.exp(-m))) for m in margins])
    assert math.isclose(dpo_loss(c, r, rc, rr, beta).item(), expected, rel_tol=1e-6)


def test_auc_and_ece_against_brute_force():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60) / 4  # many ties
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert math.isclose(auc(s, y), brute, rel_tol=1e-12)
    assert auc([0.1, 0.2], [True, True]) is None
    assert ece([0.25, 0.25, 0.75], [0.0, 0.5, 1.0]) == pytest.approx((2 / 3) * 0.0 + (1 / 3) * 0.25)
