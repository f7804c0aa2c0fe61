import json

import torch
from safetensors.torch import load_file

from stepdapo.config import load_config
from stepdapo.stages.bootstrap import bootstrap

SMALL = ["task.arithmetic.n_demos=640", "bootstrap.batch_size=32", "bootstrap.model.hidden_size=32",
         "bootstrap.model.num_heads=2", "bootstrap.model.num_layers=1", "bootstrap.model.intermediate_size=64"]


def test_same_seed_same_bootstrap_model(tmp_path):
    a = bootstrap(load_config(None, SMALL), tmp_path / "a", progress=False)
    bootstrap(load_config(None, SMALL), tmp_path / "b", progress=False)
    bootstrap(load_config(None, SMALL + ["seed=1"]), tmp_path / "c", progress=False)
    wa, wb, wc = (load_file(tmp_path / d / "model.safetensors") for d in "abc")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["steps"] == 20 and a["demonstrations"] == 640
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
    demos = ["task.arithmetic.n_demos=320", "bootstrap.batch_size=32", "bootstrap.lr=1e-2", "bootstrap.finetune_model=true"]
    for name, extra in (("full", []), ("lora", ["bootstrap.lora_r=4"])):
        s = bootstrap(load_config(None, demos + extra), tmp_path / name, progress=False, base=base)
        assert s["base"] == str(base) and s["steps"] == 10
        after = load_file(tmp_path / name / "model.safetensors")
        assert after.keys() == before.keys()  # a plain model, adapters merged
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed and (name == "full" or all("proj" in k for k in changed))  # LoRA: linear layers only
        load_policy(tmp_path / name)  # reloads as a causal LM
    assert all(torch.equal(v, load_file(base / "model.safetensors")[k]) for k, v in before.items())
