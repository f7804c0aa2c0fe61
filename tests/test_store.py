import pyarrow as pa
import pytest

from stepdapo.runner import ShardedStage, read_stage
from stepdapo.store import ArtifactError

SCHEMA = pa.schema([("x", pa.int32()), ("ids", pa.list_(pa.int32()))])


def make(tmp_path, n=3, fp=None):
    st = ShardedStage(tmp_path / "s", "demo", SCHEMA, fp or {"a": 1})
    st.start()
    for i in range(n):
        st.write_shard(i, {"x": [i, i], "ids": [[1, 2], [3]]})
    return st


def test_complete_stage_roundtrip(tmp_path):
    st = make(tmp_path)
    assert not st.is_complete()  # shards alone are not a complete stage
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        read_stage(tmp_path / "s", "demo", SCHEMA)
    st.finish(3, {"ok": True})
    assert st.is_complete()
    assert read_stage(tmp_path / "s", "demo", SCHEMA).column("x").to_pylist() == [0, 0, 1, 1, 2, 2]


def test_missing_shard_named(tmp_path):
    st = make(tmp_path)
    st.finish(3, {})
    (tmp_path / "s" / "shard-00001.parquet").unlink()
    with pytest.raises(ArtifactError, match=r"shard-00001.parquet: missing shard"):
        read_stage(tmp_path / "s", "demo", SCHEMA)


def test_corrupt_shard_named(tmp_path):
    st = make(tmp_path)
    st.finish(3, {})
    p = tmp_path / "s" / "shard-00002.parquet"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(ArtifactError, match=r"shard-00002.parquet: corrupt parquet shard"):
        read_stage(tmp_path / "s", "demo", SCHEMA)
    # resuming an unfinished stage over a corrupt shard also names it instead of reading garbage
    st2 = make(tmp_path / "b", n=2)
    (tmp_path / "b" / "s" / "shard-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(ArtifactError, match="shard-00000.parquet: corrupt"):
        st2.has_shard(0)


def test_schema_mismatch_named(tmp_path):
    make(tmp_path).finish(3, {})
    other = pa.schema([("x", pa.int64())])
    with pytest.raises(ArtifactError, match=r"shard-00000.parquet: schema mismatch"):
        read_stage(tmp_path / "s", "demo", other)
    st = ShardedStage(tmp_path / "s2", "demo", other, {"a": 1})
    st.start()
    ShardedStage(tmp_path / "s2", "demo", SCHEMA, {"a": 1}).write_shard(0, {"x": [1], "ids": [[1]]})
    with pytest.raises(ArtifactError, match="schema mismatch"):
        st.has_shard(0)


def test_settings_change_is_refused(tmp_path):
    make(tmp_path, fp={"a": 1})
    with pytest.raises(ArtifactError, match="different settings"):
        ShardedStage(tmp_path / "s", "demo", SCHEMA, {"a": 2}).start()


def test_temporary_files_are_not_shards(tmp_path):
    st = make(tmp_path, n=1)
    (tmp_path / "s" / ".shard-00001.parquet.tmp").write_bytes(b"half")
    assert not st.has_shard(1)
    with pytest.raises(ArtifactError, match="shard-00001.parquet: missing shard"):
        st.finish(2, {})
