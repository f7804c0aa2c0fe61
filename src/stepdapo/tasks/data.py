"""Reading task data: rows of .jsonl (.jsonl.gz) / .json / .parquet files or Hugging Face datasets,
each with a `where` (file and line, or row) that error messages name.

Whatever a file holds (binary junk, another encoding, a truncated or corrupt gzip or parquet file,
JSON nested too deep or with a 5000-digit number), reading it gives rows or a `DataError` naming the
file, and the line where there is one; a directory is read as a saved Hugging Face dataset or is a
`DataError` naming it. tests/tasks/test_data_fuzz.py holds this to account."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stepdapo.errors import DataError, StepdapoError, listing
from stepdapo.paths import open_input

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


class DataFileNotFound(DataError, FileNotFoundError):
    """A data file that does not exist (also a FileNotFoundError, which callers caught before)."""


def _looks_like_path(source: str) -> bool:
    if Path(source).expanduser().exists():
        return True
    # A file suffix (".jsonl", ".csv"; not a version such as "-v1.5"), an explicit directory, or
    # more than one "/": hub names are `name` or `owner/name`, with an optional `:config`.
    if re.search(r"\.[A-Za-z][A-Za-z0-9]{0,7}$", source):
        return True
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # also: nested too deep, an int over 4300 digits
        raise DataError(f"{where}: bad JSON: {e}") from None


def _not_utf8(where: str, data: bytes, start: int) -> DataError:
    """The error for `data` (a line or a whole file) with a byte that is not UTF-8 at `start`."""
    column = start - data.rfind(b"\n", 0, start)
    return DataError(f"{where}: not UTF-8 text (byte {data[start]:#04x} at column {column}); "
                     f"convert the file to UTF-8")


def _open(path: Path):
    """The data file opened for reading if it is a regular file (a FIFO would block the reader
    forever, a device never ends), else a DataError naming it."""
    try:
        return open_input(path, "data file")
    except StepdapoError as e:
        raise DataError(str(e)) from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    gz = path.name.lower().endswith(".gz")
    try:
        with _open(path) as raw_file, (gzip.GzipFile(fileobj=raw_file) if gz else raw_file) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte order mark
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _not_utf8(where, raw, e.start) from None
                if line.strip():
                    yield where, _loads(line, where)
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # unreadable; a corrupt or truncated gzip file
        raise DataError(f"{path}: cannot read: {e}") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with _open(path) as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        raise _not_utf8(f"{path}:{line}", data, start) from None
    try:
        rows = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: bad JSON: nested too deeply") from None
    except ValueError:
        # Not one JSON document: JSON lines in a .json file (as `datasets` accepts them)?
        yield from _read_jsonl(path)
        return
    if isinstance(rows, dict):
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or an object holding one list), "
                            f"got an object with keys {listing(sorted(rows))}")
        rows = lists[0]
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a list of rows, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{path}: item {i}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    with _open(path) as f:  # a regular file, opened once: pyarrow would block on a FIFO
        try:
            rows = pq.read_table(f).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: cannot read parquet: {e}") from e
    for i, row in enumerate(rows):
        yield f"{path}: row {i}", row


def _read_hub(source: str, hf_split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    name, _, config = source.partition(":")
    ds = datasets.load_dataset(name, config or None, split=hf_split)
    for i, row in enumerate(ds):
        yield f"{source} (split {hf_split!r}): row {i}", row


def _read_dataset_dir(path: Path, hf_split: str) -> Iterator[tuple[str, Any]]:
    try:
        rows = list(_read_hub(str(path), hf_split))
    except Exception as e:  # noqa: BLE001 - whatever `datasets` raises, the user's answer is this
        raise DataError(f"{path}: a directory, and `datasets.load_dataset` cannot read it as a "
                        f"dataset ({type(e).__name__}: {str(e)[:200]}); give a "
                        f"{' / '.join(FILE_SUFFIXES)} file instead") from e
    yield from rows


def read_rows(source: str, hf_split: str = "train") -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a .jsonl / .json / .parquet file or a hub dataset; `where`
    names the file and line (or row index) for error messages."""
    if not _looks_like_path(source):
        return _read_hub(source, hf_split)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataFileNotFound(f"data file not found: {source}")
    suffix = path.suffix.lower()
    if path.is_dir():
        if path.name.lower().endswith(FILE_SUFFIXES):
            raise DataError(f"{source}: a directory, not a {suffix} file")
        return _read_dataset_dir(path, hf_split)  # a dataset saved for `datasets.load_dataset`
    if suffix == ".jsonl" or path.name.lower().endswith(".jsonl.gz"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{source}: unsupported file type {suffix or '(none)'!r}; "
                    f"use one of {', '.join(FILE_SUFFIXES)} or a Hugging Face dataset name")
