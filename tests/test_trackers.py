"""The experiment trackers (`report_to`) as a run uses them: the bootstrap (two rounds), the critic,
the actor and the DPO baseline, one after the other in one process with report_to=[tensorboard,
wandb] (wandb offline, no network). TensorBoard's event files and wandb's offline run files are read
back: each stage's metrics are exactly the ones its module docstring lists (as `train/<name>`) plus
the Trainer's own ones that training.py's docstring lists, each trainer has its own tracker run
(nothing logged into another stage's run), and the values are those the trainers logged."""

import re
import struct
import zlib
from pathlib import Path

import pytest
from scripted import ScriptedArithmeticPolicy

from stepdapo import training
from stepdapo.config import load_config
from stepdapo.models import char_tokenizer
from stepdapo.stages import actor, bootstrap, critic, dpo
from stepdapo.stages.advantages import run_advantages
from stepdapo.stages.labels import run_labels
from stepdapo.stages.states import run_states
from stepdapo.tasks.arithmetic import ArithmeticTask

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e .[dev])")
pytest.importorskip("wandb", reason="wandb is not installed (pip install -e .[dev])")

TINY = ["bootstrap.max_rounds=2", "bootstrap.check_problems=20", "task.arithmetic.n_demos=320",
        "bootstrap.batch_size=32", "bootstrap.model.hidden_size=32", "bootstrap.model.num_heads=2",
        "bootstrap.model.num_layers=1", "bootstrap.model.intermediate_size=64",
        "states.n_problems=30", "label.rollouts=16", "advantages.source=mc",
        "critic.epochs=1", "actor.epochs=1", "dpo.epochs=1", "report_to=[tensorboard,wandb]"]
# what the Trainer logs besides a trainer's own metrics: `epoch` with every log, these once at the end
TRAINER_EVERY_LOG = {"epoch"}
TRAINER_AT_END = {"train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


def documented(doc: str, start: str, end: str | None = None) -> set[str]:
    """The metric names of the table after `start` (up to `end`) in a module docstring: its lines
    `  name   what it is`."""
    section = doc[doc.index(start):doc.index(end) if end else None]
    return set(re.findall(r"^  ([a-z_]+) {2,}\S", section, re.M))


DOCUMENTED = {
    "bootstrap": documented(bootstrap.__doc__, "Logged training metrics"),
    "critic": documented(critic.__doc__, "Logged training metrics"),
    "actor": documented(actor.__doc__, "Logged training metrics"),
    "dpo": documented(dpo.__doc__, "Logged training metrics"),
}


def test_the_docstrings_list_the_metrics():
    """The parse above finds the tables (an empty or garbled table would pass everything below)."""
    common = {"loss", "grad_norm", "learning_rate"}
    assert DOCUMENTED == {"bootstrap": common, "critic": common, "actor": common | {"log_ratio", "target", "corr"},
                          "dpo": common | {"log_ratio_margin"}}
    for name in TRAINER_EVERY_LOG | TRAINER_AT_END:
        assert f"`{name}`" in training.__doc__


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Every trainer run once with both trackers; returns (the run directory, the stages' summaries,
    wandb's offline run directories)."""
    d = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    # offline (no network), and nothing written outside the test's directory
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(d / "wandb"), "WANDB_CACHE_DIR": str(d / "wandb-cache"),
                 "WANDB_CONFIG_DIR": str(d / "wandb-config"), "WANDB_DATA_DIR": str(d / "wandb-data"),
                 "WANDB_PROJECT": "stepdapo-test", "WANDB_SILENT": "true", "WANDB_LOG_MODEL": "false",
                 "WANDB_WATCH": "false"}.items():
        mp.setenv(k, v)
    (d / "wandb").mkdir()
    try:
        cfg = load_config(None, TINY)
        task = ArithmeticTask(cfg.task.arithmetic)
        scripted = ScriptedArithmeticPolicy(task, char_tokenizer(), 0.3)
        summaries = {"bootstrap": bootstrap.bootstrap(cfg, d / "sft", progress=False)}
        run_states(cfg, "scripted", d / "states", task, progress=False, generator=scripted)
        run_labels(cfg, "scripted", d / "states", d / "labels", task, progress=False, generator=scripted)
        run_advantages(cfg, None, d / "labels", d / "advantages", task, tokenizer=char_tokenizer(), progress=False)
        summaries["critic"] = critic.run_critic(cfg, d / "sft", d / "labels", d / "critic", task, progress=False)
        summaries["actor"] = actor.run_actor(cfg, d / "sft", d / "advantages", d / "actor", progress=False)
        summaries["dpo"] = dpo.train(cfg, d / "sft", d, d / "dpo", progress=False)  # d holds states/
    finally:
        mp.undo()
    import wandb

    assert wandb.run is None  # every stage finished its run
    return d, summaries, sorted((d / "wandb" / "wandb").glob("offline-run-*"))


def scalars(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's scalars under the published stage's `runs/`: tag -> [(step, value)], of all
    its event directories in the order they were written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list] = {}
    runs = sorted((stage_dir / "runs").iterdir(), key=lambda p: min(f.name for f in p.glob("events.out.tfevents.*")))
    for run in runs:
        acc = EventAccumulator(str(run))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def expected_tags(stage: str) -> set[str]:
    return {f"train/{m}" for m in DOCUMENTED[stage] | TRAINER_EVERY_LOG | TRAINER_AT_END}


@pytest.mark.parametrize("stage", ["bootstrap", "critic", "actor", "dpo"])
def test_tensorboard_shows_the_documented_metrics(tracked, stage):
    d, summaries, _ = tracked
    stage_dir = d / ("sft" if stage == "bootstrap" else stage)
    s = scalars(stage_dir)
    assert set(s) == expected_tags(stage)
    steps = summaries[stage]["steps"]
    if stage == "bootstrap":  # two rounds (a tiny model never meets the criterion), each a Trainer of its own
        rounds = summaries[stage]["rounds_log"]
        assert len(rounds) == 2 and all(r["steps"] <= 20 for r in rounds)  # so a log every step
        assert [x for x, _ in s["train/loss"]] == [*range(1, rounds[0]["steps"] + 1), *range(1, rounds[1]["steps"] + 1)]
        assert [v for _, v in s["train/train_loss"]] == pytest.approx([r["train_loss"] for r in rounds])
        return
    assert s["train/train_loss"] == [(steps, pytest.approx(summaries[stage]["train_loss"]))]
    if stage in ("actor", "dpo"):  # the values the trainer logged (its summary's `log`)
        for m in DOCUMENTED[stage]:
            logged = [(e["step"], pytest.approx(e[m], rel=1e-5, abs=1e-7)) for e in summaries[stage]["log"] if m in e]
            assert logged and s[f"train/{m}"] == logged, m


# -- wandb's offline run files ---------------------------------------------------------------------

def wandb_records(path: Path):
    """The records of a wandb transaction log (`run-<id>.wandb`): a 7-byte header (":W&B", magic
    0xBEE1, version), then LevelDB-log records in 32 KiB blocks, each a 7-byte header (CRC-32 of
    its type and data, length, type: 1 full, 2 first, 3 middle, 4 last) and a piece of a protobuf
    `Record`. wandb has no Python reader of its own any more (its Go core reads them)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, pieces = 7, []
    while len(data) - pos >= 7:
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros: the rest of the file was never written
            break
        piece = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(piece, zlib.crc32(bytes([kind]))) == crc
        pieces.append(piece)
        pos += 7 + n
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def wandb_run(run_dir: Path) -> dict:
    """A run's name, its history (a list of {key: value}), its summary keys and its exit code."""
    import json

    out = {"history": [], "summary": set(), "exit": None}
    for r in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"] = r.run.display_name, r.run.project
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"] |= {i.key or "/".join(i.nested_key) for i in r.summary.update}
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out


def test_wandb_offline_runs_hold_the_documented_metrics(tracked):
    d, summaries, run_dirs = tracked
    # one run per trainer, named after the stage's output directory (the bootstrap: one per round), each
    # finished (its exit record written); taken in training order by name (wandb's directory names hold
    # the start time to the second only: two stages started within one second sort at random)
    names = [f"{d / 'sft'}/round-1", f"{d / 'sft'}/round-2", str(d / "critic"), str(d / "actor"), str(d / "dpo")]
    by_name = {r["name"]: r for r in map(wandb_run, run_dirs)}
    assert len(by_name) == len(run_dirs) and sorted(by_name) == sorted(names)
    runs = [by_name[n] for n in names]
    assert all(r["exit"] == 0 and r["project"] == "stepdapo-test" for r in runs)
    for stage, run in zip(["bootstrap", "bootstrap", "critic", "actor", "dpo"], runs):
        keys = {k for h in run["history"] for k in h if not k.startswith("_")} - {"train/global_step"}
        assert keys == {f"train/{m}" for m in DOCUMENTED[stage] | TRAINER_EVERY_LOG}, stage
        assert TRAINER_AT_END <= run["summary"], stage
        if stage in ("actor", "dpo"):  # the values the trainer logged
            for m in DOCUMENTED[stage]:
                logged = [(e["step"], pytest.approx(e[m])) for e in summaries[stage]["log"] if m in e]
                assert [(h["train/global_step"], h[f"train/{m}"]) for h in run["history"]
                        if f"train/{m}" in h] == logged, m
