"""The model stages (bootstrap, critic, actor, DPO baseline, GGUF import) on runner.ModelStage: a
finished stage is skipped, what the tool did not make is refused and left alone, a killed trainer
resumes from its checkpoint, and 2 processes (torchrun, gloo) train like 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_gguf import write_tiny_gguf
from tiny_stages import DATA, MODULES, TINY, run
from transformers import TrainerCallback

from stepdapo import models
from stepdapo.config import load_config
from stepdapo.errors import ArtifactError, StepdapoError
from stepdapo.models import import_model
from stepdapo.stages.advantages import read_advantages

TESTS = Path(__file__).parents[1]
STAGES = ["bootstrap", "critic", "actor", "dpo", "step_dpo", "rft"]


def module_of(name: str):
    return MODULES[name]


def tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*"))}


def weights(model_dir: Path) -> dict:
    return load_file(model_dir / "model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a.keys() & b.keys())


@pytest.mark.parametrize("name", STAGES)
def test_finished_stage_is_skipped(name, inputs, tmp_path, monkeypatch):
    out = tmp_path / name
    first = run(name, inputs, out)
    assert (out / f"stepdapo_{name}.json").is_file() and (out / "config.json").is_file()
    assert os.listdir(tmp_path) == [name]  # published, the work dir removed
    before = tree(out)

    def never(*a, **k):
        raise AssertionError("a finished stage must not train again")
    monkeypatch.setattr(module_of(name), "training_args", never)
    again = run(name, inputs, out)
    assert again["fingerprint"] == first["fingerprint"] and again["steps"] == first["steps"]
    assert tree(out) == before and os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("name", STAGES)
def test_foreign_directory_or_file_is_refused_and_untouched(name, inputs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match=f"{mine}: exists, is not empty and is not a stepdapo {name} output"):
        run(name, inputs, mine)
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    file = tmp_path / "file"
    file.write_text("keep")
    with pytest.raises(StepdapoError, match=f"{file}: exists and is a regular file; the {name} output needs"):
        run(name, inputs, file)
    assert file.read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["file", "mine"]  # no work dir either


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


class KillAtFirstCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise Killed(state.global_step)


@pytest.mark.parametrize("name,trainer,metric,extra", [
    ("critic", "CriticTrainer", lambda s: s["heldout"]["bce"], []),  # the log-ratio critic
    ("critic", "CriticTrainer", lambda s: s["heldout"]["bce"], ["critic.log_ratio_beta=0"]),  # a value head alone
    ("critic", "CriticTrainer", lambda s: s["heldout"]["bce"],
     ["critic.log_ratio_beta=0", "critic.shared_prefix=true"]),  # state-wise batches
    ("critic", "CriticTrainer", lambda s: s["heldout"]["bce"], ["critic.token_targets=true"]),  # every token
    ("actor", "DAPOTrainer", lambda s: s["final_loss"], []),
    ("dpo", "OutcomeDPOTrainer", None, []),  # no final metric: its weights are compared
    ("step_dpo", "OutcomeDPOTrainer", None, []),
    ("rft", "Trainer", None, [])])
def test_killed_trainer_resumes_from_its_checkpoint(name, trainer, metric, extra, inputs, tmp_path, monkeypatch):
    cfg = load_config(None, TINY + DATA + [f"{name}.epochs=2"] + extra)
    whole = run(name, inputs, tmp_path / "whole", cfg)
    assert whole["resumed_from_step"] is None

    module = module_of(name)

    class Dying(getattr(module, trainer)):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(KillAtFirstCheckpoint())
    monkeypatch.setattr(module, trainer, Dying)
    out, work = tmp_path / "killed", tmp_path / "killed.work"
    with pytest.raises(Killed) as killed:
        run(name, inputs, out, cfg)
    step = killed.value.args[0]
    assert not out.exists() and os.listdir(work / "checkpoints") == [f"checkpoint-{step}"]
    if name in ("actor", "dpo", "step_dpo"):
        assert (work / "ref_logprobs.0-of-1.json").is_file()  # kept for the resumed run (one share per process)
    monkeypatch.undo()

    resumed = run(name, inputs, out, cfg)
    assert 0 < resumed["resumed_from_step"] == step < resumed["steps"] == whole["steps"]
    if name == "critic":
        assert resumed["global_step"] == resumed["steps"]  # the step count went on from the checkpoint
    if metric is not None:
        assert metric(resumed) == pytest.approx(metric(whole), rel=1e-4)  # as if never killed
    else:
        assert max_difference(weights(out), weights(tmp_path / "whole")) < 1e-5  # as if never killed
    assert not work.exists()


def test_gguf_import_converts_once(inputs, tmp_path, monkeypatch):
    """A GGUF file is converted into an HF directory once: the converted model is the GGUF's (its
    weights, its logits, its tokenizer), and a second import loads nothing and rewrites nothing."""
    d = inputs[0]
    assert import_model(d / "policy", tmp_path / "unused") == d / "policy"  # an HF dir is used where it is
    assert not (tmp_path / "unused").exists()
    gguf = tmp_path / "model.gguf"
    held = write_tiny_gguf(gguf)
    loads, load_policy = [], models.load_policy

    def counted_load_policy(path, *args, **kwargs):  # the real loader, its calls counted
        loads.append(Path(path))
        return load_policy(path, *args, **kwargs)
    monkeypatch.setattr(models, "load_policy", counted_load_policy)
    out = import_model(gguf, tmp_path / "base-model")
    assert out == tmp_path / "base-model" and (out / "config.json").is_file()
    assert json.loads((out / "stepdapo_import.json").read_text())["source"] == str(gguf)
    assert loads == [gguf]
    written = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(out.iterdir()) if f.is_file()}

    assert import_model(gguf, tmp_path / "base-model") == out
    assert loads == [gguf], "the second import converted again"
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(out.iterdir()) if f.is_file()} == written

    # the converted directory is the GGUF's model: float32 weights as the file holds them
    # (dequantized), logits as loading the GGUF itself gives, the same tokenizer
    converted, tok = load_policy(out)
    direct, direct_tok = load_policy(gguf)
    assert next(converted.parameters()).dtype == torch.float32
    torch.testing.assert_close(converted.model.embed_tokens.weight, torch.from_numpy(held["token_embd"]))
    torch.testing.assert_close(converted.lm_head.weight, torch.from_numpy(held["output"]))
    torch.testing.assert_close(converted.model.norm.weight, torch.from_numpy(held["output_norm"]))
    text = "the cat sat on the mat.\nthen it left"
    ids = tok(text)["input_ids"]
    assert ids == direct_tok(text)["input_ids"] and tok.decode(ids) == text
    assert direct_tok.convert_ids_to_tokens(ids).count("\u0120t") == text.count(" t") == 1  # the merge
    with torch.no_grad():
        got = converted(input_ids=torch.tensor([ids])).logits
        want = direct(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(got, want)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="mine: exists, is not empty"):
        import_model(gguf, tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


@pytest.mark.parametrize("name", ["critic", "actor"])
def test_lora_is_merged_into_a_plain_model(name, inputs, tmp_path):
    cfg = load_config(None, TINY + DATA + [f"{name}.lora_r=2", f"{name}.lr=1e-2"])
    summary = run(name, inputs, tmp_path / name, cfg)
    assert not list((tmp_path / name).glob("adapter*"))  # a plain HF directory, no adapters
    trained, start = weights(tmp_path / name), weights(inputs[0] / "policy")
    assert not any("lora" in k for k in trained) and max_difference(trained, start) > 1e-3
    if name == "actor":  # the summary's log-ratios were measured on the saved (merged) model
        assert summary["lora"] and sum(map(abs, summary["scatter"]["log_ratio"])) > 0


def test_two_processes_train_like_one(inputs, tmp_path):
    """`stepdapo critic` and `stepdapo actor` under torchrun with 2 CPU processes (gloo DDP) give the
    1-process models. The training is sized so that every global batch is a full one (the critic's
    examples a multiple of its batch, the actor's steps within one pass over its states): then both
    runs take the same optimizer steps on the same global batches, and differ only in the float
    summation order of the gradient all-reduce. Measured: weights within 1e-6 of each other after
    updates of 3e-3 (actor) and 2e-2 (critic), summaries within 1e-6 relative. "Noise" is set at 1% of
    the update for the weights and 1e-3 relative for the summaries: far above the summation-order
    differences, far below what a data-parallel mistake does (with each process taking the whole
    global batch, the weights end 5e-3 to 1e-2 apart, about the whole update, and the actor's final
    loss 0.5% off)."""
    d, task, _ = inputs
    n_states = len(set(read_advantages(d / "advantages").column("state_index").to_pylist()))
    full_batches = n_states // 16
    overrides = TINY + DATA + ["critic.batch_size=32", "critic.max_examples=256", "critic.epochs=2", "critic.lr=1e-3",
                               "actor.states_per_batch=16", "actor.lr=1e-3",
                               f"actor.epochs={(full_batches * 16 - 0.5) / n_states}", "threads=1"]
    cfg = load_config(None, overrides)
    one_critic = run("critic", inputs, tmp_path / "critic-1", cfg)
    one_actor = run("actor", inputs, tmp_path / "actor-1", cfg)
    assert one_critic["steps"] == 16 and one_actor["steps"] == full_batches >= 4

    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent / 'src'}{os.pathsep}{TESTS / 'helpers'}", "OMP_NUM_THREADS": "1"}
    for cmd in (["critic", "--model", str(d / "policy"), "--labels", str(d / "labels")],
                ["actor", "--model", str(d / "policy"), "--advantages", str(d / "advantages")]):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "stepdapo", *cmd, "--out", str(tmp_path / f"{cmd[0]}-2"), *overrides],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    two_critic = json.loads((tmp_path / "critic-2" / "stepdapo_critic.json").read_text())
    two_actor = json.loads((tmp_path / "actor-2" / "stepdapo_actor.json").read_text())
    assert sorted(os.listdir(tmp_path)) == ["actor-1", "actor-2", "critic-1", "critic-2"]
    assert (one_critic["processes"], two_critic["processes"]) == (1, 2)  # the Trainer ran 2-process DDP
    assert (one_actor["processes"], two_actor["processes"]) == (1, 2)
    assert two_critic["steps"] == one_critic["steps"] and two_actor["steps"] == one_actor["steps"]

    start = weights(d / "policy")
    for name in ("critic", "actor"):
        one, two = weights(tmp_path / f"{name}-1"), weights(tmp_path / f"{name}-2")
        assert one.keys() == two.keys()
        update = max_difference(one, start)  # training moved the weights: agreeing is not trivial
        assert update > 1e-3 and max_difference(one, two) < 1e-2 * update
    assert two_critic["train_loss"] == pytest.approx(one_critic["train_loss"], rel=1e-3)
    for key in ("bce", "brier"):
        assert two_critic["heldout"][key] == pytest.approx(one_critic["heldout"][key], rel=1e-3)
    assert two_actor["final_loss"] == pytest.approx(one_actor["final_loss"], rel=1e-3)
    one_ratios, two_ratios = one_actor["scatter"]["log_ratio"], two_actor["scatter"]["log_ratio"]
    assert two_ratios == pytest.approx(one_ratios, abs=2e-4)  # each action's log-ratio (rounded to 1e-4)
    assert sum(map(abs, one_ratios)) / len(one_ratios) > 0.02
