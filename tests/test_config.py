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


# -- the typed sections (pydantic) -----------------------------------------------------------------

def _sections(model, prefix=""):
    from pydantic import BaseModel

    yield prefix.rstrip("."), model
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _sections(info.annotation, prefix + name + ".")


def test_every_field_is_documented_and_every_number_constrained():
    """A field without a doc, or a number without a declared range, is a defect: `config show`
    prints the docs, and an unchecked number fails minutes into a run instead of at load time."""
    import typing

    for where, section in _sections(RunConfig):
        assert (section.__doc__ or "").strip(), f"{where or 'RunConfig'}: no class docstring"
        for name, info in section.model_fields.items():
            assert (info.description or "").strip(), f"{where}.{name}: no docstring under the field"
            types = set(typing.get_args(info.annotation)) or {info.annotation}
            if types & {int, float} and bool not in types:
                declared = {b for m in info.metadata for b in ("gt", "ge", "lt", "le")
                            if getattr(m, b, None) is not None}
                assert declared & {"gt", "ge"} and declared & {"lt", "le"}, \
                    f"{where}.{name}: a number without a lower and an upper bound"


@pytest.mark.parametrize("override,needle", [
    ("critic.batch_size=0", "critic.batch_size: must be in [1, 16,777,216]"),
    ("dpo.epochs=0", "dpo.epochs: must be in (0, 10,000]"),
    ("label.max_new_tokens=0", "label.max_new_tokens: must be in [1, "),
    ("states.batch_size=0", "states.batch_size: must be in [1, "),
    ("actor.beta=.inf", "actor.beta: must be a finite number"),
    ("actor.warmup_ratio=1.5", "actor.warmup_ratio: must be in [0, 1)"),
    ("label.batch_size=-1", "label.batch_size: must be in [1, "),
    ("critic.init=random", "critic.init: must be one of 'policy' or 'previous'"),
    ("eval.split=dev", "eval.split: must be one of 'train' or 'test'"),
    ("states.keep_per_problem=9", "states.keep_per_problem: must be <= samples_per_problem"),
    ("bootstrap.model.num_heads=3", "num_heads: must divide hidden_size"),
    ("report_to=[tensorbored]", "report_to.0: must be one of"),
    ("actor.lora_r=2.5", "actor.lora_r: expected an integer"),
    ("bf16=1", "bf16: expected true/false/auto"),
])
def test_bad_settings_are_errors_at_load_time(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and f"override {override!r}" in str(e.value)


def test_cross_field_check_sees_overridden_and_default_values():
    with pytest.raises(ConfigError, match="n_ops_max: must be >= n_ops_min"):
        load_config(None, ["task.arithmetic.n_ops_min=5"])


@pytest.mark.parametrize("text,needle", [
    ("", "the config file is empty"),
    ("# only a comment\n", "the config file is empty"),
    ("seed: 1\nseed: 2\n", "c.yaml:2: duplicate key 'seed' (first at line 1)"),
    ("actor:\n  lr: 1.0e-4\n  beta: 1\n  lr: 2.0e-4\n", "c.yaml:4: duplicate key 'actor.lr' (first at line 2)"),
    ("- 1\n- 2\n", "the top level must be a mapping"),
    ("actor: 3\n", "c.yaml:1: actor: must be a mapping"),
    ("seed: [1\n", "invalid YAML"),
])
def test_bad_files_are_errors(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value)


def test_unreadable_config_paths(tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        load_config(tmp_path)
    f = tmp_path / "latin1.yaml"
    f.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{f}: not UTF-8"):
        load_config(f)


def test_exponent_without_dot_is_a_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("actor:\n  lr: 1e-5\n")
    assert load_config(f).actor.lr == 1e-5


def test_all_errors_are_reported_at_once(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("actor:\n  lr: -1\ncritic:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "c.yaml:2: actor.lr" in str(e.value) and "c.yaml:4: critic.batch_size" in str(e.value)


def test_shipped_configs_load():
    from pathlib import Path

    for f in sorted(Path("configs").glob("*.yaml")):
        load_config(f)


def test_assignment_is_validated():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.actor.beta = -1.0


def test_a_renamed_key_says_where_it_went(tmp_path):
    """The DPO baseline's section was `baseline` (with `dpo: true`): a config of that version gets
    the new names in its error, not only a list of known keys."""
    old = tmp_path / "old.yaml"
    old.write_text("baseline:\n  dpo: true\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"old.yaml:1: baseline: unknown key 'baseline': renamed: .*section `dpo`"):
        load_config(old)
    with pytest.raises(ConfigError, match=r"`baselines: \[\]` for `baseline.dpo: false`"):
        load_config(None, ["baseline.dpo=false"])
