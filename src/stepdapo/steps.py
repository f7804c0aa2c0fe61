"""Steps: where a solution's token sequence is cut into the steps DAPO scores.

A step ends at a token whose text holds the step delimiter (the paper: a newline), so states are
exact token prefixes and an action is the tokens up to and including the next such token. Every
stage that makes or reads states (states, labels, critic, advantages, plan, prm) cuts with
`split_steps` over `delimiter_token_mask`; `check_step_delimiter` refuses a delimiter that a
tokenizer writes across several tokens (no step would ever end).
"""

from __future__ import annotations

import numpy as np
import torch


def delimiter_token_mask(tokenizer, delimiter: str) -> torch.Tensor:
    """Boolean mask over the vocabulary: does the token's text contain the step delimiter?

    A BPE vocabulary holds the delimiter inside larger tokens ("\n\n", " \n", "\n   ", ".\n"):
    each of them ends a step. A delimiter the tokenizer splits across tokens is refused
    (`check_step_delimiter`)."""
    vocab = len(tokenizer)
    mask = torch.zeros(vocab, dtype=torch.bool)
    for tok_id in range(vocab):
        if delimiter in tokenizer.decode([tok_id]):
            mask[tok_id] = True
    return mask


def check_step_delimiter(tokenizer, delimiter: str, is_delim: torch.Tensor | None = None) -> None:
    """Refuse a step delimiter that this tokenizer writes across tokens. Steps end at a token that
    holds the whole delimiter, so a delimiter split into pieces would never end one and every
    solution would silently be a single step: "\n\n" with a GPT-2-style tokenizer (SmolLM2's
    writes "a.\n\nb" as "a", ".", "\n", "\n", "b"). Checked on short texts with the delimiter
    between two sentences."""
    from stepdapo.errors import ConfigError

    if is_delim is None:
        is_delim = delimiter_token_mask(tokenizer, delimiter)
    for text in (f"Step one is done.{delimiter}Step two", f"x = 1{delimiter}y = 2"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(split_steps(ids, is_delim)) < 2:
            pieces = [tokenizer.decode([t]) for t in ids]
            raise ConfigError(f"step delimiter {delimiter!r}: this tokenizer writes it across several tokens "
                              f"({text!r} -> {pieces}), so no step would ever end; use a delimiter it keeps in "
                              f"one token (e.g. \"\\n\": blank lines then end the step before them)")


def split_steps(token_ids: list[int], is_delim: torch.Tensor) -> list[int]:
    """End offsets of the steps of a token sequence: a step ends after a token that contains the
    delimiter; whatever follows the last delimiter (the answer line and EOS, or a truncated tail)
    is the last step.

    Consecutive delimiter tokens end ONE step, after the last of them, and a step needs at least
    one token that is not a delimiter token before it can end. Why: a byte-level BPE tokenizer
    (SmolLM2's, GPT-2's) writes a blank line "a\n\nb" as "a", "\n", "\n", "b" (it only merges
    "\n\n" before whitespace), which would otherwise make a step of a lone "\n": a state whose
    action is an empty line, twice the states and rollouts for nothing. So "a\n\nb" is the steps
    "a\n\n" and "b", as with tokenizers that merge the newlines (Llama 3, Qwen2). A completion
    that starts with blank lines keeps them in its first step. (The rule sees delimiter tokens, not
    whitespace: a lone space token before a newline, " \n \nq" at the start of a text, still
    counts as content.) One-step sampling (stop="step")
    stops at the first delimiter token and cannot look ahead: the pipeline splits whole samples."""
    # Vectorised (a Python loop over a million solutions' tokens is minutes): a step ends after each
    # run of delimiter tokens, except a run at the very start, which has no content before it (between
    # two runs there is always a token that is not a delimiter, or they would be one run).
    d = np.asarray(is_delim)[np.asarray(token_ids, dtype=np.int64)]
    run_end = np.flatnonzero(d & ~np.append(d[1:], False)) + 1
    ends = run_end[1:] if len(d) and d[0] else run_end
    ends = ends.tolist()
    if not ends or ends[-1] != len(token_ids):
        ends.append(len(token_ids))
    return ends
