"""ches_filter.scorefile: the one writer and reader of a score file's table and metadata."""

from __future__ import annotations


import pyarrow as pa
import pytest

from ches_filter import scorefile
from ches_filter.errors import BadDataError, BadFlagError


def test_table_metadata_round_trip(tmp_path):
    table = pa.table({"score": [0.5, 1.5]}).replace_schema_metadata({b"other": b"kept"})
    meta = {"model": "gpt2", "threshold": 0.25, "skipped": {"empty_turn": 4}, "note": "é"}
    scorefile.write_table(table, str(tmp_path / "s.parquet"), metadata=meta)
    got, got_meta = scorefile.read_table(str(tmp_path / "s.parquet"))
    assert got_meta == meta
    assert got.column("score").to_pylist() == [0.5, 1.5]
    assert got.schema.metadata[b"other"] == b"kept"


def test_table_without_metadata_and_overwrite(tmp_path):
    path = str(tmp_path / "s.parquet")
    scorefile.write_table(pa.table({"a": [1]}), path)
    assert scorefile.read_table(path)[1] == {}
    with pytest.raises(BadFlagError, match="pass `--overwrite`"):
        scorefile.write_table(pa.table({"a": [2]}), path)
    scorefile.write_table(pa.table({"a": [2]}), path, metadata={"v": 2}, overwrite=True)
    table, meta = scorefile.read_table(path)
    assert table.column("a").to_pylist() == [2] and meta == {"v": 2}


def test_read_table_errors(tmp_path):
    with pytest.raises(BadDataError, match="no such file"):
        scorefile.read_table(str(tmp_path / "nope.parquet"))
    (tmp_path / "bad.parquet").write_text("nope", "utf-8")
    with pytest.raises(BadDataError, match="not a readable parquet file"):
        scorefile.read_table(str(tmp_path / "bad.parquet"))


def test_score_metadata_has_one_writer_and_one_reader():
    """Tables and schemas (merge's footer) get the same bytes; every reader refuses corrupt metadata in one line."""
    from ches_filter.scoring import table_metadata

    meta = {"model": "modèle", "counts": {"ok": 1}}
    table = scorefile.with_metadata(pa.table({"a": [1]}).replace_schema_metadata({b"other": b"kept"}), meta)
    schema = scorefile.with_metadata(pa.schema([("a", pa.int64())]), meta)
    assert table.schema.metadata[b"ches_filter"] == schema.metadata[b"ches_filter"]
    assert table.schema.metadata[b"other"] == b"kept"
    assert table_metadata(table) == meta == scorefile.parse_metadata(schema.metadata, "x")
    assert scorefile.parse_metadata(None, "x") == {}
    for raw, needle in ((b"{cut", "has corrupt ches_filter metadata"), (b"[1]", "not a JSON object")):
        bad = pa.table({"a": [1]}).replace_schema_metadata({b"ches_filter": raw})
        with pytest.raises(BadDataError, match=needle):
            table_metadata(bad)
