"""GSM8K / MATH-style tasks: free-form reasoning that ends in a `\\boxed{}` answer, checked with
math-verify.

    prompt:      <question>\\n\\n<instruction>   (the user turn of the chat template, if the model has one)
    completion:  "...reasoning, one step per line...\\nThe answer is $\\boxed{18}$."

Problems come from a .jsonl / .json / .parquet file or a Hugging Face dataset (see `MathConfig`). The
gold answer is the text after GSM8K's final `#### N` line (thousands separators removed), MATH's
`answer` field as is, or else the last `\\boxed{}` of the worked solution.

The model's answer is its last boxed answer (`stepdapo.tasks.answers`). Equivalence is
math-verify's (`parse` + `verify`: numbers, fractions vs decimals, LaTeX forms, sets, intervals,
...), run in a worker process with a per-answer timeout of `verify_timeout` seconds
(`stepdapo.execution.verifier`): a pathological answer is judged incorrect ("verifier timeout") instead
of hanging the run.
"""

from __future__ import annotations

import math

from collections.abc import Iterable
from typing import Any

from pydantic import Field

from stepdapo.errors import ConfigError, DataError, excerpt, listing
from stepdapo.settings import Section
from stepdapo.tasks import Problem, Task, Verdict
from stepdapo.tasks.answers import MAX_COMPLETION_CHARS, extract_answer, gsm8k_gold, last_boxed
from stepdapo.tasks.data import read_rows
from stepdapo.execution.verifier import check_equivalent


class MathConfig(Section):
    """GSM8K / MATH-style problems: step-by-step reasoning ending in a `\\boxed{}` answer, checked
    with math-verify."""

    train: str | None = None
    """the train split's source: a .jsonl / .json / .parquet path, or a Hugging Face dataset name
    (`openai/gsm8k`, or `name:config` such as `openai/gsm8k:main`), loaded with
    `datasets.load_dataset` (needs the network or a local HF cache). null: no train split
    (evaluation only)."""
    test: str | None = None
    """the test split's source, as `train`."""
    hf_train_split: str = "train"
    """split name for `train` when it is a hub dataset."""
    hf_test_split: str = "test"
    """split name for `test` when it is a hub dataset."""
    question_field: str = "question"
    """the field with the problem text (GSM8K "question", MATH "problem")."""
    answer_field: str = "answer"
    """the field with the gold answer. GSM8K's `answer` holds the reasoning and a final `#### N`
    line; only N is kept. MATH's `answer` is the answer itself."""
    solution_field: str = "solution"
    """a worked solution whose (last) `\\boxed{}` is the gold answer, used when a row has no
    `answer_field` (the original MATH files)."""
    id_field: str | None = None
    """the field with a stable problem id (null: `<split>-<row index>`)."""
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    """appended to the question in the user turn of the chat template."""
    step_delimiter: str = Field("\n", min_length=1)
    """the text that ends a step (the paper: a newline)."""
    verify_timeout: float = Field(5.0, gt=0, le=86400)
    """seconds math-verify may spend on one completion before it is judged incorrect ("verifier
    timeout")."""


class MathTask(Task):
    def __init__(self, cfg: MathConfig | None = None, name: str = "math"):
        self.cfg = cfg or MathConfig()
        self.name = name
        self.step_delimiter = self.cfg.step_delimiter
        self._cache: dict[str, list[Problem]] = {}

    # -- problems ------------------------------------------------------------------------------
    def problems(self, split: str) -> list[Problem]:
        if split not in ("train", "test"):
            raise ConfigError(f"{self.name} task: unknown split {split!r} (use 'train' or 'test')")
        if split in self._cache:
            return self._cache[split]
        source = getattr(self.cfg, split)
        if source is None:
            raise ConfigError(f"task.{self.name}.{split} is not set: give a .jsonl / .json / "
                             f".parquet path or a Hugging Face dataset name")
        hf_split = getattr(self.cfg, f"hf_{split}_split")
        out = []
        seen: dict[str, str] = {}
        for index, (where, row) in enumerate(read_rows(str(source), hf_split)):
            p = self._problem(row, where, split, index)
            if p.id in seen:
                raise DataError(f"{where}: duplicate id {excerpt(p.id)} (first at {seen[p.id]})")
            seen[p.id] = where
            out.append(p)
        if not out:
            raise DataError(f"{source}: no rows")
        self._cache[split] = out
        return out

    def _problem(self, row: Any, where: str, split: str, index: int) -> Problem:
        c = self.cfg
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        question = row.get(c.question_field)
        if not isinstance(question, str) or not question.strip():
            what = "missing" if question is None else f"not a non-empty string ({question!r:.40})"
            raise DataError(f"{where}: field {c.question_field!r} {what} "
                            f"(fields: {listing(map(str, row))})")
        solution = None
        raw = row.get(c.answer_field)
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float, type(None))) or (
                isinstance(raw, float) and not math.isfinite(raw)):
            # str(["2"]) or str(True) would be a gold answer that no completion matches
            raise DataError(f"{where}: field {c.answer_field!r} must be a string or a finite number, "
                            f"got {type(raw).__name__} ({raw!r:.40})")
        if raw is not None and not isinstance(raw, str):
            raw = str(raw)  # a numeric answer column
        if raw is not None and raw.strip():
            gold = gsm8k_gold(raw)
            if gold is not None:
                fmt, solution = "####", raw
            else:
                fmt, gold = "answer", raw.strip()
        else:
            solution = row.get(c.solution_field)
            gold = last_boxed(solution) if isinstance(solution, str) else None
            fmt = "boxed"
        if gold is None or not gold.strip():
            raise DataError(f"{where}: no gold answer: field {c.answer_field!r} is missing or "
                            f"empty and field {c.solution_field!r} has no \\boxed{{}} answer")
        if c.id_field:
            if row.get(c.id_field) is None:
                raise DataError(f"{where}: field {c.id_field!r} (the id_field) missing")
            pid = str(row[c.id_field])
        else:
            pid = f"{split}-{index}"
        meta: dict[str, Any] = {k: v for k, v in row.items()
                                if k not in (c.question_field, c.answer_field, c.solution_field)}
        if solution is None and isinstance(row.get(c.solution_field), str):
            solution = row[c.solution_field]
        if solution is not None:
            meta["solution"] = solution
        meta["answer_format"] = fmt
        return Problem(id=pid, question=question, answer=gold.strip(), meta=meta)

    # -- text ----------------------------------------------------------------------------------
    def user_message(self, problem: Problem) -> str:
        instr = self.cfg.instruction.strip()
        return f"{problem.question}\n\n{instr}" if instr else problem.question

    def prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        content = self.user_message(problem)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                 tokenize=False, add_generation_prompt=True)
        return content + "\n"

    # -- verification --------------------------------------------------------------------------
    def _gsm8k_style(self, problem: Problem) -> bool:
        fmt = problem.meta.get("answer_format")
        return fmt == "####" or (fmt is None and self.name == "gsm8k")

    def extract(self, problem: Problem, completion: str) -> str | None:
        if len(completion) > MAX_COMPLETION_CHARS:  # never parsed (see stepdapo.tasks.answers)
            return None
        return extract_answer(completion, self._gsm8k_style(problem))

    def verify(self, problem: Problem, completion: str) -> Verdict:
        return self.verify_many([(problem, completion)])[0]

    def verify_many(self, pairs: Iterable[tuple[Problem, str]]) -> list[Verdict]:
        """`verify` for many (problem, completion) pairs in one round trip to the worker."""
        pairs = list(pairs)
        answers = [self.extract(p, c) for p, c in pairs]
        todo = [i for i, a in enumerate(answers) if a is not None]
        results = check_equivalent([(pairs[i][0].answer, answers[i]) for i in todo],
                                   self.cfg.verify_timeout)
        verdicts: list[Verdict] = [Verdict(False, None, "no boxed answer")] * len(pairs)
        for i, (_, c) in enumerate(pairs):
            if len(c) > MAX_COMPLETION_CHARS:
                verdicts[i] = Verdict(False, None, f"completion too long ({len(c)} characters; "
                                                   f"the limit is {MAX_COMPLETION_CHARS})")
        for i, (status, value) in zip(todo, results):
            a, gold = answers[i], pairs[i][0].answer
            if status == "timeout":
                verdicts[i] = Verdict(False, a, "verifier timeout")
            elif status == "error":
                verdicts[i] = Verdict(False, a, f"verifier error: {value}")
            elif value:
                verdicts[i] = Verdict(True, a, "correct")
            else:
                verdicts[i] = Verdict(False, a, f"wrong answer {a} (gold {gold})")
        return verdicts
