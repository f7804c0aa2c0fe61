"""The GSM8K / MATH task: data loading, gold answers, prompts, answer extraction, math-verify
equivalence and the verifier's timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stepdapo.config import MathConfig, TaskConfig
from stepdapo.tasks import Problem, Task, Verdict, get_task
from stepdapo.tasks.answers import extract_answer, last_boxed, normalize_answer
from stepdapo.tasks.data import DataError
from stepdapo.tasks.math import MathTask
from stepdapo.execution.verifier import verifier

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
GSM8K = DATA / "gsm8k"
MATH500 = DATA / "math500" / "test.jsonl"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "train.jsonl").exists(),
                                 reason=f"GSM8K data not found under {GSM8K}")
needs_math500 = pytest.mark.skipif(not MATH500.exists(), reason=f"MATH-500 not found at {MATH500}")

MATH_CFG = {"question_field": "problem", "id_field": "unique_id"}


def _task(name: str = "math", **kw) -> MathTask:
    return MathTask(MathConfig(**kw), name=name)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------
# Equivalence table
# ----------------------------------------------------------------------------------------------

CASES = [
    # gold, completion, correct
    ("\\frac{1}{2}", "so $\\boxed{0.5}$", True),
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("\\frac12", "\\boxed{1/2}", True),
    ("18", "She makes \\boxed{\\$18} a day.", True),
    ("18", "\\boxed{18 dollars}", True),
    ("18", "\\boxed{18\\text{ cm}}", True),
    ("18", "\\boxed{18 \\text{ dollars}}", True),
    ("18", "\\boxed{\\$18.00}", True),
    ("18", "\\boxed{18.}", True),
    ("1234", "\\boxed{1,234}", True),
    ("1,234", "\\boxed{1234}", True),
    ("1234567", "\\boxed{1,234,567}", True),
    ("1234", "\\boxed{1\\,234}", True),
    ("1234", "\\boxed{1{,}234}", True),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\sqrt{2}/2}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{1}{\\sqrt{3}}}", True),  # nested braces
    ("2\\pi", "\\boxed{\\pi \\cdot 2}", True),
    ("(1, 2]", "\\boxed{(1,2]}", True),
    ("(1, 2]", "\\boxed{(1, 2)}", False),
    ("(3, 4)", "\\boxed{(3,4)}", True),
    ("(3, 4)", "\\boxed{(4, 3)}", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", True),
    ("\\{1, 2\\}", "\\boxed{\\{2, 1\\}}", True),
    ("50\\%", "\\boxed{50\\%}", True),
    ("50", "\\boxed{50\\%}", True),
    ("0.5", "\\boxed{50\\%}", True),
    ("-3", "\\boxed{-3}", True),
    ("-3", "\\boxed{3}", False),
    ("\\frac{1}{3}", "\\boxed{0.33}", False),
    ("18", "\\boxed{17}", False),
    ("x^2+2x", "\\boxed{x(x+2)}", True),
    ("3", "\\boxed{x = 3}", True),
    ("\\text{(C)}", "\\boxed{C}", True),
    ("5", "maybe \\boxed{4}; no, the answer is \\boxed{5}", True),  # the last box counts
    ("5", "\\boxed{5}, or rather \\boxed{4}", False),
    ("5", "\\boxed{5} and then \\boxed{\\frac{1", True),  # an unclosed (truncated) box is skipped
    ("5", "\\fbox{5}", True),
    ("5", "hence $\\boxed 5$.", True),
    ("18", "The answer is 18.", False),  # MATH-style: no boxed answer
    ("18", "\\boxed{}", False),
]


@pytest.mark.parametrize("gold,completion,correct", CASES)
def test_equivalence_table(gold, completion, correct):
    v = _task().verify(Problem("p", "q", gold), completion)
    assert v.correct is correct, v
    if correct:
        assert v.reason == "correct"


def test_verdict_reasons():
    task = _task()
    p = Problem("p", "q", "18")
    assert task.verify(p, "\\boxed{17}") == Verdict(False, "17", "wrong answer 17 (gold 18)")
    v = task.verify(p, "I think it is 18")
    assert (v.correct, v.answer, v.reason) == (False, None, "no boxed answer")
    v = task.verify(p, "\\boxed{ 18 }")
    assert (v.correct, v.answer, v.reason) == (True, "18", "correct")


def test_verify_many_matches_verify():
    task = _task()
    pairs = [(Problem(str(i), "q", gold), comp) for i, (gold, comp, _) in enumerate(CASES)]
    many = task.verify_many(pairs)
    assert [v.correct for v in many] == [c for _, _, c in CASES]
    assert many == [task.verify(p, c) for p, c in pairs]
    assert task.verify_many([]) == []


def test_gsm8k_fallbacks():
    """GSM8K-style problems also accept a final `#### N` line or "the answer is N"."""
    task = _task("gsm8k")
    p = Problem("p", "q", "1234", meta={"answer_format": "####"})
    assert task.verify(p, "work\n#### 1,234").correct
    assert task.verify(p, "So the answer is $1,234.").correct
    assert task.verify(p, "The final answer is: 1234").correct
    assert not task.verify(p, "The answer is 1235.").correct
    assert task.verify(p, "The answer is 1000.\n\\boxed{1234}").correct  # a box wins
    assert task.verify(p, "It costs 1234 dollars.").reason == "no boxed answer"
    # The same completions on a MATH-style problem need a box.
    m = _task("math")
    assert m.verify(Problem("p", "q", "1234"), "work\n#### 1234").reason == "no boxed answer"


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("no box here", None),
    ("\\boxed{1}", "1"),
    ("a \\boxed{1} b \\boxed{\\frac{1}{\\sqrt{3}}} c", "\\frac{1}{\\sqrt{3}}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{\\left\\{ x \\right\\}}", "\\left\\{ x \\right\\}"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 7$", "7"),
    ("\\boxed {7}", "7"),
    ("\\boxed{1} then \\boxed{2", "1"),
    ("\\boxed{}", ""),
    ("\\boxedfoo{1}", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_extract_and_normalize():
    assert extract_answer("#### 72") is None
    assert extract_answer("#### 72", gsm8k_style=True) == "72"
    assert extract_answer("The answer is -3.5.", gsm8k_style=True) == "-3.5"
    assert normalize_answer("$18$") == "18"
    assert normalize_answer("18 dollars") == "18"
    assert normalize_answer("\\$18 per hour") == "\\$18"
    assert normalize_answer("2 pi") == "2 pi"  # maths, not a unit
    assert normalize_answer("1\\,234\\,567") == "1234567"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@needs_gsm8k
def test_gsm8k_loads():
    task = _task("gsm8k", train=str(GSM8K / "train.jsonl"), test=str(GSM8K / "test.jsonl"))
    train, test = task.problems("train"), task.problems("test")
    assert (len(train), len(test)) == (7473, 1319)
    p = train[0]
    assert p.id == "train-0" and p.answer == "72" and p.question.startswith("Natalia sold clips")
    assert p.meta["answer_format"] == "####" and p.meta["solution"].endswith("#### 72")
    assert test[0].id == "test-0" and test[0].answer == "18"
    assert test[146].answer == "2125"  # "#### 2,125"
    assert all(q.answer and "," not in q.answer for q in train + test)
    assert task.problems("train") is train  # cached
    v = task.verify(test[0], "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nThe answer is $\\boxed{18}$.")
    assert v.correct and v.answer == "18"


@needs_math500
def test_math500_loads_and_its_solutions_verify():
    task = _task("math", test=str(MATH500), **MATH_CFG)
    ps = task.problems("test")
    assert len(ps) == 500 and len({p.id for p in ps}) == 500
    p = ps[0]
    assert p.id == "test/precalculus/807.json"
    assert p.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert p.meta["subject"] == "Precalculus" and p.meta["level"] == 2
    # Every reference solution ends in a box that math-verify finds equal to the answer field.
    verdicts = task.verify_many([(q, q.meta["solution"]) for q in ps[:100]])
    assert all(v.correct for v in verdicts), [v for v in verdicts if not v.correct]


def test_gold_from_boxed_solution(tmp_path):
    f = _write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "p0", "solution": "First \\boxed{3}, then $\\boxed{\\frac{1}{\\sqrt{3}}}$."},
        {"problem": "p1", "solution": "\\fbox{7}", "answer": None, "level": "Level 3"},
    ])
    ps = _task("math", test=str(f), question_field="problem").problems("test")
    assert [p.answer for p in ps] == ["\\frac{1}{\\sqrt{3}}", "7"]
    assert [p.id for p in ps] == ["test-0", "test-1"]
    assert ps[1].meta["level"] == "Level 3" and ps[1].meta["answer_format"] == "boxed"
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no gold answer"):
        _task("math", test=str(bad), question_field="problem").problems("test")


def test_malformed_jsonl(tmp_path):
    f = _write_jsonl(tmp_path / "broken.jsonl", [
        {"question": "ok", "answer": "#### 1"}, {"question": "ok", "answer": "#### 2"}, "{not json",
    ])
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: bad JSON"):
        _task("gsm8k", train=str(f)).problems("train")
    g = _write_jsonl(tmp_path / "noq.jsonl", [
        {"question": "ok", "answer": "#### 1"}, {"prompt": "x", "answer": "#### 2"}])
    with pytest.raises(ValueError, match=r"noq\.jsonl:2: field 'question' missing"):
        _task("gsm8k", train=str(g)).problems("train")
    h = _write_jsonl(tmp_path / "noid.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"noid\.jsonl:1: field 'uid'"):
        _task("gsm8k", train=str(h), id_field="uid").problems("train")


def test_sources_that_are_missing_or_unset(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _task("gsm8k", train=str(tmp_path / "nope.jsonl")).problems("train")
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        _task("gsm8k", train="./no/such/dir").problems("train")
    with pytest.raises(ValueError, match=r"task\.gsm8k\.test is not set"):
        _task("gsm8k").problems("test")
    with pytest.raises(ValueError, match="unknown split"):
        _task("gsm8k").problems("validation")
    with pytest.raises(FileNotFoundError, match="data.csv"):
        _task("gsm8k", train=str(tmp_path / "data.csv")).problems("train")
    (tmp_path / "data.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        _task("gsm8k", train=str(tmp_path / "data.csv")).problems("train")


@pytest.mark.parametrize("source,is_path", [
    ("openai/gsm8k", False), ("openai/gsm8k:main", False), ("gsm8k", False),
    ("HuggingFaceH4/MATH-500", False), ("org/data-v1.5", False),
    ("data/gsm8k/train.jsonl", True), ("train.parquet", True), ("./gsm8k", True),
    ("/abs/dir", True), ("a/b/c", True), ("x.csv", True),
])
def test_path_or_hub_name(source, is_path):
    from stepdapo.tasks.data import _looks_like_path

    assert _looks_like_path(source) is is_path


def test_parquet_and_json_load_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i), "solution": f"\\boxed{{{2 * i}}}",
             "subject": "Algebra", "level": i % 5 + 1, "unique_id": f"u/{i}"} for i in range(20)]
    rows[3]["answer"] = "\\frac{1}{2}"
    _write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    load = {suffix: _task("math", test=str(tmp_path / f"d{suffix}"), **MATH_CFG).problems("test")
            for suffix in (".jsonl", ".parquet", ".json")}
    ref = [(p.id, p.question, p.answer, p.meta) for p in load[".jsonl"]]
    assert len(ref) == 20 and ref[3][2] == "\\frac{1}{2}" and ref[3][0] == "u/3"
    for suffix in (".parquet", ".json"):
        assert [(p.id, p.question, p.answer, p.meta) for p in load[suffix]] == ref
    bad = [dict(rows[0]), {k: v for k, v in rows[1].items() if k != "problem"}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: row 1: field 'problem'"):
        _task("math", test=str(tmp_path / "bad.parquet"), **MATH_CFG).problems("test")


@needs_gsm8k
def test_get_task_builds_math_tasks():
    cfg = TaskConfig(name="gsm8k")
    cfg.gsm8k.test = str(GSM8K / "test.jsonl")
    task = get_task(cfg)
    assert isinstance(task, MathTask) and isinstance(task, Task)
    assert task.name == "gsm8k" and task.step_delimiter == "\n"
    assert len(task.problems("test")) == 1319


# ----------------------------------------------------------------------------------------------
# Prompt
# ----------------------------------------------------------------------------------------------


class FakeChatTokenizer:
    chat_template = "{% for m in messages %}...{% endfor %}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"


def test_prompt_uses_chat_template():
    task = _task("math", instruction="Box it.")
    p = Problem("p", "What is 1+1?", "2")
    tok = FakeChatTokenizer()
    assert task.prompt(p, tok) == "<|user|>What is 1+1?\n\nBox it.<|end|><|assistant|>"
    assert tok.calls == [([{"role": "user", "content": "What is 1+1?\n\nBox it."}], False, True)]

    class Plain:
        chat_template = None

    assert task.prompt(p, Plain()) == "What is 1+1?\n\nBox it.\n"
    assert task.prompt(p, None) == "What is 1+1?\n\nBox it.\n"
    assert "\\boxed{}" in _task().prompt(p, None)  # the default instruction asks for a box


# ----------------------------------------------------------------------------------------------
# The verifier worker: timeouts, threads, lifetime
# ----------------------------------------------------------------------------------------------


def test_worker_timeout_then_recovers():
    w = verifier()
    w.run("sleep", [0.0], timeout=5)
    pid = w.pid
    t = time.monotonic()
    out = w.run("sleep", [0.0, 30.0, 0.0], timeout=0.3)
    assert time.monotonic() - t < 5
    assert out == [("ok", True), ("timeout", None), ("ok", True)]
    assert w.pid != pid  # killed and restarted
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_pathological_answer_times_out():
    task = _task("math", verify_timeout=0.5)
    p = Problem("p", "q", "5")
    t = time.monotonic()
    verdicts = task.verify_many([(p, "\\boxed{5}"), (p, "\\boxed{9^{9^{9}}}"), (p, "\\boxed{10/2}")])
    assert time.monotonic() - t < 10
    assert [(v.correct, v.reason) for v in verdicts] == \
        [(True, "correct"), (False, "verifier timeout"), (True, "correct")]
    assert verdicts[1].answer == "9^{9^{9}}"
    assert task.verify(p, "\\boxed{5}").correct  # the next call still works


def test_an_answer_too_long_is_a_verifier_error_not_a_wrong_answer():
    """math-verify gives up on a sum of 1000 ones (1999 characters) and calls it wrong, quietly;
    an answer over the cap never reaches it, and the verdict says why."""
    task = _task()
    p = Problem("p", "q", "1000")
    verdicts = task.verify_many([(p, "\\boxed{" + "+".join(["1"] * 1000) + "}"),
                                 (Problem("p", "q", "300"), "\\boxed{" + "+".join(["1"] * 300) + "}"),
                                 (p, "\\boxed{1000}")])
    assert [(v.correct, v.reason) for v in verdicts] == [
        (False, "verifier error: answer too long (1999 characters; the limit is 1000)"),
        (True, "correct"), (True, "correct")]


def test_pathological_completions_take_linear_time():
    """Extraction and normalisation run in our process: no input may make them hang."""
    t = time.monotonic()
    assert last_boxed("\\boxed{" * 200_000) is None  # each unclosed box once scanned to the end
    assert last_boxed("\\boxed 1 " * 100_000) == "1"
    long_units = "1 " + "a" * 200 + "1"  # the unit-word pattern backtracked exponentially
    assert normalize_answer(long_units) == long_units
    assert normalize_answer("18 US dollars.") == "18"
    assert time.monotonic() - t < 5


# Runs extract_answer on one hostile completion in a child whose address space is capped at what
# it holds after the import + 300 MB, and prints the answer (repr). A quadratic copy dies of
# MemoryError; a backtracking regex runs into the parent's timeout.
_BOUNDED_EXTRACT = textwrap.dedent("""
    import resource, sys, time
    from stepdapo.tasks.answers import extract_answer
    text, gsm8k = eval(sys.argv[1]), sys.argv[2] == "gsm8k"
    vm = next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20),) * 2)
    t = time.monotonic()
    answer = extract_answer(text, gsm8k)
    assert time.monotonic() - t < 10, f"took {time.monotonic() - t:.1f}s"
    print(repr(answer))
""")

_HOSTILE = {
    # name: (expression for the completion, gsm8k style, expected answer)
    "nested_closed": ('"\\\\boxed{" * 100_000 + "42" + "}" * 100_000', False, "42"),
    "nested_closed_then_unclosed": (
        '"\\\\boxed{" * 100_000 + "x" + "}" * 100_000 + "\\\\boxed{" * 100_000', False, "x"),
    "a_million_characters": (  # 124_999 * 8 + 8 = 10**6
        '"\\\\boxed{" * 124_999 + "12345678" + "}" * 124_999', False, "12345678"),
    "a_million_newlines": ('"\\n" * 10**6', True, None),
    "hash_line_after_a_million_newlines": ('"\\n" * 10**6 + "x\\n#### 72"', True, "72"),
    "hash_number_then_spaces": ('"#### 5" + " " * 10**5 + "x"', True, None),
    "answer_is_then_spaces": ('"the answer is" + " " * 10**5 + "x"', True, None),
    "answer_is_long_number": ('"the answer is " + "1," * 300_000 + "..1"', True, None),
}


@pytest.mark.parametrize("name", list(_HOSTILE))
def test_answer_extraction_is_linear_in_time_and_memory(name):
    """A completion of nested boxes, or one built to make the fallback patterns backtrack, is
    extracted in bounded memory and time, with the documented answer (the last complete box)."""
    expr, gsm8k, expected = _HOSTILE[name]
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run([sys.executable, "-c", _BOUNDED_EXTRACT, expr,
                               "gsm8k" if gsm8k else "math"],
                              capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: extraction still running after 60s")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == repr(expected)


def test_a_completion_over_the_cap_is_judged_without_parsing():
    from stepdapo.tasks.answers import MAX_COMPLETION_CHARS

    task = _task()
    p = Problem("p", "q", "5")
    long = "\\boxed{5}" + " " * MAX_COMPLETION_CHARS
    v = task.verify(p, long)
    assert (v.correct, v.answer) == (False, None)
    assert v.reason == (f"completion too long ({len(long)} characters; the limit is "
                        f"{MAX_COMPLETION_CHARS})")
    assert task.extract(p, long) is None
    # just under the cap: judged as usual
    assert task.verify(p, " " * (MAX_COMPLETION_CHARS - 9) + "\\boxed{5}").correct


def test_worker_killed_between_calls_is_restarted():
    task = _task()
    p = Problem("p", "q", "5")
    assert task.verify(p, "\\boxed{5}").correct
    os.kill(verifier().pid, 9)
    time.sleep(0.1)
    assert task.verify(p, "\\boxed{5}").correct


def test_verify_from_threads():
    task = _task()
    p = Problem("p", "q", "\\frac{1}{2}")
    got = []
    th = threading.Thread(target=lambda: got.append(task.verify(p, "\\boxed{0.5}")))
    th.start()
    th.join(60)
    assert got and got[0].correct
    with ThreadPoolExecutor(4) as ex:
        verdicts = list(ex.map(lambda c: task.verify(p, c), ["\\boxed{0.5}", "\\boxed{1/2}",
                                                              "\\boxed{2}", "\\boxed{0.50}"] * 3))
    assert [v.correct for v in verdicts] == [True, True, False, True] * 3


_CHILD = textwrap.dedent("""
    import os, sys, threading
    from stepdapo.tasks import Problem
    from stepdapo.tasks.math import MathTask
    from stepdapo.execution.verifier import verifier
    task = MathTask(name="math")
    assert task.verify(Problem("p", "q", "5"), "\\\\boxed{5}").correct
    print(verifier().pid, flush=True)
    if sys.argv[1] == "kill":  # die hard while the worker is busy in sympy
        threading.Timer(0.5, lambda: os.kill(os.getpid(), 9)).start()
        task.cfg.verify_timeout = 100
        task.verify(Problem("p", "q", "5"), "\\\\boxed{9^{9^{9}}}")
""")


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A dead child of a dead parent is reaped by init; a zombie still answers kill(pid, 0).
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_no_worker_outlives_the_interpreter(how):
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, how], capture_output=True, text=True,
                          check=False, env=env, timeout=60)
    assert proc.returncode == (0 if how == "exit" else -9), proc.stderr
    pid = int(proc.stdout.split()[0])
    assert _gone(pid, within=5), f"math-verify worker {pid} outlived its parent"
