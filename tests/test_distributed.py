"""Sharding: `--num-shards` + `merge`, and `torchrun` data parallelism (gloo on CPU)."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from ches_filter.cli import main
from ches_filter.config import JobConfig
from ches_filter.run import Topology, WorkDir, part_grid, shard_slice
from ches_filter.errors import BadFlagError

from conftest import read_hh

ROWS = 30
EVERY = 4


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def same_table(a, b):
    return a.equals(b) and a.schema.metadata == b.schema.metadata


@given(st.integers(0, 500), st.integers(1, 64), st.integers(1, 9))
def test_grid_and_shards_cover_every_row_once(num_rows, every, count):
    grid = part_grid(num_rows, every)
    assert [r for a, b in grid for r in range(a, b)] == list(range(num_rows))
    assert all(0 < b - a <= every for a, b in grid)
    shards = [shard_slice(grid, i, count) for i in range(count)]
    assert [p for shard in shards for p in shard] == grid  # contiguous, in order, nothing twice
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"num_shards": 3}, "--shard-index"),
        ({"num_shards": 3, "shard_index": 3}, "--shard-index"),
        ({"shard_index": 1}, "--shard-index"),
        ({"checkpoint_every": 0}, "--checkpoint-every"),
        ({"num_shards": 0, "shard_index": 0}, "--num-shards"),
    ],
)
def test_job_config_refuses_bad_values(kwargs, flag):
    with pytest.raises(BadFlagError, match=flag):
        JobConfig(**kwargs)


def test_topology_reads_torchrun_environment(monkeypatch):
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    topo = Topology.from_env(shard_index=1, num_shards=2)
    assert (topo.rank, topo.world_size, topo.local_rank, topo.local_world_size) == (3, 4, 1, 2)
    assert (topo.worker, topo.workers) == (7, 8)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(BadFlagError, match="RANK"):
        Topology.from_env()


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_world_size_without_rendezvous_is_one_line_naming_torchrun(monkeypatch, missing, tmp_path):
    """WORLD_SIZE/RANK set by hand without torchrun's rendezvous: say so instead of torch's ValueError."""
    from click.testing import CliRunner

    from ches_filter.cli import main

    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(missing)
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    for command in (["score", str(data), "-o", str(tmp_path / "s.parquet")],
                    ["prune", str(data), "--keep", "0.5", "-o", str(tmp_path / "p.jsonl")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert missing in result.output and "torchrun" in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written


@pytest.fixture(scope="module")
def hh30(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "hh30.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in read_hh(ROWS)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def flags(tiny_model_dir):
    return ["--model", tiny_model_dir, "--checkpoint-every", EVERY, "--chunk-size", 2, "-q"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hh30, flags):
    """One process, no sharding."""
    out = tmp_path_factory.mktemp("ref") / "single.parquet"
    result = invoke("score", hh30, "-o", out, *flags)
    assert result.exit_code == 0, result.output
    return pq.read_table(out)


def test_three_shards_and_merge_equal_one_process(tmp_path, hh30, flags, reference):
    out = tmp_path / "s.parquet"
    for index in (2, 0, 1):
        result = invoke("score", hh30, "-o", out, *flags, "--num-shards", 3, "--shard-index", index)
        assert result.exit_code == 0, result.output
        assert "ches-filter merge" in result.output
        assert not out.exists()
    work = WorkDir(str(out) + ".parts")
    assert work.completed_shards() == {3: {0, 1, 2}}
    stamps = {os.path.basename(p).split(".")[1] for p in work.scan_parts().values()}
    assert stamps == {"rank-00000", "rank-00001", "rank-00002"}
    result = invoke("merge", work.path, "-o", out)
    assert result.exit_code == 0, result.output
    assert same_table(pq.read_table(out), reference)
    assert not os.path.exists(work.path)


def test_merge_names_the_missing_shards(tmp_path, hh30, flags, reference):
    out = tmp_path / "s.parquet"
    for index in (0, 2):
        assert invoke("score", hh30, "-o", out, *flags, "--num-shards", 3, "--shard-index", index).exit_code == 0
    result = invoke("merge", str(out) + ".parts", "-o", out)
    assert result.exit_code == 1
    assert "`--shard-index` 1" in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert invoke("score", hh30, "-o", out, *flags, "--num-shards", 3, "--shard-index", 1).exit_code == 0
    assert invoke("merge", str(out) + ".parts", "-o", out).exit_code == 0
    assert same_table(pq.read_table(out), reference)


def test_shards_with_different_flags_refuse_to_mix(tmp_path, hh30, flags):
    out = tmp_path / "s.parquet"
    assert invoke("score", hh30, "-o", out, *flags, "--num-shards", 2, "--shard-index", 0).exit_code == 0
    result = invoke("score", hh30, "-o", out, *flags, "--num-shards", 2, "--shard-index", 1, "--max-length", 100)
    assert result.exit_code == 2 and "`--max-length`" in result.output


def test_merge_of_a_directory_that_is_not_a_work_dir(tmp_path):
    result = invoke("merge", tmp_path, "-o", tmp_path / "s.parquet")
    assert result.exit_code == 1 and "manifest" in result.output


def _torchrun(args, **kwargs):
    # python -m torch.distributed.run is torchrun; --standalone picks a free port.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ches_filter", "score", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, hh30, flags, reference):
    out = tmp_path / "s.parquet"
    done = _torchrun([hh30, "-o", out, *flags, "--keep-work-dir"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_table(pq.read_table(out), reference)
    work = WorkDir(str(out) + ".parts")
    stamps = sorted(os.path.basename(p).split(".")[1] for p in work.scan_parts().values())
    assert stamps == ["rank-00000"] * 4 + ["rank-00001"] * 4  # 8 parts, split in two contiguous runs
    for worker in (0, 1):
        with open(work.stats_path(worker)) as handle:
            run = json.load(handle)["runs"][-1]
        assert (run["world_size"], run["rank"], run["parts_written"], run["finished"]) == (2, worker, 4, True)


@pytest.mark.slow
def test_torchrun_resumes_and_shares_out_what_is_left(tmp_path, hh30, flags, reference):
    """A launch finds shard 0 of 3 done and splits the remaining parts between its two ranks."""
    out = tmp_path / "s.parquet"
    assert invoke("score", hh30, "-o", out, *flags, "--num-shards", 3, "--shard-index", 0).exit_code == 0
    work = WorkDir(str(out) + ".parts")
    first = dict(work.scan_parts())
    assert len(first) == 2
    done = _torchrun([hh30, "-o", out, *flags, "--keep-work-dir"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_table(pq.read_table(out), reference)
    runs = {}
    for worker in (0, 1):
        with open(work.stats_path(worker)) as handle:
            runs[worker] = json.load(handle)["runs"][-1]
    assert [(r["parts_skipped"], r["parts_written"]) for r in runs.values()] == [(2, 3), (2, 3)]
    assert {k: v for k, v in work.scan_parts().items() if k in first} == first
