"""SIGTERM (pre-emption) unwinds like Ctrl-C, and a later run removes the temporaries of killed runs."""

from __future__ import annotations

import os
import shutil
import signal
import socket

import pytest
from click.testing import CliRunner

from ches_filter import io
from ches_filter.cli import main

from conftest import EXAMPLE_HH, REPO

GOLDEN = REPO / "tests" / "golden" / "hh300_scores.parquet"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE_HH, tmp_path / "in.jsonl")
    shutil.copy(GOLDEN, tmp_path / "s.parquet")
    return tmp_path


PRUNE = ["prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl", "--rejects", "rej.jsonl"]


def test_sigterm_during_prunes_final_write_leaves_no_temporaries(workspace, monkeypatch):
    received = []
    # Without ches-filter's own handler, this one would only note the signal and the write would finish.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    real_fsync = io._fsync_tree

    def terminated_while_flushing(path):
        assert os.path.exists(path)  # the temporary is on disk when the signal arrives
        os.kill(os.getpid(), signal.SIGTERM)
        return real_fsync(path)

    monkeypatch.setattr(io, "_fsync_tree", terminated_while_flushing)
    try:
        result = CliRunner().invoke(main, PRUNE)
        assert result.exit_code == 143, result.output
        assert "Terminated." in result.output and "Traceback" not in result.output
        assert sorted(p.name for p in workspace.iterdir()) == ["in.jsonl", "s.parquet"]  # no output, no temporary
        assert received == []
        # The command's handler is gone afterwards: the previous one is back.
        assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_next_run_removes_stale_temporaries_of_killed_runs(workspace):
    host = socket.gethostname()
    dead = 2**22 + 12345  # above Linux's default pid_max of 2**22: no such process
    stale = [workspace / f".out.jsonl.tmp-{host}-{dead}", workspace / f".rej.jsonl.tmp-{host}-{dead + 1}"]
    stale[0].write_text("half a file")
    stale[1].mkdir()  # a directory output's temporary
    live = workspace / f".out.jsonl.tmp-{host}-{os.getppid()}"  # a running process's: kept
    other_host = workspace / f".out.jsonl.tmp-{host}x-{dead}"  # another machine's: cannot be checked, kept
    unrelated = workspace / f".notes.txt.tmp-{host}-{dead}"  # not an output of this command: kept
    for path in (live, other_host, unrelated):
        path.write_text("x")
    result = CliRunner().invoke(main, PRUNE)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale)
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert (workspace / "out.jsonl").exists() and (workspace / "rej.jsonl").exists()
