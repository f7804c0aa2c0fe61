"""Answers of the math tasks: the gold answer of a GSM8K solution, the model's answer in a
completion, and the small normalisation applied before math-verify compares them.

Answer extraction (`extract_answer`): the LAST complete `\\boxed{...}` (or `\\fbox{...}`,
`\\boxed N`) of the completion counts; a model that boxes several candidates is judged on its final
one. Only for GSM8K-style problems (gold from a `####` line, or task "gsm8k"), a completion with no
boxed answer may instead end its answer with a `#### N` line (the format of the GSM8K solutions) or
say "the (final) answer is N"; N must be a number there. Anything else is "no boxed answer".

Normalisation (`normalize_answer`) before math-verify sees an answer: trailing punctuation, plain
unit words such as "18 dollars", `\\,` / `{,}` thousands separators.

Pure functions of text; equivalence itself is checked in `stepdapo.tasks.verifier`.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_HASH_LINE_RE = re.compile(r"^\s*####\s*(.*?)\s*$", re.MULTILINE)
_HASH_NUM_RE = re.compile(rf"^\s*####\s*\$?\s*({_NUMBER})\s*\.?\s*$", re.MULTILINE)
_ANSWER_IS_RE = re.compile(
    rf"answer\s+is\s*:?\s*(?:\\\(|\$)?\s*(?:\\\$|\$)?\s*({_NUMBER})(?![\d.,]*\d)", re.IGNORECASE)
_TOKEN_RE = re.compile(r"[^\s$]+")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _closing_braces(text: str) -> dict[int, int]:
    """For each `{` of `text`, the index of the `}` that closes it (unclosed ones are absent).
    Escaped braces (`\\{`, `\\}`) do not count. One pass: a completion of thousands of unclosed
    `\\boxed{` must not cost a scan to the end for each."""
    closing: dict[int, int] = {}
    opened: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            opened.append(i)
        elif c == "}" and opened:
            closing[opened.pop()] = i
        i += 1
    return closing


def boxed_contents(text: str) -> list[str]:
    """The contents of every complete `\\boxed{...}` / `\\fbox{...}` / `\\boxed N` in `text`, in
    order. Nested braces are matched; an unclosed `\\boxed{` (a truncated completion) is skipped."""
    out = []
    closing = None
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            if closing is None:
                closing = _closing_braces(text)
            if i in closing:
                out.append(text[i + 1:closing[i]])
        elif i > m.end():  # "\boxed 5": the token after the space
            tok = _TOKEN_RE.match(text, i)
            if tok:
                out.append(tok.group(0))
    return out


def last_boxed(text: str) -> str | None:
    """The contents of the last complete `\\boxed{...}` (or `\\fbox{...}`, `\\boxed N`) in `text`,
    None if there is none. `last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"`."""
    found = boxed_contents(text)
    return found[-1] if found else None


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
