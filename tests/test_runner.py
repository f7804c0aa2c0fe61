import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_toy import N_SHARDS, SCHEMA, run_toy, toy_rows

from stepdapo.runner import ModelStage, ShardedStage, read_stage, stage_fingerprint
from stepdapo.store import ArtifactError
from stepdapo.errors import StepdapoError

TESTS = Path(__file__).parent


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def die():
    raise Killed()


def make_shard(i):
    return toy_rows(i), {"n": len(toy_rows(i)["x"])}


def summarize(table, infos):
    return {"rows": table.num_rows, "x_sum": sum(table.column("x").to_pylist()), "n": sum(i["n"] for i in infos)}


def sharded(d, fp=None):
    return ShardedStage(d, "toy", SCHEMA, fp or {"seed": 0})


def killed_after(k):
    calls = []

    def make(i):
        if len(calls) == k:
            raise Killed()
        calls.append(i)
        return make_shard(i)
    return make


def rows(d):
    return read_stage(d, "toy", SCHEMA).to_pylist()


# -- sharded stages --------------------------------------------------------------------------------

def test_complete_sharded_stage_is_skipped(tmp_path):
    first = sharded(tmp_path / "s").run(N_SHARDS, make_shard, summarize)
    assert first == {"rows": len(rows(tmp_path / "s")), "x_sum": first["x_sum"], "n": first["rows"]}
    assert sharded(tmp_path / "s").done() == first

    def never(i):
        raise AssertionError("work on a complete stage")
    assert sharded(tmp_path / "s").run(N_SHARDS, never, summarize) == first
    assert stage_fingerprint(tmp_path / "s", "toy") == {"seed": 0}


def test_killed_sharded_stage_resumes_missing_shards_only(tmp_path):
    whole = sharded(tmp_path / "whole").run(N_SHARDS, make_shard, summarize)
    with pytest.raises(Killed):
        sharded(tmp_path / "s").run(N_SHARDS, killed_after(3), summarize)
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        read_stage(tmp_path / "s", "toy", SCHEMA)
    done = []
    resumed = sharded(tmp_path / "s").run(N_SHARDS, lambda i: done.append(i) or make_shard(i), summarize)
    assert done == [3, 4, 5, 6]
    assert resumed == whole  # the summary sees the earlier run's shards and infos too
    assert rows(tmp_path / "s") == rows(tmp_path / "whole")


def test_changed_fingerprint_is_an_error_naming_the_file(tmp_path):
    sharded(tmp_path / "s", {"seed": 0, "lr": 1}).run(N_SHARDS, make_shard, summarize)
    with pytest.raises(ArtifactError, match=r"s/manifest.json: .*different settings.*differs in: lr"):
        sharded(tmp_path / "s", {"seed": 0, "lr": 2}).run(N_SHARDS, make_shard, summarize)
    with pytest.raises(Killed):
        sharded(tmp_path / "i", {"seed": 0}).run(N_SHARDS, killed_after(2), summarize)
    with pytest.raises(ArtifactError, match=r"i/started.json: .*differs in: seed"):
        sharded(tmp_path / "i", {"seed": 1}).run(N_SHARDS, make_shard, summarize)
    # a tuple reads back from JSON as a list: the same fingerprint, not a change
    sharded(tmp_path / "t", {"betas": (0.9, 0.95)}).run(1, make_shard, summarize)
    assert sharded(tmp_path / "t", {"betas": (0.9, 0.95)}).done() is not None


def test_corrupt_shard_is_an_error_naming_it(tmp_path):
    with pytest.raises(Killed):
        sharded(tmp_path / "s").run(N_SHARDS, killed_after(3), summarize)
    p = tmp_path / "s" / "shard-00001.parquet"
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="shard-00001.parquet: corrupt parquet shard"):
        sharded(tmp_path / "s").run(N_SHARDS, make_shard, summarize)
    p.unlink()  # what the message says to do
    sharded(tmp_path / "s").run(N_SHARDS, make_shard, summarize)
    other = pa.schema([("x", pa.int64())])
    with pytest.raises(ArtifactError, match="shard-00000.parquet: schema mismatch"):
        read_stage(tmp_path / "s", "toy", other)


def test_sharded_stage_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="mine: exists, is not empty and is not a stepdapo toy stage"):
        sharded(tmp_path / "mine").run(N_SHARDS, make_shard, summarize)
    assert sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]


# -- model stages ----------------------------------------------------------------------------------

def model_stage(d, fp=None):
    return ModelStage(d, "toy", fp or {"lr": 1})


def saver(stage, seen=None):
    def work():
        assert not stage.dir.exists() or not any(stage.dir.iterdir())  # nothing final until complete
        if seen is not None:
            seen.append(stage.last_checkpoint())
        stage.model_dir.mkdir(parents=True)
        (stage.model_dir / "config.json").write_text("{}")
        return {"loss": 0.5}
    return work


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*"))}


def test_model_publish_is_atomic_and_cleans_its_work_dir(tmp_path):
    st = model_stage(tmp_path / "m")
    summary = st.run(saver(st))
    assert summary == {"loss": 0.5, "fingerprint": {"lr": 1}}
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no work dir left
    assert json.loads((tmp_path / "m" / "stepdapo_toy.json").read_text()) == summary
    assert stage_fingerprint(tmp_path / "m", "toy") == {"lr": 1}


def test_foreign_model_dir_is_refused_and_untouched(tmp_path):
    d = tmp_path / "user"
    (d / "sub").mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"precious")
    (d / "sub" / "x").write_text("y")
    before = tree(d)
    st = model_stage(d)
    with pytest.raises(ArtifactError, match="user: exists, is not empty and is not a stepdapo toy output"):
        st.run(lambda: pytest.fail("work on a foreign directory"))
    assert tree(d) == before
    assert "user.work" not in os.listdir(tmp_path)
    # files that appear in the output directory during the run are not replaced either
    st = model_stage(tmp_path / "late")

    def user_writes_meanwhile():
        saver(st)()
        st.dir.mkdir()
        (st.dir / "user.txt").write_text("mine")
        return {}
    with pytest.raises(ArtifactError, match="late: cannot move the finished model here.*nothing was deleted"):
        st.run(user_writes_meanwhile)
    assert os.listdir(st.dir) == ["user.txt"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(StepdapoError, match="f: exists and is a regular file; the .* output needs a new or empty directory"):
        model_stage(tmp_path / "f").run(saver(model_stage(tmp_path / "f")))


def test_empty_model_dir_is_fine(tmp_path):
    (tmp_path / "m").mkdir()
    st = model_stage(tmp_path / "m")
    st.run(saver(st))
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "stepdapo_toy.json"]


def test_our_model_dir_is_skipped_or_refused_by_fingerprint(tmp_path):
    st = model_stage(tmp_path / "m")
    first = st.run(saver(st))
    assert model_stage(tmp_path / "m").run(lambda: pytest.fail("work on a complete stage")) == first
    with pytest.raises(ArtifactError, match=r"m/stepdapo_toy.json: .*differs in: lr"):
        model_stage(tmp_path / "m", {"lr": 2}).run(lambda: pytest.fail("work"))
    (tmp_path / "m" / "stepdapo_toy.json").write_text('{"loss": 0.5}')  # what earlier versions wrote
    with pytest.raises(ArtifactError, match=r"m/stepdapo_toy.json: .*older stepdapo"):
        model_stage(tmp_path / "m").run(lambda: pytest.fail("work"))


def test_work_dir_survives_a_kill_and_is_handed_back(tmp_path):
    st = model_stage(tmp_path / "m")

    def killed():
        (st.checkpoints / "checkpoint-4").mkdir(parents=True)
        (st.checkpoints / "checkpoint-12").mkdir()
        st.model_dir.mkdir()
        (st.model_dir / "half.bin").write_text("half saved")
        raise Killed()
    with pytest.raises(Killed):
        st.run(killed)
    assert not (tmp_path / "m").exists()
    seen = []
    model_stage(tmp_path / "m").run(saver(st, seen))  # saver mkdirs model_dir: the half-saved one was cleared
    assert seen == [str(st.checkpoints / "checkpoint-12")]
    assert sorted(os.listdir(tmp_path)) == ["m"]
    # another interrupted run with other settings is refused, naming the work dir
    st2 = model_stage(tmp_path / "n")
    with pytest.raises(Killed):
        st2.run(die)
    with pytest.raises(ArtifactError, match=r"n.work/stepdapo-work.json: .*differs in: lr"):
        model_stage(tmp_path / "n", {"lr": 3}).run(saver(st2))


def test_saved_but_unpublished_model_is_published_without_work(tmp_path):
    st = model_stage(tmp_path / "m")
    st._prepare_work_dir()
    saver(st)()
    # killed inside publishing: the summary is written into the model, the rename not done
    (st.model_dir / "stepdapo_toy.json").write_text(json.dumps({"loss": 0.5, "fingerprint": {"lr": 1}}))
    assert model_stage(tmp_path / "m").run(lambda: pytest.fail("work")) == {"loss": 0.5, "fingerprint": {"lr": 1}}
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_foreign_work_dir_is_refused(tmp_path):
    (tmp_path / "m.work").mkdir()
    (tmp_path / "m.work" / "mine.txt").write_text("keep")
    st = model_stage(tmp_path / "m")
    with pytest.raises(ArtifactError, match="m.work: exists, is not empty"):
        st.run(saver(st))
    assert os.listdir(tmp_path / "m.work") == ["mine.txt"]


# -- several processes -----------------------------------------------------------------------------

def torchrun(out: Path, *fail: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent / 'src'}{os.pathsep}{TESTS / 'helpers'}", "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(TESTS / "helpers" / "runner_toy.py"), str(out), *fail],
                       env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def results(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(ranks)]


def test_two_processes_equal_one(tmp_path):
    one = run_toy(tmp_path / "one")
    p, _ = torchrun(tmp_path / "two")
    assert p.returncode == 0, p.stderr[-3000:]
    assert rows(tmp_path / "two" / "toy") == rows(tmp_path / "one" / "toy")
    r0, r1 = results(tmp_path / "two", 2)
    assert r0 == r1  # every rank gets rank 0's summaries
    assert r0["sharded"] == one["sharded"]
    assert r0["model"]["world"] == 2 and (tmp_path / "two" / "model" / "weights.txt").is_file()
    made_by = [json.loads(pq.read_schema(p).metadata[b"stepdapo.shard_info"])["made_by"]
               for p in sorted((tmp_path / "two" / "toy").glob("shard-*.parquet"))]
    assert made_by == [i % 2 for i in range(N_SHARDS)]


def test_a_killed_rank_fails_the_run_promptly_and_a_rerun_completes(tmp_path):
    p, seconds = torchrun(tmp_path / "two", "1:1:kill")
    assert p.returncode != 0
    assert seconds < 45, f"the launcher took {seconds:.0f} s to give up"
    assert not (tmp_path / "two" / "toy" / "manifest.json").exists()
    assert (tmp_path / "two" / "toy" / "shard-00000.parquet").is_file()  # kept for the rerun
    p, _ = torchrun(tmp_path / "two")
    assert p.returncode == 0, p.stderr[-3000:]
    one = run_toy(tmp_path / "one")
    assert rows(tmp_path / "two" / "toy") == rows(tmp_path / "one" / "toy")
    assert results(tmp_path / "two", 2)[1]["sharded"] == one["sharded"]


def test_an_exception_on_one_rank_fails_the_run_with_its_message(tmp_path):
    p, _ = torchrun(tmp_path / "two", "1:2:raise")
    assert p.returncode != 0
    assert "ValueError: toy failure on purpose on rank 1" in p.stdout + p.stderr
    assert not (tmp_path / "two" / "toy" / "manifest.json").exists()


def test_a_dead_peer_fails_the_others_without_a_launcher(tmp_path):
    """What holds on several nodes, where no single launcher kills the survivors: a rank waiting
    at a synchronisation point fails as soon as a peer dies, even by SIGKILL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent / 'src'}{os.pathsep}{TESTS / 'helpers'}", "OMP_NUM_THREADS": "1",
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, str(TESTS / "helpers" / "runner_toy.py"), str(tmp_path), "1:1:kill"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    t0 = time.monotonic()
    err0 = procs[0].communicate(timeout=90)[1]
    seconds = time.monotonic() - t0
    procs[1].wait(timeout=30)
    assert procs[1].returncode == -9
    assert procs[0].returncode != 0
    assert "rank 0: another process of this run stopped" in err0
    assert seconds < 45
