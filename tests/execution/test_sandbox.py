"""The sandbox against hostile programs: each must end within its limits (plus a little slack),
with a verdict, and leave nothing behind: no process, no file outside its own directory."""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from stepdapo.execution import sandbox
from stepdapo.execution.sandbox import run_python

LIMITS = {"timeout": 3.0, "cpu_seconds": 2, "memory_mb": 256, "max_processes": 8}
SLACK = 3.0  # seconds: two interpreter start-ups, namespace setup and the cleanup
REPO = Path(__file__).resolve().parents[2]

NAMESPACES = sandbox.isolation() == "namespaces"
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="needs the namespaces sandbox (root with CAP_SYS_ADMIN)")
# RLIMIT_NPROC is not enforced for root, so a fork bomb is only safe with the sandbox uid.
nproc_enforced = pytest.mark.skipif(
    os.geteuid() == 0 and not NAMESPACES, reason="RLIMIT_NPROC is not enforced for root")


def sandbox_pids() -> list[int]:
    lo, hi = sandbox.SANDBOX_UID_BASE, sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_SLOTS
    return [pid for pid, _, uid in sandbox.process_table() if lo <= uid < hi]


def pids_running(marker: str) -> list[int]:
    """Processes whose command line contains `marker`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd:
                out.append(int(name))
    return out


def run(code: str, **kw) -> sandbox.SandboxResult:
    limits = {**LIMITS, **kw}
    t0 = time.monotonic()
    r = run_python(code, **limits)
    took = time.monotonic() - t0
    assert took < limits["timeout"] + SLACK, (took, r)
    return r


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    # Every process of a sandbox uid must be gone. (Sandboxes run by someone else at the same time
    # may show up here for a moment: only a process still there after a grace period counts.)
    left = set(sandbox_pids())
    deadline = time.monotonic() + 3 * (LIMITS["timeout"] + SLACK)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left &= set(sandbox_pids())
    assert not left, f"sandboxed processes survived: {sorted(left)}"


# -- benign programs ----------------------------------------------------------------------------

def test_benign_program_passes():
    r = run("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert r.ok and r.reason == "ok" and r.returncode == 0
    assert r.stdout == "hello 42\n" and r.stderr == "warn\n"
    assert r.wall_s < 3


def test_exit_status_and_assertion_message():
    r = run("import sys; sys.exit(3)")
    assert not r.ok and r.returncode == 3 and r.reason == "exit status 3"
    r = run("x = 1\nassert x == 2, 'one is not two'")
    assert not r.ok and r.returncode == 1
    assert "AssertionError: one is not two" in r.reason
    assert "Traceback" in r.stderr and "main.py" in r.stderr


def test_own_directory_is_writable_stdin_empty_no_inherited_fds():
    r_fd, w_fd = os.pipe()
    os.set_inheritable(w_fd, True)  # even an inheritable descriptor of ours must not get through
    try:
        r = run("import os, sys\n"
                "open('scratch.txt', 'w').write('data')\n"
                "print(open('scratch.txt').read())\n"
                "print(repr(sys.stdin.read()))\n"
                "print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))")
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert r.ok, r
    data, stdin, fds = r.stdout.splitlines()
    assert data == "data" and stdin == "''"
    assert max(eval(fds)) <= 3  # 0, 1, 2 and the one listdir itself opened


# -- hostile programs ---------------------------------------------------------------------------

@nproc_enforced
@pytest.mark.parametrize("code", [
    "import os\nwhile True: os.fork()",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
], ids=["plain", "persistent"])
def test_fork_bomb(code):
    r = run(code)
    assert not r.ok and r.reason, r


def test_infinite_loop_hits_the_cpu_limit():
    r = run("while True: pass")
    assert not r.ok
    assert "SIGXCPU" in r.reason or "SIGKILL" in r.reason or r.reason.startswith("timeout"), r


def test_sleep_forever_hits_the_wall_clock_timeout():
    r = run("import time\ntime.sleep(10**6)")
    assert not r.ok and r.reason == "timeout after 3s" and r.returncode is None
    assert r.wall_s >= 3.0


@pytest.mark.parametrize("code", [
    "x = bytearray(10 * 2**30)",
    "a = []\nwhile True: a.append(' ' * 10**6)",
], ids=["bytearray", "list"])
def test_memory_hog(code):
    r = run(code)
    assert not r.ok
    assert "MemoryError" in r.reason or "signal" in r.reason, r


def test_huge_output_is_capped():
    r = run("import sys\nwhile True: sys.stdout.write('x' * 65536)", max_output=10_000)
    assert not r.ok
    assert len(r.stdout) < 10_200 and "bytes cut" in r.stdout


def test_output_over_the_cap_but_under_the_file_limit_is_truncated_not_fatal():
    r = run("print('a' * 50_000)\nprint('end')", max_output=1000)
    assert r.ok and r.stdout.startswith("aaa") and r.stdout.endswith("end\n") and len(r.stdout) < 1200


@needs_namespaces
def test_cannot_write_outside_its_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    existing = locked / "existing.txt"
    existing.write_text("original")
    name = f"stepdapo-sandbox-test-{uuid.uuid4().hex}"
    targets = [str(locked / "new.txt"), f"/tmp/{name}", str(REPO / name), "/var/tmp/" + name,
               "/dev/shm/" + name]
    code = ("import os\n"
            f"for path in {targets + [str(existing)]!r}:\n"
            "    try:\n"
            "        with open(path, 'a') as f:\n"
            "            f.write('pwned')\n"
            "        print('wrote', path)\n"
            "    except OSError as e:\n"
            "        print('refused', path, e)\n"
            f"os.makedirs('/tmp/{name}-dir/sub', exist_ok=True)\n")
    try:
        r = run(code)
        assert r.ok, r  # the program itself ran; what matters is what is left outside
        for path in targets + [f"/tmp/{name}-dir"]:
            assert not os.path.exists(path), (path, r.stdout)
        assert existing.read_text() == "original"
        assert f"refused {REPO / name}" in r.stdout
    finally:
        for path in targets:
            if os.path.isfile(path):
                os.remove(path)


def _listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    return srv


@pytest.mark.parametrize("mode", ["default", "rlimits"])
def test_no_network(mode, monkeypatch):
    if mode == "rlimits":
        monkeypatch.setattr(sandbox, "isolation", lambda: "rlimits")
    srv = _listener()
    port = srv.getsockname()[1]
    try:
        for code in [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                     "import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=2)",
                     "import socket\nsocket.getaddrinfo('example.com', 80)"]:
            r = run(code)
            assert not r.ok, (code, r)
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected
    finally:
        srv.close()


@pytest.mark.parametrize("mode", ["default", "rlimits"])
def test_parent_environment_does_not_leak(mode, monkeypatch):
    if mode == "rlimits":
        monkeypatch.setattr(sandbox, "isolation", lambda: "rlimits")
    secret = "xyz-" + uuid.uuid4().hex
    monkeypatch.setenv("STEPDAPO_SECRET", secret)
    code = "import os\nprint(dict(os.environ))\n"
    if mode == "default" and NAMESPACES:  # as another uid it cannot read our /proc/<pid>/environ
        code += (f"for pid in ({os.getpid()}, os.getppid()):\n"
                 "    try:\n"
                 "        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
                 "    except OSError as e:\n"
                 "        print('refused', e)\n")
    r = run(code)
    assert r.ok, r
    assert secret not in r.stdout and "STEPDAPO_SECRET" not in r.stdout


@pytest.mark.parametrize("mode", ["default", "rlimits"])
@pytest.mark.parametrize("how", ["setsid", "double-fork"])
def test_detached_children_die_with_the_program(how, mode, monkeypatch):
    if mode == "rlimits":
        monkeypatch.setattr(sandbox, "isolation", lambda: "rlimits")
    marker = str(900000 + uuid.uuid4().int % 90000)  # `sleep <marker>` is ours alone
    if how == "setsid":
        code = ("import subprocess\n"
                f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n")
    else:
        code = ("import os\n"
                "if os.fork() == 0:\n"
                "    os.setsid()\n"
                "    if os.fork() == 0:\n"
                f"        os.execvp('sleep', ['sleep', '{marker}'])\n"
                "    os._exit(0)\n"
                "os.wait()\n")
    code += "import time\ntime.sleep(0.3)\nprint('bye')\n"
    try:
        r = run(code)
        assert r.ok and r.stdout == "bye\n", r
        assert pids_running(f"sleep {marker}") == []
    finally:
        for pid in pids_running(f"sleep {marker}"):
            os.kill(pid, 9)


@needs_namespaces  # in "rlimits" mode all runs share the user's process budget
def test_concurrent_runs_do_not_disturb_each_other():
    """Each run has its own uid: a fork bomb next door does not eat the others' process budget."""
    results = {}

    def go(key, code):
        results[key] = run_python(code, **LIMITS)

    benign = ("import subprocess, sys\n"
              "print(subprocess.run([sys.executable, '-c', 'print(5)'], capture_output=True,"
              " text=True).stdout.strip())")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    threads = [threading.Thread(target=go, args=("bomb", bomb))]
    threads += [threading.Thread(target=go, args=(i, benign)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not results["bomb"].ok
    for i in range(3):
        assert results[i].ok and results[i].stdout == "5\n", results[i]


def test_audit_hook_fallback_blocks_sockets(tmp_path):
    """The weakest network block (no namespaces available) still refuses a plain connect."""
    srv = _listener()
    port = srv.getsockname()[1]
    (tmp_path / "main.py").write_text(
        f"print(__name__)\nimport socket\nsocket.create_connection(('127.0.0.1', {port}))\n")
    try:
        p = subprocess.run([sys.executable, "-I", "-c", sandbox._AUDIT_NO_NET], cwd=tmp_path,
                           capture_output=True, text=True, timeout=30, check=False)
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()
    assert p.returncode == 1 and p.stdout == "__main__\n"
    assert "PermissionError: network access is disabled" in p.stderr
    assert 'File "main.py", line 3' in p.stderr


def test_isolation_level_is_reported():
    assert sandbox.isolation() in ("namespaces", "rlimits")
    if NAMESPACES:
        r = run("import os\nprint(os.getuid(), os.getcwd())")
        uid, cwd = r.stdout.split()
        assert sandbox.SANDBOX_UID_BASE <= int(uid) < sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_SLOTS
        assert cwd == "/tmp/work"


def test_secret_input_on_fd_3_and_report_from_fd_4():
    r = run("import os\nsecret = os.read(3, 100)\nos.write(4, secret[::-1])\nprint('out')",
            secret_input=b"abc123")
    assert r.ok and r.report == "321cba" and r.stdout == "out\n", r
    r = run("import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))")
    assert r.report == "" and max(eval(r.stdout)) <= 3  # without secret_input: no fd 3 or 4
    # The secret is not in the launcher's argv (readable by anyone in /proc).
    r = run("import os\nos.read(3, 100)\n"
            "print([open(f'/proc/{p}/cmdline', 'rb').read() for p in (os.getppid(),)])",
            secret_input=b"sekrit-in-argv?")
    assert r.ok and b"sekrit" not in r.stdout.encode(), r


def test_the_launchers_command_line_holds_no_spec():
    """Anyone can read a process's argv in /proc: the run's setup (its directory, uid, limits,
    hidden paths) is not in the launcher's (the program's parent)."""
    r = run("import os\nprint(open(f'/proc/{os.getppid()}/cmdline', 'rb').read())",
            hide=["/no-such-path-hidden"])
    assert r.ok and r.stdout.startswith("b'"), r
    for leak in ("stepdapo-sandbox-", "memory_mb", "no-such-path-hidden", "{"):
        assert leak not in r.stdout, r.stdout


@needs_namespaces
def test_the_programs_root_holds_only_the_os():
    r = run("import os\nprint(sorted(os.listdir('/')))\n"
            f"print(os.path.exists({str(REPO)!r}), os.path.exists({str(Path.home())!r}))\n"
            "print(os.listdir('/tmp'))")
    assert r.ok, r
    top, gone, tmp = r.stdout.splitlines()
    assert set(eval(top)) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
                              "dev", "proc", "tmp"}, top
    assert gone == "False False" and sorted(eval(tmp)) == [".python", "work"]


@needs_namespaces
def test_hide_covers_files_and_directories_under_the_interpreter():
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    this, email = os.path.join(stdlib, "this.py"), os.path.join(stdlib, "email")
    view = "/tmp/.python/" + os.path.relpath(stdlib, os.path.realpath(sys.base_prefix))
    code = (f"import os\nprint(len(open({view + '/this.py'!r}).read()))\n"
            f"print(os.listdir({view + '/email'!r}))")
    r = run(code)
    assert r.ok and r.stdout.split("\n")[0] != "0", r  # there without `hide`
    r = run(code, hide=[this, email])
    assert r.ok and r.stdout == "0\n[]\n", r
