"""Bad data files: every input gives the rows it holds or a clean StepdapoError (the CLI prints its
message and exits 2) naming the file, and the line (or item, or row) and the field where there is
one; never another exception, never junk taken for rows. A table of hand-made inputs, each with the
exact outcome of each loader, then generated ones (hypothesis, derandomized: the same examples on
every run), each checked against a reference reading of the bytes written here."""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import zlib
from typing import NamedTuple

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


def load(loader: str, path) -> list | str:
    """The loader's outcome on `path`: what it read, or the StepdapoError's message; any other
    exception propagates (and fails the test)."""
    try:
        return LOADERS[loader](str(path))
    except StepdapoError as e:
        return str(e)


def _parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


GOOD_ROW = {"problem": "1+1?", "question": "1+1?", "answer": "2", "id": "a", "text": "Add.",
            "test_list": ["assert add(1, 1) == 2"]}
GOOD = json.dumps(GOOD_ROW).encode()
PARQUET = _parquet([GOOD_ROW, {**GOOD_ROW, "id": "b"}])
JUNK = random.Random(0).randbytes(4096)


def _utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False

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


class Err(NamedTuple):
    """A DataError whose message starts with the file's path, then `at` (the line ":2", the item
    ": item 0", nothing for the whole file), then ": " and `text` (PATH in it: the file's path)."""

    at: str
    text: str


def same(outcome) -> dict:
    return dict.fromkeys(LOADERS, outcome)


def problems_of(rows: list[tuple[str, dict]], stem: str = "x") -> dict:
    """What each loader reads from valid `rows` ((line or item, row) pairs): `rows` as (where,
    row), the code task's (id, question, gold, tests) (MBPP-style rows), the math tasks'
    (id, question, gold)."""
    code = [(r.get("task_id") or f"{stem}/{i}",
             f"{r['text']}\n\nYour code should pass these tests:\n\n" + "\n".join(r["test_list"]),
             "", "\n".join(r["test_list"])) for i, (_, r) in enumerate(rows)]
    return {"rows": rows, "code": code,
            "math": [(f"test-{i}", r["problem"], r["answer"]) for i, (_, r) in enumerate(rows)],
            "gsm8k": [(r["id"], r["question"], r["answer"]) for _, r in rows]}


NO_ROWS = {"rows": [], **dict.fromkeys(("code", "math", "gsm8k"), Err("", "no rows"))}
MISSING_QUESTION = {"math": Err(":1", "field 'problem' missing"),
                    "gsm8k": Err(":1", "field 'question' missing")}
HUGE_ROW = {**GOOD_ROW, "question": "x" * 5_000_000}


def row_of(name: str) -> dict:
    return json.loads(BAD_FILES[name][1])


# name -> loader -> its outcome: the rows it reads (see `problems_of`) or the error (`Err`)
EXPECTED = {
    "empty-jsonl": NO_ROWS, "empty-json": NO_ROWS, "empty-gz": NO_ROWS, "blank-lines": NO_ROWS,
    "empty-parquet": same(Err("", "cannot read parquet")),
    "bom-then-row": problems_of([(":1", GOOD_ROW)]),
    "bom-json": problems_of([(": item 0", GOOD_ROW)]),
    # the rows before the bad line are read; the bad line is named, with the byte and its column
    "latin-1-jsonl": same(Err(":2", "not UTF-8 text (byte 0xe9 at column 18)")),
    "latin-1-json": same(Err(":3", "not UTF-8 text (byte 0xe9 at column 18)")),
    "utf-16": same(Err(":1", "not UTF-8 text (byte 0xff at column 1)")),
    "binary-jsonl": same(Err(":1", "not UTF-8 text (byte 0xcd at column 1)")),
    "binary-json": same(Err(":1", "not UTF-8 text (byte 0xcd at column 1)")),
    "binary-gz": same(Err("", "cannot read")),
    "binary-parquet": same(Err("", "cannot read parquet")),
    "gzip-of-latin-1": same(Err(":1", "not UTF-8 text (byte 0xe9 at column 8)")),
    "gzip-truncated": same(Err("", "cannot read")),
    "gzip-corrupt": same(Err("", "cannot read")),
    "plain-text-as-gz": same(Err("", "cannot read")),
    "parquet-truncated": same(Err("", "cannot read parquet")),
    "parquet-magic-only": same(Err("", "cannot read parquet")),
    # which error depends on the bytes the installed pyarrow writes: its first line is UTF-8 or not
    "parquet-as-jsonl": same(Err(":1", "bad JSON" if _utf8(PARQUET.split(b"\n")[0]) else "not UTF-8")),
    "csv-as-jsonl": same(Err(":1", "bad JSON")),
    "csv-as-json": same(Err(":1", "bad JSON")),  # not one JSON document: read as JSON lines
    "csv": same(Err("", "unsupported file type '.csv'")),
    "truncated-json-row": same(Err(":1", "bad JSON")),
    "truncated-json-doc": same(Err(":1", "bad JSON")),
    "nested-too-deep-jsonl": same(Err(":1", "bad JSON")),
    "nested-too-deep-json": same(Err("", "bad JSON: nested too deeply")),
    "int-of-5000-digits": same(Err(":1", "bad JSON")),
    "huge-line": problems_of([(":1", HUGE_ROW)]),
    "huge-garbage-line": same(Err(":1", "bad JSON")),
    "json-scalar": same(Err("", "expected a list of rows, got int")),
    "json-object-two-lists": same(Err("", "expected a list of rows (or an object holding one list), "
                                          "got an object with keys a, b")),
    "rows-not-objects": {"rows": [(":1", [1, 2]), (":2", "text"), (":3", None)],
                         "code": Err(":1", "expected an object, got list"),
                         "math": Err(":1", "expected a JSON object, got list"),
                         "gsm8k": Err(":1", "expected a JSON object, got list")},
    "wrong-types": {"rows": [(":1", row_of("wrong-types"))],
                    "code": Err(":1", "field 'text' must be str, got int"),
                    "math": Err(":1", "field 'problem' not a non-empty string ([])"),
                    "gsm8k": Err(":1", "field 'question' not a non-empty string (1)")},
    # a list is not a gold answer (str(["2"]) would be one no completion matches)
    "answer-a-list": {"rows": [(":1", row_of("answer-a-list"))],
                      "code": Err(":1", "field 'test_list' must be a list of strings, got str"),
                      "math": Err(":1", "field 'answer'"), "gsm8k": Err(":1", "field 'answer'")},
    "tests-not-python": {"rows": [(":1", row_of("tests-not-python"))], **MISSING_QUESTION,
                         "code": Err(":1", "field 'test_list' is not valid Python: SyntaxError")},
    "tests-with-nul": {"rows": [(":1", row_of("tests-with-nul"))], **MISSING_QUESTION,
                       "code": Err(":1", "field 'test_list' is not valid Python: SyntaxError")},
    "tests-nested-too-deep": {"rows": [(":1", row_of("tests-nested-too-deep"))], **MISSING_QUESTION,
                              "code": Err(":1", "field 'test_list' is not valid Python: SyntaxError")},
    "entry-point-int": {"rows": [(":1", row_of("entry-point-int"))], **MISSING_QUESTION,
                        "code": Err(":1", "field 'entry_point' must be str, got int")},
    # any JSON value is an id: str() of it ("{'a': 1}") is stable and names the row
    "task-id-object": {"rows": [(":1", row_of("task-id-object"))], **MISSING_QUESTION,
                       "code": [("{'a': 1}", "t\n\nYour code should pass these tests:\n\nassert 1", "",
                                 "assert 1")]},
    # only gsm8k has an id field here (math and code number the rows)
    "duplicate-ids": {**problems_of([(":1", GOOD_ROW), (":2", GOOD_ROW)]),
                      "gsm8k": Err(":2", "duplicate id 'a' (first at PATH:1)")},
    "nan-and-infinity": {"rows": [(":1", row_of("nan-and-infinity"))],
                         "code": Err(":1", "missing field 'text' or 'prompt' (the problem statement)"),
                         "math": Err(":1", "field 'problem' not a non-empty string (-inf)"),
                         "gsm8k": Err(":1", "field 'question' not a non-empty string (nan)")},
}
# Outcomes the loaders get wrong today (strict xfail: fixing one makes its test pass, and fail here)
KNOWN_WRONG: dict[tuple[str, str], str] = {}


def read_back(loader: str, outcome: list) -> str:
    """What a loader read, in the terms of EXPECTED, as its repr (so that NaN equals NaN)."""
    if loader == "rows":
        return repr(outcome)
    return repr([(p.id, p.question, p.answer) + ((p.meta["tests"],) if loader == "code" else ())
                 for p in outcome])


def test_the_table_covers_every_file():
    assert sorted(EXPECTED) == sorted(BAD_FILES)
    assert all(sorted(e) == sorted(LOADERS) for e in EXPECTED.values())


@pytest.mark.parametrize("name,loader", [
    pytest.param(name, loader, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[name, loader])]
                 if (name, loader) in KNOWN_WRONG else [])
    for name in sorted(BAD_FILES) for loader in LOADERS])
def test_each_file_gives_its_rows_or_an_error_naming_where(tmp_path, name, loader):
    file_name, data = BAD_FILES[name]
    path = tmp_path / file_name
    path.write_bytes(data)
    got, want = load(loader, path), EXPECTED[name][loader]
    if isinstance(want, Err):
        start = f"{path}{want.at}: {want.text.replace('PATH', str(path))}"
        assert isinstance(got, str) and got.startswith(start), \
            f"{loader} on {name}: expected an error starting {start!r}, got {str(got)[:300]!r}"
    else:
        if loader == "rows":
            want = [(f"{path}{at}", row) for at, row in want]
        assert not isinstance(got, str), f"{loader} on {name}: expected rows, got the error {got[:300]!r}"
        assert read_back(loader, got) == repr(want), f"{loader} on {name}: read {read_back(loader, got)[:300]}"


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

def _reference_lines(where: str, data: bytes, gz: bool) -> tuple[list, str | None]:
    """JSON lines: each non-blank line (split at b"\\n", a UTF-8 byte order mark dropped from the
    first) is one JSON value."""
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            # damaged: read as a stream, a bad line before the damage may be named first
            return [], rf"{re.escape(where)}(: cannot read: |:\d+: (bad JSON|not UTF-8 text))"
    rows = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return rows, re.escape(f"{where}:{n}: not UTF-8 text")
        if line.strip():
            try:
                rows.append((f"{where}:{n}", json.loads(line)))
            except (ValueError, RecursionError):
                return rows, re.escape(f"{where}:{n}: bad JSON: ")
    return rows, None


def reference_rows(path, data: bytes) -> tuple[list, str | None]:
    """What `read_rows` must give for `data` written at `path`, worked out here from the bytes:
    the (where, row) pairs it yields, and None, or a regex that its error must match (the rows are
    then those read before the error)."""
    where, name = str(path), path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _reference_lines(where, data, name.endswith(".gz"))
    if name.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception:  # noqa: BLE001 - whatever pyarrow refuses
            return [], re.escape(f"{where}: cannot read parquet: ")
        return [(f"{where}: row {i}", row) for i, row in enumerate(table)], None
    if name.endswith(".json"):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            start = e.start + 3 * data.startswith(b"\xef\xbb\xbf")
            line = data.count(b"\n", 0, start) + 1
            return [], re.escape(f"{where}:{line}: not UTF-8 text")
        try:
            doc = json.loads(text)
        except RecursionError:
            return [], re.escape(f"{where}: bad JSON: nested too deeply")
        except ValueError:  # not one document: JSON lines
            return _reference_lines(where, data, False)
        if isinstance(doc, dict):
            lists = [v for v in doc.values() if isinstance(v, list)]
            if len(lists) != 1:
                return [], re.escape(f"{where}: expected a list of rows (or an object holding one list)")
            doc = lists[0]
        if not isinstance(doc, list):
            return [], re.escape(f"{where}: expected a list of rows, got {type(doc).__name__}")
        return [(f"{where}: item {i}", row) for i, row in enumerate(doc)], None
    return [], re.escape(f"{where}: unsupported file type")


# A task's error on one row: its place, then what is wrong with it (naming the field where one is)
ROW_ERROR = (r"(expected (a JSON |an )object, got |field '[\w]+' |missing field '|"
             r"no gold answer: field '|duplicate (task_)?id )")


def check_against_the_reference(path, data: bytes) -> None:
    """`read_rows` gives exactly the reference's rows or its error; each task gives a problem per
    row, built from the row's fields, or an error naming the row and what is wrong with it, or
    `read_rows`' error, or "no rows" for none."""
    rows, error = reference_rows(path, data)
    got = load("rows", path)
    if error is None:
        assert not isinstance(got, str), f"read_rows: expected {len(rows)} rows, got the error {got!r:.300}"
        assert repr(got) == repr(rows), f"read_rows read {got!r:.300}, not {rows!r:.300}"
    else:
        assert isinstance(got, str) and re.match(error, got), \
            f"read_rows: expected an error matching {error!r}, got {got!r:.300}"
    for loader in ("code", "math", "gsm8k"):
        out = load(loader, path)
        if isinstance(out, str):
            if error is not None and re.match(error, out):
                continue  # the file's error, after its rows were read
            if error is None and not rows:
                assert out == f"{path}: no rows", (loader, out)
                continue
            assert any(re.match(re.escape(w) + ": " + ROW_ERROR, out) for w, _ in rows), \
                f"{loader}: {out!r:.300} names none of the rows read, or not what is wrong"
            continue
        assert error is None, f"{loader} read {len(out)} problems from a file read_rows refuses ({error!r})"
        assert len(out) == len(rows), (loader, len(out), len(rows))
        for p, (_, row) in zip(out, rows):
            assert p.answer.strip() or loader == "code", (loader, p)
            if loader == "math":
                assert p.question == row["problem"], (loader, p, row)
            elif loader == "gsm8k":
                assert (p.id, p.question) == (str(row["id"]), row["question"]), (loader, p, row)
            elif isinstance(row.get("text") or row.get("prompt"), str):
                assert (row.get("text") or row.get("prompt")) in p.question, (loader, p, row)


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
    check_against_the_reference(path, data)


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
    check_against_the_reference(path, data)
