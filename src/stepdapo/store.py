"""Artifacts on disk: atomic writes, so that a killed run never leaves a half-written file that a
later run would read as complete."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


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


def finished_summary(path: str | os.PathLike, fingerprint: Any, what: str) -> dict | None:
    """The summary of a finished single-artifact stage (critic, actor, DPO) if `path` exists and
    was made with `fingerprint`; None if it does not exist; an error if it was made otherwise."""
    p = Path(path)
    if not p.is_file():
        return None
    summary = read_json(p)
    if summary.get("fingerprint") != fingerprint:
        raise ValueError(f"{p}: this {what} was trained with different settings or inputs; "
                         f"use a new output directory or delete {p.parent}")
    return summary


def read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: corrupt JSON at line {e.lineno}: {e.msg}") from None


# ------------------------------------------------------------------------------------------------
# Sharded parquet stages
# ------------------------------------------------------------------------------------------------

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """A missing, corrupt or mismatched artifact; the message names the file."""


class ShardedStage:
    """A stage's output directory: parquet shards written atomically, then a manifest.

    - A shard file exists only once it is complete (written to a temporary name, then renamed), so
      a killed run leaves either a whole shard or none, and a rerun redoes only missing shards.
    - `fingerprint` (the settings and inputs that determine the output) is recorded when the stage
      starts; resuming with different settings is an error instead of a silent mix.
    - The stage is complete only when `manifest.json` lists every shard with its row count; readers
      check that list, so a half-written stage is never read as complete.
    """

    def __init__(self, directory: str | os.PathLike, name: str, schema: pa.Schema, fingerprint: dict):
        self.dir = Path(directory)
        self.name = name
        self.schema = schema
        self.fingerprint = fingerprint

    # -- state -----------------------------------------------------------------------------------
    def is_complete(self) -> bool:
        m = self.dir / MANIFEST
        if not m.is_file():
            return False
        manifest = read_json(m)
        if manifest.get("fingerprint") != self.fingerprint:
            raise ArtifactError(f"{m}: this {self.name} stage was produced with different settings "
                                f"or inputs; use a new output directory or delete {self.dir}")
        return bool(manifest.get("complete"))

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        started = self.dir / "started.json"
        if started.is_file():
            if read_json(started).get("fingerprint") != self.fingerprint:
                raise ArtifactError(f"{started}: an interrupted {self.name} stage with different "
                                    f"settings or inputs is here; use a new directory or delete {self.dir}")
        else:
            write_json(started, {"stage": self.name, "fingerprint": self.fingerprint})

    def shard_path(self, index: int) -> Path:
        return self.dir / f"shard-{index:05d}.parquet"

    def has_shard(self, index: int) -> bool:
        p = self.shard_path(index)
        if not p.is_file():
            return False
        self._check_file(p)
        return True

    def _check_file(self, p: Path) -> int:
        try:
            meta = pq.read_metadata(p)
            schema = pq.read_schema(p)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise ArtifactError(f"{p}: corrupt parquet shard ({e}); delete it to recompute it") from None
        if not schema.remove_metadata().equals(self.schema):
            raise ArtifactError(f"{p}: schema mismatch: expected {self.schema.names}, found {schema.names}"
                                f" (written by another version?); delete {self.dir} to recompute")
        return meta.num_rows

    # -- writing ---------------------------------------------------------------------------------
    def write_shard(self, index: int, rows: dict[str, list]) -> None:
        table = pa.table(rows, schema=self.schema)
        p = self.shard_path(index)
        tmp = p.with_name(f".{p.name}.tmp")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def finish(self, n_shards: int, summary: dict) -> None:
        shards = []
        for i in range(n_shards):
            p = self.shard_path(i)
            if not p.is_file():
                raise ArtifactError(f"{p}: missing shard; cannot finish the {self.name} stage")
            shards.append({"file": p.name, "rows": self._check_file(p)})
        write_json(self.dir / "summary.json", summary)
        write_json(self.dir / MANIFEST, {"stage": self.name, "complete": True, "fingerprint": self.fingerprint,
                                         "schema": self.schema.names, "shards": shards})

    # -- reading ---------------------------------------------------------------------------------
    def read_shards(self, n_shards: int) -> pa.Table:
        """All shards of a stage whose manifest is not written yet (checked one by one)."""
        tables = []
        for i in range(n_shards):
            p = self.shard_path(i)
            if not p.is_file():
                raise ArtifactError(f"{p}: missing shard")
            self._check_file(p)
            tables.append(pq.read_table(p))
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def read(self) -> pa.Table:
        return read_stage(self.dir, self.name, self.schema)


def read_stage(directory: str | os.PathLike, name: str, schema: pa.Schema | None = None) -> pa.Table:
    """Read a complete stage; every problem is an ArtifactError naming the file."""
    d = Path(directory)
    m = d / MANIFEST
    if not m.is_file():
        raise ArtifactError(f"{m}: missing: the {name} stage in {d} is not complete (rerun it)")
    manifest = read_json(m)
    if not manifest.get("complete") or manifest.get("stage") != name:
        raise ArtifactError(f"{m}: not a complete {name} stage")
    tables = []
    for s in manifest["shards"]:
        p = d / s["file"]
        if not p.is_file():
            raise ArtifactError(f"{p}: missing shard listed in {m}")
        try:
            t = pq.read_table(p)
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{p}: corrupt parquet shard ({e})") from None
        if t.num_rows != s["rows"]:
            raise ArtifactError(f"{p}: has {t.num_rows} rows, manifest says {s['rows']}")
        if schema is not None and not t.schema.remove_metadata().equals(schema):
            raise ArtifactError(f"{p}: schema mismatch: expected {schema.names}, found {t.schema.names}")
        tables.append(t)
    if not tables:
        return (schema or pa.schema([])).empty_table()
    return pa.concat_tables(tables)


def stage_fingerprint(directory: str | os.PathLike, name: str) -> dict:
    """The fingerprint of a complete upstream stage (an error naming the file if it is not)."""
    m = Path(directory) / MANIFEST
    if not m.is_file():
        raise ArtifactError(f"{m}: missing: the {name} stage in {directory} is not complete (run it first)")
    return read_json(m)["fingerprint"]
