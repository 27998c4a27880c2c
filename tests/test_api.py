"""The library API (ches_filter.api): score_pairs scores rows in memory, with the pipeline's exact numbers."""

import os
import tempfile

import pytest

from ches_filter import score_pairs
from ches_filter.config import ScoreConfig
from ches_filter.run import score_to_table

from conftest import read_hh


def _rows():
    rows = read_hh(24)
    rows[3] = {"chosen": "", "rejected": rows[3]["rejected"]}  # not scorable
    rows[5] = {"chosen": rows[5]["rejected"], "rejected": rows[5]["rejected"]}  # identical responses
    return rows


def _record_creations(monkeypatch):
    """Every directory made and every file opened for writing from Python, wherever it is (removed or not)."""
    import builtins

    made = []
    real_mkdir, real_open, real_os_open = os.mkdir, builtins.open, os.open

    def mkdir(path, *a, **k):
        made.append(os.fspath(path))
        return real_mkdir(path, *a, **k)

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            made.append(os.fspath(file) if not isinstance(file, int) else file)
        return real_open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & os.O_CREAT:
            made.append(os.fspath(path))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    return made


def _listing(path):
    return sorted(os.path.relpath(os.path.join(d, name), path) for d, dirs, files in os.walk(path) for name in dirs + files)


def test_score_pairs_on_rows_writes_nothing_and_equals_the_pipeline(tiny_model_dir, tmp_path, monkeypatch):
    """No work directory, lock, manifest or part anywhere; the same table, bit for bit, as the work-dir pipeline."""
    rows = _rows()
    config = ScoreConfig(model=str(tiny_model_dir), chunk_size=5, max_batch_tokens=256, quiet=True,
                         measures="ches,ln_ches,last_hidden_ip")
    scratch, cwd = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(cwd)
    made = _record_creations(monkeypatch)
    direct = score_pairs(rows, config)
    assert made == [] and _listing(scratch) == [] and _listing(cwd) == []
    monkeypatch.undo()
    piped, work = score_to_table(rows, config)  # a temporary work directory, removed again
    assert work is None
    assert direct.schema == piped.schema
    assert direct.equals(piped, check_metadata=True)  # values, types and the ches_filter metadata (fingerprint too)
    assert direct.column("status").to_pylist()[3:6] == [piped.column("status")[i].as_py() for i in (3, 4, 5)]
    assert direct.num_rows == len(rows)


def test_score_pairs_table_is_accepted_by_prune_as_its_scores(tiny_model_dir):
    """The in-memory table still carries the input fingerprint, so prune --scores accepts it for these rows only."""
    from ches_filter import prune_pairs
    from ches_filter.errors import BadDataError

    rows = read_hh(12)
    config = ScoreConfig(model=str(tiny_model_dir), quiet=True)
    table = score_pairs(rows, config)
    result = prune_pairs(rows, keep=0.5, scores=table, score_config=config)
    assert result.selection.n_kept == 6
    other = [dict(r) for r in rows]
    other[2]["chosen"] += " (edited)"
    with pytest.raises(BadDataError, match="does not belong"):
        prune_pairs(other, keep=0.5, scores=table, score_config=config)
