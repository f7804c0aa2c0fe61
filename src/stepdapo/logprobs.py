"""Teacher-forced log-probabilities of completions given prompts (token ids), batched.

Used to cache log pi_ref(a|s) for the actor, to compute log pi_theta(a|s) with gradients while
training it, and by the outcome-level DPO baseline. `log pi(a|s)` is the SUM over the action's
tokens, with no length normalisation (the paper, arXiv 2412.18279, eq. for the actor loss).
"""

from __future__ import annotations

import torch


def pad_pairs(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """LEFT-pad prompt+completion sequences so that every completion ends in the last column.

    Returns input_ids, attention_mask, position_ids, and a mask over the last K+1 columns (K the
    longest completion) of the positions whose NEXT token is a completion token. Only those K+1
    columns need logits: with a real vocabulary (49k for SmolLM2) the full [B, T, V] logits of
    long prompts would dominate memory.
    """
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    B, T = len(prompts), max(lengths)
    K = max(len(c) for c in completions)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    score = torch.zeros((B, K), dtype=torch.bool)  # column j scores token T-K+j
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, T - len(p) - len(c):] = torch.tensor(p + c)
        attn[i, T - len(p) - len(c):] = 1
        score[i, K - len(c):] = True
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos, score


def sequence_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                      pad_id: int = 0) -> torch.Tensor:
    """Sum of log pi(completion token | prefix) for each pair; differentiable through `model`."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if all(len(c) == 0 for c in completions):
        return torch.zeros(len(prompts))
    device = next(model.parameters()).device
    ids, attn, pos, score = (t.to(device) for t in pad_pairs(prompts, completions, pad_id))
    K = score.shape[1]
    # logits of the last K+1 positions; the first K of them score the last K tokens
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=K + 1).logits[:, :-1].float()
    targets = ids[:, -K:]
    token_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return (token_logp * score).sum(-1)


@torch.no_grad()
def batched_sequence_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                              pad_id: int = 0, batch_size: int = 64) -> list[float]:
    """`sequence_logprobs` without gradients over any number of pairs, in batches of similar
    lengths (less padding)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]) + len(completions[i]), i))
    out = [0.0] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        values = sequence_logprobs(model, [prompts[i] for i in idx], [completions[i] for i in idx], pad_id)
        for i, v in zip(idx, values.tolist()):
            out[i] = v
    return out
