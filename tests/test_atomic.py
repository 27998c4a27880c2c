"""ches_filter.atomic: all-or-none writes of files and directories; a failed write leaves no file and no litter."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import datasets
import pytest

from ches_filter import atomic, records, sources

from conftest import THREE_HH_PAIRS, listing, rows_of, write_jsonl


@pytest.mark.parametrize("name", ["out.parquet", "out.jsonl", "out_dir"])
def test_write_dataset_round_trips(tmp_path, name):
    ds = sources.read_dataset(str(write_jsonl(tmp_path / "d.jsonl", THREE_HH_PAIRS)))
    out = tmp_path / name
    records.write_dataset(ds, str(out))
    assert rows_of(sources.read_dataset(str(out))) == THREE_HH_PAIRS
    if name.endswith(".jsonl"):
        assert "café" in out.read_text("utf-8")  # not escaped to \u00e9


@pytest.mark.parametrize("name", ["out.parquet", "out_dir"])
def test_write_dataset_overwrites(tmp_path, name):
    out = tmp_path / name
    records.write_dataset(datasets.Dataset.from_list(THREE_HH_PAIRS), str(out))
    records.write_dataset(datasets.Dataset.from_list(THREE_HH_PAIRS[:1]), str(out), overwrite=True)
    assert rows_of(sources.read_dataset(str(out))) == THREE_HH_PAIRS[:1]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_write_filtered_dataset_keeps_only_selected_rows(tmp_path):
    ds = datasets.Dataset.from_list(THREE_HH_PAIRS).select([0, 2])
    records.write_dataset(ds, str(tmp_path / "out.parquet"))
    assert rows_of(sources.read_dataset(str(tmp_path / "out.parquet"))) == [THREE_HH_PAIRS[0], THREE_HH_PAIRS[2]]


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
        records.write_dataset(datasets.Dataset.from_list(THREE_HH_PAIRS), str(out))
    before = listing(work)

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
            records.write_dataset(datasets.Dataset.from_list(THREE_HH_PAIRS[:1]), str(out), overwrite=True)
    assert listing(work) == before
    if existing:
        assert rows_of(sources.read_dataset(str(out))) == THREE_HH_PAIRS


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
    assert listing(tmp_path) == ["thing"]


def test_atomic_path_yields_hidden_sibling(tmp_path):
    with atomic.atomic_path(str(tmp_path / "x.parquet")) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert os.path.basename(tmp) == f".x.parquet.tmp-{socket.gethostname()}-{os.getpid()}"
        Path(tmp).write_text("ok", "utf-8")


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
