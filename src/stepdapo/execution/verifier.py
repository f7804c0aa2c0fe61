"""math-verify in a long-lived worker process with our own per-answer timeout.

Why a process: math-verify's own timeouts use `signal.alarm`, which fails off the main thread (the
pipeline verifies from worker threads), and a pathological answer (`\\boxed{9^{9^{9}}}`) can keep
sympy busy for minutes. So all math-verify calls run in one long-lived worker subprocess per
interpreter, started on first use, with math-verify's timeouts disabled. The parent waits at most
`timeout` seconds for each result; when that passes, it kills the worker, judges that answer
"timeout" (the task's "verifier timeout"), restarts the worker and goes on with the rest. This works
from any thread (calls are serialised by a lock). A batch goes in one message and the verdicts are
read as they stream back, which keeps the per-completion overhead to the cost of math-verify itself
(about 0.04 ms per completion batched, 0.3 ms for a lone call). The worker exits when the parent
closes its pipe (atexit does), and is killed by the kernel if the parent dies (Linux
PR_SET_PDEATHSIG; elsewhere a watchdog thread polls the parent pid). A worker that stops answering
for another reason (killed, crashed) is restarted; its pending answer reads ("error", ...).

Why not a library pool (checked with pebble 5.2.3 and concurrent.futures on Python 3.11, Linux,
one worker each):
  * concurrent.futures.ProcessPoolExecutor has no per-call kill: `result(timeout=)` only stops
    waiting, the hung call keeps the worker and every later call queues behind it (`cancel()` is
    False once running); killing the worker breaks the pool for good (BrokenProcessPool). On SIGKILL
    of the parent a busy worker lives on, and a normal exit waits for the busy worker to finish.
  * pebble's ProcessPool has per-task timeouts that kill and replace the worker, and a worker that
    dies mid-task fails only that task. But a worker that dies while idle (the OOM killer, a stray
    kill) puts the whole pool in an error state ("Unexpected error within the Pool" on every later
    call), and a worker busy in a C call lives on after its parent is SIGKILLed (minutes for
    `9**(9**9)`). Adding PR_SET_PDEATHSIG in an initializer ties the worker to the thread that
    started it, which pebble does not control: a pool created from a short-lived pipeline thread
    lost its worker when that thread ended, which is the idle death that breaks the pool. Its
    overhead, one task per completion, matched ours within noise (0.06-0.11 vs 0.06-0.07 ms per
    completion batched, on a loaded 2-core machine).
Neither gives a per-call kill, recovery from any worker death and a worker that dies with a
SIGKILLed parent without the machinery below, so we keep our own worker.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from stepdapo.tasks.answers import _latex, normalize_answer

log = logging.getLogger(__name__)

# Longer predictions are not sent to math-verify: it gives up on them quietly (a sum of 1000 ones,
# 1999 characters, parses as nothing and is "wrong") or spends long on them; no real answer is this
# long (MATH-500's longest is 53 characters).
MAX_ANSWER_CHARS = 1000
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


_BOOT = ("import sys; sys.path[0:1] = [sys.argv[4]]; from stepdapo.execution.verifier import _serve; "
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


_spawner = _Spawner()  # its fork handler is registered with the worker's, in verifier()

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


_worker: VerifyWorker | None = None
_worker_lock = threading.Lock()


def _stop_worker() -> None:
    if _worker is not None:
        _worker.exiting = True
        _worker.close()


def verifier() -> VerifyWorker:
    """The interpreter's math-verify worker, shared by all MathTasks. Made (and its exit and fork
    handlers registered) on first use: importing this module changes nothing in the process."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = VerifyWorker()
            atexit.register(_stop_worker)
            os.register_at_fork(after_in_child=_worker._after_fork)
            os.register_at_fork(after_in_child=_spawner._after_fork)
    return _worker


def check_equivalent(pairs: list[tuple[str, str]], timeout: float,
                     max_chars: int = MAX_ANSWER_CHARS) -> list[tuple[str, Any]]:
    """math-verify equivalence of (gold, prediction) answer texts: one ("ok", bool) /
    ("timeout", None) / ("error", msg) per pair. A prediction over `max_chars` characters is an
    error ("answer too long"), never sent to math-verify."""
    out: list[tuple[str, Any] | None] = [None] * len(pairs)
    todo, items = [], []
    for i, (gold, pred) in enumerate(pairs):
        if len(pred) > max_chars:
            out[i] = ("error", f"answer too long ({len(pred)} characters; the limit is "
                               f"{max_chars})")
        else:
            todo.append(i)
            items.append((_latex(normalize_answer(gold)), _latex(normalize_answer(pred))))
    for i, result in zip(todo, verifier().run("verify", items, timeout) if items else []):
        out[i] = result
    return out  # type: ignore[return-value]
