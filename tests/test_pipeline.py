"""One pipeline: prune, score_pairs and score share the resumable, locked, torchrun-able path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ches_filter.cli import main
from ches_filter.run import WorkDir

from conftest import read_hh

ROWS, EVERY = 12, 4


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def listing(root) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: 'nothing written' means this does not change."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def hh12(tmp_path):
    path = tmp_path / "hh12.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in read_hh(ROWS)), encoding="utf-8")
    return path


@pytest.fixture
def tiny(tiny_model_dir):
    return ["--model", tiny_model_dir, "--checkpoint-every", EVERY, "--chunk-size", 2, "-q"]


def _write_lock(work_dir, pid, host):
    work = WorkDir(str(work_dir))
    os.makedirs(work.locks_dir, exist_ok=True)
    path = work.lock_path(0, 1)
    with open(path, "w") as handle:
        json.dump({"pid": pid, "host": host, "started": "2026-11-28T00:00:00+00:00"}, handle)
    return path


@pytest.mark.parametrize("command", ["score", "prune"])
@pytest.mark.parametrize("host", ["here", "elsewhere"])
def test_a_live_lock_refuses_at_once_and_writes_nothing(tmp_path, hh12, tiny, command, host):
    out = tmp_path / ("s.parquet" if command == "score" else "kept.jsonl")
    # A live owner: this test's parent process on this host, or any pid on another host.
    lock = _write_lock(str(out) + ".parts", os.getppid(), socket.gethostname() if host == "here" else "node-17")
    before = listing(tmp_path)
    extra = ["--keep", "0.5"] if command == "prune" else []
    t0 = time.time()
    result = invoke(command, hh12, "-o", out, *tiny, *extra)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "another ches-filter run" in line and str(os.getppid()) in line and lock in line
    assert time.time() - t0 < 5, "the second run must refuse before loading anything"
    assert listing(tmp_path) == before


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path, hh12, tiny, caplog):
    out = tmp_path / "s.parquet"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    _write_lock(str(out) + ".parts", dead, socket.gethostname())
    result = invoke("score", hh12, "-o", out, *tiny)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == ROWS
    assert not os.path.exists(str(out) + ".parts")


def test_prune_scores_through_the_score_pipeline_and_resumes_from_its_parts(tmp_path, hh12, tiny):
    """`prune` without --scores writes the same parts as `score` and picks them up after a crash."""
    work = tmp_path / "w"
    scores = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", scores, *tiny, "--work-dir", work, "--keep-work-dir").exit_code == 0
    parts = {k: os.stat(p).st_mtime_ns for k, p in WorkDir(str(work)).scan_parts().items()}
    assert len(parts) == 3
    kept = tmp_path / "kept.jsonl"
    result = CliRunner().invoke(main, [str(a) for a in ("prune", hh12, "--keep", 0.5, "-o", kept, *tiny[:-1], "--work-dir", work)])
    assert result.exit_code == 0, result.output
    assert "resuming: 3 of 3 parts" in result.output  # nothing rescored
    assert not work.exists()  # removed once the outputs were written
    again = tmp_path / "kept_from_scores.jsonl"
    assert invoke("prune", hh12, "--keep", 0.5, "--scores", scores, "-o", again).exit_code == 0
    assert kept.read_text() == again.read_text()


def test_prune_keeps_its_work_dir_on_request_and_refuses_work_dir_with_scores(tmp_path, hh12, tiny):
    kept = tmp_path / "kept.parquet"
    assert invoke("prune", hh12, "--keep", 0.5, "-o", kept, *tiny, "--keep-work-dir").exit_code == 0
    assert WorkDir(str(kept) + ".parts").read_manifest() is not None
    before = listing(tmp_path)
    result = invoke("prune", hh12, "--keep", 0.5, "-o", tmp_path / "k2.parquet", "--scores", kept, "--work-dir", tmp_path / "w")
    assert result.exit_code == 2 and "--work-dir" in result.output
    assert listing(tmp_path) == before


def test_score_pairs_equals_the_score_file_and_takes_a_model_object(tmp_path, hh12, tiny, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ches_filter import score_pairs

    out = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", out, *tiny).exit_code == 0
    from_file = pq.read_table(out)
    by_path = score_pairs(str(hh12), model=str(tiny_model_dir), chunk_size=2, progress=False)
    assert by_path.drop(["row_index"]).equals(from_file.drop(["row_index"]))
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    lm.train()  # a training script's model: scored in eval mode, its mode restored
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    by_object = score_pairs(read_hh(ROWS), model=lm, tokenizer=tok, chunk_size=2, progress=False)
    assert lm.training
    assert by_object.column("ches").to_pylist() == pytest.approx(from_file.column("ches").to_pylist(), rel=1e-6)
    assert by_object.column("status").to_pylist() == from_file.column("status").to_pylist()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".parts")]


def test_score_pairs_refuses_a_model_object_without_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from ches_filter import score_pairs
    from ches_filter.errors import BadFlagError

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(BadFlagError, match="tokenizer="):
        score_pairs(read_hh(2), model=lm)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
def test_concurrent_second_run_refuses_and_the_first_finishes(tmp_path, tiny_model_dir):
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_hh(200)), encoding="utf-8")
    out = tmp_path / "s.parquet"
    command = [sys.executable, "-m", "ches_filter", "score", str(data), "-o", str(out), "--model", str(tiny_model_dir),
               "--checkpoint-every", "20", "-q"]
    first = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = WorkDir(str(out) + ".parts")
    deadline = time.time() + 120
    while not os.path.exists(work.lock_path(0, 1)) and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    second = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    finished = first.communicate(timeout=600)
    assert first.returncode == 0, finished[1][-2000:]
    assert second.returncode == 2, second.stderr
    assert "another ches-filter run" in second.stderr and str(first.pid) in second.stderr
    assert pq.read_table(out).num_rows == 200
    assert not os.path.exists(work.path)


# `prune` killed, then rerun: tests/test_resume.py::test_sigkill_then_rerun_gives_the_uninterrupted_output
# (one killed run checks the prune outputs and the resumed parts together).
# `prune` under torchrun equals one process: tests/test_distributed.py::test_torchrun_two_ranks_equal_one_process
# (one launch checks the prune outputs and the ranks' shares together).


def test_prune_refuses_a_foreign_work_dir_before_reading_anything(tmp_path, hh12, tiny):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    before = listing(tmp_path)
    result = invoke("prune", hh12, "--keep", 0.5, "-o", tmp_path / "kept.jsonl", *tiny[:-1], "--work-dir", junk)
    assert result.exit_code == 2 and "notes.txt" in result.output
    assert "read 12 rows" not in result.output  # refused before the input was opened
    assert listing(tmp_path) == before


@pytest.mark.parametrize("content", ["", "[]", "{not json", "null"])
def test_an_old_unreadable_lock_is_taken_over_and_a_young_one_refused(tmp_path, content, caplog):
    """A crash between creating the lock and writing its record leaves it empty or garbled: after a minute it is stale."""
    from ches_filter.errors import BadFlagError

    work = WorkDir(str(tmp_path / "w"))
    os.makedirs(work.locks_dir)
    path = work.lock_path(0, 1)
    with open(path, "w") as handle:
        handle.write(content)
    with pytest.raises(BadFlagError, match="unreadable"):
        work.acquire(0, 1)
    old = time.time() - 3600
    os.utime(path, (old, old))
    with caplog.at_level("WARNING", logger="ches_filter"):
        lock = work.acquire(0, 1)
    assert any("taking over the unreadable lock" in r.message for r in caplog.records)
    with open(lock) as handle:
        assert json.load(handle)["pid"] == os.getpid()
    WorkDir.release(lock)
    assert not os.path.exists(work.path)


def test_a_directory_where_the_lock_goes_is_refused_and_kept(tmp_path):
    from ches_filter.errors import BadFlagError

    work = WorkDir(str(tmp_path / "w"))
    os.makedirs(os.path.join(work.locks_dir, "validate.lock", "mine"))
    old = time.time() - 3600
    os.utime(os.path.join(work.locks_dir, "validate.lock"), (old, old))
    with pytest.raises(BadFlagError, match="is a directory where ches-filter keeps a lock file"):
        work.acquire(name="validate")
    assert os.path.isdir(os.path.join(work.locks_dir, "validate.lock", "mine"))


@pytest.mark.parametrize("pid, taken", [(10**20, True), (2**31 + 5, True), (-1, False), (0, False), (True, False), ("7", False)])
def test_a_lock_with_an_impossible_pid_is_stale_or_refused_never_a_traceback(tmp_path, pid, taken):
    from ches_filter.errors import BadFlagError

    work = WorkDir(str(tmp_path / "w"))
    os.makedirs(work.locks_dir)
    with open(work.lock_path(0, 1), "w") as handle:
        json.dump({"pid": pid, "host": socket.gethostname(), "started": "x"}, handle)
    if taken:  # no process has such a pid: the owner is gone
        WorkDir.release(work.acquire(0, 1))
    else:  # not a pid that can be checked: refused with the way out
        with pytest.raises(BadFlagError, match="if it is no longer running, delete"):
            work.acquire(0, 1)


def test_a_lock_that_cannot_be_written_keeps_a_directory_the_run_found(tmp_path, monkeypatch):
    import errno

    import ches_filter.run.workdir as workdir_module
    from ches_filter.errors import ChesFilterError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir_module.json, "dump", full)
    found = tmp_path / "found"
    found.mkdir()
    for path, stays in ((found, True), (tmp_path / "new", False)):
        with pytest.raises(ChesFilterError, match="no space left on"):
            WorkDir(str(path)).acquire(name="validate")
        assert path.is_dir() is stays and not (path / "locks").exists()
