"""Writes that the file system refuses: a full disk and an unwritable directory are one line, leave no temporaries,
and a rerun after the fix is byte-identical to an undisturbed run."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest


from conftest import invoke, read_hh

# mount and chattr run as subprocesses (root only; skipped elsewhere).
pytestmark = pytest.mark.slow


def temporaries(root) -> list[str]:
    return [os.path.join(b, n) for b, _, files in os.walk(root) for n in files if ".tmp-" in n]


@pytest.fixture
def tiny(tiny_model_dir):
    return ["--model", tiny_model_dir, "--checkpoint-every", 4, "--chunk-size", 2, "-q"]


@pytest.fixture
def hh12(tmp_path):
    path = tmp_path / "hh12.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in read_hh(12)), encoding="utf-8")
    return path


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount, leave: int) -> str:
    """Fill ``mount`` up to ``leave`` free bytes; return the filler's path."""
    filler = os.path.join(mount, "filler")
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as handle:
        try:
            handle.write(b"\0" * max(0, free - leave))
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("leave", [0, 24 * 1024])
def test_full_disk_is_one_line_cleans_up_and_the_rerun_is_identical(tmp_path, hh12, tiny, small_disk, leave):
    reference = tmp_path / "reference.parquet"
    assert invoke("score", hh12, "-o", reference, *tiny).exit_code == 0
    out = small_disk / "s.parquet"
    filler = _fill(small_disk, leave)
    result = invoke("score", hh12, "-o", out, *tiny)
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"no space left on {small_disk}" in line and "writing" in line
    assert temporaries(small_disk) == []
    assert not out.exists()
    os.unlink(filler)
    assert invoke("score", hh12, "-o", out, *tiny).exit_code == 0
    assert pq.read_table(out).equals(pq.read_table(reference))


def test_full_disk_on_prune_output(tmp_path, hh12, tiny, small_disk):
    out = small_disk / "kept.jsonl"
    scores = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", scores, *tiny).exit_code == 0
    _fill(small_disk, 0)
    result = invoke("prune", hh12, "--keep", 0.5, "--scores", scores, "-o", out)
    assert result.exit_code == 1 and "no space left on" in result.output, result.output
    assert temporaries(small_disk) == [] and not out.exists()


@pytest.fixture
def immutable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    done = subprocess.run(["chattr", "+i", str(locked)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
    yield locked
    subprocess.run(["chattr", "-i", str(locked)], check=False)


@pytest.mark.parametrize("command", ["score", "prune"])
def test_unwritable_output_directory_is_one_line(hh12, tiny, immutable_dir, command):
    out = immutable_dir / ("s.parquet" if command == "score" else "kept.jsonl")
    extra = ["--keep", "0.5"] if command == "prune" else []
    result = invoke(command, hh12, "-o", out, *tiny, *extra)
    assert result.exit_code in (1, 2), result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line and str(immutable_dir) in line
    assert os.listdir(immutable_dir) == []
