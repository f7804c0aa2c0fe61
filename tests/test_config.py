import pytest

from stepdapo.config import ConfigError, RunConfig, from_dict, load_config, to_dict


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig) and cfg.task.name == "arithmetic"


def test_shipped_config_loads():
    cfg = load_config("configs/arithmetic.yaml")
    assert cfg.task.arithmetic.flaw_prob == 0.6


def test_overrides_are_typed():
    cfg = load_config(None, ["eval.limit=7", "bootstrap.lr=1e-3", "task.arithmetic.operators=+-*",
                             "eval.temperature=1"])
    assert cfg.eval.limit == 7 and cfg.bootstrap.lr == 1e-3 and cfg.task.arithmetic.operators == "+-*"
    assert isinstance(cfg.eval.temperature, float)
    assert load_config(None, ["eval.limit=null"]).eval.limit is None


def test_unknown_key_in_file_names_file_and_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\neval:\n  limit: 3\n  temprature: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert f"{f}:4" in msg and "eval.temprature" in msg


def test_bad_value_in_file_names_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\nbootstrap:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: bootstrap.lr: expected a number"):
        load_config(f)


def test_validation_error_names_field_and_origin(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task:\n  arithmetic:\n    flaw_prob: 1.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: task.arithmetic.flaw_prob: must be in \[0, 1\]"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"override 'eval.top_p=0'"):
        load_config(None, ["eval.top_p=0"])


@pytest.mark.parametrize("bad", ["nokey", "eval.nope=1", "eval=3", "seed=abc", "task.name=nosuchtask"])
def test_bad_overrides(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")


def test_roundtrip():
    cfg = load_config(None, ["eval.limit=5", "seed=9"])
    assert from_dict(to_dict(cfg)) == cfg
