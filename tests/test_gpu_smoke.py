"""bench/gpu_smoke.py, the prepared GPU check, in its CI-sized CPU form: every probe that can run on
a CPU runs and passes (chunked log-probs equal HF's logits on a 152k vocabulary, checkpointed and
plain training steps give the same loss with float32 AdamW state, the log-ratio critic scores), so
the script a GPU session runs is known to work up to the device."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_smoke_runs_on_a_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_smoke.py"), "--device", "cpu", "--size", "ci",
                        "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    probes = json.loads(out.read_text())["probes"]
    assert {k: v["status"] for k, v in probes.items()} == {"score": "ok", "train": "ok", "critic": "ok",
                                                          "pipeline": "skipped", "fsdp": "skipped"}
    assert probes["score"]["max_abs_diff"] < 1e-4 * probes["score"]["scale"]
    assert probes["train"]["loss"]["checkpointed"] == probes["train"]["loss"]["plain"] or \
        abs(probes["train"]["loss"]["checkpointed"] - probes["train"]["loss"]["plain"]) < 1e-3


def test_a_failing_probe_fails_the_script(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_smoke.py"), "--device", "cpu", "--size", "ci",
                        "--probes", "nonexistent", "--out", str(tmp_path / "s.json")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "FAILED: nonexistent" in r.stdout
