"""Bad data files: every input gives rows or a clean StepdapoError (the CLI prints its message and
exits 2), never another exception. A table of hand-made bad inputs, then generated ones
(hypothesis, derandomized: the same examples on every run)."""

from __future__ import annotations

import gzip
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stepdapo.config import CodeConfig, MathConfig
from stepdapo.errors import DataError, StepdapoError
from stepdapo.tasks.code import CodeTask
from stepdapo.tasks.data import read_rows
from stepdapo.tasks.math import MathTask

LOADERS = {
    "rows": lambda path: list(read_rows(path)),
    "code": lambda path: CodeTask(CodeConfig(test=path)).problems("test"),
    "math": lambda path: MathTask(MathConfig(test=path, question_field="problem")).problems("test"),
    "gsm8k": lambda path: MathTask(MathConfig(test=path, id_field="id"),
                                   name="gsm8k").problems("test"),
}


def load_all(path) -> dict[str, str]:
    """Each loader's outcome on `path`: "rows" or the StepdapoError's message; any other
    exception propagates (and fails the test)."""
    out = {}
    for name, load in LOADERS.items():
        try:
            load(str(path))
            out[name] = "rows"
        except StepdapoError as e:
            out[name] = str(e)
    return out


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


GOOD_ROW = {"problem": "1+1?", "question": "1+1?", "answer": "2", "id": "a", "text": "Add.",
            "test_list": ["assert add(1, 1) == 2"]}
GOOD = json.dumps(GOOD_ROW).encode()
PARQUET = _parquet([GOOD_ROW, {**GOOD_ROW, "id": "b"}])
JUNK = random.Random(0).randbytes(4096)

# name -> (file name, bytes)
BAD_FILES = {
    "empty-jsonl": ("x.jsonl", b""),
    "empty-json": ("x.json", b""),
    "empty-gz": ("x.jsonl.gz", b""),
    "empty-parquet": ("x.parquet", b""),
    "blank-lines": ("x.jsonl", b"\n \n\t\n"),
    "bom-then-row": ("x.jsonl", b"\xef\xbb\xbf" + GOOD + b"\n"),
    "bom-json": ("x.json", b"\xef\xbb\xbf[" + GOOD + b"]"),
    "latin-1-jsonl": ("x.jsonl", GOOD + b"\n" + '{"question": "café", "answer": "1"}'.encode("latin-1")),
    "latin-1-json": ("x.json", b"[\n" + GOOD + b",\n" + '{"question": "café"}]'.encode("latin-1")),
    "utf-16": ("x.jsonl", (json.dumps(GOOD_ROW) + "\n").encode("utf-16")),
    "binary-jsonl": ("x.jsonl", JUNK),
    "binary-json": ("x.json", JUNK),
    "binary-gz": ("x.jsonl.gz", JUNK),
    "binary-parquet": ("x.parquet", JUNK),
    "gzip-of-latin-1": ("x.jsonl.gz", gzip.compress("{\"q\": \"é\"}\n".encode("latin-1"))),
    "gzip-truncated": ("x.jsonl.gz", gzip.compress((GOOD + b"\n") * 50)[:60]),
    "gzip-corrupt": ("x.jsonl.gz", gzip.compress(GOOD + b"\n")[:20] + b"\x00" * 40),
    "plain-text-as-gz": ("x.jsonl.gz", GOOD + b"\n"),
    "parquet-truncated": ("x.parquet", PARQUET[: len(PARQUET) // 2]),
    "parquet-magic-only": ("x.parquet", b"PAR1"),
    "parquet-as-jsonl": ("x.jsonl", PARQUET),
    "csv-as-jsonl": ("x.jsonl", b"question,answer\n1+1?,2\n"),
    "csv-as-json": ("x.json", b"question,answer\n1+1?,2\n"),
    "csv": ("x.csv", b"question,answer\n1+1?,2\n"),
    "truncated-json-row": ("x.jsonl", GOOD[:-5]),
    "truncated-json-doc": ("x.json", b"[" + GOOD + b", " + GOOD[:10]),
    "nested-too-deep-jsonl": ("x.jsonl", b"[" * 100_000),
    "nested-too-deep-json": ("x.json", b"[" * 100_000 + b"]" * 100_000),
    "int-of-5000-digits": ("x.jsonl", b'{"question": "q", "answer": ' + b"9" * 5000 + b"}"),
    "huge-line": ("x.jsonl", json.dumps({**GOOD_ROW, "question": "x" * 5_000_000}).encode()),
    "huge-garbage-line": ("x.jsonl", b"x" * 5_000_000),
    "json-scalar": ("x.json", b"42"),
    "json-object-two-lists": ("x.json", b'{"a": [], "b": []}'),
    "rows-not-objects": ("x.jsonl", b'[1, 2]\n"text"\nnull\n'),
    "wrong-types": ("x.jsonl", b'{"question": 1, "problem": [], "answer": {"a": 1}, "id": null, '
                               b'"text": 5, "test_list": [1, 2]}'),
    "answer-a-list": ("x.jsonl", b'{"question": "q", "problem": "q", "answer": ["2"], "id": 1, '
                                 b'"text": "t", "test_list": "assert True"}'),
    "tests-not-python": ("x.jsonl", b'{"text": "t", "test_list": ["assert f(1) ==="]}'),
    "tests-with-nul": ("x.jsonl", b'{"text": "t", "test_list": ["assert f(1)\\u0000"]}'),
    "tests-nested-too-deep": ("x.jsonl", json.dumps(
        {"text": "t", "test_list": ["x = " + "(" * 5000 + ")" * 5000]}).encode()),
    "entry-point-int": ("x.jsonl", b'{"prompt": "def f():\\n", "entry_point": 3, "test": "x"}'),
    "task-id-object": ("x.jsonl", b'{"text": "t", "test_list": ["assert 1"], "task_id": {"a": 1}}'),
    "duplicate-ids": ("x.jsonl", GOOD + b"\n" + GOOD + b"\n"),
    "nan-and-infinity": ("x.jsonl", b'{"question": NaN, "answer": Infinity, "problem": -Infinity}'),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_gives_rows_or_a_clean_error(tmp_path, name):
    file_name, data = BAD_FILES[name]
    path = tmp_path / file_name
    path.write_bytes(data)
    outcomes = load_all(path)
    for loader, outcome in outcomes.items():
        # A clean error names the file.
        assert outcome == "rows" or str(path) in outcome, (loader, outcome)


def test_not_utf8_names_the_file_and_line(tmp_path):
    for name, line, column in (("latin-1-jsonl", 2, 18), ("latin-1-json", 3, 18)):
        file_name, data = BAD_FILES[name]
        path = tmp_path / file_name
        path.write_bytes(data)
        with pytest.raises(DataError, match=rf"{path}:{line}: not UTF-8 text \(byte 0xe9 at "
                                            rf"column {column}\)"):
            list(read_rows(str(path)))
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(BAD_FILES["gzip-of-latin-1"][1])
    with pytest.raises(DataError, match=rf"{path}:1: not UTF-8"):
        list(read_rows(str(path)))


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    for name in ("bom-then-row", "bom-json"):
        file_name, data = BAD_FILES[name]
        (tmp_path / file_name).write_bytes(data)
        assert [row for _, row in read_rows(str(tmp_path / file_name))] == [GOOD_ROW]


def test_a_directory_is_a_clean_error_naming_it(tmp_path):
    named = tmp_path / "train.jsonl"
    named.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, what in ((named, "a directory, not a .jsonl file"),
                       (empty, "a directory, and `datasets.load_dataset` cannot read it")):
        with pytest.raises(DataError, match=rf"{path}: {what}"):
            list(read_rows(str(path)))
        with pytest.raises(DataError, match=rf"{path}: a directory"):
            MathTask(MathConfig(test=str(path))).problems("test")
    with pytest.raises(DataError, match=rf"{named} is a directory"):
        CodeTask(CodeConfig(test=str(named))).problems("test")


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    for name, match in (("gzip-truncated", "cannot read"), ("gzip-corrupt", "cannot read"),
                        ("parquet-truncated", "cannot read parquet"),
                        ("nested-too-deep-jsonl", ":1: bad JSON"),
                        ("int-of-5000-digits", ":1: bad JSON")):
        file_name, data = BAD_FILES[name]
        path = tmp_path / file_name
        path.write_bytes(data)
        with pytest.raises(DataError, match=f"{path}{match}" if match[0] == ":" else
                           f"{path}: {match}"):
            list(read_rows(str(path)))


def test_tests_that_are_not_python_are_a_data_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "t", "test_list": ["assert True"]}\n' + BAD_FILES["tests-not-python"][1])
    with pytest.raises(DataError, match=rf"{path}:2: field 'test_list' is not valid Python: "
                                        r"SyntaxError"):
        CodeTask(CodeConfig(test=str(path))).problems("test")


# -- generated inputs ---------------------------------------------------------------------------

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=120,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELDS = ["question", "answer", "problem", "solution", "id", "text", "prompt", "test",
          "test_list", "entry_point", "task_id", "code", "canonical_solution", "test_setup_code",
          "test_imports", "unique_id"]
SNIPPETS = ["assert f(1) == 2", "def check(candidate):\n    assert candidate(1) == 2\n",
            "def f(x):\n", "f", "\\boxed{1}", "#### 1,234", "def (", "x\x00", "\\boxed{", ""]
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.sampled_from(SNIPPETS))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
rows = st.dictionaries(st.sampled_from(FIELDS), values, max_size=7) | values
lines = (rows.map(json.dumps) | st.text(max_size=40)
         | st.sampled_from(['{"question": ', "[", "{}", "null", '"x"', "\ufeff{}", ",", "}"]))
texts = st.one_of(
    st.lists(lines, max_size=6).map("\n".join),  # JSON lines, some broken
    st.lists(rows, max_size=5).map(json.dumps),  # one JSON document
    st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=4), max_size=5).map(
        lambda rs: "\n".join(",".join(r) for r in rs)),  # CSV-like
)
encoded = st.one_of(texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
                    texts.map(lambda t: t.encode("utf-16")),
                    texts.map(lambda t: t.encode("latin-1", "replace")),
                    st.binary(max_size=300))


@FUZZ
@given(data=encoded, suffix=st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".parquet", ".csv"]),
       gz=st.booleans(), cut=st.none() | st.floats(0, 1))
def test_generated_files_give_rows_or_a_clean_error(tmp_path, data, suffix, gz, cut):
    if suffix == ".jsonl.gz" and gz:
        data = gzip.compress(data)
    if cut is not None:
        data = data[:int(len(data) * cut)]  # truncated
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    load_all(path)


parquet_values = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats()
                  | st.text(max_size=20) | st.sampled_from(SNIPPETS)
                  | st.lists(st.text(max_size=10) | st.sampled_from(SNIPPETS), max_size=3))


@FUZZ
@given(table=st.lists(st.dictionaries(st.sampled_from(FIELDS), parquet_values, max_size=7),
                      max_size=4),
       damage=st.none() | st.tuples(st.floats(0, 1), st.booleans()))
def test_generated_parquet_gives_rows_or_a_clean_error(tmp_path, table, damage):
    try:
        data = _parquet(table)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        assume(False)  # no such table: the columns' types differ between rows
    if damage is not None:  # truncated, or one byte flipped
        at, flip = int(len(data) * damage[0]), damage[1]
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:] if flip and at < len(data) \
            else data[:at]
    path = tmp_path / "fuzz.parquet"
    path.write_bytes(data)
    load_all(path)
