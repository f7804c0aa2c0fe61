"""GSM8K / MATH-style tasks: free-form reasoning that ends in a `\\boxed{}` answer, checked with
math-verify.

    prompt:      <question>\\n\\n<instruction>   (the user turn of the chat template, if the model has one)
    completion:  "...reasoning, one step per line...\\nThe answer is $\\boxed{18}$."

Problems come from a .jsonl / .json / .parquet file or a Hugging Face dataset (see `MathConfig`). The
gold answer is the text after GSM8K's final `#### N` line (thousands separators removed), MATH's
`answer` field as is, or else the last `\\boxed{}` of the worked solution.

Answer extraction (`extract_answer`): the LAST complete `\\boxed{...}` (or `\\fbox{...}`,
`\\boxed N`) of the completion counts; a model that boxes several candidates is judged on its final
one. Only for GSM8K-style problems (gold from a `####` line, or task "gsm8k"), a completion with no
boxed answer may instead end its answer with a `#### N` line (the format of the GSM8K solutions) or
say "the (final) answer is N"; N must be a number there. Anything else is "no boxed answer".

Equivalence is math-verify's (`parse` + `verify`: numbers, fractions vs decimals, LaTeX forms, sets,
intervals, ...), after a little normalisation of the extracted text (trailing punctuation, plain
unit words such as "18 dollars", `\\,` / `{,}` thousands separators).

Timeouts: math-verify's own timeouts use `signal.alarm`, which fails off the main thread (the
pipeline verifies from worker threads), and a pathological answer (`\\boxed{9^{9^{9}}}`) can keep
sympy busy for minutes. So all math-verify calls run in one long-lived worker subprocess per
interpreter, started on first use, with math-verify's timeouts disabled. The parent waits at most
`verify_timeout` seconds for each result; when that passes, it kills the worker, judges that
completion incorrect ("verifier timeout"), restarts the worker and goes on with the rest. This works
from any thread (calls are serialised by a lock). `verify_many` sends a whole batch in one message
and reads the verdicts as they stream back, which keeps the per-completion overhead to the cost of
math-verify itself (about 0.04 ms per completion batched, 0.3 ms for a lone `verify`). The worker
exits when the parent closes its pipe (atexit does), and is killed by the kernel if the parent dies
(Linux PR_SET_PDEATHSIG; elsewhere a watchdog thread polls the parent pid). A worker that stops
answering for another reason (killed, crashed) is restarted; its pending completion reads
"verifier error: ...".
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pydantic import Field

from stepdapo.settings import Section
from stepdapo.tasks import Problem, Verdict
from stepdapo.tasks.data import DataError, _looks_like_path, read_rows  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


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
    verify_timeout: float = Field(5.0, gt=0)
    """seconds math-verify may spend on one completion before it is judged incorrect ("verifier
    timeout")."""




# ----------------------------------------------------------------------------------------------
# Answer extraction (pure helpers)
# ----------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_HASH_LINE_RE = re.compile(r"^\s*####\s*(.*?)\s*$", re.MULTILINE)
_HASH_NUM_RE = re.compile(rf"^\s*####\s*\$?\s*({_NUMBER})\s*\.?\s*$", re.MULTILINE)
_ANSWER_IS_RE = re.compile(
    rf"answer\s+is\s*:?\s*(?:\\\(|\$)?\s*(?:\\\$|\$)?\s*({_NUMBER})(?![\d.,]*\d)", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the `{...}` group opening at `text[start]` and the index after it, or None
    if it is not closed. Escaped braces (`\\{`, `\\}`) do not count."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
        i += 1
    return None


def boxed_contents(text: str) -> list[str]:
    """The contents of every complete `\\boxed{...}` / `\\fbox{...}` / `\\boxed N` in `text`, in
    order. Nested braces are matched; an unclosed `\\boxed{` (a truncated completion) is skipped."""
    out = []
    for m in _BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            got = _braced(text, i)
            if got is not None:
                out.append(got[0])
        elif i > m.end():  # "\boxed 5": the token after the space
            tok = re.match(r"[^\s$]+", text[i:])
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
_NUM_UNITS_RE = re.compile(
    rf"^\s*(\\?\$)?\s*({_NUMBER})\s*(\\?%)?\s*((?:[A-Za-z]{{2,}}\.?\s*)+)$")


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


# ----------------------------------------------------------------------------------------------
# The math-verify worker subprocess
# ----------------------------------------------------------------------------------------------

_STARTUP_TIMEOUT = 120.0  # seconds for the worker to import math-verify (not counted per call)
_WORKER_MEMORY = 8 << 30  # address-space limit of the worker: a huge answer fails, not the host


def _serve(req_fd: int, resp_fd: int, parent: int) -> None:  # pragma: no cover - subprocess
    """The worker's main loop: receive (op, items), send one result per item as it is done.
    A result is ("ok", value) or ("error", message)."""
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the worker stops
    if sys.platform.startswith("linux"):
        # Killed by the kernel when the parent dies, even in the middle of a long C call that
        # holds the GIL (where the watchdog thread below cannot run). Linux ties this to the
        # thread that forked us, hence `_Spawner`.
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before that took effect
        os._exit(0)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY, _WORKER_MEMORY))
    except (ImportError, ValueError, OSError):
        pass

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    # Timeouts are ours; math-verify's warning that its own are off is noise here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    inp = Connection(req_fd, writable=False)
    out = Connection(resp_fd, readable=False)
    gold_cache: dict[str, Any] = {}

    def equivalent(gold: str, pred: str) -> bool:
        g = gold_cache.get(gold)
        if g is None:
            g = parse(gold, parsing_timeout=None)
            if len(gold_cache) > 4096:
                gold_cache.clear()
            gold_cache[gold] = g
        p = parse(pred, parsing_timeout=None)
        return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))

    equivalent(_latex("1"), _latex("\\frac{2}{2}"))  # warm the parsers up before "ready"
    out.send(("ready", os.getpid()))
    while True:
        try:
            op, items = inp.recv()
        except (EOFError, OSError):
            os._exit(0)
        for item in items:
            try:
                if op == "verify":
                    res = ("ok", equivalent(*item))
                elif op == "sleep":  # for tests of the timeout
                    time.sleep(item)
                    res = ("ok", True)
                else:
                    res = ("error", f"unknown op {op!r}")
            except Exception as e:  # noqa: BLE001 - one bad answer must not stop the worker
                res = ("error", f"{type(e).__name__}: {e}"[:300])
            out.send(res)


_BOOT = ("import sys; sys.path[0:1] = [sys.argv[4]]; from stepdapo.tasks.math import _serve; "
         "_serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))")


class _Spawner:
    """Starts processes from one long-lived thread. The worker asks the kernel to kill it when its
    parent dies, and Linux means the parent *thread*: started from a short-lived pipeline thread,
    the worker would die with that thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="stepdapo-verify-spawner")
                self._thread.start()
        box: dict[str, Any] = {}
        done = threading.Event()
        self._jobs.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _loop(self) -> None:
        while True:
            args, kwargs, box, done = self._jobs.get()
            try:
                box["proc"] = subprocess.Popen(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e
            done.set()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._thread = None


_spawner = _Spawner()
os.register_at_fork(after_in_child=_spawner._after_fork)

TIMEOUT = ("timeout", None)


class VerifyWorker:
    """A math-verify subprocess with a per-item timeout. Thread-safe; restarts itself after a
    timeout or a crash. `run` returns one ("ok", value) / ("error", msg) / ("timeout", None) per
    item."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None
        self.restarts = 0  # how many times a worker was killed (timeouts, crashes)
        self.exiting = False  # set at interpreter exit: start no new worker

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        r_req, w_req = os.pipe()
        r_resp, w_resp = os.pipe()
        src = str(Path(__file__).resolve().parents[2])  # the directory that holds `stepdapo`
        try:
            proc = _spawner.popen([sys.executable, "-c", _BOOT, str(r_req), str(w_resp),
                                   str(os.getpid()), src], pass_fds=(r_req, w_resp),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        except BaseException:
            for fd in (r_req, w_req, r_resp, w_resp):
                os.close(fd)
            raise
        os.close(r_req)
        os.close(w_resp)
        self._proc = proc
        self._send = Connection(w_req, readable=False)
        self._recv = Connection(r_resp, writable=False)
        if not self._recv.poll(_STARTUP_TIMEOUT):
            self._kill()
            raise RuntimeError(f"the math-verify worker did not start in {_STARTUP_TIMEOUT:.0f}s")
        try:
            self._recv.recv()
        except EOFError:
            code = proc.wait()
            self._kill()
            raise RuntimeError(f"the math-verify worker exited at start (code {code}); is "
                               f"math-verify installed in {sys.executable}?") from None

    def _close_pipes(self) -> None:
        for conn in (self._send, self._recv):
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        self._send = self._recv = None

    def _kill(self) -> None:
        self._close_pipes()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def run(self, op: str, items: list, timeout: float) -> list[tuple[str, Any]]:
        """Run `op` on every item, each allowed `timeout` seconds."""
        out: list[tuple[str, Any]] = []
        with self._lock:
            pending = list(items)
            while pending:
                if self._proc is None or self._proc.poll() is not None:
                    self._kill()
                    if self.exiting:
                        out += [("error", "the interpreter is exiting")] * len(pending)
                        break
                    self._start()
                try:
                    self._send.send((op, pending))
                except OSError:  # died between calls: restart and resend
                    self._kill()
                    continue
                done = 0
                for _ in pending:
                    if not self._recv.poll(timeout):
                        out.append(TIMEOUT)
                        done += 1
                        self.restarts += 1
                        log.warning("math-verify took over %.3gs on one answer; restarting it",
                                    timeout)
                        self._kill()
                        break
                    try:
                        out.append(self._recv.recv())
                    except (EOFError, OSError):
                        out.append(("error", "the math-verify worker died"))
                        done += 1
                        self.restarts += 1
                        self._kill()
                        break
                    done += 1
                pending = pending[done:]
        return out

    def close(self) -> None:
        """Stop the worker (closing its pipe lets it exit by itself; it is killed if it does not)."""
        if not self._lock.acquire(timeout=2.0):
            # Another thread is mid-call (at interpreter exit, a daemon thread): kill the worker
            # under it; that call sees the worker die and returns.
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.kill()
            return
        try:
            if self._send is not None:
                try:
                    self._send.close()
                except OSError:
                    pass
                self._send = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
            self._kill()
        finally:
            self._lock.release()

    def _after_fork(self) -> None:
        # A forked child must not talk to (or wait on) its parent's worker: forget it, start its own.
        self._lock = threading.Lock()
        self._close_pipes()
        self._proc = None


_worker = VerifyWorker()


@atexit.register
def _stop_worker() -> None:
    _worker.exiting = True
    _worker.close()


os.register_at_fork(after_in_child=_worker._after_fork)


def verifier() -> VerifyWorker:
    """The interpreter's math-verify worker, shared by all MathTasks."""
    return _worker


def check_equivalent(pairs: list[tuple[str, str]], timeout: float) -> list[tuple[str, Any]]:
    """math-verify equivalence of (gold, prediction) answer texts: one ("ok", bool) /
    ("timeout", None) / ("error", msg) per pair."""
    if not pairs:
        return []
    items = [(_latex(normalize_answer(g)), _latex(normalize_answer(p))) for g, p in pairs]
    return _worker.run("verify", items, timeout)


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------


class MathTask:
    def __init__(self, cfg: MathConfig | None = None, name: str = "math"):
        self.cfg = cfg or MathConfig()
        self.name = name
        self.step_delimiter = self.cfg.step_delimiter
        self._cache: dict[str, list[Problem]] = {}

    # -- problems ------------------------------------------------------------------------------
    def problems(self, split: str) -> list[Problem]:
        if split not in ("train", "test"):
            raise ValueError(f"{self.name} task: unknown split {split!r} (use 'train' or 'test')")
        if split in self._cache:
            return self._cache[split]
        source = getattr(self.cfg, split)
        if source is None:
            raise ValueError(f"task.{self.name}.{split} is not set: give a .jsonl / .json / "
                             f".parquet path or a Hugging Face dataset name")
        hf_split = getattr(self.cfg, f"hf_{split}_split")
        out = []
        seen: dict[str, str] = {}
        for index, (where, row) in enumerate(read_rows(str(source), hf_split)):
            p = self._problem(row, where, split, index)
            if p.id in seen:
                raise DataError(f"{where}: duplicate id {p.id!r} (first at {seen[p.id]})")
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
                            f"(fields: {', '.join(map(str, row))})")
        solution = None
        raw = row.get(c.answer_field)
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
