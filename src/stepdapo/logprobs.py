"""Teacher-forced log-probabilities of completions given prompts (token ids), batched.

Used to cache log pi_ref(a|s) for the actor, to compute log pi_theta(a|s) with gradients while
training it, and by the outcome-level DPO baseline. `log pi(a|s)` is the SUM over the action's
tokens, with no length normalisation (the paper, arXiv 2412.18279, eq. for the actor loss).
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import checkpoint
from transformers import LlamaModel

# transformers 5.x renamed the forward argument `past_key_values` to `cache` (the old name warns)
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

LOGITS_CHUNK = 4096  # the config's `logits_chunk_tokens` default
MAX_BATCH_TOKENS = 32768  # the config's `max_batch_tokens` default


# -- log-probs from the last hidden states, the vocabulary projected a chunk of positions at a time ----
#
# log p(x_t) = logit(x_t) - logsumexp(logits) needs the logits of every scored position: [N, T, V], in
# float32 for the logsumexp. At a 128k-152k vocabulary and 1-2k-token sequences that is tens of GB per
# copy (and log_softmax keeps another for its backward). Instead the model's forward stops at its last
# hidden states (HF computes the logits of one position only: `logits_to_keep=1`) and the output
# projection runs on `chunk` positions at a time, each chunk under activation checkpointing, so its
# logits are recomputed in the backward pass instead of kept: at most one chunk's float32 logits exist.

def _unwrapped(model):
    """The HF model inside a DDP / FSDP (`.module`) or PEFT (`get_base_model`) wrapper."""
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _projection(model):
    """(the decoder, the output projection) of a causal LM whose logits are projection(decoder's last
    hidden state); None when the model does not name them."""
    inner = _unwrapped(model)
    get_decoder, get_head = getattr(inner, "get_decoder", None), getattr(inner, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    return None if decoder is None or head is None or decoder is inner else (decoder, head)


def forward_hidden(model, logits_chunk: int = LOGITS_CHUNK, keep: int = 1, **inputs):
    """Run `model` on `inputs` for log-probs at (some of) its last `keep` positions. Returns (the
    output, the last hidden states [B, T, H], the features of the last `keep` positions, the
    projection to apply to them (None: the features are already logits)). With `logits_chunk` > 0 the
    features are hidden states and HF projects only the last position, which is checked against our
    own projection of it (an architecture that scales or caps its logits is refused: set
    logits_chunk_tokens=0); with 0, HF's own logits of the last `keep` positions (the plain path)."""
    proj = _projection(model) if logits_chunk > 0 else None
    if proj is None:
        if logits_chunk > 0:
            raise ValueError(f"{type(_unwrapped(model)).__name__}: no get_decoder() / get_output_embeddings() to "
                             f"compute log-probs from hidden states: set logits_chunk_tokens=0")
        out = model(**inputs, logits_to_keep=keep, output_hidden_states=True)
        return out, out.hidden_states[-1], out.logits, None
    decoder, head = proj
    seen = []
    hook = decoder.register_forward_hook(lambda _m, _args, output: seen.append(output[0]))
    try:
        out = model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    hidden = seen[-1]
    with torch.no_grad():  # the model's own last-position logits must be our projection's
        ours, theirs = head(hidden[:, -1]).float(), out.logits[:, -1].float()
        if not torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * (1 + float(theirs.abs().max()))):
            raise ValueError(f"{type(_unwrapped(model)).__name__}: its logits are not its output projection of "
                             f"its last hidden state (scaled or capped logits?): set logits_chunk_tokens=0")
    return out, hidden, hidden[:, -keep:], head


def _chunk_logprobs(features: torch.Tensor, targets: torch.Tensor, head) -> torch.Tensor:
    logits = (features if head is None else head(features)).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def token_logprobs(features: torch.Tensor, targets: torch.Tensor, head=None,
                   logits_chunk: int = LOGITS_CHUNK) -> torch.Tensor:
    """log softmax(head(features))[target] for features [..., H] and targets [...] of the same leading
    shape, in float32, `logits_chunk` positions at a time (0: all at once); differentiable, each chunk
    recomputed in the backward pass instead of keeping its logits. `head` None: the features are
    logits already."""
    shape = targets.shape
    features, targets = features.reshape(-1, features.shape[-1]), targets.reshape(-1)
    n = len(targets)
    step = n if logits_chunk <= 0 else logits_chunk
    grad = torch.is_grad_enabled() and (features.requires_grad or
                                        (head is not None and any(p.requires_grad for p in head.parameters())))
    pieces = []
    for s in range(0, n, max(step, 1)):
        f, t = features[s:s + step], targets[s:s + step]
        if grad and step < n:
            pieces.append(checkpoint(_chunk_logprobs, f, t, head, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(f, t, head))
    return (torch.cat(pieces) if pieces else features.new_zeros(0, dtype=torch.float)).view(shape)


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


def keeps_cache(model) -> bool:
    """Whether `model`'s forward keeps the KV cache that shared prefixes reuse: not while it trains
    under gradient checkpointing (HF drops the cache there)."""
    inner = _unwrapped(model)
    # the property's name in the installed transformers (`is_gradient_checkpointing` is deprecated since 5.2x)
    name = next((n for n in ("is_activation_checkpointing", "is_gradient_checkpointing") if hasattr(type(inner), n)),
                None)
    return not (inner.training and name is not None and getattr(inner, name))


def sequence_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                      pad_id: int = 0, shared_prefix: bool = False, logits_chunk: int = LOGITS_CHUNK) -> torch.Tensor:
    """Sum of log pi(completion token | prefix) for each pair; differentiable through `model`.
    With `shared_prefix`, each distinct prompt is computed once for all its completions
    (`grouped_sequence_logprobs`): the same values, fewer tokens through the model; a model training
    under gradient checkpointing (no KV cache) packs each prompt and its completions into one row
    (`packed_sequence_logprobs`), or, with an attention that takes no 4-D mask, runs a row per pair.
    Log-probs come from the hidden states, `logits_chunk` positions at a time (`token_logprobs`)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if all(len(c) == 0 for c in completions):
        return torch.zeros(len(prompts))
    if shared_prefix and (keeps_cache(model) or packs(model)):
        prefixes, members = group_pairs(prompts)
        grouped = grouped_sequence_logprobs if keeps_cache(model) else packed_sequence_logprobs
        values = grouped(model, prefixes, [[completions[i] for i in m] for m in members], pad_id, logits_chunk)
        where = torch.empty(len(prompts), dtype=torch.long)
        where[[i for m in members for i in m]] = torch.arange(len(prompts))
        return values[where.to(values.device)]  # back in the pairs' order (indexing keeps the gradient)
    device = next(model.parameters()).device
    ids, attn, pos, score = (t.to(device) for t in pad_pairs(prompts, completions, pad_id))
    K = score.shape[1]
    # the last K+1 positions; the first K of them score the last K tokens (only the scored ones projected)
    _, _, features, head = forward_hidden(model, logits_chunk, K + 1, input_ids=ids, attention_mask=attn,
                                          position_ids=pos, use_cache=False)  # no KV cache to build and drop
    logp = token_logprobs(features[:, :-1][score], ids[:, -K:][score], head, logits_chunk)
    rows = torch.arange(len(prompts), device=device)[:, None].expand(-1, K)[score]
    return torch.zeros(len(prompts), device=device, dtype=logp.dtype).index_add(0, rows, logp)


def token_batches(lengths: list[int], max_batch_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices into `lengths` in batches of similar lengths whose padded size (rows x the longest)
    stays within `max_batch_tokens` (a longer row alone), and within `max_rows` rows if given."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, batch = [], []
    for i in order:  # ascending: the newest row is the batch's longest
        if batch and ((len(batch) + 1) * lengths[i] > max_batch_tokens or (max_rows and len(batch) >= max_rows)):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


@torch.no_grad()
def batched_sequence_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                              pad_id: int = 0, batch_size: int | None = None, shared_prefix: bool = False,
                              max_batch_tokens: int = MAX_BATCH_TOKENS, logits_chunk: int = LOGITS_CHUNK) -> list[float]:
    """`sequence_logprobs` without gradients over any number of pairs, in batches of similar
    lengths (less padding) of at most `max_batch_tokens` padded tokens (and `batch_size` pairs if
    given); with `shared_prefix`, `batched_grouped_logprobs`."""
    if shared_prefix:
        return batched_grouped_logprobs(model, prompts, completions, pad_id, batch_size, max_batch_tokens,
                                        logits_chunk)
    out = [0.0] * len(prompts)
    for idx in token_batches([len(p) + len(c) for p, c in zip(prompts, completions)], max_batch_tokens, batch_size):
        values = sequence_logprobs(model, [prompts[i] for i in idx], [completions[i] for i in idx], pad_id,
                                   logits_chunk=logits_chunk)
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

def _run_prefixes(model, prefixes: list[list[int]], pad_id: int, device, call=None, **kw):
    """The left-padded prefixes through `model` with a fresh DynamicCache: (output, cache, attention
    mask [G, P], next position of each prefix [G], input ids [G, P]). `call(**inputs)` runs the model
    (default: `model(**inputs, **kw)`) and its result is the output returned."""
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
    call = call or (lambda **inputs: model(**inputs, **kw))
    out = call(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{CACHE_KW: cache})
    if cache.get_seq_length() != P:  # e.g. gradient checkpointing drops the cache: never score on an empty one
        raise RuntimeError("the model did not keep the prefixes' keys/values (gradient checkpointing drops them): "
                           "turn shared_prefix off")
    return out, cache, attn, attn.sum(-1), ids


def _run_continuations(model, cache, prefix_attn, next_pos, rows: torch.Tensor, continuations: list[list[int]],
                       pad_id: int, call=None, **kw):
    """The RIGHT-padded continuations (row i continues prefix rows[i]) on a copy of the prefixes'
    cache rows: (output, input_ids [N, K], mask [N, K]); `call` as in `_run_prefixes`."""
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
    call = call or (lambda **inputs: model(**inputs, **kw))
    out = call(input_ids=ids, attention_mask=torch.cat([prefix_attn[rows], attn], -1), position_ids=pos,
               use_cache=True, **{CACHE_KW: cache})
    return out, ids, attn


def grouped_sequence_logprobs(model, prefixes: list[list[int]], continuations: list[list[list[int]]],
                              pad_id: int = 0, logits_chunk: int = LOGITS_CHUNK) -> torch.Tensor:
    """`sequence_logprobs` of every (prefixes[g], continuations[g][j]), flattened in that order, with
    each prefix computed once; differentiable through `model`."""
    rows = [g for g, cs in enumerate(continuations) for _ in cs]
    flat = [c for cs in continuations for c in cs]
    if not flat:
        return torch.zeros(0)
    if all(len(c) == 0 for c in flat):
        return torch.zeros(len(flat))
    keep = [i for i, c in enumerate(flat) if c]  # an empty continuation has log-prob 0 and no row
    _, token_logp, _ = grouped_logprobs(model, prefixes, [rows[i] for i in keep], [flat[i] for i in keep], pad_id,
                                        logits_chunk=logits_chunk)
    values = token_logp.sum(-1)
    result = torch.zeros(len(flat), dtype=values.dtype, device=values.device)
    return result.index_copy(0, torch.tensor(keep, device=values.device), values)


def _masked_logprobs(features: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, head,
                     logits_chunk: int) -> torch.Tensor:
    """`token_logprobs` at the positions of `mask` [B, L] (others 0, not projected): [B, L]."""
    logp = token_logprobs(features[mask], targets[mask], head, logits_chunk)
    return torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device).masked_scatter(mask, logp)


def grouped_logprobs(model, prefixes: list[list[int]], rows: list[int], continuations: list[list[int]],
                     pad_id: int = 0, prefix_from: list[int] | None = None, logits_chunk: int = LOGITS_CHUNK):
    """Each prefix through `model` once and each (non-empty) continuation i on the keys/values of
    prefix rows[i]; differentiable through `model`. Returns (the log-prob of each prefix's own tokens
    from its token prefix_from[g] on, [G, L] (None without `prefix_from`); the log-prob of each
    continuation's tokens given its prefix, [N, K]; the continuations' last hidden states [N, K, H]),
    per token, 0 where nothing is counted: summed by the caller, after it has taken any difference
    between two models token by token (a difference of two long sums loses digits). A prefix's first
    token has no log-prob: it is counted from token 1 on."""
    device = next(model.parameters()).device
    P = max(len(p) for p in prefixes)
    # left padding: prefix g's token t is in column P - len + t, scored by the features of the column
    # before; the last column's features score each continuation's first token
    counted_from = None if prefix_from is None else [P - len(p) + max(f, 1) for p, f in zip(prefixes, prefix_from)]
    keep = 1 if counted_from is None else P - min(min(counted_from) - 1, P - 1)
    (_, _, prefix_features, head), cache, attn, next_pos, ids = _run_prefixes(
        model, prefixes, pad_id, device, call=lambda **inputs: forward_hidden(model, logits_chunk, keep, **inputs))
    prefix_logp = None
    if counted_from is not None:
        columns = torch.arange(P - keep + 1, P, device=device)
        counted = columns >= torch.tensor(counted_from, device=device)[:, None]
        prefix_logp = _masked_logprobs(prefix_features[:, :-1], ids[:, P - keep + 1:], counted, head, logits_chunk)
    rows = torch.as_tensor(rows, device=device)
    K = max(len(c) for c in continuations)
    (_, hidden, features, _), ids, mask = _run_continuations(
        model, cache, attn, next_pos, rows, continuations, pad_id,
        call=lambda **inputs: forward_hidden(model, logits_chunk, K, **inputs))
    features = torch.cat([prefix_features[rows, -1:], features[:, :-1]], 1)  # [N, K, *]: column k scores token k
    return prefix_logp, _masked_logprobs(features, ids, mask.bool(), head, logits_chunk), hidden


# -- packed shared prefixes: for training under gradient checkpointing --------------------------------
#
# Gradient checkpointing drops the KV cache the scheme above reuses. Packing needs none: each prefix
# and all its continuations are ONE row, [prefix, c_1, c_2, ...], with a 4-D attention mask in which
# a continuation token sees the prefix and the earlier tokens of its own continuation only, and
# positions that restart at the prefix's end for every continuation. The same attention scores over
# the same keys as the per-pair rows (so the same log-probs and gradients), each prefix computed once,
# and a plain forward pass that checkpointing, DDP and FSDP handle as any other.

PACKED_ATTENTION = ("sdpa", "eager")  # the attention implementations that take a custom 4-D mask


def packs(model) -> bool:
    """Whether `model`'s attention takes the packed rows' 4-D mask (sdpa, eager; not flash-attention)."""
    config = getattr(_unwrapped(model), "config", None)
    return getattr(config, "_attn_implementation", None) in PACKED_ATTENTION


def packed_sequence_logprobs(model, prefixes: list[list[int]], continuations: list[list[list[int]]],
                             pad_id: int = 0, logits_chunk: int = LOGITS_CHUNK) -> torch.Tensor:
    """`grouped_sequence_logprobs` (each prefix once for all its continuations, the values flattened
    in that order) with every group packed into one row and no KV cache; differentiable."""
    device = next(model.parameters()).device
    flat = [c for cs in continuations for c in cs]
    if not flat or all(len(c) == 0 for c in flat):
        return torch.zeros(len(flat), device=device)
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("every prefix needs at least one token")
    rows = [p + [t for c in cs for t in c] for p, cs in zip(prefixes, continuations)]
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    segment = torch.full((B, L), -1, dtype=torch.long)  # 0: the prefix; j + 1: continuation j; -1: padding
    feature_at, scored, owner = [], [], []  # each continuation token: the column whose features score it
    k = 0
    for b, (p, cs) in enumerate(zip(prefixes, continuations)):
        ids[b, :len(rows[b])] = torch.tensor(rows[b])
        pos[b, :len(p)] = torch.arange(len(p))
        segment[b, :len(p)] = 0
        at = len(p)
        for j, c in enumerate(cs):
            pos[b, at:at + len(c)] = torch.arange(len(p), len(p) + len(c))
            segment[b, at:at + len(c)] = j + 1
            for t in range(len(c)):  # token t: after the prefix's last token, then after its own t - 1
                feature_at.append((b, len(p) - 1 if t == 0 else at + t - 1))
                scored.append(c[t])
                owner.append(k)
            at += len(c)
            k += 1
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    allow = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allow |= torch.eye(L, dtype=torch.bool)  # padding queries see themselves (a row with no key is NaN)
    if getattr(_unwrapped(model).config, "_attn_implementation", None) == "eager":  # eager adds the mask
        mask = torch.where(allow, 0.0, torch.finfo(torch.float32).min)[:, None]
    else:
        mask = allow[:, None]
    _, _, features, head = forward_hidden(model, logits_chunk, L, input_ids=ids.to(device),
                                          attention_mask=mask.to(device), position_ids=pos.to(device),
                                          use_cache=False)
    where = torch.tensor(feature_at, device=device)
    logp = token_logprobs(features[where[:, 0], where[:, 1]], torch.tensor(scored, device=device), head,
                          logits_chunk)
    return torch.zeros(len(flat), dtype=logp.dtype, device=device).index_add(
        0, torch.tensor(owner, device=device), logp)


def group_pairs(prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """The distinct prompts (first-seen order) and, for each, the indices of its pairs: how a flat
    list of (prompt, completion) pairs shares its prompts."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    return [list(p) for p in groups], list(groups.values())


@torch.no_grad()
def batched_grouped_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0,
                             batch_size: int | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS,
                             logits_chunk: int = LOGITS_CHUNK) -> list[float]:
    """`batched_sequence_logprobs` with each distinct prompt computed once: pairs are grouped by
    prompt, groups batched in order of prompt length, a batch's continuation rows x (the longest
    prefix + the longest continuation) within `max_batch_tokens` (each row attends over its own copy
    of its prefix's keys/values), and its pairs within `batch_size` if given; one group may exceed
    either."""
    prefixes, members = group_pairs(prompts)
    order = sorted(range(len(prefixes)), key=lambda g: (len(prefixes[g]), g))
    out = [0.0] * len(prompts)
    start = 0
    while start < len(order):
        batch, n, longest = [], 0, 0

        def fits(g: int) -> bool:
            # every continuation row attends over its own copy of its prefix's keys/values: the batch's
            # memory is that of rows x (longest prefix + longest continuation), as without sharing
            rows, k = n + len(members[g]), max(longest, max(len(completions[i]) for i in members[g]))
            tokens = rows * (len(prefixes[g]) + k)  # ascending prefixes: g's is the longest
            return tokens <= max_batch_tokens and (batch_size is None or rows <= batch_size)

        while start < len(order) and (not batch or fits(order[start])):
            g = order[start]
            batch.append(g)
            n += len(members[g])
            longest = max(longest, max(len(completions[i]) for i in members[g]))
            start += 1
        values = grouped_sequence_logprobs(model, [prefixes[g] for g in batch],
                                           [[completions[i] for i in members[g]] for g in batch], pad_id,
                                           logits_chunk)
        for i, v in zip([i for g in batch for i in members[g]], values.tolist()):
            out[i] = v
    return out
