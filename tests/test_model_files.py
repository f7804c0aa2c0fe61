"""A broken model (a file of zeros named .gguf, a truncated GGUF, empty or truncated weights, a
config.json that is not a JSON object, a sharded index naming a missing shard, no tokenizer) is
one line naming the broken file, exit status 2, and NOTHING written: the model is checked before
any stage claims its output directory. Every stage that takes a model, called in-process through
the CLI (`run` and `bootstrap` with `bootstrap.finetune_model` included), and the DPO baseline."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from stepdapo.cli import main
from stepdapo.errors import ModelPathError
from tiny_gguf import write_tiny_gguf


def _tree(root: Path) -> dict:
    """Every path under `root` with the hash of its content: 'nothing changed' is an equality."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# -- the broken models: each (the path to pass, the file or directory the error must name) --------

def _copy(good: Path, d: Path) -> Path:
    shutil.copytree(good, d, ignore=shutil.ignore_patterns("runs", "stepdapo_*.json"))
    return d


def zeros_gguf(tmp, good, gguf):
    p = tmp / "x.gguf"
    p.write_bytes(bytes(4096))
    return p, p


def gguf_truncated_in_data(tmp, good, gguf):
    p = tmp / "cut.gguf"
    data = gguf.read_bytes()
    p.write_bytes(data[:len(data) * 3 // 4])
    return p, p


def gguf_truncated_in_header(tmp, good, gguf):
    p = tmp / "head.gguf"
    p.write_bytes(gguf.read_bytes()[:200])
    return p, p


def empty_safetensors(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    (d / "model.safetensors").write_bytes(b"")
    return d, d / "model.safetensors"


def truncated_safetensors(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:w.stat().st_size // 2])
    return d, w


def garbage_safetensors(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    w = d / "model.safetensors"
    w.write_bytes(struct.pack("<Q", 20) + b"this is not json at all" + bytes(100))
    return d, w


def config_not_json(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    (d / "config.json").write_text('{"model_type": "llama",')
    return d, d / "config.json"


def config_a_list(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    (d / "config.json").write_text("[1, 2]")
    return d, d / "config.json"


def config_not_utf8(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    (d / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    return d, d / "config.json"


def config_without_model_type(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["model_type"]
    (d / "config.json").write_text(json.dumps(cfg))
    return d, d / "config.json"


def index_missing_shard(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    return d, d / "model-00002-of-00002.safetensors"


def no_weights(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    (d / "model.safetensors").unlink()
    return d, d


def no_tokenizer(tmp, good, gguf):
    d = _copy(good, tmp / "m")
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    return d, d


BROKEN = [zeros_gguf, gguf_truncated_in_data, gguf_truncated_in_header, empty_safetensors, truncated_safetensors,
          garbage_safetensors, config_not_json, config_a_list, config_not_utf8, config_without_model_type,
          index_missing_shard, no_weights, no_tokenizer]


# -- upstream stages the commands need, complete (and small) --------------------------------------

def _stage(d: Path, name: str, schema, rows: dict | None = None) -> Path:
    from stepdapo.runner import ShardedStage

    stage = ShardedStage(d, name, schema, {"fake": name})
    stage.start()
    if rows is not None:
        stage.write_shard(0, rows)
    stage.finish(0 if rows is None else 1, {})
    return d


def _upstream(tmp: Path) -> dict[str, Path]:
    from stepdapo.stages import advantages, labels, states

    adv = {"state_index": [0], "problem_id": ["p"], "state_ids": [[1, 5, 6]], "depth": [0], "action_ids": [[7]],
           "action_text": ["1"], "terminal": [False], "value": [0.5], "advantage": [0.5], "weight": [1.0],
           "count": [1], "outcome_rate": [0.5]}
    return {"states": _stage(tmp / "states", "states", states.SCHEMA),
            "labels": _stage(tmp / "labels", "labels", labels.SCHEMA),
            "advantages": _stage(tmp / "advantages", "advantages", advantages.SCHEMA, adv)}


def _command(name: str, model: Path, up: dict[str, Path], out: Path) -> list[str]:
    return {
        "states": ["states", "--model", str(model), "--out", str(out), "states.n_problems=2"],
        "evaluate": ["evaluate", "--model", str(model), "--out", str(out) + ".json", "eval.limit=2"],
        "label": ["label", "--model", str(model), "--states", str(up["states"]), "--out", str(out)],
        "critic": ["critic", "--model", str(model), "--labels", str(up["labels"]), "--out", str(out)],
        "advantages": ["advantages", "--critic", str(model), "--labels", str(up["labels"]), "--out", str(out)],
        "actor": ["actor", "--model", str(model), "--advantages", str(up["advantages"]), "--out", str(out)],
        "bootstrap": ["bootstrap", "--out", str(out), f"model={model}", "bootstrap.finetune_model=true"],
        "run": ["run", "configs/arithmetic.yaml", "--out", str(out), f"model={model}"],
    }[name]


COMMANDS = ["states", "evaluate", "label", "critic", "advantages", "actor", "bootstrap", "run"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(p)
    return p


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("broken", BROKEN, ids=lambda f: f.__name__)
def test_a_broken_model_is_one_line_and_leaves_nothing(broken, command, small_model_dir, tiny_gguf, tmp_path,
                                                       capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    model, culprit = broken(inputs, small_model_dir, tiny_gguf)
    up = _upstream(inputs)
    before = _tree(tmp_path)
    try:
        code = main(_command(command, model, up, tmp_path / "o"))  # a non-StepdapoError fails the test here
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}\n{err}"
    assert "error:" in err and "Traceback" not in err, err
    assert str(culprit) in err, f"the error does not name {culprit}:\n{err}"
    assert _tree(tmp_path) == before, f"left files behind: {sorted(set(_tree(tmp_path)) - set(before))}"


@pytest.mark.parametrize("broken", [zeros_gguf, empty_safetensors, config_a_list, index_missing_shard],
                         ids=lambda f: f.__name__)
def test_the_dpo_baseline_checks_its_model_first(broken, small_model_dir, tiny_gguf, tmp_path):
    from stepdapo.config import load_config
    from stepdapo.stages.dpo import train as train_dpo

    inputs = tmp_path / "in"
    inputs.mkdir()
    model, culprit = broken(inputs, small_model_dir, tiny_gguf)
    _upstream(inputs)  # states/, labels/, advantages/ in inputs/
    before = _tree(tmp_path)
    with pytest.raises(ModelPathError, match=str(culprit)):
        train_dpo(load_config(None, []), model, inputs, tmp_path / "dpo", progress=False)  # inputs/ holds states/
    assert _tree(tmp_path) == before


def test_valid_models_pass_the_check(small_model_dir, tiny_gguf, tmp_path):
    """The check accepts what the tool itself writes and loads: a bootstrapped model, a GGUF, a
    sharded safetensors directory."""
    from stepdapo.models import check_model_dir, load_policy, load_tokenizer

    assert check_model_dir(small_model_dir) == small_model_dir
    assert check_model_dir(tiny_gguf) == tiny_gguf
    model, _ = load_policy(small_model_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(small_model_dir / "tokenizer.json", sharded)
    shutil.copy(small_model_dir / "tokenizer_config.json", sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert check_model_dir(sharded) == sharded
    load_policy(sharded)
    # a plan counts tokens with a directory's config and tokenizer alone: no weights needed there
    config_only = tmp_path / "config-only"
    shutil.copytree(small_model_dir, config_only, ignore=shutil.ignore_patterns("*.safetensors", "runs"))
    assert load_tokenizer(config_only)("1+1=2")["input_ids"]
    with pytest.raises(ModelPathError, match="no weights"):
        load_policy(config_only)


def test_a_broken_log_ratio_critic_is_named(small_model_dir, tmp_path):
    """A LogRatioCritic directory with an empty value head, or whose reference model lost its
    weights: the advantages stage names the file before it starts."""
    from stepdapo.models import LogRatioCritic, check_critic

    ref = _copy(small_model_dir, tmp_path / "ref")
    critic = LogRatioCritic.start(ref, beta=0.1, initial_value=0.5)
    d = tmp_path / "critic"
    critic.save_pretrained(d)
    shutil.copy(small_model_dir / "tokenizer.json", d)
    shutil.copy(small_model_dir / "tokenizer_config.json", d)
    assert check_critic(d) == d
    head = d / LogRatioCritic.HEAD
    saved = head.read_bytes()
    head.write_bytes(b"")
    with pytest.raises(ModelPathError, match=f"{head}: empty file"):
        check_critic(d)
    head.write_bytes(saved)
    (ref / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelPathError, match=str(ref / "model.safetensors")):
        check_critic(d)
