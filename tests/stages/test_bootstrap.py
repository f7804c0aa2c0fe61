import json

import torch
from safetensors.torch import load_file

from stepdapo.config import load_config
from stepdapo.models import char_tokenizer
from stepdapo.stages.bootstrap import bootstrap, sft_examples
from stepdapo.tasks import get_task

ONE_ROUND = ["bootstrap.max_rounds=1", "bootstrap.check_problems=40"]  # a tiny model never meets the criterion
SMALL = ONE_ROUND + ["task.arithmetic.n_demos=640", "bootstrap.batch_size=32", "bootstrap.model.hidden_size=32",
         "bootstrap.model.num_heads=2", "bootstrap.model.num_layers=1", "bootstrap.model.intermediate_size=64"]


def test_sft_examples_are_prompt_then_solution_then_eos_with_the_prompt_masked():
    """The demonstrations tokenized in batched calls: each example is the prompt's ids (as the sampling
    stages encode it), the solution's, and EOS; prompt_len marks where the loss starts."""
    task, tok = get_task(load_config(None, []).task), char_tokenizer()
    examples = sft_examples(task, tok, n=50)
    demos = list(task.demonstrations(50, None, frozenset()))
    assert len(examples) == len(demos) == 50
    for ex, (problem, solution) in zip(examples, demos):
        prompt = tok(task.prompt(problem, tok))["input_ids"]
        assert ex["input_ids"] == prompt + tok(solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ex["prompt_len"] == len(prompt)
    assert sft_examples(task, tok, n=0) == []


def test_same_seed_same_bootstrap_model(tmp_path):
    a = bootstrap(load_config(None, SMALL), tmp_path / "a", progress=False)
    bootstrap(load_config(None, SMALL), tmp_path / "b", progress=False)
    bootstrap(load_config(None, SMALL + ["seed=1"]), tmp_path / "c", progress=False)
    wa, wb, wc = (load_file(tmp_path / d / "model.safetensors") for d in "abc")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["steps"] == 20 and a["demonstrations"] == 640 and a["rounds"] == 1
    assert json.loads((tmp_path / "a" / "stepdapo_bootstrap.json").read_text())["seed"] == 0
    assert not (tmp_path / "a.tmp").exists()


def test_finished_bootstrap_is_not_redone(tmp_path):
    bootstrap(load_config(None, SMALL), tmp_path / "a", progress=False)
    mtime = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    bootstrap(load_config(None, SMALL), tmp_path / "a", progress=False)
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == mtime


def _base_model(tmp_path):
    """A small random HF Llama with the character tokenizer, saved as a user's model directory."""
    from stepdapo.config import TinyModelConfig
    from stepdapo.models import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(tok, TinyModelConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64), seed=5)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_finetunes_a_given_model_fully_and_with_lora(tmp_path):
    """bootstrap.finetune_model: the user's model (not a fresh tiny one) is trained on the
    demonstrations; LoRA is merged into a plain directory; the base is left untouched."""
    from stepdapo.models import load_policy

    base = _base_model(tmp_path)
    before = {k: v.clone() for k, v in load_file(base / "model.safetensors").items()}
    demos = ONE_ROUND + ["task.arithmetic.n_demos=320", "bootstrap.batch_size=32", "bootstrap.lr=1e-2", "bootstrap.finetune_model=true"]
    for name, extra in (("full", []), ("lora", ["bootstrap.lora_r=4"])):
        s = bootstrap(load_config(None, demos + extra), tmp_path / name, progress=False, base=base)
        assert s["base"] == str(base) and s["steps"] == 10
        after = load_file(tmp_path / name / "model.safetensors")
        assert after.keys() == before.keys()  # a plain model, adapters merged
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed and (name == "full" or all("proj" in k for k in changed))  # LoRA: linear layers only
        load_policy(tmp_path / name)  # reloads as a causal LM
    assert all(torch.equal(v, load_file(base / "model.safetensors")[k]) for k, v in before.items())


def test_trains_rounds_until_the_criterion_and_reports_it(tmp_path):
    """A model short of bootstrap.min_step_accuracy trains another round on fresh demonstrations at
    later_lr, up to max_rounds; one that meets it stops after its first round."""
    tight = SMALL + ["bootstrap.min_step_accuracy=1.0", "bootstrap.max_rounds=2", "bootstrap.later_lr=5e-4"]
    s = bootstrap(load_config(None, tight), tmp_path / "two", progress=False)
    assert s["rounds"] == 2 and [e["round"] for e in s["rounds_log"]] == [1, 2]
    assert [e["lr"] for e in s["rounds_log"]] == [3e-3, 5e-4]
    assert s["steps"] == 40 and s["demonstrations"] == 1280
    c = s["criterion"]
    assert c == s["rounds_log"][-1]["criterion"] and c["n"] == 40 and not c["met"] and not c["steps_ok"]
    assert 0 <= c["other_step_accuracy"] < 1.0 and c["min_step_accuracy"] == 1.0
    easy = bootstrap(load_config(None, SMALL + ["bootstrap.min_step_accuracy=0", "bootstrap.max_rounds=3",
                                                "bootstrap.max_flaw_step_accuracy=1"]), tmp_path / "one", progress=False)
    assert easy["rounds"] == 1 and easy["criterion"]["met"]


def test_a_killed_bootstrap_resumes_after_its_last_finished_round(tmp_path, monkeypatch):
    from stepdapo.stages import bootstrap as stage

    cfg = load_config(None, SMALL + ["bootstrap.min_step_accuracy=1.0", "bootstrap.max_rounds=2"])
    whole = bootstrap(cfg, tmp_path / "whole", progress=False)
    real, calls = stage.check_sft, []

    def dies_in_round_2(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    monkeypatch.setattr(stage, "check_sft", dies_in_round_2)
    try:
        bootstrap(cfg, tmp_path / "killed", progress=False)
    except KeyboardInterrupt:
        pass
    assert (tmp_path / "killed.work" / "checkpoints" / "round-1" / stage.ROUND_DONE).is_file()
    assert not (tmp_path / "killed").exists()
    trained = []
    real_train = stage.Trainer.train
    monkeypatch.setattr(stage.Trainer, "train", lambda self, *a, **k: trained.append(1) or real_train(self, *a, **k))
    monkeypatch.setattr(stage, "check_sft", real)
    resumed = bootstrap(cfg, tmp_path / "killed", progress=False)
    assert len(trained) == 1  # round 2 only
    assert resumed["rounds_log"] == whole["rounds_log"]
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "killed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_criterion_problems_are_held_out_of_the_demonstrations():
    from stepdapo.tasks.arithmetic import ArithmeticConfig, ArithmeticTask

    task = ArithmeticTask(ArithmeticConfig(n_ops_min=1, n_ops_max=1))  # a small space: collisions are likely
    held = task.sft_check_problems(40)
    assert len({p.question for p in held}) == 40 and all(task._split_of(p.question) == "train" for p in held)
    qs = {p.question for p in held}
    assert qs & {p.question for p, _ in task.demonstrations(2000)}  # without exclusion they would be trained on
    assert not qs & {p.question for p, _ in task.demonstrations(2000, exclude=qs)}
