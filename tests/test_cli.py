import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "stepdapo.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_evaluate_writes_the_eval_contract(small_model_dir, tmp_path):
    out = tmp_path / "ev.json"
    r = run("evaluate", "--model", str(small_model_dir), "--task", "arithmetic", "--limit", "30",
            "--out", str(out), "eval.samples=2", "eval.k=2")
    assert r.returncode == 0, r.stderr
    ev = json.loads(out.read_text())["eval"]
    assert ev["n"] == 30 and 0 <= ev["accuracy"] <= 1
    assert ev["ci95"][0] <= ev["accuracy"] <= ev["ci95"][1]
    assert "sampled_accuracy" in ev and "pass@2" in ev and "maj@2" in ev
    assert "greedy pass@1" in r.stderr  # the table


@pytest.mark.parametrize("args,needle", [
    (["evaluate", "--model", "MODEL", "--task", "nosuchtask"], "unknown task 'nosuchtask'"),
    (["evaluate", "--model", "MODEL", "eval.limt=3"], "unknown key 'eval.limt'"),
    (["evaluate", "--model", "MODEL", "eval.temperature=hot"], "eval.temperature: expected a number"),
    (["evaluate", "--model", "MODEL", "badoverride"], "expected key=value"),
    (["evaluate", "--model", "/no/such/model"], "model path not found: /no/such/model"),
    (["bootstrap", "--out", "OUT", "--config", "/no/such.yaml"], "config file not found"),
])
def test_bad_input_is_a_clear_error(small_model_dir, tmp_path, args, needle):
    args = [a.replace("MODEL", str(small_model_dir)).replace("OUT", str(tmp_path / "o")) for a in args]
    r = run(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_not_a_model_directory(tmp_path):
    r = run("evaluate", "--model", str(tmp_path))
    assert r.returncode == 2 and "not a Hugging Face model directory" in r.stderr


def test_run_with_bad_config_is_a_clear_error(tmp_path):
    r = run("run", "/no/such.yaml", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "config file not found: /no/such.yaml" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor:\n  beta: -1\n")
    r = run("run", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "bad.yaml:2: actor.beta: must be in [1e-06, 1,000,000]" in r.stderr
    assert not (tmp_path / "o").exists()


def test_stage_commands_report_missing_inputs(tmp_path):
    r = run("critic", "--model", str(tmp_path), "--labels", str(tmp_path / "nolabels"), "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "manifest.json" in r.stderr and "Traceback" not in r.stderr


def test_config_show_prints_resolved_values_with_docs():
    r = run("config", "show", "configs/arithmetic.yaml", "actor.beta=0.7")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    i = lines.index("  beta: 0.7")
    assert lines[i - 1].strip().startswith("# KL strength")  # the field's doc right above it
    r = run("config", "show", "critic.lr=3")  # overrides without a file
    assert r.returncode == 0 and "  lr: 3.0" in r.stdout
    r = run("config", "show", "actor.bta=1")
    assert r.returncode == 2 and "unknown key 'actor.bta'" in r.stderr and "Traceback" not in r.stderr


def test_help_points_to_config_show():
    assert "stepdapo config show" in run("--help").stdout
    assert "stepdapo config show" in run("run", "--help").stdout
