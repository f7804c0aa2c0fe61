"""Reading task data: rows of .jsonl (.jsonl.gz) / .json / .parquet files or Hugging Face datasets,
each with a `where` (file and line, or row) that error messages name."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stepdapo.errors import DataError

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


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: bad JSON: {e}") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        # Not one JSON document: JSON lines in a .json file (as `datasets` accepts them)?
        yield from _read_jsonl(path)
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or an object holding one list), "
                            f"got an object with keys {sorted(data)[:10]}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}: item {i}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
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


def read_rows(source: str, hf_split: str = "train") -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a .jsonl / .json / .parquet file or a hub dataset; `where`
    names the file and line (or row index) for error messages."""
    if not _looks_like_path(source):
        return _read_hub(source, hf_split)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataFileNotFound(f"data file not found: {source}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or path.name.lower().endswith(".jsonl.gz"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    if path.is_dir():  # a dataset saved for `datasets.load_dataset(<dir>)`
        return _read_hub(str(path), hf_split)
    raise DataError(f"{source}: unsupported file type {suffix or '(none)'!r}; "
                    f"use one of {', '.join(FILE_SUFFIXES)} or a Hugging Face dataset name")
