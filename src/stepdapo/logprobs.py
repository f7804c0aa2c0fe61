"""Teacher-forced log-probabilities of completions given prompts (token ids), batched.

Used to cache log pi_ref(a|s) for the actor, to compute log pi_theta(a|s) with gradients while
training it, and by the outcome-level DPO baseline. `log pi(a|s)` is the SUM over the action's
tokens, with no length normalisation (the paper, arXiv 2412.18279, eq. for the actor loss).
"""

from __future__ import annotations

import inspect

import torch
from transformers import LlamaModel

# transformers 5.x renamed the forward argument `past_key_values` to `cache` (the old name warns)
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


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
                      pad_id: int = 0, shared_prefix: bool = False) -> torch.Tensor:
    """Sum of log pi(completion token | prefix) for each pair; differentiable through `model`.
    With `shared_prefix`, each distinct prompt is computed once for all its completions
    (`grouped_sequence_logprobs`): the same values, fewer tokens through the model."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if all(len(c) == 0 for c in completions):
        return torch.zeros(len(prompts))
    if shared_prefix:
        prefixes, members = group_pairs(prompts)
        values = grouped_sequence_logprobs(model, prefixes, [[completions[i] for i in m] for m in members], pad_id)
        where = torch.empty(len(prompts), dtype=torch.long)
        where[[i for m in members for i in m]] = torch.arange(len(prompts))
        return values[where.to(values.device)]  # back in the pairs' order (indexing keeps the gradient)
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
                              pad_id: int = 0, batch_size: int = 64, shared_prefix: bool = False) -> list[float]:
    """`sequence_logprobs` without gradients over any number of pairs, in batches of similar
    lengths (less padding); with `shared_prefix`, `batched_grouped_logprobs`."""
    if shared_prefix:
        return batched_grouped_logprobs(model, prompts, completions, pad_id, batch_size)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]) + len(completions[i]), i))
    out = [0.0] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        values = sequence_logprobs(model, [prompts[i] for i in idx], [completions[i] for i in idx], pad_id)
        for i, v in zip(idx, values.tolist()):
            out[i] = v
    return out


# -- shared prefixes: each state's prefix computed once for all its actions -------------------------
#
# A state s is hundreds of tokens, its M candidate actions tens. Instead of M rows s+a_j, the
# prefixes run once (left-padded, use_cache=True), the cache rows are copied to one per continuation
# (index_select: autograd flows back through the copies into the shared prefix, so gradients are the
# sum over the continuations, exactly as in the per-pair computation), and the continuations run on
# the cached keys/values with the prefix's mask in front of theirs and positions continuing the
# prefix's. Exact: the same attention scores over the same keys, only fewer rows.

def _run_prefixes(model, prefixes: list[list[int]], pad_id: int, device, **kw):
    """The left-padded prefixes through `model` with a fresh DynamicCache: (output, cache, attention
    mask [G, P], next position of each prefix [G], input ids [G, P])."""
    from transformers import DynamicCache

    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token")
    G, P = len(prefixes), max(len(p) for p in prefixes)
    ids = torch.full((G, P), pad_id, dtype=torch.long)
    attn = torch.zeros((G, P), dtype=torch.long)
    for i, p in enumerate(prefixes):  # left padding: every prefix ends in the last column
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{CACHE_KW: cache}, **kw)
    if cache.get_seq_length() != P:  # e.g. gradient checkpointing drops the cache: never score on an empty one
        raise RuntimeError("the model did not keep the prefixes' keys/values (gradient checkpointing drops them): "
                           "turn shared_prefix off")
    return out, cache, attn, attn.sum(-1), ids


def _run_continuations(model, cache, prefix_attn, next_pos, rows: torch.Tensor, continuations: list[list[int]],
                       pad_id: int, **kw):
    """The RIGHT-padded continuations (row i continues prefix rows[i]) on a copy of the prefixes'
    cache rows: (output, input_ids [N, K], mask [N, K])."""
    device = prefix_attn.device
    cache.batch_select_indices(rows)  # differentiable copies of the prefix keys/values
    N, K = len(continuations), max(len(c) for c in continuations)
    ids = torch.full((N, K), pad_id, dtype=torch.long)
    attn = torch.zeros((N, K), dtype=torch.long)
    for i, c in enumerate(continuations):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        attn[i, :len(c)] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = next_pos[rows, None] + torch.arange(K, device=device)  # positions continue each prefix's
    out = model(input_ids=ids, attention_mask=torch.cat([prefix_attn[rows], attn], -1), position_ids=pos,
                use_cache=True, **{CACHE_KW: cache}, **kw)
    return out, ids, attn


def grouped_sequence_logprobs(model, prefixes: list[list[int]], continuations: list[list[list[int]]],
                              pad_id: int = 0) -> torch.Tensor:
    """`sequence_logprobs` of every (prefixes[g], continuations[g][j]), flattened in that order, with
    each prefix computed once; differentiable through `model`."""
    rows = [g for g, cs in enumerate(continuations) for _ in cs]
    flat = [c for cs in continuations for c in cs]
    if not flat:
        return torch.zeros(0)
    if all(len(c) == 0 for c in flat):
        return torch.zeros(len(flat))
    keep = [i for i, c in enumerate(flat) if c]  # an empty continuation has log-prob 0 and no row
    _, token_logp, _ = grouped_logprobs(model, prefixes, [rows[i] for i in keep], [flat[i] for i in keep], pad_id)
    values = token_logp.sum(-1)
    result = torch.zeros(len(flat), dtype=values.dtype, device=values.device)
    return result.index_copy(0, torch.tensor(keep, device=values.device), values)


def grouped_logprobs(model, prefixes: list[list[int]], rows: list[int], continuations: list[list[int]],
                     pad_id: int = 0, prefix_from: list[int] | None = None, **continuation_kw):
    """Each prefix through `model` once and each (non-empty) continuation i on the keys/values of
    prefix rows[i]; differentiable through `model`. Returns (the log-prob of each prefix's own tokens
    from its token prefix_from[g] on, [G, L] (None without `prefix_from`); the log-prob of each
    continuation's tokens given its prefix, [N, K]; the continuations' output, run with
    `continuation_kw`), per token, 0 where nothing is counted: summed by the caller, after it has
    taken any difference between two models token by token (a difference of two long sums loses
    digits). A prefix's first token has no log-prob: it is counted from token 1 on."""
    device = next(model.parameters()).device
    P = max(len(p) for p in prefixes)
    # left padding: prefix g's token t is in column P - len + t, scored by the logits of the column
    # before; the last column's logits score each continuation's first token
    counted_from = None if prefix_from is None else [P - len(p) + max(f, 1) for p, f in zip(prefixes, prefix_from)]
    keep = 1 if counted_from is None else P - min(min(counted_from) - 1, P - 1)
    out, cache, attn, next_pos, ids = _run_prefixes(model, prefixes, pad_id, device, logits_to_keep=keep)
    logits = out.logits.float()  # columns P - keep .. P - 1
    prefix_logp = None
    if counted_from is not None:
        token_logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, P - keep + 1:, None]).squeeze(-1)
        columns = torch.arange(P - keep + 1, P, device=device)
        counted = columns >= torch.tensor(counted_from, device=device)[:, None]
        prefix_logp = torch.where(counted, token_logp, 0.0)
    rows = torch.as_tensor(rows, device=device)
    out, ids, mask = _run_continuations(model, cache, attn, next_pos, rows, continuations, pad_id, **continuation_kw)
    logits = torch.cat([logits[rows, -1:], out.logits[:, :-1].float()], 1)  # [N, K, V]: row k scores token k
    token_logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    return prefix_logp, token_logp * mask, out


def group_pairs(prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """The distinct prompts (first-seen order) and, for each, the indices of its pairs: how a flat
    list of (prompt, completion) pairs shares its prompts."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    return [list(p) for p in groups], list(groups.values())


@torch.no_grad()
def batched_grouped_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0,
                             batch_size: int = 64) -> list[float]:
    """`batched_sequence_logprobs` with each distinct prompt computed once: pairs are grouped by
    prompt, groups batched (about `batch_size` pairs each) in order of prompt length."""
    prefixes, members = group_pairs(prompts)
    order = sorted(range(len(prefixes)), key=lambda g: (len(prefixes[g]), g))
    out = [0.0] * len(prompts)
    start = 0
    while start < len(order):
        batch, n = [], 0
        while start < len(order) and (not batch or n + len(members[order[start]]) <= batch_size):
            batch.append(order[start])
            n += len(members[order[start]])
            start += 1
        values = grouped_sequence_logprobs(model, [prefixes[g] for g in batch],
                                           [[completions[i] for i in members[g]] for g in batch], pad_id)
        for i, v in zip([i for g in batch for i in members[g]], values.tolist()):
            out[i] = v
    return out
