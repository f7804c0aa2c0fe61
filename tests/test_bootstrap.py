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
