"""Run untrusted, model-generated Python in a separate, locked-down process.

    r = run_python("print(1 + 1)", timeout=5, cpu_seconds=5, memory_mb=512, max_processes=8)
    r.ok, r.reason, r.stdout          # True, "ok", "2\\n"

A caller that must tell the program's own output from a trusted part's (the code task's test
harness) passes `secret_input`: the program reads it on fd 3 (it is in no file, argv or environment)
and whatever it writes to fd 4 comes back as `r.report`, apart from stdout and stderr.

Model-generated code never runs in our own process. A small launcher (this file run as a script,
`python -I -S sandbox.py`, in a new session; its spec comes on stdin, not in argv, which anyone
can read in /proc) sets up the isolation, forks the program's process, which sets its limits and
execs a fresh `python -I -u -B main.py`, waits for it and reports back. Two isolation levels,
chosen once per process by `isolation()`:

"namespaces" -- running as root with CAP_SYS_ADMIN (our containers and VMs):
  * the program runs as a dedicated unprivileged uid, SANDBOX_UID_BASE + slot (default 64000..64063,
    env STEPDAPO_SANDBOX_UID_BASE; no /etc/passwd entry needed). The kernel never enforces
    RLIMIT_NPROC for root, and it counts every process of a uid, so each run claims a uid of its own
    with a file lock (threads and other processes never share one) and skips a uid that some other
    process runs as. Fork bombs stop at `max_processes`.
  * a private network namespace: only a loopback that is down, so every connect fails, even to
    127.0.0.1. A private IPC namespace.
  * a private mount namespace and a root of its own (chroot) that holds only the OS (/usr, /etc,
    /bin, /sbin, /lib*, all read-only), /dev, /proc and fresh size-capped tmpfs on /tmp (the working
    directory is /tmp/work) and /dev/shm that vanish with the namespace: the host's other files
    (our data, the benchmark's tests, home and work directories) are not there to read. The
    interpreter's install prefix is bind-mounted read-only at /tmp/.python, because it may lie under
    a directory the sandbox uid cannot enter (here: /root/.pyenv, /root is 0700). `hide` covers
    paths that would still show (a data file inside /usr or the prefix) with an empty mount.
    A chrooted process cannot create a user namespace, the usual way out of a chroot.
  * not hidden: the host's process list (/proc, no PID namespace); other users' processes are
    out of reach (their /proc files need ptrace rights the sandbox uid does not have).
"rlimits" -- anything else (a non-root user; root without CAP_SYS_ADMIN, e.g. default Docker):
  the program runs as the current user, in a throwaway directory, and CAN read and write wherever
  that user can (a benchmark's test files included; `hide` is ignored). The network is cut with an
  unprivileged user+network namespace where the kernel allows it, else only by an audit hook that
  blocks socket connect/bind/sendto/getaddrinfo (bypassable, e.g. with ctypes). RLIMIT_NPROC counts all the user's processes, so it is set to their current count
  plus `max_processes` (racy), and concurrent sandboxes share that budget; as root it is not
  enforced at all. The program can read what the user can (our /proc/<pid>/environ and, where the
  kernel lets a user ptrace their own processes, our memory included) and signal the user's other
  processes: nothing the caller holds is secret from it.

Both levels: a wall-clock timeout (enforced by the launcher) and RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE
(which also caps stdout/stderr: they go to files, read back with a size cap), RLIMIT_CORE 0,
RLIMIT_NOFILE; stdin is /dev/null, no file descriptors are inherited (but fds 3 and 4 with
`secret_input`), the environment is an explicit tiny one (nothing of ours leaks). The launcher makes
itself non-dumpable, so a program of the same uid cannot read its memory or file descriptors. At
the end every process the program started is killed, daemons that called setsid() included: the
launcher is a child subreaper, so orphans are re-parented to it rather than to init, and it kills
and reaps its whole subtree (init here does not reap zombies, which would otherwise pile up and
count against the uid's process limit). The caller also kills the
launcher's process group in a `finally`. The limits are per process (rlimits, not cgroups): a
program may hold up to max_processes x memory_mb of memory, and CPU for as long as the timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import glob
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

SANDBOX_UID_BASE = int(os.environ.get("STEPDAPO_SANDBOX_UID_BASE", "64000"))
SANDBOX_UID_SLOTS = 64  # at most this many sandboxes at once (per machine, in "namespaces" mode)

# Linux constants (not in the os module of Python 3.11).
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x08000000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
INPUT_FD, REPORT_FD = 3, 4  # the program's ends of `secret_input` and `report`
# What the program's root holds besides /dev, /proc and /tmp: the OS, without which the interpreter
# cannot start (a symlink such as /lib -> usr/lib is copied as a symlink).
_OS_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")

_SIGNAL_HINTS = {"SIGKILL": "memory or CPU limit?", "SIGXCPU": "CPU time limit",
                 "SIGXFSZ": "file size limit", "SIGSEGV": "crashed; memory limit?"}


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not the program's fault)."""


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exit status 0 within the limits
    reason: str  # "ok", "timeout after 5s", "exit status 1: MemoryError", "killed by signal ..."
    returncode: int | None  # as subprocess: negative for a signal; None on timeout
    stdout: str  # capped (head and tail kept)
    stderr: str
    wall_s: float
    report: str = ""  # what the program wrote to fd 4 (with `secret_input` only), capped


# ----------------------------------------------------------------------------------------------
# The caller's side
# ----------------------------------------------------------------------------------------------

def run_python(code: str, *, timeout: float = 10.0, cpu_seconds: int = 10, memory_mb: int = 1024,
               max_processes: int = 16, file_mb: int = 16, max_output: int = 64 * 1024,
               secret_input: bytes | None = None, hide: Sequence[str] = ()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox. `file_mb` caps each file the program writes
    (stdout and stderr included) and, in "namespaces" mode, all it writes to /tmp together;
    `max_output` caps the characters of stdout/stderr (and report) returned. With `secret_input`,
    the program reads it on fd 3 and what it writes to fd 4 comes back as `report`. `hide`: paths
    the program must not see where they would show through its root ("namespaces" mode). Raises
    SandboxError only when the sandbox cannot be set up."""
    return _run(code, isolation(), timeout=timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                max_processes=max_processes, file_mb=file_mb, max_output=max_output,
                secret_input=secret_input, hide=hide)


def _run(code: str, mode: str, *, timeout: float, cpu_seconds: int, memory_mb: int,
         max_processes: int, file_mb: int, max_output: int, secret_input: bytes | None = None,
         hide: Sequence[str] = ()) -> SandboxResult:
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stepdapo-sandbox-") as root, \
            (_claim_uid() if mode == "namespaces" else contextlib.nullcontext(None)) as uid, \
            _memfd(secret_input) as input_fd:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir, 0o700)
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        # The secret goes by file descriptor: argv (this spec) is readable by anyone in /proc.
        report_path = os.path.join(root, "report")
        spec = dict(mode=mode, uid=uid, root=root, workdir=workdir,
                    status=os.path.join(root, "status"), timeout=timeout, cpu_seconds=cpu_seconds,
                    memory_mb=memory_mb, max_processes=max_processes, file_mb=file_mb,
                    input_fd=input_fd, report=report_path if input_fd is not None else None,
                    hide=[os.path.realpath(p) for p in hide], **_interpreter(mode))
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # The spec goes on stdin, not in argv: anyone can read a process's argv in /proc.
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, close_fds=True,
                pass_fds=() if input_fd is None else (input_fd,),
                start_new_session=True, cwd=root, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            try:
                with contextlib.suppress(BrokenPipeError):  # a launcher dead at start: see below
                    with proc.stdin:
                        proc.stdin.write(json.dumps(spec).encode())
                proc.wait(timeout=timeout + 30)  # the launcher enforces `timeout`; this is a backstop
            except subprocess.TimeoutExpired:
                pass
            finally:  # whatever happened, nothing of the launcher's process group survives
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stdout, stderr = _read_capped(out_path, max_output), _read_capped(err_path, max_output)
        report = _read_capped(report_path, max_output) if os.path.exists(report_path) else ""
        with open(spec["status"]) as f:
            status = json.loads(f.read() or "{}")
        if uid is not None:
            _kill_uid(uid)  # only does something if the launcher itself was killed
    wall = time.monotonic() - start

    if "error" in status:
        raise SandboxError(f"sandbox setup failed: {status['error']}")
    if status.get("timeout"):
        return SandboxResult(False, f"timeout after {timeout:g}s", None, stdout, stderr, wall,
                             report)
    if "status" not in status:
        return SandboxResult(False, f"sandbox launcher died (exit {proc.returncode})", None,
                             stdout, stderr, wall, report)
    rc = os.waitstatus_to_exitcode(status["status"])
    if rc == 0:
        return SandboxResult(True, "ok", rc, stdout, stderr, wall, report)
    if rc < 0:
        name = signal.Signals(-rc).name
        hint = f" ({_SIGNAL_HINTS[name]})" if name in _SIGNAL_HINTS else ""
        return SandboxResult(False, f"killed by signal {name}{hint}", rc, stdout, stderr, wall,
                             report)
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    reason = f"exit status {rc}" + (f": {last[:300]}" if last else "")
    return SandboxResult(False, reason, rc, stdout, stderr, wall, report)


@functools.cache
def isolation() -> str:
    """The isolation level this process gets: "namespaces" or "rlimits" (see the module docstring).
    Decided once, by trying the namespaces sandbox on a trivial program when running as root."""
    if os.geteuid() != 0:
        return "rlimits"
    try:
        r = _run("import sys; print(sys.version)", "namespaces", timeout=30, cpu_seconds=10,
                 memory_mb=512, max_processes=4, file_mb=1, max_output=4096)
        if r.ok:
            return "namespaces"
        why = f"{r.reason}: {r.stderr.strip()[-500:]}"
    except (SandboxError, OSError) as e:
        why = str(e)
    log.warning("sandbox: running as root but the namespace sandbox does not work here (%s); "
                "falling back to rlimits only: programs run as root, can write anywhere and fork "
                "freely. Run as a non-root user or grant CAP_SYS_ADMIN.", why)
    return "rlimits"


def _interpreter(mode: str) -> dict:
    """Which interpreter the program runs, as the launcher needs to know it."""
    if mode != "namespaces":
        return {"python": sys.executable}
    # The sandbox uid may not be able to reach our interpreter: the launcher bind-mounts its whole
    # install prefix at /tmp/.python and runs it from there (a venv's python is a symlink to it).
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    rel = os.path.relpath(exe, prefix)
    if rel.startswith(".."):
        raise SandboxError(f"interpreter {exe} is not inside its prefix {prefix}")
    # Its shared libpython may be found through an absolute RUNPATH the sandbox uid cannot reach.
    has_libs = bool(glob.glob(os.path.join(prefix, "lib", "libpython*")))
    return {"python": os.path.join("/tmp/.python", rel), "prefix": prefix,
            "ld_library_path": "/tmp/.python/lib" if has_libs else None}


@contextlib.contextmanager
def _memfd(data: bytes | None):
    """An anonymous in-memory file holding `data` (None: no file), closed on exit."""
    if data is None:
        yield None
        return
    fd = os.memfd_create("stepdapo-sandbox-input", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _read_capped(path: str, limit: int) -> str:
    """The file's text, or its head and tail with the middle cut out when it is over `limit`."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= limit:
            data = f.read()
        else:
            head = f.read(limit // 2)
            f.seek(size - limit // 2)
            data = head + f"\n[... {size - limit} bytes cut ...]\n".encode() + f.read()
    return data.decode("utf-8", errors="replace")


@contextlib.contextmanager
def _claim_uid():
    """A sandbox uid that no other sandbox (in any process) and no other program is using."""
    lockdir = os.path.join(tempfile.gettempdir(), "stepdapo-sandbox-uids")
    os.makedirs(lockdir, mode=0o700, exist_ok=True)
    for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_SLOTS):
        with open(os.path.join(lockdir, str(uid)), "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when f is closed
            except BlockingIOError:
                continue  # another sandbox has it
            if pids_of_uid(uid):  # someone else's processes (or unreaped leftovers)
                continue
            yield uid
            return
    raise SandboxError(f"all {SANDBOX_UID_SLOTS} sandbox uids from {SANDBOX_UID_BASE} are busy")


def process_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, real uid) of every process, from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            out.append((int(name), int(fields["PPid"]), int(fields["Uid"].split()[0])))
        except (OSError, KeyError, ValueError):
            continue  # it exited meanwhile
    return out


def pids_of_uid(uid: int) -> list[int]:
    """The processes (zombies included) whose real uid is `uid`."""
    return [pid for pid, _, u in process_table() if u == uid]


def _kill_uid(uid: int) -> None:
    for _ in range(100):
        pids = pids_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# The launcher's side (this file run as a script; single-threaded, so fork is safe)
# ----------------------------------------------------------------------------------------------

def _launcher(spec: dict) -> None:
    """Set up the isolation, run the program, write {"status": wait status} or {"timeout": true}
    or {"error": "..."} to the status file, and leave no process behind."""
    with open(spec["status"], "w") as status_file:  # opened first: /tmp may be covered next
        try:
            result = _supervise(spec)
        except Exception as e:  # noqa: BLE001 - any failure here is the sandbox's, report it
            result = {"error": f"{type(e).__name__}: {e}"}
        finally:
            _kill_subtree()
        json.dump(result, status_file)


def _supervise(spec: dict) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    _prctl(libc, PR_SET_DUMPABLE, 0)  # a program of our uid cannot read our memory or fds
    _prctl(libc, PR_SET_CHILD_SUBREAPER, 1)  # orphans come to us, not to init
    if spec["input_fd"] is not None:
        os.set_inheritable(spec["input_fd"], False)  # the program gets it as fd 3 only
        spec["report_fd"] = os.open(spec["report"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    if spec["mode"] == "namespaces":
        _enter_namespaces(libc, spec)
    # SIGCHLD stays pending while blocked, so sigtimedwait in _wait cannot miss an exit.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    r, w = os.pipe()  # close-on-exec: EOF without data means the exec worked
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _exec_program(libc, spec)
        except BaseException as e:  # noqa: BLE001 - report whatever stopped the exec
            os.write(w, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(127)
    os.close(w)
    if spec["input_fd"] is not None:
        os.close(spec["input_fd"])
        os.close(spec["report_fd"])
    with os.fdopen(r, "rb") as f:
        err = f.read()
    if err:
        return {"error": "starting the program: " + err.decode(errors="replace")}
    return _wait(pid, start + spec["timeout"])


def _wait(pid: int, deadline: float) -> dict:
    """Wait for the program until `deadline`, reaping orphans meanwhile (zombies count against
    the process limit)."""
    while True:
        try:
            while True:
                done, status = os.waitpid(-1, os.WNOHANG)
                if done == 0:
                    break
                if done == pid:
                    return {"status": status}
        except ChildProcessError:
            return {"error": "program vanished"}
        left = deadline - time.monotonic()
        if left <= 0:
            return {"timeout": True}
        signal.sigtimedwait({signal.SIGCHLD}, min(left, 1.0))


def _kill_subtree() -> None:
    """SIGKILL every descendant and reap them all (the subreaper gets the orphans)."""
    me = os.getpid()
    while True:
        table = process_table()
        children: dict[int, list[int]] = {}
        for pid, ppid, _ in table:
            children.setdefault(ppid, []).append(pid)
        todo, found = list(children.get(me, [])), []
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            if not found:
                return
        time.sleep(0.002)


def _enter_namespaces(libc, spec: dict) -> None:
    """New mount, network and IPC namespaces, and a new root holding only the OS (read-only),
    /dev, /proc, the interpreter at /tmp/.python and a private /tmp (see the module docstring)."""
    with open(os.path.join(spec["workdir"], "main.py"), "rb") as f:
        code = f.read()
    new_root = os.path.join(spec["root"], "fs")
    os.mkdir(new_root, 0o755)  # now: "/" turns read-only below
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC) != 0:
        raise OSError(ctypes.get_errno(), "unshare(mount, net, ipc namespaces)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # first: nothing below reaches the host
    # Opened in the new namespace (a bind source must be in it).
    prefix_fd = os.open(spec["prefix"], os.O_PATH)
    for target, opts in _mounts():
        if target.startswith(("/proc", "/sys", "/dev")) and target != "/dev/shm":
            continue  # kernel interfaces and devices (/dev/null must stay writable)
        keep = sum(flag for name, flag in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV),
                   ("noexec", MS_NOEXEC), ("noatime", MS_NOATIME), ("nodiratime", MS_NODIRATIME),
                   ("relatime", MS_RELATIME)) if name in opts)
        _mount(libc, None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep)
    # Bind mounts keep the read-only flag of what they copy.
    _mount(libc, "tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for name in _OS_DIRS + ("dev", "proc"):
        src, dst = "/" + name, os.path.join(new_root, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            os.mkdir(dst, 0o755)
            _mount(libc, src, dst, None, MS_BIND | MS_REC)
    tmpfs = f"size={spec['file_mb']}m,mode=1777"
    os.mkdir(os.path.join(new_root, "tmp"))
    _mount(libc, "tmpfs", os.path.join(new_root, "tmp"), "tmpfs", MS_NOSUID | MS_NODEV, tmpfs)
    if os.path.isdir(os.path.join(new_root, "dev/shm")):
        _mount(libc, "tmpfs", os.path.join(new_root, "dev/shm"), "tmpfs", MS_NOSUID | MS_NODEV,
               tmpfs)
    python = os.path.join(new_root, "tmp/.python")
    os.mkdir(python, 0o755)
    _mount(libc, f"/proc/self/fd/{prefix_fd}", python, None, MS_BIND | MS_REC)
    _mount(libc, None, python, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(prefix_fd)
    os.chdir(new_root)
    os.chroot(".")  # the host's other files are gone from here on
    for path in spec["hide"]:
        _hide(libc, path, spec["prefix"])
    _mount(libc, None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    spec["workdir"] = "/tmp/work"
    os.mkdir(spec["workdir"], 0o700)
    with open("/tmp/work/main.py", "wb") as f:
        f.write(code)
    for path in ("/tmp/work", "/tmp/work/main.py"):
        os.chown(path, spec["uid"], spec["uid"])


def _hide(libc, path: str, prefix: str) -> None:
    """Cover the host path `path` with an empty mount wherever the new root shows it: at itself
    (under /usr, /etc, ...) and under /tmp/.python if it is inside the interpreter's prefix."""
    views = [path]
    if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
        views.append("/tmp/.python" + path[len(prefix.rstrip("/")):])
    for view in views:
        if os.path.isdir(view):
            _mount(libc, "tmpfs", view, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV,
                   "size=4k,mode=0555")
        elif os.path.exists(view):
            _mount(libc, "/dev/null", view, None, MS_BIND)


def _mounts() -> list[tuple[str, list[str]]]:
    """(mount point, per-mount options) of each mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")  # "\040" for a space
            out.append((target, fields[5].split(",")))
    return out


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    def enc(s):
        return None if s is None else s.encode()

    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _prctl(libc, option: int, arg: int) -> None:
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


_AUDIT_NO_NET = (
    "import sys\n"
    "def _no_net(event, args):\n"
    "    if event in ('socket.connect', 'socket.bind', 'socket.sendto', 'socket.sendmsg',\n"
    "                 'socket.getaddrinfo'):\n"
    "        raise PermissionError('network access is disabled in the sandbox')\n"
    "sys.addaudithook(_no_net)\n"
    "del sys, _no_net\n"
    "exec(compile(open('main.py').read(), 'main.py', 'exec'))\n")


def _exec_program(libc, spec: dict) -> None:
    """In the forked child: limits, identity, then exec the program. Does not return."""
    launcher = os.getppid()
    os.chdir(spec["workdir"])
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})  # the mask survives exec
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    mb = 1 << 20
    limits = {resource.RLIMIT_CPU: (spec["cpu_seconds"], spec["cpu_seconds"] + 1),  # SIGXCPU, then SIGKILL
              resource.RLIMIT_AS: (spec["memory_mb"] * mb,) * 2,
              resource.RLIMIT_FSIZE: (spec["file_mb"] * mb,) * 2,
              resource.RLIMIT_CORE: (0, 0),
              resource.RLIMIT_NOFILE: (256, 256)}
    nproc = spec["max_processes"]
    if spec["mode"] != "namespaces":  # the count is per user: allow what they run already
        nproc += len(pids_of_uid(os.getuid()))
    limits[resource.RLIMIT_NPROC] = (nproc, nproc)
    for which, value in limits.items():
        resource.setrlimit(which, value)
    if spec["input_fd"] is not None:  # to fds 3 and 4, via free numbers: they may be 3 or 4 now
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (spec["input_fd"], spec["report_fd"])]
        for fd, target in zip(moved, (INPUT_FD, REPORT_FD)):
            os.dup2(fd, target)  # inheritable
            os.close(fd)

    argv = [spec["python"], "-I", "-u", "-B", "main.py"]
    if spec["mode"] == "namespaces":
        uid = spec["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # for good: a root-owned process could undo all of the above
    elif libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        argv = [spec["python"], "-I", "-u", "-B", "-c", _AUDIT_NO_NET]  # weaker: bypassable
    _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)  # after setresuid, which clears it
    if os.getppid() != launcher:  # the launcher died before we could ask
        os._exit(137)
    bin_dir = os.path.dirname(spec["python"])
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": spec["workdir"],
           "TMPDIR": "/tmp" if spec["mode"] == "namespaces" else spec["workdir"], "LANG": "C.UTF-8"}
    if spec.get("ld_library_path"):
        env["LD_LIBRARY_PATH"] = spec["ld_library_path"]
    os.execve(spec["python"], argv, env)


if __name__ == "__main__":
    _spec = json.loads(sys.stdin.buffer.read())  # from the caller's pipe (see `_run`)
    _null = os.open(os.devnull, os.O_RDONLY)  # the program's stdin
    os.dup2(_null, 0)
    os.close(_null)
    _launcher(_spec)
