"""What every sampling backend gives the stages: `SamplingParams` in, `Sample`s out, through the
`Generator` protocol; and what both backends share (the tokens that end a solution, prompt encoding).

Prompts are token ids, not text, because a state is an exact token prefix: re-tokenising `s + a` as
text can merge tokens across the boundary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch


@dataclass
class SamplingParams:
    """How to sample.

    temperature: 0 means greedy decoding; otherwise logits are divided by it before sampling.
    top_p: nucleus sampling threshold (1.0 disables it).
    max_new_tokens: longest completion; a sample cut there ends with finish="length".
    stop: "solution" stops at the end-of-sequence token; "step" also stops after the first token
        that contains the task's step delimiter (exactly one reasoning step).
    seed: seed of the sampling noise; the same seed and inputs give the same samples.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop: Literal["solution", "step"] = "solution"
    seed: int = 0


@dataclass
class Sample:
    """One completion. `token_ids` include the token that ended it (EOS or the delimiter's token);
    `text` is their decoding without special tokens; `logprob` is the sum of log pi(token) over
    `token_ids` under the model at temperature 1 (`token_logprobs` holds the terms)."""

    token_ids: list[int]
    text: str
    logprob: float
    finish: Literal["eos", "step", "length"]
    token_logprobs: list[float]


class Generator(Protocol):
    tokenizer: object  # the policy's tokenizer (prompts are encoded with it)
    is_delim: torch.Tensor  # vocabulary mask: tokens that end a step
    last_stats: dict[str, float]  # of the last `generate` call: tokens, seconds, tokens_per_s

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 desc: str = "sampling") -> list[list[Sample]]:
        """n samples for each prompt (token ids); result[i][j] is sample j of prompt i.

        A backend whose prompt i is sampled with seed `params.seed + i*n` and nothing else of the
        call (vLLM; not the HF sampler, one random stream per call) says so with
        `make.seeds_each_prompt = True` on its `make` function: a call on prompts[a:b] with seed
        `seed + a*n` then draws what the whole call draws for them, so evaluation may split its
        shards finer across processes without changing the numbers (stages/evaluate.py)."""


def _eos_ids(tokenizer, model_dir: Path) -> list[int]:
    """The tokens that end a solution (`end_token_ids`), the generation config read from its file."""
    gen_config = model_dir / "generation_config.json"
    gen_eos = json.loads(gen_config.read_text()).get("eos_token_id") if gen_config.is_file() else None
    return end_token_ids(tokenizer, gen_eos)


def chat_turn_end_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>), found by rendering one; None without a template or when
    the template writes plain text there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Answer 7d1f."
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Question?"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this conversation: no answer
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    ids = tokenizer(text.split(marker)[-1], add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])
    special = ids[0] in tokenizer.all_special_ids or (added is not None and getattr(added, "special", False))
    return ids[0] if special else None


def end_token_ids(tokenizer, generation_eos=None) -> list[int]:
    """The tokens that end a solution, for both backends: the tokenizer's EOS, the generation
    config's eos_token_id (an int or a list: an instruct model's end-of-turn, e.g. Llama 3.1's
    <|eot_id|> beside <|end_of_text|>), and the chat template's end of an assistant turn. The last
    one matters where the tokenizer's EOS is the end of a document (<|endoftext|>) and no
    generation config names the turn's end (a base model given a chat template, a GGUF file): the
    policy ends its answer with <|im_end|>, and without it sampling would run on into an invented
    next turn, up to max_new_tokens, whose text the verifier would read."""
    eos = {tokenizer.eos_token_id, chat_turn_end_id(tokenizer)}
    eos |= set(generation_eos) if isinstance(generation_eos, (list, tuple)) else {generation_eos}
    return sorted(e for e in eos if e is not None)


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of prompt texts, with the tokenizer's special tokens (BOS) as the model expects,
    except where a chat template already wrote them into the text (no doubled BOS)."""
    bos = tokenizer.bos_token
    has_bos = [bool(bos) and t.startswith(bos) for t in texts]
    out: list[list[int]] = [[] for _ in texts]
    for flag in (False, True):  # one batched call per kind (a call per text costs ~50 us of Python each)
        idx = [i for i, h in enumerate(has_bos) if h == flag]
        if idx:
            for i, ids in zip(idx, tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]):
                out[i] = ids
    return out
