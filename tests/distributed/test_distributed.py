"""Several processes (torchrun, gloo on this CPU): the sampling stages split their shards across
ranks, and per-shard seeds make the result the same as one process's, row for row."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from stepdapo.stages.labels import read_labels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One torch thread per process: two 2-thread processes on 2 cores slow each other 10x or more.
SMALL = ["threads=1", "states.n_problems=24", "states.samples_per_problem=4", "states.keep_per_problem=2",
         "label.rollouts=4", "label.shard_size=7", "eval.limit=40", "eval.samples=2", "eval.k=2"]


def stepdapo(*args, procs: int = 1, timeout: int = 600):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] if procs > 1
                else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    return subprocess.run([*launcher, "-m", "stepdapo", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def one_and_two(small_model_dir, tmp_path_factory):
    """The same states -> labels -> evaluation by 1 process and by 2."""
    root = tmp_path_factory.mktemp("dist")
    for procs in (1, 2):
        d = root / f"p{procs}"
        r = stepdapo("states", "--model", str(small_model_dir), "--out", str(d / "states"), *SMALL, procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        r = stepdapo("label", "--model", str(small_model_dir), "--states", str(d / "states"),
                     "--out", str(d / "labels"), *SMALL, procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        r = stepdapo("evaluate", "--model", str(small_model_dir), "--out", str(d / "eval.json"), *SMALL, procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
    return root


def test_labels_from_two_processes_equal_one_process_row_for_row(one_and_two):
    one, two = read_labels(one_and_two / "p1" / "labels"), read_labels(one_and_two / "p2" / "labels")
    assert one.num_rows > 14  # several shards of 7 states, dealt to both ranks
    assert one.to_pylist() == two.to_pylist()
    shards = sorted((one_and_two / "p2" / "labels").glob("shard-*.parquet"))
    assert len(shards) >= 3
    assert pq.read_table(one_and_two / "p1" / "labels" / "stepwise.parquet").equals(
        pq.read_table(one_and_two / "p2" / "labels" / "stepwise.parquet"))


def test_evaluation_from_two_processes_equals_one_process(one_and_two):
    import json

    one = json.loads((one_and_two / "p1" / "eval.json").read_text())["eval"]
    two = json.loads((one_and_two / "p2" / "eval.json").read_text())["eval"]
    for key in ("accuracy", "n", "ci95", "sampled_accuracy", "pass@2", "maj@2", "reasons", "greedy_examples"):
        assert one[key] == two[key], key


def test_a_failing_rank_fails_the_run_with_its_error(small_model_dir, tmp_path):
    """A bad input seen by every rank: the launcher fails promptly, the rank's message is shown."""
    r = stepdapo("label", "--model", str(small_model_dir), "--states", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "labels"), *SMALL, procs=2, timeout=300)
    assert r.returncode != 0
    assert "manifest.json: missing" in r.stderr
    assert not (tmp_path / "labels").exists()


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_sigkill_of_one_rank_fails_the_run_and_a_rerun_equals_one_process(one_and_two, small_model_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "labels"
    args = ["label", "--model", str(small_model_dir), "--states", str(one_and_two / "p1" / "states"),
            "--out", str(out), *SMALL, "label.shard_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "stepdapo", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("shard-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _children(launcher.pid)
    assert len(workers) == 2 and list(out.glob("shard-*.parquet")), "the run did not start labelling"
    os.kill(workers[-1], signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = launcher.communicate(timeout=180)
    assert launcher.returncode != 0 and time.monotonic() - killed_at < 120
    assert not (out / "manifest.json").exists()
    r = stepdapo(*args, procs=2)  # the same command resumes at the missing shards
    assert r.returncode == 0, r.stderr[-3000:]
    reference = [a if a != str(out) else str(tmp_path / "one") for a in args]
    assert stepdapo(*reference).returncode == 0  # one uninterrupted process
    assert read_labels(out).to_pylist() == read_labels(tmp_path / "one").to_pylist()


def _kill_when(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start `stepdapo *cmd` (one process), SIGKILL it once `ready()` is true."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.Popen([sys.executable, "-m", "stepdapo", *cmd], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "it finished before the kill point"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_evaluation_killed_in_the_middle_resumes_to_the_same_result(small_model_dir, tmp_path):
    import json

    args = ["evaluate", "--model", str(small_model_dir), "threads=1", "eval.limit=600", "eval.samples=2", "eval.k=2"]
    shards = tmp_path / "ev.json.shards"
    _kill_when([*args, "--out", str(tmp_path / "ev.json")], lambda: (shards / "shard-00000.parquet").exists())
    assert not (tmp_path / "ev.json").exists() and not (shards / "manifest.json").exists()
    assert stepdapo(*args, "--out", str(tmp_path / "ev.json")).returncode == 0
    assert stepdapo(*args, "--out", str(tmp_path / "once.json")).returncode == 0
    resumed, once = (json.loads((tmp_path / f).read_text())["eval"] for f in ("ev.json", "once.json"))
    drop = ("seconds", "greedy_tokens_per_s", "sampled_tokens_per_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in once.items() if k not in drop}


def test_critic_killed_in_the_middle_resumes_from_its_checkpoint(one_and_two, small_model_dir, tmp_path):
    import json

    args = ["critic", "--model", str(small_model_dir), "--labels", str(one_and_two / "p1" / "labels"), "threads=1",
            "critic.epochs=4", "critic.batch_size=16"]
    work = tmp_path / "critic.work" / "checkpoints"
    _kill_when([*args, "--out", str(tmp_path / "critic")], lambda: any(work.glob("checkpoint-*/trainer_state.json")))
    assert not (tmp_path / "critic").exists()
    r = stepdapo(*args, "--out", str(tmp_path / "critic"))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads((tmp_path / "critic" / "stepdapo_critic.json").read_text())
    assert resumed["resumed_from_step"] > 0 and resumed["global_step"] == resumed["steps"]
    assert stepdapo(*args, "--out", str(tmp_path / "once")).returncode == 0
    once = json.loads((tmp_path / "once" / "stepdapo_critic.json").read_text())
    # the same optimizer steps on the same batches, reloaded from a checkpoint: equal up to float noise
    assert abs(resumed["heldout"]["bce"] - once["heldout"]["bce"]) < 1e-3 * once["heldout"]["bce"]


def test_advantages_from_two_processes_equal_one_process_row_for_row(one_and_two, small_model_dir, tmp_path):
    """The advantages stage scores the labels' shards (label.shard_size=7 here: several) dealt to the
    ranks, each rank loading the critic once: the same rows and statistics as one process."""
    import json

    from stepdapo.stages.advantages import read_advantages

    labels = one_and_two / "p1" / "labels"
    r = stepdapo("critic", "--model", str(small_model_dir), "--labels", str(labels), "--out", str(tmp_path / "critic"),
                 "threads=1", "critic.epochs=1", "critic.batch_size=16")
    assert r.returncode == 0, r.stderr[-3000:]
    for procs in (1, 2):
        r = stepdapo("advantages", "--critic", str(tmp_path / "critic"), "--labels", str(labels),
                     "--out", str(tmp_path / f"adv{procs}"), "threads=1", "advantages.min_gap=0", procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = read_advantages(tmp_path / "adv1"), read_advantages(tmp_path / "adv2")
    assert one.num_rows > 0 and one.to_pylist() == two.to_pylist()
    s1, s2 = (json.loads((tmp_path / f"adv{p}" / "summary.json").read_text()) for p in (1, 2))
    assert s1["shards"] >= 3
    assert {k: v for k, v in s1.items() if k != "seconds"} == {k: v for k, v in s2.items() if k != "seconds"}
