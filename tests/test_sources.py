"""ches_filter.sources: every input kind (files, globs, directories, datasets, Hub ids) and one clear error for each broken file."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ches_filter import sources
from ches_filter.errors import BadDataError, BadFlagError

from conftest import HH_PAIR, check_outcome, example_rows, invoke, make_scores, read_hh, rows_of, run_score, snapshot, write_bytes, write_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_DEV = SHARED_DATA / "hh-rlhf-harmless-base-test.dev.jsonl.gz"

THREE_HH_PAIRS = [
    {"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: go away"},
    {"chosen": "Human: café?\n\nAssistant: oui", "rejected": "Human: café?\n\nAssistant: non"},
    {"chosen": "Human: 2+2\n\nAssistant: 4", "rejected": "Human: 2+2\n\nAssistant: 5"},
]


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    # Keep the Arrow copies datasets makes of local files out of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# ---------------------------------------------------------------- input kinds


def test_reads_jsonl(tmp_path):
    ds = sources.read_dataset(str(write_jsonl(tmp_path / "d.jsonl", THREE_HH_PAIRS)))
    assert isinstance(ds, datasets.Dataset)
    assert rows_of(ds) == THREE_HH_PAIRS


def test_reads_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(THREE_HH_PAIRS, indent=2), "utf-8")
    assert rows_of(sources.read_dataset(str(path))) == THREE_HH_PAIRS


def test_reads_json_file_with_one_object_per_line(tmp_path):
    assert rows_of(sources.read_dataset(str(write_jsonl(tmp_path / "d.json", THREE_HH_PAIRS)))) == THREE_HH_PAIRS


def test_reads_jsonl_gz(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in THREE_HH_PAIRS)
    assert rows_of(sources.read_dataset(str(path))) == THREE_HH_PAIRS


def test_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(THREE_HH_PAIRS[0]) + "\n\n  \n" + json.dumps(THREE_HH_PAIRS[1]) + "\n", "utf-8")
    assert rows_of(sources.read_dataset(str(path))) == THREE_HH_PAIRS[:2]


def test_reads_parquet_file_dir_and_glob(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(THREE_HH_PAIRS[:2]), data / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(THREE_HH_PAIRS[2:]), data / "part-1.parquet")
    assert rows_of(sources.read_dataset(str(data / "part-0.parquet"))) == THREE_HH_PAIRS[:2]
    assert rows_of(sources.read_dataset(str(data))) == THREE_HH_PAIRS
    assert rows_of(sources.read_dataset(str(data / "*.parquet"))) == THREE_HH_PAIRS


def test_parquet_dir_ignores_hidden_temp_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(THREE_HH_PAIRS), data / "part-0.parquet")
    (data / ".part-1.parquet.tmp-123").write_bytes(b"half written")
    assert len(sources.read_dataset(str(data))) == len(THREE_HH_PAIRS)


def test_reads_csv(tmp_path):
    path = tmp_path / "d.csv"
    datasets.Dataset.from_list(THREE_HH_PAIRS).to_csv(str(path), index=False)
    assert rows_of(sources.read_dataset(str(path))) == THREE_HH_PAIRS


def test_reads_save_to_disk_dataset(tmp_path):
    datasets.Dataset.from_list(THREE_HH_PAIRS).save_to_disk(str(tmp_path / "saved"))
    assert rows_of(sources.read_dataset(str(tmp_path / "saved"))) == THREE_HH_PAIRS


def test_reads_dataset_dict_with_split(tmp_path):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(THREE_HH_PAIRS[:2]), test=datasets.Dataset.from_list(THREE_HH_PAIRS[2:])
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert rows_of(sources.read_dataset(str(tmp_path / "dd"), split="test")) == THREE_HH_PAIRS[2:]
    with pytest.raises(BadFlagError, match=r"`--split NAME`; available splits: train, test"):
        sources.read_dataset(str(tmp_path / "dd"))
    with pytest.raises(BadFlagError, match="no split `dev`"):
        sources.read_dataset(str(tmp_path / "dd"), split="dev")


def test_dataset_dict_with_one_split_needs_no_flag(tmp_path):
    datasets.DatasetDict(train=datasets.Dataset.from_list(THREE_HH_PAIRS)).save_to_disk(str(tmp_path / "dd"))
    assert rows_of(sources.read_dataset(str(tmp_path / "dd"))) == THREE_HH_PAIRS


def test_split_on_a_plain_file_is_a_flag_error(tmp_path):
    with pytest.raises(BadFlagError, match="`--split test` does not apply"):
        sources.read_dataset(str(write_jsonl(tmp_path / "d.jsonl", THREE_HH_PAIRS)), split="test")


def test_hub_id_goes_to_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(THREE_HH_PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    assert len(sources.read_dataset("Anthropic/hh-rlhf")) == len(THREE_HH_PAIRS)
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
    path.write_text(json.dumps(THREE_HH_PAIRS[0]) + "\n" + json.dumps(THREE_HH_PAIRS[1]) + '\n{"chosen": \n', "utf-8")
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
    path.write_text("\n".join([json.dumps(THREE_HH_PAIRS[0])] * 3 + [dup]) + "\n", "utf-8")
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
    path.write_text(json.dumps(THREE_HH_PAIRS[0]) + "\n[1, 2]\n", "utf-8")
    with pytest.raises(BadDataError, match="line 2 holds a list where a JSON object is expected"):
        sources.read_dataset(str(path))


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(THREE_HH_PAIRS[0]).encode() + b'\n{"chosen": "caf\xe9"}\n')
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
    plain = write_jsonl(tmp_path / "plain.jsonl.gz", THREE_HH_PAIRS)
    with pytest.raises(BadDataError, match="not a valid gzip file"):
        sources.read_dataset(str(plain))
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(b'{"a": 1}\n'))
    with pytest.raises(BadDataError, match="rename it"):
        sources.read_dataset(str(packed))


def test_mixed_type_column(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [THREE_HH_PAIRS[0], {"chosen": [{"role": "user", "content": "hi"}], "rejected": "x"}]
    write_jsonl(path, rows)
    expected = r"column `chosen` holds values that cannot be read as one column"
    with pytest.raises(BadDataError, match=expected):
        sources.read_dataset(str(path))


def test_ints_floats_and_nulls_do_not_count_as_mixed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"s": 1, "t": None}, {"s": 2.5, "t": "x"}])
    assert rows_of(sources.read_dataset(str(path))) == [{"s": 1.0, "t": None}, {"s": 2.5, "t": "x"}]


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


# ----------------------------------------------------------------- writing


# ------------------------------------------------------------ tables + meta


def test_non_utf8_line_is_named(tmp_path, tiny_model_dir):
    bad = json.dumps(HH_PAIR).encode()[:-1] + b', "x": "\xff"}'
    path = write_bytes(tmp_path / "d.jsonl", json.dumps(HH_PAIR).encode() + b"\n" + bad + b"\n")
    result = run_score(path, tmp_path / "s.parquet", tiny_model_dir)
    assert check_outcome(result, path, tmp_path / "s.parquet", 2) == "refused"
    assert "line 2" in result.output and "UTF-8" in result.output


def test_truncated_jsonl_names_the_last_line(tmp_path, tiny_model_dir):
    text = (json.dumps(HH_PAIR) + "\n") * 3
    path = write_bytes(tmp_path / "d.jsonl", text.encode()[:-20])
    result = run_score(path, tmp_path / "s.parquet", tiny_model_dir)
    assert check_outcome(result, path, tmp_path / "s.parquet", 3) == "refused"
    assert "line 3" in result.output


def test_truncated_gzip_is_named(tmp_path, tiny_model_dir):
    blob = gzip.compress(((json.dumps(HH_PAIR) + "\n") * 200).encode())
    path = write_bytes(tmp_path / "d.jsonl.gz", blob[: len(blob) // 2])
    result = run_score(path, tmp_path / "s.parquet", tiny_model_dir)
    assert check_outcome(result, path, tmp_path / "s.parquet", 0) == "refused"
    assert "truncated" in result.output


def test_truncated_parquet_is_named(tmp_path, tiny_model_dir):
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.Table.from_pylist([HH_PAIR] * 5), whole)
    path = write_bytes(tmp_path / "d.parquet", whole.read_bytes()[:-30])
    result = run_score(path, tmp_path / "s.parquet", tiny_model_dir)
    assert check_outcome(result, path, tmp_path / "s.parquet", 0) == "refused"


def test_duplicate_json_key_is_named(tmp_path, tiny_model_dir):
    path = write_bytes(tmp_path / "d.jsonl", (json.dumps(HH_PAIR) + "\n").encode() + b'{"chosen": "a", "chosen": "b", "rejected": "c"}\n')
    result = run_score(path, tmp_path / "s.parquet", tiny_model_dir)
    assert check_outcome(result, path, tmp_path / "s.parquet", 2) == "refused"
    assert "chosen" in result.output


def test_duplicate_csv_column_keeps_every_row(tmp_path, tiny_model_dir):
    """A pair column named twice in the header is ambiguous: refused in one line, naming it."""
    rows = read_hh(4)
    lines = ["chosen,chosen,rejected"] + [",".join(json.dumps(r[k]) for k in ("chosen", "chosen", "rejected")) for r in rows]
    path = write_bytes(tmp_path / "d.csv", ("\n".join(lines) + "\n").encode())
    result = run_score(path, tmp_path / "s.parquet", tiny_model_dir)
    assert check_outcome(result, path, tmp_path / "s.parquet", 4) == "refused"
    assert "the column `chosen` twice" in result.output


def test_directory_mixing_jsonl_and_parquet_is_refused_naming_both(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    write_jsonl(data / "a.jsonl", example_rows(6))
    pq.write_table(pa.Table.from_pylist(example_rows(3, 6)), data / "p1.parquet")
    before = snapshot(tmp_path)
    result = invoke("score", data, "-o", tmp_path / "s.parquet", "--model", "no/such-model")
    assert result.exit_code == 1, result.output
    assert "a.jsonl" in result.output and "p1.parquet" in result.output and "several kinds" in result.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("stray", ["notes.txt", "sub/extra.tsv", "data.jsonl.bz2", "x.arrow", "noext"])
def test_directory_with_files_it_cannot_read_is_refused(tmp_path, stray):
    data = tmp_path / "d"
    (data / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(example_rows(3)), data / "p1.parquet")
    (data / stray).write_text("hello\n")
    with pytest.raises(BadDataError, match=os.path.basename(stray).replace(".", r"\.")):
        sources.read_dataset(str(data))
    result = invoke("prune", data, "--keep", "0.5", "-o", tmp_path / "out.parquet")
    assert result.exit_code == 1 and os.path.basename(stray) in result.output


def test_directory_reads_every_data_file_and_ignores_hidden_and_docs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d"
    (data / "sub").mkdir(parents=True)
    (data / ".git").mkdir()
    write_jsonl(data / "a.jsonl", example_rows(6))
    write_jsonl(data / "sub" / "b.jsonl", example_rows(2, 6))
    write_jsonl(data / "README.jsonl", example_rows(1, 8))  # named like documentation, but it is data
    (data / "README.md").write_text("# my data\n")
    (data / "LICENSE").write_text("MIT\n")
    (data / ".DS_Store").write_bytes(b"\x00\x01junk")
    (data / ".git" / "config.txt").write_text("x")
    (data / ".a.jsonl.tmp-123").write_text("half a line")
    ds = sources.read_dataset(str(data))
    assert len(ds) == 9
    # sorted by path: README.jsonl, a.jsonl, sub/b.jsonl
    assert ds["chosen"] == [r["chosen"] for r in example_rows(1, 8) + example_rows(6) + example_rows(2, 6)]
    make_scores("d", tmp_path / "s.parquet")
    result = invoke("prune", "d", "--keep", "1", "--scores", "s.parquet", "-o", "out.jsonl")
    assert result.exit_code == 0 and "rows in:  9" in result.output, result.output


def test_directory_of_parquet_and_glob_still_read(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(example_rows(3)), data / "p1.parquet")
    pq.write_table(pa.Table.from_pylist(example_rows(2, 3)), data / "p2.parquet")
    write_jsonl(data / "a.jsonl", example_rows(6))
    assert len(sources.read_dataset(str(data / "*.parquet"))) == 5  # a glob names what to read
    assert len(sources.read_dataset(str(data / "*.jsonl"))) == 6
    (data / "a.jsonl").unlink()
    assert len(sources.read_dataset(str(data))) == 5
