"""Answers of the math tasks: the gold answer of a GSM8K solution, the model's answer in a
completion, and the small normalisation applied before math-verify compares them.

Answer extraction (`extract_answer`): the LAST complete `\\boxed{...}` (or `\\fbox{...}`,
`\\boxed N`) of the completion counts; a model that boxes several candidates is judged on its final
one. Only for GSM8K-style problems (gold from a `####` line, or task "gsm8k"), a completion with no
boxed answer may instead end its answer with a `#### N` line (the format of the GSM8K solutions) or
say "the (final) answer is N"; N must be a number there. Anything else is "no boxed answer".

A completion longer than `MAX_COMPLETION_CHARS` is not parsed at all: the math task judges it
incorrect ("completion too long"). Below that, extraction is linear in time and memory in the
completion's length (only spans of boxes are kept, and the patterns cannot backtrack
quadratically), so no completion can make it hang or exhaust memory; math-verify only ever sees the
extracted answer, itself capped (`stepdapo.execution.verifier.MAX_ANSWER_CHARS`).

Normalisation (`normalize_answer`) before math-verify sees an answer: trailing punctuation, plain
unit words such as "18 dollars", `\\,` / `{,}` thousands separators.

Pure functions of text; equivalence itself is checked in `stepdapo.execution.verifier`.
"""

from __future__ import annotations

import re

# Far above any real solution: the longest our configs generate is 2048 tokens (under 10k
# characters), and a 32k-token long-reasoning trace is about 130k characters.
MAX_COMPLETION_CHARS = 500_000

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_HASH_LINE_RE = re.compile(r"^\s*####\s*(.*?)\s*$", re.MULTILINE)
# The patterns below run on whole completions, so none may backtrack more than linearly: no two
# `\s*` around an optional token (`\s*\.?\s*` tries every split of a run of spaces; four of
# them made 200 spaces take 3 s), no `^\s*` that runs over the following lines from every line
# start, and the number matched once: `(?=(N))\1` cannot backtrack into N, which with the
# lookahead after it was quadratic in N's length.
_HASH_NUM_RE = re.compile(rf"^[^\S\n]*####\s*(?:\$\s*)?({_NUMBER})\s*(?:\.\s*)?$", re.MULTILINE)
_ANSWER_IS_RE = re.compile(
    rf"answer\s+is\s*(?::\s*)?(?:(?:\\\(|\$)\s*)?(?:(?:\\\$|\$)\s*)?(?=({_NUMBER}))\1(?![\d.,]*\d)",
    re.IGNORECASE)
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape pair (`\{`, `\\`) or a brace
_TOKEN_RE = re.compile(r"[^\s$]+")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _box_spans(text: str) -> list[tuple[int, int]]:
    """Where the contents of every complete `\\boxed{...}` / `\\fbox{...}` / `\\boxed N` of
    `text` lie, as (start, end) in order. Spans, not copies: copying every box of 10**5 nested
    `\\boxed{` is quadratic in memory. Nested braces are matched and escaped ones (`\\{`, `\\}`)
    do not count; an unclosed `\\boxed{` (a truncated completion) is skipped. Linear time and
    memory: one pass finds the boxes, one pass over the braces closes them."""
    spans: list[tuple[int, int] | None] = []
    slot: dict[int, int] = {}  # index of a box's "{" -> its place in `spans`
    n = len(text)
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "{":
            slot[i] = len(spans)
            spans.append(None)  # filled in when its "}" is found
        elif i > m.end():  # "\boxed 5": the token after the space
            tok = _TOKEN_RE.match(text, i)
            if tok:
                spans.append(tok.span())
    if slot:
        # A box's "{" follows a letter or a space, so it is never the second character of an
        # escape: the scan can start at the first one.
        opened: list[int] = []
        for b in _BRACE_RE.finditer(text, min(slot)):
            c = b.group()
            if c == "{":
                opened.append(b.start())
            elif c == "}" and opened:
                i = opened.pop()
                if i in slot:
                    spans[slot[i]] = (i + 1, b.start())
    return [s for s in spans if s is not None]


def last_boxed(text: str) -> str | None:
    """The contents of the last complete `\\boxed{...}` (or `\\fbox{...}`, `\\boxed N`) in `text`,
    None if there is none. `last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"`.
    "Last" is by where the box starts: in `\\boxed{\\boxed{1}}` it is the inner one."""
    spans = _box_spans(text)
    return text[spans[-1][0]:spans[-1][1]] if spans else None


def gsm8k_gold(text: str) -> str | None:
    """The answer of a GSM8K solution: what follows its last `####`, thousands separators removed."""
    found = _HASH_LINE_RE.findall(text)
    if not found:
        return None
    return strip_thousands(found[-1].strip())


def strip_thousands(text: str) -> str:
    """ "1,234" -> "1234"; anything that is not a number with thousands separators is unchanged."""
    return text.replace(",", "") if _THOUSANDS_RE.match(text) else text


def extract_answer(completion: str, gsm8k_style: bool = False) -> str | None:
    """The model's answer: the last boxed answer; for GSM8K-style problems, failing that, a final
    `#### N` line or the last "the answer is N" (N a number). None if there is none."""
    boxed = last_boxed(completion)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    if gsm8k_style:
        found = _HASH_NUM_RE.findall(completion)
        if found:
            return found[-1]
        found = _ANSWER_IS_RE.findall(completion)
        if found:
            return found[-1]
    return None


# Words that are maths, not units, when they follow a number ("2 pi").
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "inf",
               "infty", "infinity", "and", "or", "i", "e"}
# Words of 2+ letters split by spaces or dots; a run of letters cannot be split two ways, so a
# long one that does not match fails in linear time (`(?:[A-Za-z]{2,}\.?\s*)+` was exponential).
_NUM_UNITS_RE = re.compile(
    rf"^\s*(\\?\$)?\s*({_NUMBER})\s*(\\?%)?\s*"
    r"([A-Za-z]{2,}(?:(?:\.\s*|\s+)[A-Za-z]{2,})*\.?\s*)$")


def normalize_answer(text: str) -> str:
    """Small fixes before math-verify sees an answer: surrounding `$`, trailing punctuation, plain
    unit words after a number ("18 dollars" -> "18"), LaTeX thin-space or `{,}` thousands
    separators ("1\\,234" -> "1234")."""
    s = text.strip()
    if "\\boxed" in s or "\\fbox" in s:
        s = (last_boxed(s) or s).strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$") and not s.startswith("$$"):
        s = s[1:-1].strip()
    s = re.sub(r"(?<=\d)(?:\\,|\{,\}|\\!|\\ )(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"(?<![\\.])[.;,!]+$", "", s).strip()
    m = _NUM_UNITS_RE.match(s)
    if m and not set(m.group(4).lower().replace(".", " ").split()) & _MATH_WORDS:
        s = (m.group(1) or "") + m.group(2) + (m.group(3) or "")
    return s


def _latex(answer: str) -> str:
    """An answer as math-verify input: inside `\\boxed{}`, which math-verify extracts first and
    which parses LaTeX and plain numbers alike."""
    return "\\boxed{" + answer + "}"
