"""Every bad input to the CLI is exit status 2 and one clear message naming the culprit, never a
traceback, and it leaves nothing behind: a table of generated bad inputs, run in-process (an
exception that is not a StepdapoError escapes `main` and fails the test)."""

import hashlib
import os
from pathlib import Path


from stepdapo.cli import main


def _tree(root: Path) -> dict:
    """Every path under `root` with the hash of its content: 'nothing changed' is an equality."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _bad_config_files(tmp: Path) -> dict[str, Path]:
    files = {
        "empty": b"",
        "binary": bytes(range(256)) * 4,
        "latin-1": "seed: 1 # caf\xe9\n".encode("latin-1"),
        "list": b"- 1\n- 2\n",
        "scalar": b"42\n",
        "tabs": b"actor:\n\tbeta: 1\n",
        "duplicate": b"seed: 1\nseed: 2\n",
        "unknown": b"sed: 1\n",
        "wrong type": b"actor:\n  beta: high\n",
        "out of range": b"critic:\n  batch_size: 0\n",
        "inf": b"actor:\n  beta: .inf\n",
        "nan": b"actor:\n  lr: .nan\n",
        "bad choice": b"advantages:\n  source: oracle\n",
        "section as scalar": b"critic: 3\n",
        "unclosed": b"seed: [1, 2\n",
        "huge number": b"seed: 99999999999999999999999999999\n",
        "negative": b"iterations: -1\n",
        "bool for int": b"threads: true\n",
        "unknown task": b"task:\n  name: chess\n",
    }
    out = {}
    for name, data in files.items():
        p = tmp / f"{name.replace(' ', '_')}.yaml"
        p.write_bytes(data)
        out[name] = p
    return out


def _cases(tmp: Path, model: Path) -> list[tuple[str, list[str]]]:
    afile = tmp / "a-file.txt"
    afile.write_text("not a directory\n")
    cases = []
    for name, cfg in _bad_config_files(tmp).items():
        cases.append((f"run with a bad config ({name})", ["run", str(cfg), "--out", str(tmp / "o")]))
        cases.append((f"evaluate with a bad config ({name})", ["evaluate", "--config", str(cfg), "--model", str(model),
                                                                "--out", str(tmp / "o.json")]))
    cases += [
        ("run: config is a directory", ["run", str(tmp), "--out", str(tmp / "o")]),
        ("run: missing config", ["run", str(tmp / "nope.yaml"), "--out", str(tmp / "o")]),
        ("run: --out is a file", ["run", "configs/arithmetic.yaml", "--out", str(afile)]),
        ("run: bad override", ["run", "configs/arithmetic.yaml", "--out", str(tmp / "o"), "actor.beta=-1"]),
        ("run: override without =", ["run", "configs/arithmetic.yaml", "--out", str(tmp / "o"), "actor.beta"]),
        ("run: override of a section", ["run", "configs/arithmetic.yaml", "--out", str(tmp / "o"), "actor=1"]),
        ("bootstrap: --out is a file", ["bootstrap", "--out", str(afile)]),
        ("bootstrap: other task", ["bootstrap", "--out", str(tmp / "o"), "task.name=gsm8k"]),
        ("states: --out is a file", ["states", "--model", str(model), "--out", str(afile), "states.n_problems=2"]),
        ("states: model is missing", ["states", "--model", str(tmp / "nomodel"), "--out", str(tmp / "o")]),
        ("states: model is a text file", ["states", "--model", str(afile), "--out", str(tmp / "o")]),
        ("states: model dir has no config.json", ["states", "--model", str(tmp / "empty"), "--out", str(tmp / "o")]),
        ("label: states missing", ["label", "--model", str(model), "--states", str(tmp / "nostates"),
                                   "--out", str(tmp / "o")]),
        ("label: states is a file", ["label", "--model", str(model), "--states", str(afile), "--out", str(tmp / "o")]),
        ("critic: labels missing", ["critic", "--model", str(model), "--labels", str(tmp / "nolabels"),
                                    "--out", str(tmp / "o")]),
        ("advantages: labels missing", ["advantages", "--critic", str(model), "--labels", str(tmp / "x"),
                                        "--out", str(tmp / "o")]),
        ("actor: advantages missing", ["actor", "--model", str(model), "--advantages", str(tmp / "x"),
                                       "--out", str(tmp / "o")]),
        ("evaluate: --out is a directory", ["evaluate", "--model", str(model), "--out", str(tmp)]),
        ("evaluate: no model", ["evaluate", "--out", str(tmp / "o.json")]),
        ("evaluate: gsm8k without data", ["evaluate", "--model", str(model), "--task", "gsm8k",
                                          "--out", str(tmp / "o.json")]),
        ("evaluate: data path is a directory", ["evaluate", "--model", str(model), "--task", "gsm8k",
                                                f"task.gsm8k.test={tmp}", "--out", str(tmp / "o.json")]),
        ("evaluate: data file missing", ["evaluate", "--model", str(model), "--task", "gsm8k",
                                         f"task.gsm8k.test={tmp / 'none.jsonl'}", "--out", str(tmp / "o.json")]),
        ("config show: bad override", ["config", "show", "eval.k=0"]),
    ]
    return cases


def test_every_bad_input_is_a_clean_error(small_model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = _cases(tmp_path, small_model_dir)
    before = _tree(tmp_path)
    clean = 0
    for name, argv in cases:
        try:
            code = main(argv)  # a non-StepdapoError would raise here: that is the failure we look for
        except SystemExit as e:  # argparse's own usage errors: exit 2 and a message, no traceback
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, f"{name}: exit {code}\n{err}"
        assert "error:" in err and "Traceback" not in err, f"{name}: {err}"
        assert _tree(tmp_path) == before, f"{name}: left files behind or changed one"
        clean += 1
    assert clean == len(cases) > 50


def test_out_on_a_foreign_directory_loses_nothing(small_model_dir, tmp_path, capsys):
    """`--out ~/experiments` must never touch what is in it, for every command that writes."""
    foreign = tmp_path / "experiments"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious\n")
    (foreign / "sub").mkdir()
    (foreign / "sub" / "data.bin").write_bytes(os.urandom(64))
    before = _tree(foreign)
    for argv in (["run", "configs/arithmetic.yaml"], ["bootstrap"],
                 ["states", "--model", str(small_model_dir), "states.n_problems=2"]):
        code = main([*argv, "--out", str(foreign)])
        err = capsys.readouterr().err
        assert code == 2 and str(foreign) in err and "Traceback" not in err, (argv, err)
        assert _tree(foreign) == before, argv
