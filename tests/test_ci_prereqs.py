""".ci/prereqs.py, the check `.ci/run` makes before the tests: with each prerequisite removed in turn
(../shared/data, the SmolLM2 GGUF, the namespaces sandbox's privileges, vLLM) it fails, naming what
is missing, so CI cannot pass by skipping the tests that need it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "prereqs.py"


def check(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def without_vllm() -> str:
    """A Python that cannot import vLLM: this one, when vLLM is not installed next to it."""
    r = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True)
    return sys.executable if r.returncode != 0 else "/nonexistent/python"


@pytest.mark.parametrize("removed, args, expected", [
    ("shared data", ["--shared", "/nonexistent/shared"], "shared data missing: /nonexistent/shared/data/gsm8k/train.jsonl"),
    ("SmolLM2", ["--smollm2", "/nonexistent/smollm2.gguf"], "SmolLM2 GGUF missing at /nonexistent/smollm2.gguf"),
    ("vLLM environment", ["--vllm-python", "/nonexistent/python"], "vLLM environment missing: /nonexistent/python"),
])
def test_each_missing_prerequisite_fails_by_name(removed, args, expected):
    r = check(*args)
    assert r.returncode == 1, (removed, r.stdout, r.stderr)
    assert f"prerequisite missing: {expected}" in r.stderr, r.stderr
    assert "CI stops here" in r.stderr


def test_vllm_not_importable_fails_by_name():
    python = without_vllm()
    r = check("--vllm-python", python)
    assert r.returncode == 1
    assert (f"vLLM not importable by {python}" in r.stderr or f"vLLM environment missing: {python}" in r.stderr), r.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                    reason="needs the namespaces sandbox: dropping root's capabilities needs root and setpriv")
def test_without_root_privileges_the_sandbox_check_fails():
    """Root without its capabilities (setpriv drops them all) cannot build the namespaces sandbox."""
    r = check(prefix=("setpriv", "--bounding-set=-all", "--inh-caps=-all"))
    assert r.returncode == 1
    assert "prerequisite missing: the namespaces sandbox is unavailable (isolation: 'rlimits'" in r.stderr, r.stderr
