"""The HF backend (`generation.backend: hf`): our own batched decoding loop on an HF causal LM,
on any device, no extra install.

It runs its own loop instead of `model.generate` for three reasons:
- the prompt's prefill is computed ONCE and its KV cache shared by the n samples of that prompt
  (`generate(num_return_sequences=n)` recomputes it n times: the Monte-Carlo labels pay this for
  every state; see bench/bench_sampling.py);
- finished rows are dropped from the batch and the cache as they end, so a batch is never held up
  by padding (states near the end of a solution finish after a few tokens);
- each sample's log-probability under the model itself (temperature 1, no top-p) is accumulated on
  the fly: DAPO needs log pi_ref(a|s) of exactly the sampled tokens.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from stepdapo.generation.base import Sample, SamplingParams, end_token_ids
from stepdapo.precision import sampling_dtype
from stepdapo.steps import delimiter_token_mask


def _choose(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    probs = torch.softmax(logits, -1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class HFGenerator:
    """Batched sampling from an HF causal LM with a KV cache (see the module docstring)."""

    def __init__(self, model, tokenizer, step_delimiter: str = "\n", batch_size: int = 256,
                 progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = torch.tensor(end_token_ids(tokenizer, gen_eos))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.is_delim = delimiter_token_mask(tokenizer, step_delimiter)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.last_stats: dict[str, float] = {}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 desc: str = "sampling") -> list[list[Sample]]:
        if n < 1:
            raise ValueError("n must be >= 1")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (add a BOS token)")
        # the noise is drawn where the logits are (a CPU generator cannot sample CUDA tensors)
        gen = torch.Generator(device=next(self.model.parameters()).device).manual_seed(params.seed)
        # Similar lengths in one batch waste less padding; the order is deterministic.
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        per_batch = max(1, self.batch_size // n)
        results: list[list[Sample] | None] = [None] * len(prompts)
        t0, n_tokens = time.perf_counter(), 0
        bar = tqdm(total=len(prompts) * n, desc=desc, unit="sample", disable=not self.progress,
                   dynamic_ncols=True, leave=False,
                   mininterval=0.1 if sys.stderr.isatty() else 15)  # a log file gets a line per 15 s
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            batch = self._generate_batch([prompts[i] for i in idx], n, params, gen)
            for i, samples in zip(idx, batch):
                results[i] = samples
                n_tokens += sum(len(s.token_ids) for s in samples)
            bar.update(len(idx) * n)
            bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.0f}", refresh=False)
        bar.close()
        elapsed = time.perf_counter() - t0
        self.last_stats = {"tokens": n_tokens, "seconds": elapsed,
                           "tokens_per_s": n_tokens / max(elapsed, 1e-9)}
        return results  # type: ignore[return-value]

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float()

    def _generate_batch(self, prompts: list[list[int]], n: int, params: SamplingParams,
                        gen: torch.Generator) -> list[list[Sample]]:
        device = next(self.model.parameters()).device
        B, L = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
            input_ids[i, L - len(p):] = torch.tensor(p)
            attn[i, L - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        input_ids, attn, pos = input_ids.to(device), attn.to(device), pos.to(device)
        cache = DynamicCache()
        logits = self._forward(input_ids, attn, pos, cache)
        next_pos = pos[:, -1] + 1
        if n > 1:  # share the prefill: copy the cache rows instead of recomputing them
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, 0)
            attn = attn.repeat_interleave(n, 0)
            next_pos = next_pos.repeat_interleave(n, 0)

        rows = B * n
        max_new = params.max_new_tokens
        if self.max_positions:
            max_new = max(1, min(max_new, self.max_positions - L))
        out_tokens: list[list[int]] = [[] for _ in range(rows)]
        out_logp: list[list[float]] = [[] for _ in range(rows)]
        out_finish: list[str] = ["length"] * rows
        row_of = torch.arange(rows)  # current batch position -> original row
        is_delim, eos_ids = self.is_delim.to(device), self.eos_ids.to(device)
        for step in range(max_new):
            tok = _choose(logits, params, gen).to(device)
            lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
            ended_eos = torch.isin(tok, eos_ids)
            ended = ended_eos | (is_delim[tok] if params.stop == "step" else torch.zeros_like(ended_eos))
            tok_l, lp_l, ended_l, eos_l = tok.tolist(), lp.tolist(), ended.tolist(), ended_eos.tolist()
            for j, r in enumerate(row_of.tolist()):
                out_tokens[r].append(tok_l[j])
                out_logp[r].append(lp_l[j])
                if ended_l[j]:
                    out_finish[r] = "eos" if eos_l[j] else "step"
            if ended.all() or step == max_new - 1:
                break
            if ended.any():  # drop finished rows from the batch and the cache
                keep = (~ended).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                tok, attn, next_pos, row_of = tok[keep], attn[keep], next_pos[keep], row_of[keep.cpu()]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            logits = self._forward(tok[:, None], attn, next_pos[:, None], cache)
            next_pos = next_pos + 1

        samples = [Sample(token_ids=out_tokens[r],
                          text=self.tokenizer.decode(out_tokens[r], skip_special_tokens=True),
                          logprob=sum(out_logp[r]), finish=out_finish[r],  # type: ignore[arg-type]
                          token_logprobs=out_logp[r]) for r in range(rows)]
        return [samples[i * n:(i + 1) * n] for i in range(B)]


def hf_sampling_dtype(engine) -> torch.dtype:
    """The dtype the HF sampler loads the policy in: `generation.dtype`, "auto" resolved for this
    machine (stepdapo.precision); no engine: float32. The training stages recompute every log-prob
    they use, so only the samples change."""
    return getattr(torch, sampling_dtype(getattr(engine, "dtype", "float32")))


def make(policy, step_delimiter: str, engine, batch_size: int, progress: bool = True) -> HFGenerator:
    """The HF sampler of the policy at `policy`, on this process's device, in `generation.dtype`."""
    from stepdapo.models import load_policy
    from stepdapo.runner import device

    model, tok = load_policy(policy, dtype=hf_sampling_dtype(engine))
    return HFGenerator(model.to(device()), tok, step_delimiter, batch_size=batch_size, progress=progress)
