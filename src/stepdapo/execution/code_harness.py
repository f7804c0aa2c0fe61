"""The code task's judge: this file is the sandboxed program's main.py (`stepdapo.tasks.code`). Only
the standard library: stepdapo is not importable in the sandbox.

A reward is a security boundary: the program must not be able to be judged passed without the
hidden tests having run and passed. So the program and the tests never share an interpreter:

  * the judge (this process) makes itself non-dumpable first, so that the program, which runs as the
    same uid, can neither ptrace it nor read its memory, file descriptors or environment in /proc.
    The program's process also installs a seccomp filter (`fence_off`, x86_64 and aarch64) that
    refuses it and its children the syscalls that would still reach the judge: prlimit, signals,
    scheduling, ptrace, process_vm_*, pidfd_getfd / pidfd_send_signal.
  * it forks the program's process, which closes fds 3 and 4, receives the program's source, runs
    it, and then answers calls: (function name, arguments) -> return value or exception. The fork
    comes first, so nothing secret was ever in that process's memory.
  * it reads its job (the program, the tests, a per-run secret token) from fd 3, which exists only
    in this process and only until read (the tests are in no file the program can open).
  * it runs the tests in its own interpreter, with the trusted setup and prompt code (the
    benchmark's helpers, e.g. HumanEval's `encode_cyclic`), where each function of the program
    that the tests call is a stub that calls into the program's process.
  * only when the tests ran to the end with every call answered does it write the token to fd 4,
    which the program's process never has; otherwise it writes "fail: <reason>". The caller
    counts a run as passed only if fd 4 holds exactly the token: the exit status counts for nothing.

Values cross between the processes as plain data only: None, bool, int, float, complex, str, bytes,
and list, tuple, dict, set, frozenset of them, of exactly those types. So the tests compare builtin
values with the builtin `==`: no object of the program's (an `__eq__` that is always true, an int
subclass) reaches them, and its monkeypatching of builtins and modules stays in its own process.
A function that returns anything else fails with a TypeError. The program's process may send
anything at all; the judge decodes it strictly, and a malformed answer fails the test.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import os
import signal
import sys
import time
import types

INPUT_FD, REPORT_FD = 3, 4  # as stepdapo.execution.sandbox
MAX_MESSAGE = 256 << 20  # bytes of one message between the processes


# -- plain data --------------------------------------------------------------------------------

def encode(value):
    """`value` as JSON-able data; TypeError for anything but plain data of builtin types."""
    t = type(value)
    if value is None or t in (bool, int, float, str):
        return value
    if t is list:
        return [encode(v) for v in value]
    if t in (tuple, set, frozenset):
        return {t.__name__: [encode(v) for v in value]}
    if t is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if t is bytes:
        return {"bytes": value.hex()}
    if t is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a value of type {t.__name__!r} is not plain data (None, bool, int, float, "
                    f"complex, str, bytes, list, tuple, dict, set, frozenset)")


def decode(data):
    """The value `encode` gave `data`; ValueError for anything else."""
    t = type(data)
    if data is None or t in (bool, int, float, str):
        return data
    if t is list:
        return [decode(v) for v in data]
    if t is dict and len(data) == 1:
        (tag, body), = data.items()
        if tag in ("tuple", "set", "frozenset") and type(body) is list:
            return getattr(builtins, tag)(decode(v) for v in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2
                                                        for p in body):
            return {decode(k): decode(v) for k, v in body}
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2 and all(
                type(x) in (int, float) for x in body):
            return complex(*body)
    raise ValueError("malformed value from the program")


def send(stream, message) -> None:
    data = json.dumps(message).encode()
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def receive(stream):
    """The next message, None at the end of the stream."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    size = int.from_bytes(head, "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes from the program")
    data = stream.read(size)
    return json.loads(data) if len(data) == size else None


def text_of(e: BaseException) -> str:
    """str(e), short; never raises (the exception may be the program's)."""
    try:
        return str(e)[:200]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return ""


def describe(e: BaseException) -> str:
    """`Type: message`."""
    text = text_of(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- the program's process ---------------------------------------------------------------------

def serve(calls, answers) -> None:
    """Run the program it is sent as __main__ (from solution.py, for its tracebacks), then answer
    calls until the judge closes the pipe."""
    source = receive(calls)["program"]
    with open("solution.py", "w", encoding="utf-8") as f:
        f.write(source)
    module = types.ModuleType("__main__")
    module.__file__ = os.path.abspath("solution.py")
    sys.modules["__main__"] = module
    try:
        exec(compile(source, "solution.py", "exec"), module.__dict__)
    except SystemExit:
        pass  # e.g. its own unittest.main(): what it defined is tested all the same
    except BaseException as e:  # noqa: BLE001 - the program failed; say how
        send(answers, {"load_error": describe(e)})
        return
    names = [k for k, v in list(vars(module).items()) if isinstance(k, str) and callable(v)]
    send(answers, {"ready": names})
    while (call := receive(calls)) is not None:
        name = call["name"]
        try:
            value = vars(module)[name](*decode(call["args"]), **decode(call["kwargs"]))
        except BaseException as e:  # noqa: BLE001 - the function raised: the tests may expect it
            send(answers, {"raised": type(e).__name__, "message": text_of(e)})
            continue
        try:
            send(answers, {"value": encode(value)})
        except (TypeError, ValueError, RecursionError) as e:
            send(answers, {"raised": "TypeError", "message": f"from {name}(): {e}"})


# -- the judge out of the program's reach --------------------------------------------------------

# Syscalls by which a process of the judge's uid could still act on it (non-dumpable already stops
# ptrace and /proc/<pid>/{mem,fd,environ}): (name, x86_64 number, aarch64 number, when to refuse).
# "judge": when argument i is the judge's pid; "not_positive": when argument i is 0 or negative
# (a process group or every process, the judge's included); "always".
_FENCE = [
    ("kill", 62, 129, [(0, "judge"), (0, "not_positive")]),
    ("tkill", 200, 130, [(0, "judge")]),
    ("tgkill", 234, 131, [(0, "judge"), (1, "judge")]),
    ("rt_sigqueueinfo", 129, 138, [(0, "judge"), (0, "not_positive")]),
    ("rt_tgsigqueueinfo", 297, 240, [(0, "judge"), (1, "judge")]),
    ("prlimit64", 302, 261, [(0, "judge")]),  # setrlimit() on itself is prlimit64(0, ...)
    ("sched_setaffinity", 203, 122, [(0, "judge")]),
    ("sched_setparam", 142, 118, [(0, "judge")]),
    ("sched_setscheduler", 144, 119, [(0, "judge")]),
    ("sched_setattr", 314, 274, [(0, "judge")]),
    ("ptrace", 101, 117, "always"),
    ("process_vm_readv", 310, 270, "always"),
    ("process_vm_writev", 311, 271, "always"),
    ("pidfd_send_signal", 424, 424, "always"),  # a pidfd may also be an open /proc/<pid>
    ("pidfd_getfd", 438, 438, "always"),
]
_ARCH = {"x86_64": (0xC000003E, 1), "aarch64": (0xC00000B7, 2)}  # AUDIT_ARCH_*, column in _FENCE


def fence_off(judge: int) -> bool:
    """Install a seccomp filter in this process (inherited by all it starts) that refuses (EPERM)
    the syscalls of `_FENCE` aimed at `judge`: the program, which runs as the judge's uid, cannot
    limit, signal, reschedule or read the judge. False where that cannot be done (another
    architecture, no seccomp): the verdict still fails closed then (docs/reward-hacking.md)."""
    import ctypes
    import platform

    arch = _ARCH.get(platform.machine())
    if arch is None or sys.byteorder != "little":
        return False
    audit_arch, column = arch
    allow, refuse = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JMP|JGE|K, RET|K

    def arg(i):  # offset of the low 32 bits of argument i in struct seccomp_data (a pid is an int)
        return 16 + 8 * i

    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, refuse),  # another ABI (int 0x80)
            (ld, 0, 0, 0)]  # the syscall number
    if column == 1:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, refuse)]  # the x32 ABI's numbers
    for entry in _FENCE:
        nr, when = entry[column], entry[3]
        if when == "always":
            body = [(ret, 0, 0, refuse)]
        else:  # each body ends in a return: the number need not be loaded again after it
            body = []
            for i, test in when:
                body.append((ld, 0, 0, arg(i)))
                if test == "judge":
                    body += [(jeq, 0, 1, judge), (ret, 0, 0, refuse)]
                else:  # 0, or negative as a 32-bit int
                    body += [(jeq, 1, 0, 0), (jge, 0, 1, 0x80000000), (ret, 0, 0, refuse)]
            body.append((ret, 0, 0, allow))
        prog += [(jeq, 0, len(body), nr)] + body
    prog.append((ret, 0, 0, allow))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
    fprog = Program(len(prog), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    # PR_SET_NO_NEW_PRIVS (needed without CAP_SYS_ADMIN), then PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    zero = ctypes.c_ulong(0)
    return (libc.prctl(38, ctypes.c_ulong(1), zero, zero, zero) == 0
            and libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(fprog), zero, zero) == 0)


# -- the judge ---------------------------------------------------------------------------------

class ProgramDied(BaseException):
    """The program's process stopped answering (a BaseException: tests must not swallow it)."""


class Program:
    """The program's process, as the tests see it: `function(name)` is a stub that calls it."""

    def __init__(self) -> None:
        call_r, call_w = os.pipe()
        answer_r, answer_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            for fd in (INPUT_FD, REPORT_FD, call_w, answer_r):
                os.close(fd)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                fence_off(os.getppid())  # before anything of the program's runs
                serve(os.fdopen(call_r, "rb"), os.fdopen(answer_w, "wb"))
            except BaseException:  # noqa: BLE001 - e.g. a value too big to send
                os._exit(1)
            os._exit(0)
        os.close(call_r)
        os.close(answer_w)
        self.calls, self.answers = os.fdopen(call_w, "wb"), os.fdopen(answer_r, "rb")
        self.failed: str | None = None  # set once the process stops answering, for good

    def receive(self, during: str):
        # Any failure here (a MemoryError too) is the program's, never an exception it raised: a
        # test's `except Exception` must not take it for one.
        try:
            message = receive(self.answers)
        except Exception as e:  # noqa: BLE001
            message, why = None, f"sent a malformed answer ({describe(e)})"
        else:
            why = None
        if type(message) is not dict:
            self.failed = self.failed or f"the program {why or self._death()} {during}"
            raise ProgramDied(self.failed)
        return message

    def _death(self) -> str:
        for _ in range(100):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        else:
            return "stopped answering"
        self.pid = None
        rc = os.waitstatus_to_exitcode(status)
        if rc < 0:
            name = signal.Signals(-rc).name
            hint = {"SIGXCPU": " (CPU time limit)", "SIGKILL": " (memory or CPU limit?)"}
            return f"was killed by signal {name}{hint.get(name, '')}"
        return f"exited with status {rc}"

    def function(self, name: str):
        def call(*args, **kwargs):
            if self.failed:
                raise ProgramDied(self.failed)
            try:
                message = {"name": name, "args": encode(list(args)), "kwargs": encode(kwargs)}
            except TypeError as e:  # the tests' own arguments: a limit of this judge
                raise TypeError(f"cannot pass to {name}(): {e}") from None
            try:
                send(self.calls, message)
            except OSError:
                pass  # it died: receive() says how
            answer = self.receive(f"during a call of {name}()")
            if "value" in answer:
                try:
                    return decode(answer["value"])
                except Exception as e:  # noqa: BLE001 - as in receive()
                    self.failed = f"the program sent a malformed answer: {describe(e)}"
                    raise ProgramDied(self.failed) from None
            if type(answer.get("raised")) is str:
                raise _exception(answer["raised"], str(answer.get("message")))
            self.failed = "the program sent a malformed answer"
            raise ProgramDied(self.failed)

        call.__name__ = call.__qualname__ = name
        return call

    def close(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


def _exception(name: str, text: str) -> Exception:
    """The program's exception, as a builtin exception of the same name where there is one (tests
    may expect a ValueError), but never StopIteration: raised in the tests' `map(lambda ...)` or
    iterator, it would quietly end their loop as if every case had been checked."""
    cls = getattr(builtins, name, None)
    if (isinstance(cls, type) and issubclass(cls, Exception)
            and not issubclass(cls, (StopIteration, StopAsyncIteration))):
        try:
            return cls(text)
        except Exception:  # noqa: BLE001 - constructors with other signatures
            pass
    return RuntimeError(f"the program raised {name}" + (f": {text}" if text else ""))


def free_names(tests: str) -> tuple[set[str], set[str]]:
    """(every name the tests read, the names they use as `name.attribute`)."""
    names, bases = set(), set()
    for node in ast.walk(ast.parse(tests)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            bases.add(node.value.id)
    return names, bases


def run_tests(job: dict, program: Program) -> str | None:
    """Run the tests against the program: None if they passed, else why not."""
    ns: dict = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(job["setup"], "<setup>", "exec"), ns)
    if job["prompt_code"]:
        exec(compile(job["prompt_code"], "<prompt>", "exec"), ns)
    try:
        hello = program.receive("before the tests ran")
    except ProgramDied as e:
        return str(e)
    if "load_error" in hello:
        return f"the program raised {hello['load_error']}"
    defined = hello.get("ready")
    defined = set(defined) if type(defined) is list else set()
    entry = job["entry_point"]
    names, bases = free_names(job["tests"])
    for name in sorted(names - set(ns) - set(dir(builtins))):
        if name in defined:  # the program's function the tests call by name (MBPP)
            ns[name] = program.function(name)
        elif name in bases and importlib.util.find_spec(name) is not None:
            ns[name] = importlib.import_module(name)  # a module the program imported for them
    if entry:
        ns[entry] = program.function(entry)
    try:
        exec(compile(job["tests"], "<tests>", "exec"), ns)
    except ProgramDied as e:
        return str(e)
    except BaseException as e:  # noqa: BLE001 - a failed test, whatever it raised
        line = None
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<tests>":
                line = job["tests"].splitlines()[tb.tb_lineno - 1].strip()
            tb = tb.tb_next
        return describe(e) + (f" (at: {line})" if line else "")
    return program.failed  # a test that swallowed the program's death did not pass


def main() -> None:
    import ctypes

    # First of all: fail closed if it cannot be done (then nothing is written to fd 4).
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
    # The program may signal us: a KeyboardInterrupt could land in a test's bare `except:`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # big ints cross as JSON numbers
    program = Program()  # forked before the job is read
    job: dict = {}
    try:
        with os.fdopen(INPUT_FD, "rb") as f:
            job = json.loads(f.read())
        send(program.calls, {"program": job["program"]})
        failure = run_tests(job, program)
    except BaseException as e:  # noqa: BLE001 - fail closed, with the reason
        failure = f"judge error: {describe(e)}"
    finally:
        program.close()
    with os.fdopen(REPORT_FD, "w", encoding="utf-8") as report:
        report.write(job["token"] if failure is None else "fail: " + failure)


if __name__ == "__main__":
    main()
