"""Teacher-forced log-probabilities of completions given prompts (token ids), batched.

Used to cache log pi_ref(a|s) for the actor, to compute log pi_theta(a|s) with gradients while
training it, and by the outcome-level DPO baseline. `log pi(a|s)` is the SUM over the action's
tokens, with no length normalisation (PAPER.md, stage 5).
"""

from __future__ import annotations

import torch


def pad_pairs(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Right-pad prompt+completion sequences; returns input_ids, attention_mask and a mask of the
    positions whose NEXT token is a completion token (the positions whose logits score it)."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    B, T = len(prompts), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    score = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        attn[i, :len(p) + len(c)] = 1
        score[i, len(p) - 1:len(p) + len(c) - 1] = True
    return ids, attn, score


def sequence_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                      pad_id: int = 0) -> torch.Tensor:
    """Sum of log pi(completion token | prefix) for each pair; differentiable through `model`."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    ids, attn, score = pad_pairs(prompts, completions, pad_id)
    ids, attn, score = ids.to(device), attn.to(device), score.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    targets = ids[:, 1:]
    token_logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return (token_logp * score[:, :-1]).sum(-1)


@torch.no_grad()
def batched_sequence_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                              pad_id: int = 0, batch_size: int = 256) -> list[float]:
    """`sequence_logprobs` without gradients over any number of pairs, in batches."""
    out: list[float] = []
    for s in range(0, len(prompts), batch_size):
        out += sequence_logprobs(model, prompts[s:s + batch_size], completions[s:s + batch_size],
                                 pad_id).tolist()
    return out
