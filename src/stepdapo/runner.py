"""The one stage runner: fingerprint -> complete? skip : resume -> work -> atomic publish, on one
process or many (`torchrun` / `accelerate launch`, on one node or several sharing a filesystem).

A stage's *fingerprint* is a JSON-able dict of everything that determines its output (settings,
seed, and its inputs: `stage_fingerprint(upstream_dir, name)` for an upstream stage, a model's
fingerprint for a user's model). It is recorded with the output; rerunning with the same
fingerprint skips a complete stage and resumes an interrupted one; with another it is an
ArtifactError naming the file and the fields that differ, never a silent mix.

Two kinds of output:

`ShardedStage(out_dir, name, schema, fingerprint)` - parquet shards (states, labels, advantages).
    out_dir/started.json        {"stage", "fingerprint"}, written when the stage starts
    out_dir/shard-NNNNN.parquet each written atomically; the dict `make_shard` returns with the rows
                                ("info") is kept in the shard's parquet metadata, so a resumed run
                                can still summarise shards an earlier run made
    out_dir/summary.json        what `summarize` returned
    out_dir/manifest.json       written last: {"stage", "complete", "fingerprint", "schema",
                                "shards": [{"file", "rows"}]}; `read_stage` reads only through it
  `.run(n_shards, make_shard, summarize) -> summary` does it all; `.done() -> summary | None`
  lets a stage skip its setup (loading a model) when the stage is complete.
  `make_shard(i) -> (columns, info)` must depend on i only (seed it with `shard_seed`), so the
  output is the same whatever the number of processes and wherever a run was killed.
  `summarize(table, infos) -> dict` gets every shard's rows (in shard order) and infos (each with
  "seconds" added); on several processes it runs on rank 0 only, after every rank finished.

`ModelStage(out_dir, name, fingerprint)` - an HF `save_pretrained` directory (bootstrap, GGUF
import, critic, actor, DPO baseline) with `stepdapo_<name>.json` in it: the summary plus the
fingerprint, the mark that the directory is ours.
    out_dir.work/               next to out_dir: stepdapo-work.json (our mark), checkpoints/
                                (the Trainer's output_dir), caches; kept when killed, so a rerun
                                resumes from the last checkpoint
    out_dir.work/model/         where the work function saves the finished model
  `.run(work, main_only=False) -> summary`: skip if complete; else call `work()` (on every rank,
  or on rank 0 only with main_only) which trains, saves into `.model_dir` and returns the summary;
  then rank 0 writes the summary into `.model_dir` and renames it to out_dir - the output appears
  whole or not at all - and removes the work dir. `.work_dir`, `.model_dir`, `.checkpoints` and
  `.last_checkpoint()` are for `work`.
  Nothing the tool did not create is ever deleted or written into: an existing out_dir that is not
  empty and has no `stepdapo_<name>.json` (or a work dir without our mark) is an ArtifactError
  naming it; an empty out_dir is replaced by the model directory.

Example, a sharded stage (states):

    stage = ShardedStage(out_dir, "states", SCHEMA, {"policy": model_fingerprint(policy), "seed": cfg.seed})
    if (summary := stage.done()) is not None:
        return summary
    gen = HFGenerator(*load_policy(policy), ...)            # every rank: each samples its own shards
    def make_shard(i):
        out = gen.generate(prompts_of_shard(i), n, SamplingParams(seed=shard_seed(cfg.seed, "states", i)))
        return columns_of(out), {"tokens": sum(len(x.token_ids) for s in out for x in s)}
    def summarize(table, infos):                              # rank 0, all shards written
        return {"solutions": table.num_rows, "tokens": sum(i["tokens"] for i in infos)}
    return stage.run(n_shards, make_shard, summarize)

Example, a model stage (critic; the Trainer does the data parallelism itself):

    stage = ModelStage(out_dir, "critic", {"init": model_fingerprint(init), "seed": cfg.seed,
                                           "labels": stage_fingerprint(labels_dir, "labels")})
    def train() -> dict:                                      # on every rank
        args = TrainingArguments(output_dir=str(stage.checkpoints), save_strategy="steps", ...)
        trainer = CriticTrainer(model=model, args=args, ...)
        result = trainer.train(resume_from_checkpoint=stage.last_checkpoint())
        trainer.save_model(stage.model_dir)                   # writes on rank 0 (gathers FSDP/ZeRO-3)
        if is_main():
            tok.save_pretrained(stage.model_dir)
        return {"train_loss": result.training_loss}
    return stage.run(train)                                   # every rank gets rank 0's summary

Processes. Ranks come from the launcher's RANK / WORLD_SIZE / LOCAL_RANK; `rank()`, `world_size()`,
`is_main()`. Every rank calls the same stage methods in the same order (they synchronise). Rank 0
takes the decisions (complete? which shards are missing?) and tells the others, so they never act
on a filesystem view that lags (NFS caches); the missing shards are dealt round-robin, so a resumed
stage is balanced too; each rank writes only its own shards; rank 0 alone writes manifests,
summaries and model directories. Only rank 0 should write reports (`is_main()`).
`gather(value)` returns every rank's value on every rank (it is the barrier); `on_main(fn)` runs
fn on rank 0 and returns its result on every rank (e.g. an evaluation, or reference log-probs
computed once); `init_distributed()` joins the launcher's process group, lazily on the first
synchronisation (gloo on CPU, nccl + gloo on CUDA), and the HF Trainer / accelerate reuse it.

Failures. A rank that raises is not caught: it exits. Its peers waiting at a synchronisation point
fail at once, because the synchronisation runs over gloo, which notices the closed connections of a
dead process (also after a SIGKILL, also on another node); and torchrun / accelerate kill the
remaining workers when one exits non-zero. The failing rank's traceback is on its stderr (decorate
the entry point with torch.distributed.elastic.multiprocessing.errors.record to have it in the
launcher's summary too). We deliberately do not catch an error to report it at the next
synchronisation point: the other ranks may be inside a Trainer collective that the failed rank will
never join, and would wait for it. Nor a file flag: a killed rank writes nothing. The timeout of
the synchronisation (STEPDAPO_SYNC_TIMEOUT_S, default 2 h) only ends a wait on a rank that is alive
but stuck, or on a node that vanished without closing its connections; it must exceed the longest
legitimate wait (the slowest rank's last shard; rank 0 summarising or saving a model).
A rerun resumes: finished shards, checkpoints and a saved-but-unpublished model are kept.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from stepdapo.errors import ArtifactError
from stepdapo.paths import existing_output_dir
from stepdapo.store import check_parquet, read_json, read_parquet, write_json, write_parquet

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
STARTED = "started.json"
WORK_MARK = "stepdapo-work.json"
INFO_KEY = "stepdapo.shard_info"  # parquet metadata key of a shard's info dict

# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device():
    """This process's device: its own GPU (LOCAL_RANK) when there are GPUs, else the CPU."""
    import torch

    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed() -> None:
    """Join the launcher's process group (once; nothing to do for one process). Accelerate and
    the HF Trainer reuse it. On CUDA, nccl for CUDA tensors and gloo for CPU ones (FSDP with CPU
    offload needs both); gloo alone on CPU."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    timeout = timedelta(seconds=sync_timeout())  # the Trainer's collectives wait as long as ours
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("cuda:nccl,cpu:gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def sync_timeout() -> float:
    """Seconds a rank waits for the others at a synchronisation point or collective
    (STEPDAPO_SYNC_TIMEOUT_S, default 2 h): longer than the longest legitimate wait."""
    return float(os.environ.get("STEPDAPO_SYNC_TIMEOUT_S", 2 * 3600))


_sync_group = None


def _group():
    """Our own gloo group: CPU objects whatever the default backend, and our timeout."""
    global _sync_group
    if _sync_group is None:
        import torch.distributed as dist

        init_distributed()
        _sync_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=sync_timeout()))
        # Left to interpreter shutdown, gloo's threads can abort the process ("terminate called
        # without an active exception", SIGABRT) after a successful run; even Trainer DDP alone does.
        atexit.register(_destroy_process_groups)
    return _sync_group


def _destroy_process_groups() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def gather(value: Any) -> list:
    """Every rank's `value` (picklable), on every rank, once all ranks got here: the barrier."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    out: list = [None] * world_size()
    try:
        dist.all_gather_object(out, value, group=_group())
    except Exception as e:  # noqa: BLE001 - DistBackendError, RuntimeError, ... depending on how it broke
        raise RuntimeError(f"rank {rank()}: another process of this run stopped (its own error is in its "
                           f"output) or did not arrive within STEPDAPO_SYNC_TIMEOUT_S: {e}") from None
    return out


def barrier() -> None:
    gather(None)


def on_main(fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 only; every rank returns its result once it is there."""
    return gather(fn() if is_main() else None)[0]


def shard_seed(seed: int, stage: str, index: int) -> int:
    """The seed of one shard: a resumed run, or one on another number of processes, reproduces an
    uninterrupted single-process run."""
    return int.from_bytes(hashlib.sha1(f"{seed}/{stage}/{index}".encode()).digest()[:4], "big")


# ------------------------------------------------------------------------------------------------
# Fingerprints
# ------------------------------------------------------------------------------------------------


def _canonical(fingerprint: Any) -> Any:
    """As it will read back from JSON (tuples become lists, paths strings), so that comparing a
    stored fingerprint with a fresh one compares values, not types."""
    return json.loads(json.dumps(fingerprint, default=str))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "(all)"]


def _check_fingerprint(path: Path, found: Any, expected: Any, what: str, remedy: Path) -> None:
    if found != expected:
        why = ("by an older stepdapo (no fingerprint recorded)" if found is None else
               f"with different settings or inputs (differs in: {', '.join(_differences(found, expected))})")
        raise ArtifactError(f"{path}: this {what} was made {why}; use another output directory or delete {remedy}")


def stage_fingerprint(directory: str | os.PathLike, name: str) -> Any:
    """The fingerprint of a complete upstream stage, sharded or model (an ArtifactError naming the
    file if it is not complete): what a downstream stage puts in its own fingerprint."""
    d = Path(directory)
    summary = d / f"stepdapo_{name}.json"
    if summary.is_file():
        return read_json(summary)["fingerprint"]
    return _complete_manifest(d, name)["fingerprint"]


def _complete_manifest(d: Path, name: str) -> dict:
    """The manifest of the complete sharded stage `name` in `d`; an ArtifactError naming it if not."""
    m = d / MANIFEST
    if not m.is_file():
        raise ArtifactError(f"{m}: missing: the {name} stage in {d} is not complete (run it first)")
    manifest = read_json(m)
    if not manifest.get("complete") or manifest.get("stage") != name:
        raise ArtifactError(f"{m}: not a complete {name} stage")
    return manifest


def _not_ours(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: exists, is not empty and is not a stepdapo {what}; refusing to "
                         f"write into it (nothing in it was changed): choose another output directory")


def _claim(directory: Path, mark: Path, record: dict, what: str) -> None:
    """Make `directory` ours by writing `mark` into it. A new or empty directory is fine; a file, or a
    non-empty directory without our mark, is an ArtifactError naming it, and nothing in it is touched."""
    if existing_output_dir(directory, what) and any(directory.iterdir()):
        raise _not_ours(directory, what)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(mark, record)


# ------------------------------------------------------------------------------------------------
# Sharded parquet stages
# ------------------------------------------------------------------------------------------------


class ShardedStage:
    """A stage written as parquet shards and a manifest; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, name: str, schema: pa.Schema, fingerprint: Any):
        self.dir = Path(directory)
        self.name = name
        self.schema = schema
        self.fingerprint = _canonical(fingerprint)

    # -- the whole stage: every rank calls these ---------------------------------------------------
    def done(self) -> dict | None:
        """The summary if the stage is complete (same fingerprint), else None."""
        return on_main(lambda: read_json(self.dir / SUMMARY) if self.is_complete() else None)

    def run(self, n_shards: int, make_shard: Callable[[int], tuple[dict, dict]],
            summarize: Callable[[pa.Table, list[dict]], dict]) -> dict:
        summary = self.done()
        if summary is not None:
            return summary
        missing = on_main(lambda: self._missing(n_shards))
        mine = missing[rank()::world_size()]
        for i in mine:
            t0 = time.perf_counter()
            rows, info = make_shard(i)
            self.write_shard(i, rows, {**info, "seconds": time.perf_counter() - t0})
        written = gather(mine)  # every rank has finished its shards
        return on_main(lambda: self._summarize(n_shards, [i for ws in written[1:] for i in ws], summarize))

    def _missing(self, n_shards: int) -> list[int]:
        self.start()
        return [i for i in range(n_shards) if not self.has_shard(i)]

    def _summarize(self, n_shards: int, by_others: list[int], summarize) -> dict:
        for i in by_others:  # another node's new file may take a while to show here (NFS caches)
            _wait_for(self.shard_path(i))
        summary = summarize(self.read_shards(n_shards), self.shard_infos(n_shards))
        self.finish(n_shards, summary)
        return summary

    # -- the steps, on one process -----------------------------------------------------------------
    def is_complete(self) -> bool:
        m = self.dir / MANIFEST
        if not m.is_file():
            return False
        manifest = read_json(m)
        _check_fingerprint(m, manifest.get("fingerprint"), self.fingerprint, f"{self.name} stage", self.dir)
        return bool(manifest.get("complete"))

    def start(self) -> None:
        """Record the fingerprint; resuming with another is an error naming the file."""
        started = self.dir / STARTED
        if started.is_file():
            _check_fingerprint(started, read_json(started).get("fingerprint"), self.fingerprint,
                               f"interrupted {self.name} stage", self.dir)
            return
        _claim(self.dir, started, {"stage": self.name, "fingerprint": self.fingerprint},
               f"{self.name} stage directory")

    def shard_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.parquet"

    def has_shard(self, index: int) -> bool:
        """Whether shard `index` is written; a corrupt one or one of another schema is an error."""
        p = self.shard_path(index)
        if not p.is_file():
            return False
        check_parquet(p, self.schema)
        return True

    def write_shard(self, index: int, rows: dict[str, list], info: dict | None = None) -> None:
        table = pa.table(rows, schema=self.schema)
        if info is not None:
            table = table.replace_schema_metadata({INFO_KEY: json.dumps(info)})
        write_parquet(self.shard_path(index), table)

    def finish(self, n_shards: int, summary: dict) -> None:
        """Write the summary, then the manifest that makes the stage complete."""
        shards = []
        for i in range(n_shards):
            p = self.shard_path(i)
            if not p.is_file():
                raise ArtifactError(f"{p}: missing shard; cannot finish the {self.name} stage")
            shards.append({"file": p.name, "rows": check_parquet(p, self.schema)[0]})
        write_json(self.dir / SUMMARY, summary)
        write_json(self.dir / MANIFEST, {"stage": self.name, "complete": True, "fingerprint": self.fingerprint,
                                         "schema": self.schema.names, "shards": shards})

    def read_shards(self, n_shards: int) -> pa.Table:
        """All shards of a stage whose manifest is not written yet (checked one by one)."""
        tables = []
        for i in range(n_shards):
            p = self.shard_path(i)
            if not p.is_file():
                raise ArtifactError(f"{p}: missing shard")
            tables.append(read_parquet(p, self.schema))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def shard_infos(self, n_shards: int) -> list[dict]:
        return [json.loads(check_parquet(self.shard_path(i))[1].get(INFO_KEY, "{}")) for i in range(n_shards)]

    def read(self) -> pa.Table:
        return read_stage(self.dir, self.name, self.schema)


def _wait_for(path: Path, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(1.0)


def read_stage(directory: str | os.PathLike, name: str, schema: pa.Schema | None = None) -> pa.Table:
    """Read a complete sharded stage; every problem is an ArtifactError naming the file."""
    d = Path(directory)
    m = d / MANIFEST
    manifest = _complete_manifest(d, name)
    tables = []
    for s in manifest["shards"]:
        p = d / s["file"]
        if not p.is_file():
            raise ArtifactError(f"{p}: missing shard listed in {m}")
        t = read_parquet(p, schema)
        if t.num_rows != s["rows"]:
            raise ArtifactError(f"{p}: has {t.num_rows} rows, {m} says {s['rows']}")
        tables.append(t)
    if not tables:
        return (schema or pa.schema([])).empty_table()
    return pa.concat_tables(tables)


# ------------------------------------------------------------------------------------------------
# Model directories
# ------------------------------------------------------------------------------------------------


class ModelStage:
    """A stage whose output is a model directory; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, name: str, fingerprint: Any):
        self.dir = Path(directory).absolute()  # "." has no name to put ".work" after
        self.name = name
        self.fingerprint = _canonical(fingerprint)
        self.summary_name = f"stepdapo_{name}.json"
        self.work_dir = self.dir.with_name(self.dir.name + ".work")
        self.model_dir = self.work_dir / "model"
        self.checkpoints = self.work_dir / "checkpoints"

    def last_checkpoint(self) -> str | None:
        """The Trainer checkpoint to resume from (`resume_from_checkpoint=`), if a run left one; rank 0
        decides (a shared filesystem may show ranks different directory listings) and every rank
        gets its answer: every rank calls this."""
        from transformers.trainer_utils import get_last_checkpoint

        return on_main(lambda: get_last_checkpoint(str(self.checkpoints)) if self.checkpoints.is_dir() else None)

    # -- every rank calls these --------------------------------------------------------------------
    def done(self) -> dict | None:
        """The summary if the model is complete (same fingerprint), else None."""
        return on_main(self._finished)

    def run(self, work: Callable[[], dict], main_only: bool = False) -> dict:
        summary = self.done()
        if summary is not None:
            return summary
        summary = on_main(self._prepare_work_dir)  # not None: saved by a run killed before publishing
        if summary is None:
            summary = on_main(work) if main_only else work()
        return on_main(lambda: self._publish(summary))

    # -- rank 0 ------------------------------------------------------------------------------------
    def _finished(self) -> dict | None:
        if not existing_output_dir(self.dir, f"{self.name} output"):
            return None
        s = self.dir / self.summary_name
        if s.is_file():
            summary = read_json(s)
            _check_fingerprint(s, summary.get("fingerprint"), self.fingerprint, self.name, self.dir)
            self._remove_work_dir()  # left by a run killed between publishing and cleaning up
            return summary
        if any(self.dir.iterdir()):
            raise _not_ours(self.dir, f"{self.name} output")
        return None  # an empty directory: the model directory will replace it

    def _prepare_work_dir(self) -> dict | None:
        mark = self.work_dir / WORK_MARK
        if mark.is_file():
            _check_fingerprint(mark, read_json(mark).get("fingerprint"), self.fingerprint,
                               f"interrupted {self.name}", self.work_dir)
            saved = self.model_dir / self.summary_name
            if saved.is_file():
                return read_json(saved)
            shutil.rmtree(self.model_dir, ignore_errors=True)  # ours, half saved
            return None
        _claim(self.work_dir, mark, {"stage": self.name, "fingerprint": self.fingerprint},
               f"{self.name} work directory")
        return None

    def _publish(self, summary: dict) -> dict:
        summary = {**summary, "fingerprint": self.fingerprint}
        if not self.model_dir.is_dir() or not any(self.model_dir.iterdir()):
            raise ArtifactError(f"{self.model_dir}: the {self.name} stage saved no model here")
        write_json(self.model_dir / self.summary_name, summary)
        try:  # rename(2) replaces an empty directory and fails on a non-empty one: it never deletes data
            os.rename(self.model_dir, self.dir)
        except OSError as e:  # e.g. files appeared in self.dir during the run
            raise ArtifactError(f"{self.dir}: cannot move the finished model here from {self.model_dir} "
                                f"({e.strerror}); nothing was deleted") from None
        self._remove_work_dir()
        return summary

    def _remove_work_dir(self) -> None:
        if (self.work_dir / WORK_MARK).is_file():  # only ever ours
            shutil.rmtree(self.work_dir)
