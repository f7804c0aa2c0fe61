"""Hostile and careless inputs, round two (issue 27): YAML that expands, tags, deep nesting;
paths that are FIFOs, devices, sockets, symlink loops or someone else's files; numbers at the edge
of what the code can use; inputs whose error messages would be megabytes. Every one is exit status
2, a short message without a traceback, within seconds, and nothing on disk created or changed.

Each case runs the CLI in-process in a daemon thread, so a hang (a FIFO opened for reading blocks
until a writer comes) fails the test after HANG_S instead of hanging the suite."""

import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepdapo.cli import main
from stepdapo.config import RunConfig, load_config
from stepdapo.errors import ConfigError
from test_cli_errors import _tree

HANG_S = 30  # the bound for "hangs"; every case here takes well under a second or two
MAX_ERR = 3500  # characters of stderr: one message of at most ~3000 (errors.MAX_MESSAGE) and its prefix


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `stepdapo argv`, failing the test if it runs past HANG_S."""
    result: dict = {}
    argv_shown = [a if len(a) < 100 else a[:100] + "..." for a in argv]

    def target():
        try:
            result["code"] = main(argv)
        except SystemExit as e:  # argparse's usage errors
            result["code"] = e.code
        except BaseException as e:  # noqa: BLE001 - reported below as the failure it is
            result["exc"] = e

    t = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), f"{argv_shown}: still running after {HANG_S} s (a hang)"
    err = capsys.readouterr().err
    if "exc" in result:
        raise AssertionError(f"{argv_shown}: raised {type(result['exc']).__name__}: {str(result['exc'])[:500]}")
    assert time.monotonic() - start < HANG_S
    return result["code"], err


def assert_clean_error(argv, capsys, root: Path, needle: str | None = None) -> str:
    before = _tree(root)
    code, err = run_cli(argv, capsys)
    assert code == 2, f"{argv}: exit {code}\n{err[:2000]}"
    assert "error:" in err and "Traceback" not in err, f"{argv}: {err[:2000]}"
    assert len(err) < MAX_ERR, f"{argv}: a {len(err):,}-character error"
    if needle is not None:
        assert needle in err, f"{argv}: {needle!r} not in {err[:2000]}"
    assert _tree(root) == before, f"{argv}: created or changed files"
    return err


# ---------------------------------------------------------------------------------------------
# 1. YAML: aliases, tags, nesting
# ---------------------------------------------------------------------------------------------

def _laughs_list(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def _laughs_mapping(levels: int = 9) -> str:
    lines = ["m0: &m0 {k0: lol, k1: lol, k2: lol, k3: lol, k4: lol, k5: lol, k6: lol, k7: lol, k8: lol}"]
    for i in range(1, levels):
        lines.append(f"m{i}: &m{i} {{{', '.join(f'k{j}: *m{i - 1}' for j in range(9))}}}")
    return "\n".join(lines) + "\n"


BAD_YAML = {
    "billion laughs (lists)": (_laughs_list(), "values once its aliases are expanded"),
    "billion laughs (mappings)": (_laughs_mapping(), "values once its aliases are expanded"),
    "python object tag": ('seed: !!python/object/apply:os.system ["echo owned"]\n', "YAML tag"),
    "python name tag": ("seed: !!python/name:os.system\n", "YAML tag"),
    "unknown tag": ("actor:\n  beta: !weird 0.3\n", "YAML tag '!weird'"),
    "set tag": ("report_to: !!set {tensorboard: null}\n", "YAML tag"),
    "deep lists": ("seed: " + "[" * 20000 + "]" * 20000 + "\n", "nested more than"),
    "deep flow mappings": ("seed: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested more than"),
    "deep block mappings": ("".join(" " * i + f"k{i}:\n" for i in range(300)) + " " * 300 + "x: 1\n",
                            "nested more than"),
    "alias loop": ("actor: &a\n  beta: *a\n", "a loop"),
    "complex key": ("? [actor, beta]\n: 1\n", "a key must be a plain name"),
    "merge of a scalar": ("actor:\n  <<: 3\n", "a merge key (<<) takes a mapping"),
}


@pytest.mark.parametrize("name", list(BAD_YAML))
def test_hostile_yaml_is_a_quick_clean_error(name, small_model_dir, tmp_path, capsys):
    text, needle = BAD_YAML[name]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    for argv in (["run", str(cfg), "--out", str(tmp_path / "o")],
                 ["evaluate", "--config", str(cfg), "--model", str(small_model_dir), "--out", str(tmp_path / "o.json")],
                 ["config", "show", str(cfg)],
                 ["plan", str(cfg)]):
        assert_clean_error(argv, capsys, tmp_path, needle)


@pytest.mark.parametrize("override, needle", [
    ("seed=" + _laughs_list(6).replace("\n", " ").split(": ", 1)[1].split(" a1:")[0], None),
    ("seed=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
     "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]]", "aliases are expanded"),
    ('seed=!!python/object/apply:os.system ["echo owned"]', "YAML tag"),
    ("seed=" + "[" * 20000 + "]" * 20000, "nested more than"),
    ("a" + ".a" * 5000 + "=1", "nested that deep"),
    ("actor.beta=" + "9" * 5000, "actor.beta"),
])
def test_hostile_overrides_are_clean_errors(override, needle, tmp_path, capsys):
    err = assert_clean_error(["config", "show", override], capsys, tmp_path, needle)
    assert err.count("\n") <= 2


def test_aliases_and_merge_keys_within_bounds_work(tmp_path):
    """Anchors, aliases and merge keys are how YAML shares settings: allowed, with YAML 1.1's
    merge semantics (the mapping's own keys win) and the merged keys' lines in errors."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("actor: &opt\n  lr: 2.0e-4\n  epochs: 5.0\ndpo:\n  <<: *opt\n  epochs: 2.0\n"
                   "critic:\n  <<: [{lr: 1.0e-5}, *opt]\n")
    c = load_config(cfg)
    assert (c.dpo.lr, c.dpo.epochs) == (2.0e-4, 2.0)
    assert (c.critic.lr, c.critic.epochs) == (1.0e-5, 5.0)
    cfg.write_text("actor: &opt\n  lr: fast\ndpo:\n  <<: *opt\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: dpo.lr: expected a number"):
        load_config(cfg)


# generated YAML: random documents with anchors, aliases, tags and nesting; each loads or is a
# ConfigError, quickly, and an error is short
_leaf = st.sampled_from(["1", "0.5", "true", "null", "lol", "*a", "*b", "!!str x", "!x 1", "!!binary aGk=",
                         "&a [1, 2]", "&b {k: v}", "[*a, *a]", "{<<: *b}", "'quoted'", "1e-3", ".inf"])


@st.composite
def _documents(draw):
    def node(depth):
        if depth > 30 or draw(st.booleans()):
            return draw(_leaf)
        kids = [node(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        if draw(st.booleans()):
            return "[" + ", ".join(kids) + "]"
        return "{" + ", ".join(f"k{i}: {k}" for i, k in enumerate(kids)) + "}"
    keys = draw(st.lists(st.sampled_from(["seed", "actor", "critic", "x", "<<", "threads"]), min_size=1,
                         max_size=4, unique=True))
    return "\n".join(f"{k}: {node(0)}" for k in keys) + "\n"


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_documents())
def test_generated_yaml_loads_or_is_a_short_config_error(doc):
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"stepdapo-gen-{os.getpid()}.yaml"
    path.write_text(doc)
    try:
        start = time.monotonic()
        try:
            load_config(path)
        except ConfigError as e:
            assert len(str(e)) < MAX_ERR, doc
        assert time.monotonic() - start < HANG_S
    finally:
        path.unlink()


# ---------------------------------------------------------------------------------------------
# 2. Paths: non-regular inputs, outputs that are not ours, OS errors
# ---------------------------------------------------------------------------------------------

def _char_device(path: Path) -> bool:
    """A /dev/null-like node at `path` (root with CAP_MKNOD), else False."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return True
    except (PermissionError, OSError):
        return False


def test_inputs_that_are_not_regular_files_are_refused_without_waiting(small_model_dir, tmp_path, capsys):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    cfg_fifo = tmp_path / "fifo.yaml"
    os.mkfifo(cfg_fifo)
    model = str(small_model_dir)
    assert_clean_error(["config", "show", str(cfg_fifo)], capsys, tmp_path, "a FIFO (named pipe), not a config file")
    assert_clean_error(["run", str(cfg_fifo), "--out", str(tmp_path / "o")], capsys, tmp_path, "FIFO")
    for data in (fifo, Path("/dev/zero")):
        assert_clean_error(["evaluate", "--model", model, "--task", "gsm8k", f"task.gsm8k.test={data}",
                            "--out", str(tmp_path / "o.json")], capsys, tmp_path, str(data))
    assert_clean_error(["evaluate", "--model", model, "--task", "code", f"task.code.test={fifo}",
                        "--out", str(tmp_path / "o.json")], capsys, tmp_path, "FIFO")


def test_stage_inputs_holding_fifos_are_refused_without_waiting(small_model_dir, tmp_path, capsys):
    """A stage directory given as input (--labels, --states) whose manifest or shard is a FIFO."""
    from stepdapo.store import check_parquet, read_json

    for name in ("manifest.json", "shard-00000.parquet"):
        os.mkfifo(tmp_path / name)
    with pytest.raises(Exception, match="not a regular file"):
        read_json(tmp_path / "manifest.json")
    with pytest.raises(Exception, match="not a regular file"):
        check_parquet(tmp_path / "shard-00000.parquet")
    labels = tmp_path / "labels"
    labels.mkdir()
    os.mkfifo(labels / "manifest.json")
    assert_clean_error(["critic", "--model", str(small_model_dir), "--labels", str(labels), "--out",
                        str(tmp_path / "c")], capsys, tmp_path, "manifest.json")


def test_outputs_that_are_not_ours_are_never_replaced(small_model_dir, tmp_path, capsys):
    model = str(small_model_dir)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "out.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": "precious"}\n')
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    targets = [fifo, sock_path, foreign, link]
    if _char_device(tmp_path / "null"):
        targets.append(tmp_path / "null")
    try:
        for target in targets:
            kind = stat.S_IFMT(os.lstat(target).st_mode)
            assert_clean_error(["evaluate", "--model", model, "eval.limit=2", "eval.samples=0", "--out", str(target)],
                               capsys, tmp_path, str(target))
            assert_clean_error(["plan", "configs/arithmetic.yaml", "--json", str(target)], capsys, tmp_path,
                               str(target))
            assert stat.S_IFMT(os.lstat(target).st_mode) == kind
        assert foreign.read_text() == '{"mine": "precious"}\n'
    finally:
        sock.close()


def test_an_output_of_ours_is_replaced(small_model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(small_model_dir), "eval.limit=2", "eval.samples=0", "--out", str(out)]
    assert run_cli(argv, capsys)[0] == 0
    first = json.loads(out.read_text())
    assert run_cli(argv, capsys)[0] == 0  # again: its own file (and shards) are reused, not refused
    assert json.loads(out.read_text())["eval"]["accuracy"] == first["eval"]["accuracy"]


def test_os_errors_on_out_are_one_line_naming_the_path(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    afile = tmp_path / "a-file"
    afile.write_text("x\n")
    for out in (loop / "run", afile / "run", loop):
        for argv in (["run", "configs/arithmetic.yaml", "--out", str(out)], ["bootstrap", "--out", str(out)],
                     ["plan", "configs/arithmetic.yaml", "--json", str(out / "plan.json")]):
            err = assert_clean_error(argv, capsys, tmp_path)
            assert err.count("\n") == 1 and (str(loop) in err or str(afile) in err), err


# ---------------------------------------------------------------------------------------------
# 3. Numbers at the edge
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["run", "configs/arithmetic.yaml", "threads=99999999999"], "threads: must be in [1, 1,024]"),
    (["run", "configs/arithmetic.yaml", "eval.temperature=1e-320"], "eval.temperature: must be in [0.01, 100]"),
    (["run", "configs/arithmetic.yaml", "states.temperature=1e300"], "states.temperature"),
    (["run", "configs/arithmetic.yaml", "--seed", "1" + "0" * 30], "seed: must be in [0, 4,294,967,295]"),
    (["evaluate", "--model", "x", "--limit", "1" + "0" * 30], "eval.limit"),
    (["run", "configs/arithmetic.yaml", "actor.beta=1e-320"], "actor.beta"),
    (["run", "configs/arithmetic.yaml", "label.rollouts=" + "9" * 40], "label.rollouts"),
    (["plan", "configs/arithmetic.yaml", "--params", "inf", "--tokenizer", "x"], "--params"),
    (["plan", "configs/arithmetic.yaml", "--params", "nan", "--tokenizer", "x"], "--params"),
    (["plan", "configs/arithmetic.yaml", "--gpu-flops", "inf"], "--gpu-flops"),
    (["plan", "configs/arithmetic.yaml", "--processes", "9" * 30], "--processes"),
])
def test_numbers_beyond_what_the_code_can_use_are_load_errors(argv, needle, tmp_path, capsys):
    assert_clean_error([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "run" else [])], capsys, tmp_path,
                       needle)


def _numeric_fields(model=RunConfig, prefix=""):
    import typing

    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _numeric_fields(info.annotation, prefix + name + ".")
            continue
        types = set(typing.get_args(info.annotation)) or {info.annotation}
        if types & {int, float} and bool not in types:
            b = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le")
                 if getattr(m, k, None) is not None}
            yield prefix + name, (float if float in types else int), b


@pytest.mark.parametrize("key, kind, bounds", list(_numeric_fields()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_number_is_bounded_on_both_sides_and_extremes_are_errors(key, kind, bounds):
    """Every numeric setting has a lower and an upper bound, and values far outside either, or
    that no int/float can hold, are errors naming the key (not a crash minutes into a run)."""
    assert ("ge" in bounds or "gt" in bounds) and ("le" in bounds or "lt" in bounds), f"{key}: {bounds}"
    extremes = ["1e308", "-1e308", ".inf", "-.inf", ".nan", "1" + "0" * 40, "-" + "1" + "0" * 40]
    if kind is float:
        extremes += ["1e-320"] if bounds.get("ge", bounds.get("gt", 0)) >= 1e-300 else []
    for value in extremes:
        try:
            cfg = load_config(None, [f"{key}={value}"])
        except ConfigError as e:
            assert key in str(e) and len(str(e)) < MAX_ERR, (key, value, str(e))
            continue
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        lo, hi = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
        assert lo <= got <= hi, (key, value, got)  # accepted only within its bounds


# ---------------------------------------------------------------------------------------------
# 4. Huge inputs make short messages
# ---------------------------------------------------------------------------------------------

def test_a_row_with_a_million_columns_gives_a_short_error(small_model_dir, tmp_path, capsys):
    data = tmp_path / "wide.jsonl"
    data.write_text(json.dumps({f"c{i}": i for i in range(10**6)}) + "\n")
    err = assert_clean_error(["evaluate", "--model", str(small_model_dir), "--task", "gsm8k",
                              f"task.gsm8k.test={data}", "--out", str(tmp_path / "o.json")],
                             capsys, tmp_path, "field 'question' missing")
    assert "(1,000,000 in all)" in err and err.count("\n") == 1


def test_ten_thousand_bad_keys_give_a_short_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("".join(f"k{i}: {i}\n" for i in range(4000)))
    err = assert_clean_error(["config", "show", str(cfg)], capsys, tmp_path, "more errors")
    assert err.count("\n") <= 9


def test_a_huge_value_is_quoted_as_an_excerpt(tmp_path, capsys):
    err = assert_clean_error(["config", "show", "actor.beta=" + "x" * 10**6], capsys, tmp_path, "more characters")
    assert len(err) < 1000


# ---------------------------------------------------------------------------------------------
# 5. Section defaults per field
# ---------------------------------------------------------------------------------------------

def test_one_math_field_given_keeps_the_other_math_defaults(tmp_path):
    """`task.math.test=FILE` alone keeps MATH's field names ("problem", "unique_id"), as `config
    show` prints them; a MATH-500 file given this way loads."""
    from stepdapo.tasks import get_task

    data = tmp_path / "math500.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i}+1?", "solution": "x", "answer": str(i + 1),
                                        "subject": "Algebra", "level": 1, "unique_id": f"test/{i}.json"}) + "\n"
                            for i in range(3)))
    cfg = load_config(None, ["task.name=math", f"task.math.test={data}"])
    assert (cfg.task.math.question_field, cfg.task.math.id_field) == ("problem", "unique_id")
    assert cfg.task.math == load_config(None, ["task.name=math"]).task.math.model_copy(update={"test": str(data)})
    problems = get_task(cfg.task).problems("test")
    assert [p.id for p in problems] == ["test/0.json", "test/1.json", "test/2.json"]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"task": {"name": "math", "math": {"test": str(data), "id_field": None}}}))
    assert load_config(f).task.math.id_field is None  # an explicit value still wins
    assert load_config(f).task.math.question_field == "problem"
