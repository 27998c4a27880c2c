"""SIGTERM (pre-emption) unwinds like Ctrl-C, and a later run removes the temporaries of killed runs."""

from __future__ import annotations

import os
import shutil
import signal
import socket

import pytest
from click.testing import CliRunner

from ches_filter import atomic
from ches_filter.cli import main

from conftest import EXAMPLE_HH, GOLDEN


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
    real_fsync = atomic.fsync_tree

    def terminated_while_flushing(path):
        assert os.path.exists(path)  # the temporary is on disk when the signal arrives
        os.kill(os.getpid(), signal.SIGTERM)
        return real_fsync(path)

    monkeypatch.setattr(atomic, "fsync_tree", terminated_while_flushing)
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


# ------------------------------------------------ an unwritable datasets cache is not the input's fault


def _cache_at(monkeypatch, cache, variable):
    """Point datasets' cache at ``cache`` as the environment ``variable`` would (datasets reads it at import)."""
    import datasets

    for name in ("HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache if variable == "HF_DATASETS_CACHE"
                        else cache / ".cache" / "huggingface" / "datasets")


@pytest.mark.parametrize("variable", ["HF_DATASETS_CACHE", "HOME"])
def test_a_local_file_needs_no_datasets_cache(workspace, monkeypatch, variable):
    """Local files are read without the datasets cache: an unwritable one is no reason to fail."""
    blocker = workspace / "not-a-directory"
    blocker.write_text("a file where the cache should be")
    _cache_at(monkeypatch, blocker, variable)
    result = CliRunner().invoke(main, PRUNE)
    assert result.exit_code == 0, result.output
    assert (workspace / "out.jsonl").exists() and (workspace / "rej.jsonl").exists()
    assert blocker.read_text() == "a file where the cache should be"


@pytest.mark.parametrize("variable", ["HF_DATASETS_CACHE", "HOME"])
def test_an_unwritable_datasets_cache_is_named_with_its_variable(workspace, monkeypatch, variable):
    """A Hub dataset goes through the datasets cache: an unwritable one is named, not the input blamed."""
    blocker = workspace / "not-a-directory"
    blocker.write_text("a file where the cache should be")
    _cache_at(monkeypatch, blocker, variable)
    before = sorted(p.name for p in workspace.iterdir())
    hub = ["prune", "someone/hh-pairs", *PRUNE[2:]]
    result = CliRunner().invoke(main, hub)
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]  # the log names the id it tries; the error does not blame it
    assert line.startswith("Error: ") and "someone/hh-pairs" not in line and "failed" not in line
    assert str(blocker) in line and variable in line and "HF_DATASETS_CACHE" in line
    assert "Traceback" not in result.output and result.output.count("Error") == 1
    assert sorted(p.name for p in workspace.iterdir()) == before


@pytest.mark.slow
def test_a_read_only_home_is_named_not_the_input(workspace, monkeypatch):
    """HOME on a read-only file system (a read-only tmpfs; root only, skipped where mounting is not allowed):
    a local file is read without the cache; a Hub dataset, which needs it, names HOME."""
    import subprocess

    home = workspace / "home"
    home.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(home)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        _cache_at(monkeypatch, home, "HOME")
        result = CliRunner().invoke(main, PRUNE)
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(main, ["prune", "someone/hh-pairs", *PRUNE[2:], "--overwrite"])
        assert result.exit_code == 1, result.output
        assert "Read-only file system" in result.output and "HOME" in result.output
    finally:
        subprocess.run(["umount", str(home)], check=True)
