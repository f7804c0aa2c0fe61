"""Artifacts on disk, the file layer: atomic writes of text, JSON and parquet files, and checked
reads of parquet files. A killed process never leaves a half-written file under a final name.

Fingerprints, resume, the split across processes and publishing a stage are `stepdapo.runner`'s.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stepdapo.errors import ArtifactError

__all__ = ["ArtifactError", "atomic_write_text", "write_json", "read_json", "write_parquet", "check_parquet",
           "read_parquet"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and an atomic rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # A unique name: two processes may write the same small file (a retried run, a second rank).
    # os.open with mode 0o666 lets the kernel apply the process umask, so we never read or set it.
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if p.exists() and not p.is_file():  # a FIFO would block the reader
        raise ArtifactError(f"{p}: not a regular file; expected a JSON file stepdapo wrote")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p}: corrupt JSON at line {e.lineno}: {e.msg}") from None


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    """Write `table` to `path` atomically. Each parquet file has one writer (a shard belongs to
    one process), so the temporary name is fixed and a rerun overwrites what a killed run left."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, p)


def check_parquet(path: str | os.PathLike, schema: pa.Schema | None = None) -> tuple[int, dict]:
    """(row count, key-value metadata) of a parquet file, from its footer only; a corrupt file or
    a schema other than `schema` is an ArtifactError naming the file."""
    p = Path(path)
    if p.exists() and not p.is_file():  # a FIFO would block the reader, a device never end
        raise ArtifactError(f"{p}: not a regular file; a stage's shard is a parquet file")
    try:
        meta = pq.read_metadata(p)
        found = pq.read_schema(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ArtifactError(f"{p}: corrupt parquet shard ({e}); delete it to recompute it") from None
    if schema is not None and not found.remove_metadata().equals(schema):
        raise ArtifactError(f"{p}: schema mismatch: expected {schema.names}, found {found.names} "
                            f"(written by another version?); delete it to recompute it")
    return meta.num_rows, {k.decode(): v.decode() for k, v in (found.metadata or {}).items()}


def read_parquet(path: str | os.PathLike, schema: pa.Schema | None = None) -> pa.Table:
    """A whole parquet file, checked like `check_parquet`; its key-value metadata is dropped, so
    tables of several files concatenate."""
    check_parquet(path, schema)
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: corrupt parquet shard ({e}); delete it to recompute it") from None
    return table.replace_schema_metadata(None)
