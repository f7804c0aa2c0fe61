import math
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from scripted import ScriptedArithmeticPolicy

from stepdapo.config import load_config
from stepdapo.models import char_tokenizer
from stepdapo.stages.labels import read_labels, run_labels
from stepdapo.stages.states import (
    run_states,
)
from stepdapo.tasks.arithmetic import ArithmeticTask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_mc_labels_match_analytic_values(tmp_path, p):
    """Scripted policy: each operation step goes wrong with probability p. MC(s) must match
    (1-p)^(steps left) on error-free prefixes and 0 after an error, within sampling error."""
    m = 300
    cfg = load_config(None, ["states.n_problems=25", "states.samples_per_problem=6",
                             "states.keep_per_problem=4", f"label.rollouts={m}", "label.shard_size=50"])
    task = ArithmeticTask(cfg.task.arithmetic)
    tok = char_tokenizer()
    policy = ScriptedArithmeticPolicy(task, tok, p)
    run_states(cfg, "scripted", tmp_path / "states", task, progress=False, generator=policy)
    run_labels(cfg, "scripted", tmp_path / "states", tmp_path / "labels", task, progress=False, generator=policy)
    labels = read_labels(tmp_path / "labels")
    z2, n_zero, n_pos = [], 0, 0
    for ids, mc, n_correct in zip(labels.column("ids").to_pylist(), labels.column("mc").to_pylist(),
                                  labels.column("n_correct").to_pylist()):
        v = policy.value(tok.decode(ids, skip_special_tokens=True))
        assert n_correct == round(mc * m)
        if v == 0:
            n_zero += 1
            assert mc == 0  # after an error nothing can end correct
        else:
            n_pos += 1
            sd = math.sqrt(v * (1 - v) / m) if v < 1 else 1e-9
            assert abs(mc - v) < 5 * sd + 1e-9, (tok.decode(ids), mc, v)
            if v < 1:
                z2.append(((mc - v) / sd) ** 2)
    assert n_zero > 5 and n_pos > 20  # both kinds of state were tested
    assert 0.6 < np.mean(z2) < 1.5  # deviations have the size sampling error predicts


def test_kill_and_resume_gives_identical_labels(small_model_dir, tmp_path):
    overrides = ["states.n_problems=40", "states.samples_per_problem=4", "states.keep_per_problem=3",
                 "label.rollouts=8", "label.shard_size=2"]
    cfg = load_config(None, overrides)
    task = ArithmeticTask(cfg.task.arithmetic)
    run_states(cfg, small_model_dir, tmp_path / "states", task, progress=False)
    cmd = [sys.executable, "-m", "stepdapo.cli", "label", "--model", str(small_model_dir),
           "--states", str(tmp_path / "states"), *overrides]
    # an uninterrupted reference run
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True, capture_output=True, timeout=600)
    # a run killed with SIGKILL part-way through, then resumed
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("shard-*.parquet"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_total = len(list((tmp_path / "ref").glob("shard-*.parquet")))
    n_before = len(list(out.glob("shard-*.parquet")))
    assert not (out / "manifest.json").exists() and 3 <= n_before < n_total
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True, timeout=600)
    a, b = read_labels(tmp_path / "ref"), read_labels(out)
    assert a.equals(b)
    assert not list(out.glob(".*.tmp"))  # no temporary leftovers
    assert pq.read_table(out / "stepwise.parquet").equals(pq.read_table(tmp_path / "ref" / "stepwise.parquet"))


def test_finished_stage_is_not_recomputed_and_settings_are_checked(tmp_path):
    cfg = load_config(None, ["states.n_problems=5", "label.rollouts=4"])
    task = ArithmeticTask(cfg.task.arithmetic)
    policy = ScriptedArithmeticPolicy(task, char_tokenizer(), 0.2)
    run_states(cfg, "scripted", tmp_path / "s", task, progress=False, generator=policy)
    run_labels(cfg, "scripted", tmp_path / "s", tmp_path / "l", task, progress=False, generator=policy)
    mtime = (tmp_path / "l" / "shard-00000.parquet").stat().st_mtime_ns

    class Exploding:
        def generate(self, *a, **k):
            raise AssertionError("a finished stage must not sample again")

    run_labels(cfg, "scripted", tmp_path / "s", tmp_path / "l", task, progress=False, generator=Exploding())
    assert (tmp_path / "l" / "shard-00000.parquet").stat().st_mtime_ns == mtime
    cfg2 = load_config(None, ["states.n_problems=5", "label.rollouts=5"])
    with pytest.raises(ValueError, match="different settings"):
        run_labels(cfg2, "scripted", tmp_path / "s", tmp_path / "l", task, progress=False, generator=policy)
