"""Resume: parts on disk, SIGKILL and rerun, refusing to mix runs, atomic output."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ches_filter.cli import main
from ches_filter.config import JobConfig
from ches_filter.run import WorkDir, score_to_file
from ches_filter.api import score_pairs

from conftest import read_hh


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path):
    return pq.read_table(path)


def same_table(a, b):
    return a.equals(b) and a.schema.metadata == b.schema.metadata


@pytest.fixture
def hh12(tmp_path):
    return write_jsonl(tmp_path / "hh12.jsonl", read_hh(12))


@pytest.fixture
def tiny(tiny_model_dir):
    return ["--model", tiny_model_dir, "--checkpoint-every", 4, "--chunk-size", 2, "-q"]


def stats(work_dir):
    with open(os.path.join(work_dir, "stats", "rank-00000.json")) as handle:
        return json.load(handle)["runs"]


def test_work_dir_layout_and_cleanup(tmp_path, hh12, tiny):
    out = tmp_path / "s.parquet"
    result = invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir")
    assert result.exit_code == 0, result.output
    work = WorkDir(str(out) + ".parts")
    assert sorted(work.scan_parts()) == [(0, 4), (4, 8), (8, 12)]
    assert all(p.endswith(".rank-00000.parquet") for p in work.scan_parts().values())
    assert work.read_manifest()["grid"] == {"num_rows": 12, "checkpoint_every": 4}
    assert os.path.exists(work.completion_path(0, 1))
    assert stats(work.path)[-1]["parts_written"] == 3
    # Without --keep-work-dir the directory goes once the output is in place.
    out2 = tmp_path / "s2.parquet"
    assert invoke("score", hh12, "-o", out2, *tiny).exit_code == 0
    assert not os.path.exists(str(out2) + ".parts")
    assert same_table(read(out), read(out2))


def test_output_equals_score_pairs(tmp_path, hh12, tiny_model_dir):
    """Parts of 4 rows in chunks of 2 batch exactly as one pass in chunks of 2."""
    from ches_filter.model import load_model

    model = load_model(str(tiny_model_dir), device="cpu")
    direct = score_pairs(str(hh12), model=model, chunk_size=2, progress=False)
    out = tmp_path / "s.parquet"
    from ches_filter.config import ScoreConfig

    summary = score_to_file(str(hh12), str(out), ScoreConfig(chunk_size=2), JobConfig(checkpoint_every=4), model=model, progress=False)
    written = read(out)
    assert summary["counts"] == json.loads(direct.schema.metadata[b"ches_filter"])["counts"]
    assert written.replace_schema_metadata(None).equals(direct.replace_schema_metadata(None))
    assert json.loads(written.schema.metadata[b"ches_filter"]) == json.loads(direct.schema.metadata[b"ches_filter"])


def test_lost_part_is_redone_alone_and_stale_temp_files_ignored(tmp_path, hh12, tiny):
    out = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir").exit_code == 0
    first = read(out)
    work = WorkDir(str(out) + ".parts")
    parts = work.scan_parts()
    kept = {key: os.stat(path).st_mtime_ns for key, path in parts.items() if key != (4, 8)}
    os.unlink(parts[(4, 8)])
    # What a SIGKILL during a part write leaves behind.
    stale = os.path.join(work.parts_dir, ".000000000004-000000000008.rank-00000.parquet.tmp-host-1")
    with open(stale, "wb") as handle:
        handle.write(b"PAR1 half a file")
    result = invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir", "--overwrite")
    assert result.exit_code == 0, result.output
    assert same_table(read(out), first)
    last = stats(work.path)[-1]
    assert (last["parts_skipped"], last["parts_written"], last["rows_scored"]) == (2, 1, 4)
    assert {key: os.stat(path).st_mtime_ns for key, path in work.scan_parts().items() if key != (4, 8)} == kept
    assert not os.path.exists(stale)


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--max-length", "64"], "`--max-length`"),
        (["--checkpoint-every", "3"], "`--checkpoint-every`"),
        (["--engine", "plain"], "`--engine`"),
        (["--no-chat-template"], "`--no-chat-template`"),
    ],
)
def test_rerun_with_other_flags_refuses_to_mix(tmp_path, hh12, tiny, extra, named):
    out = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir").exit_code == 0
    before = read(out)
    result = invoke("score", hh12, "-o", out, *tiny, *extra, "--overwrite")
    assert result.exit_code == 2, result.output
    assert named in result.output and "work directory" in result.output and "Traceback" not in result.output
    assert same_table(read(out), before)


def test_rerun_on_changed_input_refuses(tmp_path, hh12, tiny):
    out = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir").exit_code == 0
    rows = read_hh(12)
    rows[5] = dict(rows[5], rejected=rows[5]["rejected"] + " (edited)")
    write_jsonl(hh12, rows)
    result = invoke("score", hh12, "-o", out, *tiny, "--overwrite")
    assert result.exit_code == 2 and "input rows differ" in result.output


def test_other_model_refuses(tmp_path, hh12, tiny, tiny_model_dir):
    out = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir", "--dtype", "float32").exit_code == 0
    result = invoke("score", hh12, "-o", out, *tiny, "--overwrite", "--dtype", "bfloat16")
    assert result.exit_code == 2 and "`--dtype`" in result.output


def test_finished_output_is_not_overwritten(tmp_path, hh12, tiny):
    out = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", out, *tiny).exit_code == 0
    result = invoke("score", hh12, "-o", out, *tiny)
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_rerun_after_finish_with_kept_work_dir_is_a_no_op(tmp_path, hh12, tiny):
    out = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir").exit_code == 0
    mtime = os.stat(out).st_mtime_ns
    result = invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir")
    assert result.exit_code == 0 and "already complete" in result.output
    assert os.stat(out).st_mtime_ns == mtime


def test_killed_while_deleting_the_work_dir(tmp_path, hh12, tiny):
    """The output is in place and the work dir was renamed aside for deletion: a rerun just finishes up."""
    out = tmp_path / "s.parquet"
    assert invoke("score", hh12, "-o", out, *tiny, "--keep-work-dir").exit_code == 0
    work = WorkDir(str(out) + ".parts")
    os.replace(work.path, work.trash)
    result = invoke("score", hh12, "-o", out, *tiny)
    assert result.exit_code == 0 and "already complete" in result.output
    assert not os.path.exists(work.trash) and not os.path.exists(work.path)


def test_work_dir_that_is_not_ours_is_refused(tmp_path, hh12, tiny):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = invoke("score", hh12, "-o", tmp_path / "s.parquet", *tiny, "--work-dir", foreign)
    assert result.exit_code == 2 and "notes.txt" in result.output
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_work_dir_may_not_hold_the_input(tmp_path, hh12, tiny):
    result = invoke("score", hh12, "-o", tmp_path / "s.parquet", *tiny, "--work-dir", tmp_path)
    assert result.exit_code == 2 and "input" in result.output
    assert hh12.exists()


# --------------------------------------------------------------------------
# The real thing: SIGKILL a running `prune` (which scores through the same parts as `score`), rerun it.
# --------------------------------------------------------------------------

KILL_ROWS = 120
CHECKPOINT = 10


def _command(data, out, work, model):
    return [sys.executable, "-m", "ches_filter", "prune", str(data), "--keep", "0.7", "-o", str(out),
            "--work-dir", str(work), "--keep-work-dir", "--model", str(model),
            "--checkpoint-every", str(CHECKPOINT), "--chunk-size", "5"]


def _env():
    # One thread per process: the scores do not depend on it, and a loaded
    # CI machine runs small matmuls far faster without thread contention.
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_output(tmp_path, tiny_model_dir):
    """One killed run checks both: the resumed `prune` writes the uninterrupted run's records byte for byte,
    and the parts under it are the uninterrupted run's scores, with the parts that survived reused untouched
    and exactly the other rows scored (the same parts `score` writes: tests/test_pipeline.py)."""
    data = write_jsonl(tmp_path / "hh.jsonl", read_hh(KILL_ROWS))
    reference, ref_work = tmp_path / "reference.jsonl", WorkDir(str(tmp_path / "ref-work"))
    done = subprocess.run(_command(data, reference, ref_work.path, tiny_model_dir), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    out, work = tmp_path / "kept.jsonl", WorkDir(str(tmp_path / "work"))
    proc = subprocess.Popen(_command(data, out, work.path, tiny_model_dir), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(work.scan_parts()) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    survived = {key: os.stat(path) for key, path in work.scan_parts().items()}
    total_parts = -(-KILL_ROWS // CHECKPOINT)
    assert 1 <= len(survived) < total_parts
    assert not out.exists(), "a killed run must not leave an output that looks complete"

    rerun = subprocess.run(_command(data, out, work.path, tiny_model_dir), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming: {len(survived)} of {total_parts} parts" in rerun.stderr
    assert out.read_bytes() == reference.read_bytes()

    # The scores under it: part for part (so row for row, in order) the uninterrupted run's, bit for bit.
    parts, ref_parts = work.scan_parts(), ref_work.scan_parts()
    assert sorted(parts) == sorted(ref_parts) == [(a, min(a + CHECKPOINT, KILL_ROWS)) for a in range(0, KILL_ROWS, CHECKPOINT)]
    for key in parts:
        assert read(parts[key]).equals(read(ref_parts[key])), f"resumed scores of rows {key} differ"

    # No pair scored twice: the parts that survived the kill were reused as they were,
    # and the rerun scored exactly the rows they did not cover.
    for key, before in survived.items():
        after = os.stat(parts[key])
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    last = stats(work.path)[-1]
    assert last["parts_skipped"] == len(survived)
    assert last["parts_written"] == total_parts - len(survived)
    assert last["rows_scored"] == KILL_ROWS - sum(b - a for a, b in survived)
    assert last["finished"] is True


def test_id_column_keeps_its_type_across_parts(tmp_path, tiny):
    """A part whose ids are all null still agrees with the others on the column type."""
    rows = [dict(r, uid=None if 4 <= i < 8 else f"id-{i}") for i, r in enumerate(read_hh(12))]
    data = write_jsonl(tmp_path / "ids.jsonl", rows)
    out = tmp_path / "s.parquet"
    result = invoke("score", data, "-o", out, *tiny, "--id-column", "uid")
    assert result.exit_code == 0, result.output
    table = read(out)
    assert str(table.schema.field("uid").type) == "string"
    assert table.column("uid").to_pylist() == [r["uid"] for r in rows]
