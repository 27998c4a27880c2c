"""Tests for ches_filter.sources, paths, atomic and scorefile (once io.py): every input kind, clear errors, atomic writes."""

from __future__ import annotations

import gzip
import json
import os
import socket
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ches_filter import atomic, paths, records, scorefile, sources
from ches_filter.errors import BadDataError, BadFlagError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_DEV = SHARED_DATA / "hh-rlhf-harmless-base-test.dev.jsonl.gz"

ROWS = [
    {"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: go away"},
    {"chosen": "Human: café?\n\nAssistant: oui", "rejected": "Human: café?\n\nAssistant: non"},
    {"chosen": "Human: 2+2\n\nAssistant: 4", "rejected": "Human: 2+2\n\nAssistant: 5"},
]


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    # Keep the Arrow copies datasets makes of local files out of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _write_jsonl(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def _rows(ds) -> list[dict]:
    return [dict(r) for r in ds]


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------- input kinds


def test_reads_jsonl(tmp_path):
    ds = sources.read_dataset(str(_write_jsonl(tmp_path / "d.jsonl")))
    assert isinstance(ds, datasets.Dataset)
    assert _rows(ds) == ROWS


def test_reads_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2), "utf-8")
    assert _rows(sources.read_dataset(str(path))) == ROWS


def test_reads_json_file_with_one_object_per_line(tmp_path):
    assert _rows(sources.read_dataset(str(_write_jsonl(tmp_path / "d.json")))) == ROWS


def test_reads_jsonl_gz(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in ROWS)
    assert _rows(sources.read_dataset(str(path))) == ROWS


def test_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n", "utf-8")
    assert _rows(sources.read_dataset(str(path))) == ROWS[:2]


def test_reads_parquet_file_dir_and_glob(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), data / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:]), data / "part-1.parquet")
    assert _rows(sources.read_dataset(str(data / "part-0.parquet"))) == ROWS[:2]
    assert _rows(sources.read_dataset(str(data))) == ROWS
    assert _rows(sources.read_dataset(str(data / "*.parquet"))) == ROWS


def test_parquet_dir_ignores_hidden_temp_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), data / "part-0.parquet")
    (data / ".part-1.parquet.tmp-123").write_bytes(b"half written")
    assert len(sources.read_dataset(str(data))) == len(ROWS)


def test_reads_csv(tmp_path):
    path = tmp_path / "d.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    assert _rows(sources.read_dataset(str(path))) == ROWS


def test_reads_save_to_disk_dataset(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert _rows(sources.read_dataset(str(tmp_path / "saved"))) == ROWS


def test_reads_dataset_dict_with_split(tmp_path):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:2]), test=datasets.Dataset.from_list(ROWS[2:])
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _rows(sources.read_dataset(str(tmp_path / "dd"), split="test")) == ROWS[2:]
    with pytest.raises(BadFlagError, match=r"`--split NAME`; available splits: train, test"):
        sources.read_dataset(str(tmp_path / "dd"))
    with pytest.raises(BadFlagError, match="no split `dev`"):
        sources.read_dataset(str(tmp_path / "dd"), split="dev")


def test_dataset_dict_with_one_split_needs_no_flag(tmp_path):
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS)).save_to_disk(str(tmp_path / "dd"))
    assert _rows(sources.read_dataset(str(tmp_path / "dd"))) == ROWS


def test_split_on_a_plain_file_is_a_flag_error(tmp_path):
    with pytest.raises(BadFlagError, match="`--split test` does not apply"):
        sources.read_dataset(str(_write_jsonl(tmp_path / "d.jsonl")), split="test")


def test_hub_id_goes_to_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    assert len(sources.read_dataset("Anthropic/hh-rlhf")) == len(ROWS)
    sources.read_dataset("owner/name-2.5", split="test", subset="harmless")
    assert calls == [
        (("Anthropic/hh-rlhf", None), {"split": "train"}),
        (("owner/name-2.5", "harmless"), {"split": "test"}),
    ]


def test_hub_failure_is_wrapped(tmp_path, monkeypatch):
    def failing_load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadDataError, match="owner/name is not a local file.*no network"):
        sources.read_dataset("owner/name")


@pytest.mark.skipif(not HH_DEV.exists(), reason=f"shared data file {HH_DEV} is absent")
def test_reads_real_hh_rlhf_dev_file():
    ds = sources.read_dataset(str(HH_DEV))
    assert len(ds) == 1500
    assert ds.column_names == ["chosen", "rejected"]
    assert ds[0]["chosen"].startswith("\n\nHuman:")


# ------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(BadDataError, match="no such file or directory"):
        sources.read_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(BadDataError, match="no such file or directory"):
        sources.read_dataset("data/train.jsonl")  # looks like owner/name but has an extension


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(BadDataError, match="matches no files"):
        sources.read_dataset(str(tmp_path / "*.parquet"))


def test_malformed_json_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"chosen": \n', "utf-8")
    with pytest.raises(BadDataError, match=r"d\.jsonl line 3 is not valid JSON: "):
        sources.read_dataset(str(path))


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"chosen": "a"},\n{"chosen" "b"}\n]', "utf-8")
    with pytest.raises(BadDataError, match=r"d\.json line 3 is not valid JSON"):
        sources.read_dataset(str(path))


def test_duplicate_key_names_the_line_and_key(tmp_path):
    path = tmp_path / "d.jsonl"
    dup = '{"prompt": "p", "chosen": "a", "rejected": "c", "chosen": "b"}'
    path.write_text("\n".join([json.dumps(ROWS[0])] * 3 + [dup]) + "\n", "utf-8")
    with pytest.raises(BadDataError, match=r"d\.jsonl line 4 has the key 'chosen' twice"):
        sources.read_dataset(str(path))


def test_duplicate_key_in_json_array_is_refused_not_silently_resolved(tmp_path):
    # Python's json would keep the last value; the JSONL path refuses, so this does too.
    path = tmp_path / "d.json"
    path.write_text('[\n{"chosen": "a", "rejected": "b"},\n\n{"chosen": "a", "rejected": "b", "rejected": "c"}\n]', "utf-8")
    with pytest.raises(BadDataError, match=r"d\.json array element 2 \(starting on line 4\) has the key 'rejected' twice"):
        sources.read_dataset(str(path))


def test_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", "utf-8")
    with pytest.raises(BadDataError, match="line 2 holds a list where a JSON object is expected"):
        sources.read_dataset(str(path))


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"chosen": "caf\xe9"}\n')
    with pytest.raises(BadDataError, match=r"d\.jsonl line 2 is not valid UTF-8"):
        sources.read_dataset(str(path))


def test_truncated_gz(tmp_path):
    whole = tmp_path / "whole.jsonl.gz"
    with gzip.open(whole, "wt", encoding="utf-8") as fh:
        for i in range(3000):
            fh.write(json.dumps({"chosen": str(i) * 40, "rejected": "x"}) + "\n")
    data = whole.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadDataError, match=r"cut\.jsonl\.gz is truncated or not a valid gzip"):
        sources.read_dataset(str(cut))


def test_uncompressed_file_named_gz_and_compressed_file_without_gz(tmp_path):
    plain = _write_jsonl(tmp_path / "plain.jsonl.gz")
    with pytest.raises(BadDataError, match="not a valid gzip file"):
        sources.read_dataset(str(plain))
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(b'{"a": 1}\n'))
    with pytest.raises(BadDataError, match="rename it"):
        sources.read_dataset(str(packed))


def test_mixed_type_column(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [ROWS[0], {"chosen": [{"role": "user", "content": "hi"}], "rejected": "x"}]
    _write_jsonl(path, rows)
    expected = r"column `chosen` holds values that cannot be read as one column"
    with pytest.raises(BadDataError, match=expected):
        sources.read_dataset(str(path))


def test_ints_floats_and_nulls_do_not_count_as_mixed(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"s": 1, "t": None}, {"s": 2.5, "t": "x"}])
    assert _rows(sources.read_dataset(str(path))) == [{"s": 1.0, "t": None}, {"s": 2.5, "t": "x"}]


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "blank.jsonl"])
def test_empty_json_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n\n" if name.startswith("blank") else "", "utf-8")
    with pytest.raises(BadDataError, match="holds no rows"):
        sources.read_dataset(str(path))


def test_empty_json_array_csv_and_parquet(tmp_path):
    (tmp_path / "a.json").write_text("[]", "utf-8")
    (tmp_path / "h.csv").write_text("chosen,rejected\n", "utf-8")
    pq.write_table(pa.table({"chosen": pa.array([], pa.string())}), tmp_path / "e.parquet")
    for name in ["a.json", "h.csv", "e.parquet"]:
        with pytest.raises(BadDataError, match="holds no rows"):
            sources.read_dataset(str(tmp_path / name))


def test_not_parquet_and_unsupported_extension(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet", "utf-8")
    with pytest.raises(BadDataError, match=r"x\.parquet is not a readable parquet file"):
        sources.read_dataset(str(tmp_path / "x.parquet"))
    (tmp_path / "x.txt").write_text("hi", "utf-8")
    with pytest.raises(BadDataError, match=r"unsupported file type; allowed inputs are"):
        sources.read_dataset(str(tmp_path / "x.txt"))


def test_directory_without_data(tmp_path):
    with pytest.raises(BadDataError, match="neither a `save_to_disk` directory"):
        sources.read_dataset(str(tmp_path))


def test_bad_csv_is_wrapped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"chosen,rejected\n\xff\xfe,x\n")
    with pytest.raises(BadDataError, match=r"d\.csv line 2 is not valid UTF-8 \(byte 0xff"):
        sources.read_dataset(str(path))


# ------------------------------------------------------------- output checks


def test_output_equal_to_input(tmp_path):
    src = str(_write_jsonl(tmp_path / "d.jsonl"))
    with pytest.raises(BadFlagError, match="same path as the input"):
        paths.check_output_path(src, inputs=[src], overwrite=True)
    # A differently spelled path to the same file is caught too.
    other = os.path.join(str(tmp_path), ".", "d.jsonl")
    with pytest.raises(BadFlagError, match="same path as the input"):
        paths.check_output_path(other, inputs=[src], overwrite=True)


def test_output_inside_or_around_input_directory(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    saved = str(tmp_path / "saved")
    with pytest.raises(BadFlagError, match="inside the input directory"):
        paths.check_output_path(os.path.join(saved, "out.parquet"), inputs=[saved], overwrite=True)
    with pytest.raises(BadFlagError, match="contains the input"):
        paths.check_output_path(str(tmp_path), inputs=[saved], overwrite=True)


def test_output_checks_accept_hub_ids_and_fresh_paths(tmp_path):
    paths.check_output_path(str(tmp_path / "out.parquet"), inputs=["owner/name"], overwrite=False)


def test_existing_output_without_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old", "utf-8")
    with pytest.raises(BadFlagError, match=r"out\.jsonl exists; pass `--overwrite` to replace it"):
        records.write_dataset(datasets.Dataset.from_list(ROWS), str(out))
    assert out.read_text("utf-8") == "old"


def test_missing_parent_directory(tmp_path):
    with pytest.raises(BadFlagError, match="does not exist; create it first"):
        records.write_dataset(datasets.Dataset.from_list(ROWS), str(tmp_path / "no" / "out.parquet"))


def test_unknown_output_extension(tmp_path):
    with pytest.raises(BadFlagError, match=r"extension `\.tsv`; use `\.parquet`, `\.jsonl`, `\.csv`"):
        records.write_dataset(datasets.Dataset.from_list(ROWS), str(tmp_path / "out.tsv"))
    assert not (tmp_path / "out.tsv").exists()


# ----------------------------------------------------------------- writing


@pytest.mark.parametrize("name", ["out.parquet", "out.jsonl", "out_dir"])
def test_write_dataset_round_trips(tmp_path, name):
    ds = sources.read_dataset(str(_write_jsonl(tmp_path / "d.jsonl")))
    out = tmp_path / name
    records.write_dataset(ds, str(out))
    assert _rows(sources.read_dataset(str(out))) == ROWS
    if name.endswith(".jsonl"):
        assert "café" in out.read_text("utf-8")  # not escaped to \u00e9


@pytest.mark.parametrize("name", ["out.parquet", "out_dir"])
def test_write_dataset_overwrites(tmp_path, name):
    out = tmp_path / name
    records.write_dataset(datasets.Dataset.from_list(ROWS), str(out))
    records.write_dataset(datasets.Dataset.from_list(ROWS[:1]), str(out), overwrite=True)
    assert _rows(sources.read_dataset(str(out))) == ROWS[:1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_write_filtered_dataset_keeps_only_selected_rows(tmp_path):
    ds = datasets.Dataset.from_list(ROWS).select([0, 2])
    records.write_dataset(ds, str(tmp_path / "out.parquet"))
    assert _rows(sources.read_dataset(str(tmp_path / "out.parquet"))) == [ROWS[0], ROWS[2]]


@pytest.mark.parametrize(
    "name,method", [("out.parquet", "to_parquet"), ("out_dir", "save_to_disk")]
)
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_file_and_no_litter(
    tmp_path, monkeypatch, name, method, existing
):
    work = tmp_path / "work"
    work.mkdir()
    out = work / name
    if existing:
        records.write_dataset(datasets.Dataset.from_list(ROWS), str(out))
    before = _listing(work)

    def crash_midway(self, target, *args, **kwargs):
        if method == "save_to_disk":
            os.mkdir(target)
            target = os.path.join(target, "data-00000-of-00001.arrow")
        with open(target, "wb") as fh:
            fh.write(b"half a file")
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, method, crash_midway)
        with pytest.raises(RuntimeError, match="disk on fire"):
            records.write_dataset(datasets.Dataset.from_list(ROWS[:1]), str(out), overwrite=True)
    assert _listing(work) == before
    if existing:
        assert _rows(sources.read_dataset(str(out))) == ROWS


def test_atomic_path_replaces_file_with_directory_and_back(tmp_path):
    target = tmp_path / "thing"
    target.write_text("file", "utf-8")
    with atomic.atomic_path(str(target)) as tmp:
        os.mkdir(tmp)
        Path(tmp, "inner").write_text("dir", "utf-8")
    assert (target / "inner").read_text("utf-8") == "dir"
    with atomic.atomic_path(str(target)) as tmp:
        Path(tmp).write_text("file again", "utf-8")
    assert target.read_text("utf-8") == "file again"
    assert _listing(tmp_path) == ["thing"]


def test_atomic_path_yields_hidden_sibling(tmp_path):
    with atomic.atomic_path(str(tmp_path / "x.parquet")) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp) == f".x.parquet.tmp-{socket.gethostname()}-{os.getpid()}"
        Path(tmp).write_text("ok", "utf-8")


# ------------------------------------------------------------ tables + meta


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


@pytest.mark.parametrize("failing", ["kept.jsonl", "rejects.parquet"])
def test_write_datasets_is_all_or_none_when_a_flush_fails(tmp_path, monkeypatch, failing):
    """prune's OUTPUT and --rejects: a full disk while flushing either leaves both earlier files as they were."""
    import errno

    import datasets

    import ches_filter.atomic as io_module
    from ches_filter.errors import ChesFilterError
    from ches_filter.records import write_datasets

    paths = {"--output": tmp_path / "kept.jsonl", "--rejects": tmp_path / "rejects.parquet"}
    old = datasets.Dataset.from_dict({"x": [1, 2]})
    write_datasets([(flag, old, str(path)) for flag, path in paths.items()])
    earlier = {flag: path.read_bytes() for flag, path in paths.items()}
    real = io_module.fsync_tree

    def full_disk(path):
        if f".{failing}.tmp-" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path)

    monkeypatch.setattr(io_module, "fsync_tree", full_disk)
    new = datasets.Dataset.from_dict({"x": [3, 4, 5]})
    with pytest.raises(ChesFilterError, match=f"no space left on .* writing .*{failing}"):
        write_datasets([(flag, new, str(path)) for flag, path in paths.items()], overwrite=True)
    assert {flag: path.read_bytes() for flag, path in paths.items()} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.jsonl", "rejects.parquet"]


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
