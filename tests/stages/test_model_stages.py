"""The model stages (bootstrap, critic, actor, DPO baseline, GGUF import) on runner.ModelStage: a
finished stage is skipped, what the tool did not make is refused and left alone, a killed trainer
resumes from its checkpoint, and 2 processes (torchrun, gloo) train like 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scripted import ScriptedArithmeticPolicy
from transformers import TrainerCallback

from stepdapo import models
from stepdapo.config import load_config
from stepdapo.errors import ArtifactError, StepdapoError
from stepdapo.models import char_tokenizer, import_model
from stepdapo import metrics
from stepdapo.stages import actor, bootstrap, critic, dpo
from stepdapo.stages.advantages import read_advantages, run_advantages
from stepdapo.stages.labels import read_labels, run_labels
from stepdapo.stages.states import read_solutions, run_states
from stepdapo.tasks.arithmetic import ArithmeticTask

TESTS = Path(__file__).parent
TINY = ["bootstrap.max_rounds=1", "bootstrap.check_problems=40", "task.arithmetic.n_demos=640", "bootstrap.batch_size=32", "bootstrap.model.hidden_size=32",
        "bootstrap.model.num_heads=2", "bootstrap.model.num_layers=1", "bootstrap.model.intermediate_size=64"]
DATA = ["states.n_problems=30", "label.rollouts=16", "advantages.source=mc"]
CFG = load_config(None, TINY + DATA + ["critic.epochs=1", "actor.epochs=1", "dpo.epochs=1"])
STAGES = ["bootstrap", "critic", "actor", "dpo"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny bootstrapped policy, and states, labels and Monte-Carlo advantages from a scripted
    policy (no sampling): every model stage's input, in a few seconds."""
    d = tmp_path_factory.mktemp("inputs")
    bootstrap.bootstrap(CFG, d / "policy", progress=False)
    task = ArithmeticTask(CFG.task.arithmetic)
    scripted = ScriptedArithmeticPolicy(task, char_tokenizer(), 0.3)
    run_states(CFG, "scripted", d / "states", task, progress=False, generator=scripted)
    run_labels(CFG, "scripted", d / "states", d / "labels", task, progress=False, generator=scripted)
    run_advantages(CFG, None, d / "labels", d / "advantages", task, tokenizer=char_tokenizer(), progress=False)
    return d, task, scripted


def run(name: str, inputs, out: Path, cfg=CFG) -> dict:
    d, task, _ = inputs
    if name == "bootstrap":
        return bootstrap.bootstrap(cfg, out, progress=False)
    if name == "critic":
        return critic.run_critic(cfg, d / "policy", d / "labels", out, task, progress=False)
    if name == "actor":
        return actor.run_actor(cfg, d / "policy", d / "advantages", out, progress=False)
    return dpo.train(cfg, d / "policy", d / "states", out, progress=False)


def module_of(name: str):
    return {"bootstrap": bootstrap, "critic": critic, "actor": actor, "dpo": dpo}[name]


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
    ("dpo", "OutcomeDPOTrainer", None, [])])  # no final metric: its weights are compared
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
    if name in ("actor", "dpo"):
        assert (work / "ref_logprobs.json").is_file()  # kept for the resumed run
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


def test_dpo_baseline_detects_changed_states_with_the_same_pair_count(inputs, tmp_path):
    d, task, scripted = inputs
    n_pairs = len(dpo.dpo_pairs(read_solutions(d / "states"), CFG.dpo.pairs_per_problem))

    def other_states(seed: int) -> Path:  # the same settings and policy, another seed: other solutions
        cfg = load_config(None, TINY + DATA + [f"seed={seed}"])
        run_states(cfg, "scripted", tmp_path / f"states-{seed}", task, progress=False, generator=scripted)
        return tmp_path / f"states-{seed}"
    changed = next(s for s in map(other_states, range(1, 30))
                   if len(dpo.dpo_pairs(read_solutions(s), CFG.dpo.pairs_per_problem)) == n_pairs)
    assert read_solutions(changed).column("text") != read_solutions(d / "states").column("text")

    run("dpo", inputs, tmp_path / "dpo")
    with pytest.raises(ArtifactError, match=r"dpo/stepdapo_dpo.json: .*differs in: states.seed"):
        dpo.train(CFG, d / "policy", changed, tmp_path / "dpo", progress=False)


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A real GGUF file, small: a 1-layer Llama (hidden 32) with a byte-level BPE vocabulary (the
    256 bytes, one merge, an end token), its matrices quantized to Q8_0 as a downloaded model's
    are (Q4_1 for SmolLM2's). Returns each tensor as the file holds it, dequantized."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    spelled = bytes_to_unicode()
    tokens = [spelled[b] for b in range(256)] + ["\u0120t", "<|endoftext|>"]  # "Ġt": " t"
    vocab, hidden, ffn = len(tokens), 32, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])  # normal, and the end token a control token
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    held = {}
    shapes = {"token_embd": (vocab, hidden), "output": (vocab, hidden), "output_norm": (hidden,),
              "blk.0.attn_norm": (hidden,), "blk.0.ffn_norm": (hidden,), "blk.0.attn_q": (hidden, hidden),
              "blk.0.attn_k": (hidden, hidden), "blk.0.attn_v": (hidden, hidden),
              "blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (ffn, hidden),
              "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn)}
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms stay float32, as llama.cpp writes them
            a = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(f"{name}.weight", a)
            held[name] = a
        else:
            q = gguf.quants.quantize((0.2 * rng.standard_normal(shape)).astype(np.float32), q8)
            w.add_tensor(f"{name}.weight", q, raw_dtype=q8)
            held[name] = gguf.quants.dequantize(q, q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


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


def test_log_ratio_critic_finds_its_reference_after_the_run_directory_moves(inputs, tmp_path):
    """The critic stage writes a work directory and renames it: the reference is named relative to
    the published critic, so a moved run directory (policy and critic together) still loads."""
    import shutil

    shutil.copytree(inputs[0] / "policy", tmp_path / "run" / "policy")
    d, task, _ = inputs
    critic.run_critic(CFG, tmp_path / "run" / "policy", d / "labels", tmp_path / "run" / "iter-1" / "critic", task,
                      progress=False)
    meta = json.loads((tmp_path / "run" / "iter-1" / "critic" / models.LogRatioCritic.META).read_text())
    assert meta["reference"] == "../../policy"
    shutil.move(tmp_path / "run", tmp_path / "moved")
    loaded, _ = models.load_critic(tmp_path / "moved" / "iter-1" / "critic")
    assert isinstance(loaded, models.LogRatioCritic) and loaded.reference_path == tmp_path / "moved" / "policy"


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

    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent / 'src'}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
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


def test_check_critic():
    """On point estimates (a summary without intervals): the Brier gain and the sibling ranking."""
    q = {"n": 100, "bce": 0.30, "bce_constant": 0.68, "brier": 0.10, "brier_constant": 0.24, "auc_mc0_vs_positive": 0.96}
    assert critic.check_critic(q, 0.05) is None
    assert critic.check_critic({**q, "brier": 0.20}, 0.05) is not None  # better, but not by enough
    failed = critic.check_critic({**q, "brier": 0.25, "bce": 0.71, "auc_mc0_vs_positive": 0.70}, 0.0)
    assert "0.2500" in failed and "0.2400" in failed and "0.710" in failed and "0.70" in failed
    assert critic.check_critic({"bce": None, "bce_constant": None}, 0.05) is None  # no held-out states
    # the sibling ranking: a good value does not pass a critic that cannot tell right steps from wrong
    ranked = {**q, "step_ranking": {"pairs": 22, "right_above_wrong": 0.50}}
    failed = critic.check_critic(ranked, 0.05, 0.65)
    assert "0.50 of 22" in failed and "right next step" in failed
    assert critic.check_critic(ranked, 0.05, 0.0) is None  # the ranking check off
    assert critic.check_critic({**ranked, "step_ranking": {"pairs": 22, "right_above_wrong": 0.70}}, 0.05, 0.65) is None
    assert critic.check_critic({**ranked, "step_ranking": {"pairs": 19, "right_above_wrong": 0.3}}, 0.05, 0.65) is None
    assert critic.check_critic({**q, "step_ranking": {"pairs": 0, "right_above_wrong": None}}, 0.05, 0.65) is None


def test_check_critic_judges_the_intervals():
    """The check passes a critic whose gain over the constant and sibling ranking are shown (95%
    interval) to be above their thresholds, however small the point estimates: issue 21's critic
    (BCE 0.603 vs 0.651, right>wrong 0.86) missed a fixed 0.05 margin by 0.002 and was thrown away."""
    issue21 = {"n": 300, "bce": 0.603, "bce_constant": 0.651, "brier": 0.190, "brier_constant": 0.215,
               "brier_gain": 0.025, "brier_gain_ci95": [0.016, 0.034], "auc_mc0_vs_positive": 0.82,
               "step_ranking": {"pairs": 60, "right_above_wrong": 0.86, "right_above_wrong_ci95": [0.76, 0.94]}}
    assert critic.check_critic(issue21, 0.0, 0.5) is None
    unsure = critic.check_critic({**issue21, "brier_gain_ci95": [-0.004, 0.05]}, 0.0, 0.5)
    assert "starts at -0.0040" in unsure and "not shown to beat a constant" in unsure
    assert critic.check_critic(issue21, 0.02, 0.5) is not None  # the interval must clear the margin too
    chance = {**issue21, "step_ranking": {"pairs": 60, "right_above_wrong": 0.62, "right_above_wrong_ci95": [0.48, 0.75]}}
    failed = critic.check_critic(chance, 0.0, 0.5)
    assert "interval from 0.48" in failed and "right next step" in failed


def test_grouped_bootstrap_interval_resamples_problems_not_states():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, 400)
    lo, hi = metrics.grouped_bootstrap_interval(x, np.ones(400), np.arange(400))
    half = 1.96 * 2.0 / np.sqrt(400)  # the normal interval of a mean of 400 independent values
    assert lo < x.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    # every problem's value repeated 10 times (10 states of one problem that agree): no more evidence,
    # so no narrower an interval; resampling the 4000 states one by one would make it ~3x narrower
    lo10, hi10 = metrics.grouped_bootstrap_interval(np.repeat(x, 10), np.ones(4000), np.repeat(np.arange(400), 10))
    assert (hi10 - lo10) == pytest.approx(hi - lo, rel=0.15)
    # a ratio of sums: pairs per problem weigh by their number
    lo, hi = metrics.grouped_bootstrap_interval([3, 0], [3, 1], ["a", "b"])
    assert 0 <= lo <= 0.75 <= hi <= 1


def test_quality_reports_the_bce_gain_with_its_interval():
    pred, target = [0.9, 0.8, 0.2, 0.1, 0.7, 0.3], [1.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    q = metrics.quality(pred, target, 0.5, groups=["a", "a", "b", "b", "c", "c"])
    for name in ("bce", "brier"):
        assert q[f"{name}_gain"] == pytest.approx(q[f"{name}_constant"] - q[name])
        assert q[f"{name}_gain_ci95"][0] <= q[f"{name}_gain"] <= q[f"{name}_gain_ci95"][1]


def test_platt_calibration_recovers_a_known_map_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 3000)
    v = 1 / (1 + np.exp(-z))  # an overconfident critic: the true values are sigmoid(0.5 z - 0.3)
    truth = 1 / (1 + np.exp(-(0.5 * z - 0.3)))
    assert metrics.fit_platt(v, truth) == pytest.approx((0.5, -0.3), abs=1e-4)
    a, b = metrics.fit_platt(v, (rng.random(3000) < truth).astype(float))  # from 0/1 outcomes: close
    assert abs(a - 0.5) < 0.06 and abs(b + 0.3) < 0.12
    mapped = metrics.apply_platt(v, (a, b))
    assert np.array_equal(np.argsort(mapped, kind="stable"), np.argsort(v, kind="stable"))
    assert metrics.bce(mapped, truth) < metrics.bce(v, truth)
    assert metrics.fit_platt(v, 1 - truth) is None  # values ranked the wrong way: no increasing map helps
    # cross-fitted: each problem's values come from the map fitted on the other half of the problems
    groups = [f"p{i // 3}" for i in range(3000)]
    oof, ab = metrics.cross_fitted_calibration(v, truth, groups)
    assert ab == pytest.approx((0.5, -0.3), abs=1e-4) and metrics.bce(oof, truth) < metrics.bce(v, truth)
    assert metrics.cross_fitted_calibration(v[:10], truth[:10], groups[:10]) == (None, None)  # too few states


def test_a_critic_that_fails_its_check_is_reported_and_replaced_by_mc(tmp_path):
    """A whole tiny run whose critic cannot pass (min_brier_gain 100): the report leads with the
    warning, the advantages came from the Monte-Carlo values, not from the failed critic, and the
    next iteration's critic starts from the new policy (critic.epochs), not from the failed one
    (continue_epochs). The run starts from a given model fine-tuned first (bootstrap.finetune_model),
    to cover that path."""
    from stepdapo.config import TinyModelConfig
    from stepdapo.models import tiny_llama
    from stepdapo.pipeline import run as run_pipeline

    tok = char_tokenizer()
    tiny_llama(tok, TinyModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64),
               seed=3).save_pretrained(tmp_path / "given")
    tok.save_pretrained(tmp_path / "given")
    cfg = load_config(None, TINY + [f"model={tmp_path / 'given'}", "bootstrap.finetune_model=true",
                                    "states.n_problems=30", "label.rollouts=8", "critic.epochs=1",
                                    "critic.heldout_fraction=0.3", "critic.min_brier_gain=1", "actor.epochs=1",
                                    "critic.continue_epochs=2", "eval.limit=40", "eval.samples=1", "eval.k=1",
                                    "iterations=2", "baselines=[]"])
    assert cfg.advantages.source == "critic"
    report = run_pipeline(cfg, tmp_path / "run", progress=False).model_dump(exclude_unset=True)
    assert report["iterations"][0]["model"] == str(tmp_path / "run" / "sft")  # DAPO starts from the fine-tuned model
    assert json.loads((tmp_path / "run" / "sft" / "stepdapo_bootstrap.json").read_text())["base"] == str(tmp_path / "given")
    it = report["iterations"][1]
    assert "not shown to beat a constant" in it["critic"]["warning"] and "Monte-Carlo" in it["critic"]["warning"]
    # a second try first: one more epoch (critic.recovery_epochs) from the failed critic, checked again
    rec = it["critic"]["recovery"]
    assert rec["passed"] is False and rec["epochs"] == 1 and "not shown to beat" in rec["first_check"]
    assert it["critic"]["dir"] == str(tmp_path / "run" / "iter-1" / "critic-more")
    assert it["critic"]["init"] == str(tmp_path / "run" / "iter-1" / "critic")
    assert "also after 1 more epoch" in it["critic"]["warning"]
    assert it["advantages"]["source"] == "mc"
    assert "starts afresh from the new policy" in it["critic"]["warning"]
    it2 = report["iterations"][2]
    first2 = json.loads((tmp_path / "run" / "iter-2" / "critic" / "stepdapo_critic.json").read_text())
    assert first2["init"] == str(tmp_path / "run" / "iter-1" / "actor") and first2["epochs"] == 1
    assert "starts afresh" not in it2["critic"]["warning"]  # no next iteration
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.index("WARNING: critic check failed") < md.index("## Test accuracy")
    assert "## Critic check" in md and "| 1 |" in md


def test_critic_checks_are_not_part_of_its_fingerprint(monkeypatch):
    """Changing a check threshold or the fallback must not throw away a finished critic; changing
    what trains it must."""
    monkeypatch.setattr(critic, "model_fingerprint", lambda p: "init")
    monkeypatch.setattr(critic, "stage_fingerprint", lambda d, name: "labels")
    base = critic.fingerprint(load_config(None), "m", "l")
    for o in ("critic.min_brier_gain=0.2", "critic.min_step_ranking=0", "critic.fallback=critic", "critic.recovery_epochs=3"):
        assert critic.fingerprint(load_config(None, [o]), "m", "l") == base
    assert critic.fingerprint(load_config(None, ["critic.lr=1e-3"]), "m", "l") != base


def test_the_critic_is_judged_calibrated_and_the_map_is_reported(inputs, tmp_path, monkeypatch):
    """critic.calibrate: evaluate_critic fits sigmoid(a logit V + b) on the held-out states and reports
    it with the cross-fitted quality the check judges (`pipeline.judged`); the published critic is
    the raw one. Here an underconfident stand-in critic (values sigmoid(0.3 logit target)) makes the
    map's effect known: a slope well above 1, and a better Brier score after it."""
    from stepdapo.steps import delimiter_token_mask
    from stepdapo.pipeline import judged

    d, task, _ = inputs
    cfg = load_config(None, TINY + DATA + ["critic.epochs=1", "critic.heldout_fraction=0.5"])
    labels = read_labels(d / "labels")
    tok = char_tokenizer()
    _, held, train_states = critic.critic_examples(labels, cfg.critic, delimiter_token_mask(tok, "\n"), 0)
    assert len(held) >= metrics.MIN_CALIBRATION_STATES
    target = {tuple(e.input_ids): e.target for e in held + train_states}

    def underconfident(model, sequences, pad_id, **kw):
        t = np.clip([target.get(tuple(x), 0.5) for x in sequences], 0.02, 0.98)
        return (1 / (1 + np.exp(-0.3 * np.log(t / (1 - t))))).tolist()

    monkeypatch.setattr(critic, "critic_values", underconfident)
    m = critic.evaluate_critic(None, tok, train_states, held, labels, task, calibrate=True)
    assert m["calibration"]["a"] > 2 and m["calibration"]["states"] == len(held)
    hc = m["heldout_calibrated"]
    assert hc["brier"] < m["heldout"]["brier"] and hc["brier_gain_ci95"][0] <= hc["brier_gain"] <= hc["brier_gain_ci95"][1]
    assert hc["step_ranking"] == m["heldout"]["step_ranking"]  # an increasing map keeps the ranking
    assert judged(m) is hc and judged({**m, "heldout_calibrated": None}) is m["heldout"]
    assert "calibration" not in critic.evaluate_critic(None, tok, train_states, held, labels, task, calibrate=False)
    # the stage reports both (None where no increasing map fits, as for this tiny critic) and
    # publishes the raw critic
    monkeypatch.undo()
    s = critic.run_critic(cfg, d / "policy", d / "labels", tmp_path / "critic", task, progress=False)
    assert "calibration" in s and "heldout_calibrated" in s
    assert not [f for f in (tmp_path / "critic").iterdir() if "calib" in f.name]
