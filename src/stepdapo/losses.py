"""The losses, as pure tensor functions (each has a CPU test against a hand-derived reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dapo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              beta: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The DAPO actor loss (Liu et al., arXiv 2412.18279, the actor objective):

        mean_i 0.5 * (A_i / beta - (log pi_theta(a_i|s_i) - log pi_ref(a_i|s_i)))**2

    All inputs are 1-D, one entry per (state, action); log-probs are summed over the action's
    tokens. No clipping, no KL term, no advantage normalisation. `weights` (optional, e.g. how often
    an action was sampled) turn the mean into a weighted mean.
    """
    if not (policy_logps.shape == ref_logps.shape == advantages.shape) or policy_logps.dim() != 1:
        raise ValueError("dapo_loss: policy_logps, ref_logps and advantages must be 1-D and of equal length")
    per = 0.5 * (advantages / beta - (policy_logps - ref_logps)) ** 2
    if weights is None:
        return per.mean()
    return (per * weights).sum() / weights.sum()


def critic_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of V = sigmoid(logits) against soft Monte-Carlo targets in [0, 1]:
    mean of -[MC log V + (1 - MC) log(1 - V)] (chosen over MSE: no vanishing gradients)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Outcome-level DPO (the baseline): mean of -log sigmoid(beta * (chosen log-ratio - rejected
    log-ratio)), log-probs summed over whole solutions."""
    margin = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return -F.logsigmoid(margin).mean()
