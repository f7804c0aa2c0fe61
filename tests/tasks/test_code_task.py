import json

import pytest

from stepdapo.config import CodeConfig, TaskConfig
from stepdapo.tasks import Problem, Task, get_task
from stepdapo.tasks.code import CodeTask, DataError, extract_code


def fenced(code: str, tag: str = "python") -> str:
    return f"Let me think.\nThe plan is simple.\n```{tag}\n{code}\n```\nDone."


@pytest.fixture(scope="module")
def humaneval():
    task = CodeTask(CodeConfig(test="humaneval", timeout=3.0, cpu_seconds=2))
    return task, {p.id: p for p in task.problems("test")}


def test_humaneval_loads_offline_with_stable_ids(humaneval):
    task, by_id = humaneval
    problems = task.problems("test")
    assert len(problems) == 164
    assert [p.id for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert [p.id for p in CodeTask(CodeConfig()).problems("test")] == [p.id for p in problems]
    p = by_id["HumanEval/0"]
    assert p.question.startswith("from typing import List") and "def has_close_elements" in p.question
    assert p.meta["entry_point"] == "has_close_elements"
    assert isinstance(task, Task)
    assert isinstance(get_task(TaskConfig(name="code")), CodeTask)


@pytest.mark.parametrize("tid", ["HumanEval/0", "HumanEval/2", "HumanEval/53", "HumanEval/163"])
def test_canonical_solutions_pass(humaneval, tid):
    task, by_id = humaneval
    p = by_id[tid]
    v = task.verify(p, fenced(p.answer))  # a full rewrite: prompt + canonical body
    assert v.correct and v.reason == "passed", v
    body = p.answer[len(p.meta["prompt_code"]):]
    v = task.verify(p, body)  # a base model's bare continuation of the prompt
    assert v.correct, v
    v = task.verify(p, fenced(body))  # a block holding just the body
    assert v.correct, v


def test_rewrite_without_the_prompts_imports_still_passes(humaneval):
    task, by_id = humaneval
    p = by_id["HumanEval/0"]
    code = ("def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
            "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
            "               for j, b in enumerate(numbers) if i != j)")
    v = task.verify(p, fenced(code))
    assert v.correct, v


def test_wrong_solution_fails_with_a_reason(humaneval):
    task, by_id = humaneval
    p = by_id["HumanEval/0"]
    v = task.verify(p, fenced("def has_close_elements(numbers, threshold):\n    return False"))
    assert not v.correct and v.answer.startswith("def has_close_elements")
    assert "AssertionError" in v.reason and "assert candidate(" in v.reason and len(v.reason) <= 300
    v = task.verify(p, fenced("def has_close_elements(numbers, threshold):\n    while True: pass"))
    assert not v.correct and ("timeout" in v.reason or "signal" in v.reason), v
    v = task.verify(p, fenced("def has_close_elements(numbers, threshold)\n    return False"))
    assert not v.correct and "SyntaxError" in v.reason


def test_no_code(humaneval):
    task, by_id = humaneval
    v = task.verify(by_id["HumanEval/0"], "")
    assert not v.correct and v.answer is None and v.reason == "no code block"


def test_extract_code_rules():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\nx = 2\n```\n```\nplain\n```") == "x = 2\n"
    assert extract_code("```\nx = 3\n```\n```text\nout\n```") == "out\n"
    assert extract_code("```python\nx = 4\n") == "x = 4\n"  # truncated: runs to the end
    assert extract_code("no fences here") is None


MBPP_ROWS = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a "
     "given character from the string.",
     "code": "def remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n    return s[::-1].replace(ch, '', 1)[::-1]",
     "test_list": ["assert remove_Occ(\"hello\",\"l\") == \"heo\"",
                   "assert remove_Occ(\"abcda\",\"a\") == \"bcd\"",
                   "assert remove_Occ(\"PHP\",\"P\") == \"H\""],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to add a constant to each number.",
     "code": "def add_k(xs):\n    return [x + K + math.floor(0.5) for x in xs]",
     "test_list": ["assert add_k([1, 2]) == [11, 12]"],
     "test_setup_code": "K = 10", "test_imports": ["import math"]},
    {"task_id": "custom/3", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n",
     "entry_point": "double", "canonical_solution": "    return 2 * x\n",
     "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2\n"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mbpp_style_jsonl(tmp_path):
    src = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    task = CodeTask(CodeConfig(train=src, test=None))
    ps = task.problems("train")
    assert [p.id for p in ps] == ["11", "12", "custom/3"]
    assert "Your code should pass these tests" in ps[0].question and "remove_Occ" in ps[0].question
    for p in ps:
        v = task.verify(p, fenced(p.answer))
        assert v.correct, (p.id, v)
    assert task.verify(ps[2], "    return x + x\n").correct  # continuation of a prompt row
    v = task.verify(ps[0], fenced("def remove_Occ(s, ch):\n    return s"))
    assert not v.correct and "assert remove_Occ" in v.reason
    v = task.verify(ps[1], "def add_k(xs): return xs")  # no fence, and not a prompt row
    assert not v.correct and v.reason == "no code block"
    with pytest.raises(ValueError, match="task.code.test is null"):
        task.problems("test")


def test_verify_many_keeps_order(tmp_path):
    task = CodeTask(CodeConfig(train=write_jsonl(tmp_path / "m.jsonl", MBPP_ROWS)))
    ps = task.problems("train")
    pairs = [(p, fenced(p.answer)) for p in ps] + [(ps[0], fenced("def remove_Occ(s, ch): pass"))]
    verdicts = task.verify_many(pairs, workers=2)
    assert [v.correct for v in verdicts] == [True, True, True, False]


@pytest.mark.parametrize("row,field", [
    ({"task_id": 2, "test_list": ["assert True"]}, "'text' or 'prompt'"),
    ({"task_id": 2, "text": "Do it."}, "'test_list' or 'test'"),
    ({"task_id": 2, "text": "Do it.", "test_list": "assert True"}, "'test_list' must be"),
])
def test_malformed_jsonl_row_names_file_line_and_field(tmp_path, row, field):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [MBPP_ROWS[0], row])
    with pytest.raises(DataError) as e:
        CodeTask(CodeConfig(test=str(path))).problems("test")
    assert f"{path}:2" in str(e.value) and field in str(e.value)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        CodeTask(CodeConfig(test=str(tmp_path / "nope.jsonl"))).problems("test")
    (tmp_path / "x.jsonl").write_text('{"text": "a", "test_list": []}\nnot json\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: missing field 'test_list'"):
        CodeTask(CodeConfig(test=str(tmp_path / "x.jsonl"))).problems("test")
    (tmp_path / "y.jsonl").write_text(json.dumps(MBPP_ROWS[0]) + "\nnot json\n")
    with pytest.raises(DataError, match=r"y.jsonl:2: bad JSON"):
        CodeTask(CodeConfig(test=str(tmp_path / "y.jsonl"))).problems("test")


def test_json_and_parquet_files(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(MBPP_ROWS))
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"test_imports": [], **row} for row in MBPP_ROWS[:2]]  # one schema for all rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name, n in (("rows.json", 3), ("rows.parquet", 2)):
        task = CodeTask(CodeConfig(test=str(tmp_path / name)))
        ps = task.problems("test")
        assert len(ps) == n and ps[0].id == "11"
        assert task.verify(ps[1], fenced(ps[1].answer)).correct


class FakeChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>"


def test_prompt_uses_the_chat_template_when_there_is_one():
    cfg = CodeConfig(instruction="Answer in one ```python block.")
    task = CodeTask(cfg)
    p = Problem("x", "Write f.", "", {"setup": "", "prompt_code": None, "entry_point": None,
                                      "tests": "assert True"})
    chat = task.prompt(p, FakeChatTokenizer())
    assert chat == "<|user|>Write f.\n\nAnswer in one ```python block.<|end|><|assistant|>"

    class Plain:
        chat_template = None

    assert task.prompt(p, Plain()) == "Write f.\n\nAnswer in one ```python block.\n"
    assert task.prompt(p, None) == task.prompt(p, Plain())


def test_all_humaneval_canonical_solutions_pass(humaneval):
    task, _ = humaneval
    problems = task.problems("test")
    verdicts = task.verify_many([(p, fenced(p.answer)) for p in problems])
    failed = [(p.id, v.reason) for p, v in zip(problems, verdicts) if not v.correct]
    assert not failed


def _problem(tests: str, entry: str | None = None) -> Problem:
    return Problem("judge", "q", "", {"setup": "", "prompt_code": None, "entry_point": entry,
                                      "tests": tests})


RAISES = ("try:\n    f(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\n"
          "else:\n    raise AssertionError('no ValueError')\nassert f(4) == 2\n")
ROUND_TRIP = ("v = f()\n"
              "assert v == [None, True, 2**200, -0.5, 'é', b'\\x00', (1, [2]), {1: {2}}, "
              "frozenset({3}), 1j, {'k': (4,)}]\n"
              "assert type(v[6]) is tuple and type(v[8]) is frozenset and type(v[5]) is bytes\n"
              "import math\nassert math.isnan(g()) and g2(a=1, b=[2]) == {'a': 1, 'b': [2]}\n")
DATA = ("def f():\n    return [None, True, 2**200, -0.5, 'é', b'\\x00', (1, [2]), {1: {2}}, "
        "frozenset({3}), 1j, {'k': (4,)}]\n"
        "def g():\n    return float('nan')\ndef g2(**kw):\n    return kw\n")


@pytest.mark.parametrize("tests,code,passed,reason", [
    (RAISES, "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return int(x ** .5)",
     True, "passed"),
    (RAISES, "def f(x):\n    return int(abs(x) ** .5)", False, "no ValueError"),
    (ROUND_TRIP, DATA, True, "passed"),
    ("assert list(f()) == [1]", "def f():\n    yield 1", False,
     "a value of type 'generator' is not plain data"),
    ("assert f(lambda: 1) == 1", "def f(g):\n    return g()", False, "cannot pass to f()"),
    ("try:\n    f()\nexcept BaseException:\n    pass", "import os\ndef f():\n    os._exit(0)",
     False, "exited with status 0 during a call of f()"),
    ("assert f() == 1", "def f(:\n    return 1", False, "SyntaxError"),
    ("assert f() == 1", "import sys\ndef f():\n    return 1\nsys.exit(3)", True, "passed"),
    ("assert f() == 1", "", False, "no code block"),
    ("def check(candidate):\n    assert candidate(2) == 4\ncheck(f)", "def f(x):\n    return x * x",
     True, "passed"),
], ids=["raises-expected", "raises-missing", "plain-data", "generator", "lambda-argument",
        "death-swallowed", "syntax-error", "exit-after-definitions", "empty", "entry-point"])
def test_judge_semantics(tests, code, passed, reason):
    """How the judge treats exceptions, values, the program's death and its exit."""
    task = CodeTask(CodeConfig(timeout=5.0, cpu_seconds=3))
    v = task.verify(_problem(tests, "f" if "check" in tests else None), fenced(code))
    assert (v.correct, reason in v.reason) == (passed, True), v
