"""Hostile inputs to the I/O promises: path aliases, exact JSON lines, whole directories, --scores settings.

Fast tier: the score files here are built from the real input fingerprint (no model), or are the
shipped golden score file of examples/data/hh_rlhf_harmless_300.jsonl; only the tests marked slow load
a model.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ches_filter import paths, records, scorefile, sources
from ches_filter.cli import main
from ches_filter.errors import BadDataError, BadFlagError

from conftest import EXAMPLE_HH, REPO

GOLDEN = REPO / "tests" / "golden" / "hh300_scores.parquet"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def snapshot(root):
    """Every file and link under ``root`` (hidden ones too): size, mtime and content hash."""
    state = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                state[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                st = os.stat(path)
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
                state[rel] = (st.st_size, st.st_mtime_ns, digest)
            else:
                state[rel] = ("dir",)
    return state


def make_scores(data, out, **config):
    """A score file for ``data`` that prune accepts: the real input fingerprint, made-up scores (rank = row)."""
    from ches_filter.config import ScoreConfig
    from ches_filter.inputs import input_fingerprint, load_input

    ds, layout, columns = load_input(str(data), ScoreConfig(**config))
    n = len(ds)
    table = pa.table({
        "row_index": pa.array(range(n), pa.int64()),
        "ches": [float(i) * 1.1 for i in range(n)],
        "ln_ches": [0.1 + i / 7 for i in range(n)],
        "status": ["ok"] * n,
    })
    meta = {
        "input_fingerprint": input_fingerprint(ds, layout, columns),
        "columns": {"prompt": columns.prompt, "chosen": columns.chosen, "rejected": columns.rejected, "id": columns.id},
        "input_format": layout,
        "num_rows": n,
    }
    scorefile.write_table(table, str(out), metadata=meta, overwrite=True)
    return out


PAIRS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)]


@pytest.fixture
def pruneable(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding in.jsonl and its score file s.parquet."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", PAIRS)
    make_scores(tmp_path / "in.jsonl", tmp_path / "s.parquet")
    return tmp_path


# --------------------------------------------------------------------------
# 1 / 13: one output overwritten through another spelling of the same path
# --------------------------------------------------------------------------


def _alias(tmp_path, spelling, target):
    """Another spelling of ``target`` (a name in tmp_path); creates links where needed."""
    if spelling == "dot":
        return f"./{target}"
    if spelling == "absolute":
        return str(tmp_path / target)
    if spelling == "dotdot":
        (tmp_path / "sub").mkdir(exist_ok=True)
        return f"sub/../{target}"
    if spelling == "trailing_slash":
        return f"{target}/"
    if spelling == "double_slash":
        return f".//{target}"
    if spelling == "symlink":
        link = tmp_path / ("link-" + target)
        link.symlink_to(tmp_path / target)
        return link.name
    if spelling == "symlinked_dir":
        (tmp_path / "dirlink").symlink_to(tmp_path, target_is_directory=True)
        return f"dirlink/{target}"
    if spelling == "hardlink":
        if not (tmp_path / target).exists():
            (tmp_path / target).write_text("old\n")
        os.link(tmp_path / target, tmp_path / ("hard-" + target))
        return "hard-" + target
    raise AssertionError(spelling)


SPELLINGS = ["dot", "absolute", "dotdot", "trailing_slash", "double_slash", "symlink", "symlinked_dir", "hardlink"]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_rejects_aliasing_output_is_refused_before_writing(pruneable, spelling, overwrite):
    tmp_path = pruneable
    if overwrite:
        (tmp_path / "out.jsonl").write_text("old\n")  # an earlier result, to be replaced only legitimately
    alias = _alias(tmp_path, spelling, "out.jsonl")
    before = snapshot(tmp_path)
    flags = ["--overwrite"] if overwrite else []
    result = invoke("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl",
                    "--rejects", alias, *flags)
    assert result.exit_code == 2, result.output
    assert "`--output`" in result.output and "`--rejects`" in result.output and "same file" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("flag", ["--rejects", "--output"])
def test_an_output_aliasing_the_input_names_its_own_flag(pruneable, spelling, flag, overwrite):
    tmp_path = pruneable
    alias = _alias(tmp_path, spelling, "in.jsonl")
    outputs = {"--output": "out1.jsonl", "--rejects": "rej.jsonl"}
    outputs[flag] = alias
    before = snapshot(tmp_path)
    result = invoke("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", outputs["--output"],
                    "--rejects", outputs["--rejects"], *(["--overwrite"] if overwrite else []))
    assert result.exit_code == 2, result.output
    other = "--output" if flag == "--rejects" else "--rejects"
    assert f"`{flag}`" in result.output and "`INPUT`" in result.output and f"`{other}`" not in result.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", ["-o", "--rejects"])
def test_an_output_aliasing_the_score_file_is_refused(pruneable, flag):
    tmp_path = pruneable
    args = {"-o": "out.jsonl", "--rejects": "rej.jsonl"}
    args[flag] = "./s.parquet"
    before = snapshot(tmp_path)
    result = invoke("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", *sum(args.items(), ()), "--overwrite")
    assert result.exit_code == 2 and "`--scores`" in result.output, result.output
    assert snapshot(tmp_path) == before


def test_directory_output_holding_the_rejects_is_refused(pruneable):
    tmp_path = pruneable
    (tmp_path / "kept").mkdir()
    before = snapshot(tmp_path)
    for rejects in ("kept/rej.jsonl", "./kept/../kept/rej.jsonl"):
        result = invoke("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "kept",
                        "--rejects", rejects, "--overwrite")
        assert result.exit_code == 2 and "lies inside" in result.output, result.output
        assert "`--output`" in result.output and "`--rejects`" in result.output
    # and the other way round: the rejects directory holding the kept file
    result = invoke("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "kept/k.jsonl",
                    "--rejects", "kept", "--overwrite")
    assert result.exit_code == 2 and "lies inside" in result.output, result.output
    assert snapshot(tmp_path) == before


def test_output_inside_an_input_directory_or_around_the_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "in.jsonl", PAIRS)
    make_scores(tmp_path / "data", tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    result = invoke("prune", "data", "--keep", "0.5", "--scores", "s.parquet", "-o", "data/../data/out.parquet")
    assert result.exit_code == 2 and "inside the input directory" in result.output and "`--output`" in result.output
    # A directory output that holds the input would delete it when replaced.
    result = invoke("prune", "data/in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl",
                    "--rejects", "data", "--overwrite")
    assert result.exit_code == 2 and "contains the input" in result.output and "`--rejects`" in result.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", ["-o", "--rejects"])
def test_an_output_matching_the_input_glob_is_refused(tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", PAIRS)
    make_scores("d/*.jsonl", tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    args = {"-o": "out.jsonl", "--rejects": "rej.jsonl"}
    args[flag] = "./d/new.jsonl"
    result = invoke("prune", "d/*.jsonl", "--keep", "0.5", "--scores", "s.parquet", *sum(args.items(), ()))
    assert result.exit_code == 2 and "matches the input pattern" in result.output, result.output
    assert snapshot(tmp_path) == before
    args[flag] = "d/new.parquet"  # outside the pattern: fine
    assert invoke("prune", "d/*.jsonl", "--keep", "0.5", "--scores", "s.parquet", *sum(args.items(), ())).exit_code == 0


def test_distinct_outputs_still_work_and_overwrite_only_their_own_files(pruneable):
    tmp_path = pruneable
    args = ["prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl", "--rejects", "rej.jsonl"]
    assert invoke(*args).exit_code == 0
    kept = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    rejected = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert kept == PAIRS[:3] and [{k: r[k] for k in PAIRS[0]} for r in rejected] == PAIRS[3:]
    before = snapshot(tmp_path)
    result = invoke(*args)  # both exist now: refused without --overwrite, naming the first
    assert result.exit_code == 2 and "out.jsonl exists" in result.output and "`--output`" in result.output
    assert snapshot(tmp_path) == before
    assert invoke(*args, "--overwrite").exit_code == 0


def test_score_refuses_output_or_work_dir_clashes_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "in.parquet")
    before = snapshot(tmp_path)
    result = invoke("score", "in.parquet", "-o", "./in.parquet", "--model", "no/such-model")
    assert result.exit_code == 2 and "`--output`" in result.output and "`INPUT`" in result.output, result.output
    # A work dir holding the output: removing it after assembly would delete the result.
    result = invoke("score", "in.parquet", "-o", "w/s.parquet", "--work-dir", "w", "--model", "no/such-model")
    assert result.exit_code == 2 and "`--work-dir`" in result.output and "`--output`" in result.output, result.output
    result = invoke("score", "in.parquet", "-o", "s.parquet", "--work-dir", "s.parquet/", "--model", "no/such-model")
    assert result.exit_code == 2 and "same file" in result.output, result.output
    assert snapshot(tmp_path) == before


def test_displacement_merge_and_report_refuse_aliases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "in.parquet")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "manifest.json").write_text("{}")
    shutil.copy(GOLDEN, tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    result = invoke("displacement", "in.parquet", "-o", f"{tmp_path}/./in.parquet", "--model", "no/such-model")
    assert result.exit_code == 2 and "`--output`" in result.output and "`INPUT`" in result.output, result.output
    result = invoke("merge", "work", "-o", "work/s.parquet")
    assert result.exit_code == 2 and "`WORK_DIR`" in result.output, result.output
    pytest.importorskip("matplotlib")
    result = invoke("report", "s.parquet", "-o", ".", "--overwrite")
    assert result.exit_code == 2 and "`SCORES`" in result.output, result.output
    assert snapshot(tmp_path) == before


def test_check_paths_compares_every_named_path(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("x\n")
    os.link(a, tmp_path / "b.jsonl")
    with pytest.raises(BadFlagError, match=r"`--one` .* and `--three` .* same file \(hard links"):
        paths.check_paths({"--one": str(a), "--two": str(tmp_path / "c"), "--three": str(tmp_path / "b.jsonl")},
                       overwrite=True)
    with pytest.raises(BadFlagError, match=r"`--two` .*b\.jsonl is the same path as the input `IN`"):
        paths.check_paths({"--two": str(tmp_path / "b.jsonl")}, {"IN": str(a)}, overwrite=True)
    with pytest.raises(BadFlagError, match=r"`--x` .* exists; pass `--overwrite`"):
        paths.check_paths({"--x": str(a)}, overwrite=False)
    paths.check_paths({"--x": str(a)}, overwrite=False, may_exist=["--x"])
    paths.check_paths({"--x": str(tmp_path / "new"), "--y": None}, {"IN": "owner/name"}, overwrite=False)
    with pytest.raises(BadFlagError, match="for `--x` .* does not exist"):
        paths.check_paths({"--x": str(tmp_path / "no" / "out.jsonl")}, overwrite=True)


# --------------------------------------------------------------------------
# 2: JSON lines output holds exactly the values the input held
# --------------------------------------------------------------------------

ODD_VALUES = [
    {"f": 0.12345678901234567, "i": 1, "n": [1, 2], "u": "é ✓ 日本 \u2028 \"q\" \\", "m": None},
    {"f": 3.141592653589793, "i": 2**63 - 1, "n": [], "u": "\U0001f600", "m": 2.5},
    {"f": 1e-320, "i": -(2**63), "n": [3], "u": "", "m": None},
    {"f": -0.0, "i": 0, "n": [-7, 2**53 + 1], "u": "tab\tnl\n", "m": 1e300},
    {"f": 5e-324, "i": 12345678901234567, "n": [0], "u": "x", "m": -1.5},
    {"f": 1.7976931348623157e308, "i": -1, "n": [9], "u": "y", "m": None},
]


def _odd_rows():
    rows = []
    for k, extra in enumerate(ODD_VALUES):
        rows.append({
            "prompt": f"p{k}", "chosen": f"c{k}", "rejected": f"r{k}", **extra,
            "nested": {"a": [extra["f"]], "k": k, "b": {"c": [[0.5 * k, 0.1], [0.2]], "d": [[k]]}, "t": "ü"},
            "flag": k % 2 == 0,
        })
    return rows


def _same(a, b):
    """Equal in value and JSON type, recursively (1 != 1.0, -0.0 != 0.0, True != 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.mark.parametrize("add_scores", [False, True])
def test_jsonl_output_round_trips_every_value(tmp_path, monkeypatch, add_scores):
    monkeypatch.chdir(tmp_path)
    rows = _odd_rows()
    write_jsonl(tmp_path / "in.jsonl", rows)
    make_scores(tmp_path / "in.jsonl", tmp_path / "s.parquet")
    flags = ["--add-scores"] if add_scores else []
    result = invoke("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl",
                    "--rejects", "rej.jsonl", *flags)
    assert result.exit_code == 0, result.output
    scores = pq.read_table(tmp_path / "s.parquet").to_pylist()
    kept, rejected = _read_jsonl(tmp_path / "out.jsonl"), _read_jsonl(tmp_path / "rej.jsonl")
    assert len(kept) == 3 and len(rejected) == 3
    for got, want, score in zip(kept + rejected, rows, scores):
        original = {k: got[k] for k in want}
        assert _same(original, want), (original, want)
        extra = {k: v for k, v in got.items() if k not in want}
        expected = {} if (got in kept and not add_scores) else {k: score[k] for k in ("ches", "ln_ches", "status")}
        if got in rejected:
            expected = {"ches_filter_reason": "high_score", **expected}
        assert _same(extra, expected), (extra, expected)


def test_parquet_input_to_jsonl_keeps_types_and_scores_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = pa.table({
        "prompt": [f"p{i}" for i in range(4)], "chosen": [f"c{i}" for i in range(4)],
        "rejected": [f"r{i}" for i in range(4)],
        "i32": pa.array([1, None, -3, 2**31 - 1], pa.int32()),  # pandas would turn the null column into floats
        "u64": pa.array([2**63 - 1, 0, 1, None], pa.uint64()),
        "f32": pa.array([0.1, 1.5, None, -0.0], pa.float32()),
        "lst": pa.array([[1.25, None], None, [], [1e-320]], pa.list_(pa.float64())),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    make_scores(tmp_path / "in.parquet", tmp_path / "s.parquet")
    result = invoke("prune", "in.parquet", "--keep", "1", "--scores", "s.parquet", "-o", "out.jsonl", "--add-scores")
    assert result.exit_code == 0, result.output
    got = _read_jsonl(tmp_path / "out.jsonl")
    want = table.to_pylist()
    scores = pq.read_table(tmp_path / "s.parquet").to_pylist()
    for g, w, s in zip(got, want, scores):
        assert _same(g, {**w, "ches": s["ches"], "ln_ches": s["ln_ches"], "status": s["status"]}), (g, w)


def test_parquet_uint64_beyond_int64_is_refused_for_jsonl_and_kept_in_parquet(tmp_path, monkeypatch):
    """JSON readers (``load_dataset("json")``, pandas) read 18446744073709551615 back as a float: refused."""
    monkeypatch.chdir(tmp_path)
    table = pa.table({"prompt": ["p0", "p1"], "chosen": ["c0", "c1"], "rejected": ["r0", "r1"],
                      "u64": pa.array([1, 2**64 - 1], pa.uint64())})
    pq.write_table(table, tmp_path / "in.parquet")
    make_scores(tmp_path / "in.parquet", tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    result = invoke("prune", "in.parquet", "--keep", "1", "--scores", "s.parquet", "-o", "out.jsonl")
    assert result.exit_code == 1 and "column `u64`, row 2" in result.output and "`.parquet`" in result.output
    assert len(result.output.strip().splitlines()[-1]) > 0 and "Traceback" not in result.output
    assert snapshot(tmp_path) == before
    assert invoke("prune", "in.parquet", "--keep", "1", "--scores", "s.parquet", "-o", "out.parquet").exit_code == 0
    assert pq.read_table(tmp_path / "out.parquet").equals(table)


@pytest.mark.parametrize("value, why", [
    (float("nan"), "value"), (float("-inf"), "value"), (b"\x00\x01", "type"),
    (datetime.datetime(2020, 1, 2), "type"),
])
def test_values_json_cannot_hold_are_refused_and_nothing_written(tmp_path, monkeypatch, value, why):
    monkeypatch.chdir(tmp_path)
    filler = datetime.datetime(2000, 1, 1) if isinstance(value, datetime.datetime) else type(value)()
    rows = [dict(p, odd=value if i == 4 else filler) for i, p in enumerate(PAIRS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    make_scores(tmp_path / "in.parquet", tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    # Row 4 is rejected (scores rank rows in order): the kept file alone would be fine, yet nothing is written.
    result = invoke("prune", "in.parquet", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl",
                    "--rejects", "rej.jsonl")
    assert result.exit_code == 1 and "column `odd`" in result.output, result.output
    # binary/timestamp are refused by column type (the kept file has it too), NaN/inf by the rejected row's value
    assert ("`--output`" if why == "type" else "`--rejects` rej.jsonl") in result.output
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before
    # Parquet holds them: the same prune with parquet outputs succeeds.
    assert invoke("prune", "in.parquet", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.parquet",
                  "--rejects", "rej.parquet").exit_code == 0


@pytest.mark.parametrize("lines, column", [
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "big": 12345678901234567890}'], "big"),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "big": 1}', '{"prompt": "p", "chosen": "a", "rejected": "b", "big": -9223372036854775809}'],
     "big"),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "deep": {"x": [1, 18446744073709551616]}}'], "deep"),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "mix": 12345678901234567}', '{"prompt": "p", "chosen": "a", "rejected": "b", "mix": 0.5}'],
     "mix"),
])
def test_numbers_a_typed_reader_would_change_pass_to_jsonl_and_are_refused_for_parquet(tmp_path, lines, column):
    """Other columns are opaque: JSONL to JSONL keeps the lines; a typed output refuses the value in one line."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = invoke("prune", path, "--keep", "1", "--keep-unscored", "--scores", make_scores(path, tmp_path / "s.parquet"),
                    "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.jsonl").read_bytes() == path.read_bytes()
    result = invoke("prune", path, "--keep", "1", "--keep-unscored", "--scores", tmp_path / "s.parquet",
                    "-o", tmp_path / "out.parquet")
    assert result.exit_code == 1 and f"column `{column}`" in result.output, result.output
    assert not (tmp_path / "out.parquet").exists()


def test_objects_whose_keys_differ_between_rows_pass_through(tmp_path):
    rows = [dict(PAIRS[0], o={"x": 1}), dict(PAIRS[1], o={"y": [2.5, {"z": None}], "w": "ü"}), dict(PAIRS[2], o=None)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = invoke("prune", path, "--keep", "1", "--scores", make_scores(path, tmp_path / "s.parquet"),
                    "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.jsonl").read_bytes() == path.read_bytes()


def test_json_array_input_refuses_big_integers_for_jsonl(tmp_path):
    path = tmp_path / "in.json"
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b", "n": 1},\n {"prompt": "p", "chosen": "a", "rejected": "b", "n": 99999999999999999999}]')
    result = invoke("prune", path, "--keep", "1", "--keep-unscored", "--scores", make_scores(path, tmp_path / "s.parquet"),
                    "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1 and "column `n`, row 2" in result.output, result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_a_column_mixing_integers_and_fractions_comes_back_as_the_same_numbers(tmp_path):
    """Documented: Arrow stores such a column as floats, so 1 is written back as 1.0 (the same number)."""
    rows = [dict(PAIRS[0], n=1), dict(PAIRS[1], n=2.5), dict(PAIRS[2], n=2**53)]
    ds = sources.read_dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    records.write_dataset(ds, str(tmp_path / "out.jsonl"))
    got = [r["n"] for r in _read_jsonl(tmp_path / "out.jsonl")]
    assert got == [1.0, 2.5, float(2**53)] and all(isinstance(v, float) for v in got)


def test_large_integers_in_an_integer_column_stay_exact(tmp_path):
    rows = [dict(PAIRS[0], n=2**63 - 1), dict(PAIRS[1], n=2**53 + 1)]
    ds = sources.read_dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    records.write_dataset(ds, str(tmp_path / "out.jsonl"))
    assert all(_same(a, b) for a, b in zip(_read_jsonl(tmp_path / "out.jsonl"), rows))


# --------------------------------------------------------------------------
# 3: a directory is read whole, or refused; no file is skipped unannounced
# --------------------------------------------------------------------------


def _hh(n, start=0):
    return [json.loads(x) for x in EXAMPLE_HH.read_text(encoding="utf-8").splitlines()[start:start + n]]


def test_directory_mixing_jsonl_and_parquet_is_refused_naming_both(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    write_jsonl(data / "a.jsonl", _hh(6))
    pq.write_table(pa.Table.from_pylist(_hh(3, 6)), data / "p1.parquet")
    before = snapshot(tmp_path)
    result = invoke("score", data, "-o", tmp_path / "s.parquet", "--model", "no/such-model")
    assert result.exit_code == 1, result.output
    assert "a.jsonl" in result.output and "p1.parquet" in result.output and "several kinds" in result.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("stray", ["notes.txt", "sub/extra.tsv", "data.jsonl.bz2", "x.arrow", "noext"])
def test_directory_with_files_it_cannot_read_is_refused(tmp_path, stray):
    data = tmp_path / "d"
    (data / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_hh(3)), data / "p1.parquet")
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
    write_jsonl(data / "a.jsonl", _hh(6))
    write_jsonl(data / "sub" / "b.jsonl", _hh(2, 6))
    write_jsonl(data / "README.jsonl", _hh(1, 8))  # named like documentation, but it is data
    (data / "README.md").write_text("# my data\n")
    (data / "LICENSE").write_text("MIT\n")
    (data / ".DS_Store").write_bytes(b"\x00\x01junk")
    (data / ".git" / "config.txt").write_text("x")
    (data / ".a.jsonl.tmp-123").write_text("half a line")
    ds = sources.read_dataset(str(data))
    assert len(ds) == 9
    # sorted by path: README.jsonl, a.jsonl, sub/b.jsonl
    assert ds["chosen"] == [r["chosen"] for r in _hh(1, 8) + _hh(6) + _hh(2, 6)]
    make_scores("d", tmp_path / "s.parquet")
    result = invoke("prune", "d", "--keep", "1", "--scores", "s.parquet", "-o", "out.jsonl")
    assert result.exit_code == 0 and "rows in:  9" in result.output, result.output


def test_directory_of_parquet_and_glob_still_read(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(_hh(3)), data / "p1.parquet")
    pq.write_table(pa.Table.from_pylist(_hh(2, 3)), data / "p2.parquet")
    write_jsonl(data / "a.jsonl", _hh(6))
    assert len(sources.read_dataset(str(data / "*.parquet"))) == 5  # a glob names what to read
    assert len(sources.read_dataset(str(data / "*.jsonl"))) == 6
    (data / "a.jsonl").unlink()
    assert len(sources.read_dataset(str(data))) == 5


# --------------------------------------------------------------------------
# 4: scoring flags given with --scores must match the score file
# --------------------------------------------------------------------------


@pytest.fixture
def golden(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE_HH, tmp_path / "base.jsonl")
    shutil.copy(GOLDEN, tmp_path / "s.parquet")
    (tmp_path / "other-model").mkdir()
    return tmp_path


PRUNE = ("prune", "base.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl")
VALIDATE = ("validate", "base.jsonl", "-o", "vout", "--scores", "s.parquet")


@pytest.mark.parametrize("flags, named", [
    (["--layout", "trl"], "--layout"),
    (["--max-length", "2"], "--max-length"),
    (["--model", "other/model"], "--model"),
    (["--model", "other-model"], "--model"),  # an existing local directory
    (["--model", "./other-model/"], "--model"),
    (["--measures", "ches,ln_ches"], "--measures"),
    (["--no-chat-template"], "--no-chat-template"),
    (["--input-format", "explicit_text"], "--input-format"),
    (["--chosen-column", "good"], "--chosen-column"),
    (["--id-column", "row"], "--id-column"),
    (["--dtype", "bfloat16"], "--dtype"),
    (["--engine", "plain"], "--engine"),
    (["--attn-implementation", "eager"], "--attn-implementation"),
    (["--model", "other/model", "--revision", "v2"], "--revision"),
    # a flag set to its default value is still given, and it differs from the file here
    (["--max-length", "512"], "--max-length"),
])
@pytest.mark.parametrize("command", [PRUNE, VALIDATE], ids=["prune", "validate"])
def test_scoring_flag_differing_from_the_score_file_is_refused(golden, flags, named, command):
    before = snapshot(golden)
    result = invoke(*command, *flags)
    assert result.exit_code == 2, result.output
    assert f"`{named}`" in result.output and "score file" in result.output and "Traceback" not in result.output
    assert snapshot(golden) == before


@pytest.mark.parametrize("command", [PRUNE, VALIDATE], ids=["prune", "validate"])
def test_every_differing_flag_is_named_at_once(golden, command):
    result = invoke(*command, "--layout", "trl", "--max-length", "2", "--model", "other/model", "--device", "cpu")
    assert result.exit_code == 2
    for flag in ("--layout", "--max-length", "--model"):
        assert f"`{flag}`" in result.output
    assert "--device" not in result.output


@pytest.mark.parametrize("flags", [
    [],
    ["--layout", "paper", "--max-length", "8192", "--measures", "edit_distance,ches,last_hidden_ip,ln_ches"],
    ["--dtype", "float32", "--engine", "packed", "--attn-implementation", "sdpa", "--input-format", "implicit_text"],
    ["--dtype", "auto", "--engine", "auto", "--prompt-column", "prompt", "--chosen-column", "chosen"],
    ["--device", "cpu", "--engine-workers", "3", "--max-batch-tokens", "64", "--max-batch-size", "2",
     "--chunk-size", "7", "--quiet", "--trust-remote-code"],
])
def test_matching_or_free_flags_are_accepted(golden, flags):
    result = invoke(*PRUNE, *flags)
    assert result.exit_code == 0, result.output
    assert "kept:     150" in result.output


def test_validate_scores_of_another_model_are_refused_even_with_the_default_model(golden):
    """validate trains its --model on the file's ranking: a file scored by another model is refused
    although --model was left at its default (prune, which trains nothing, accepts it)."""
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(golden / "s.parquet")
    meta = json.loads(table.schema.metadata[b"ches_filter"])
    meta["model"]["model"] = "google/gemma-3-270m"
    meta["use_chat_template"] = False
    pq.write_table(table.replace_schema_metadata({b"ches_filter": json.dumps(meta)}), golden / "g.parquet")
    before = snapshot(golden)
    result = invoke("validate", "base.jsonl", "-o", "vout", "--scores", "g.parquet")
    assert result.exit_code == 2, result.output
    assert "`--model`" in result.output and "google/gemma-3-270m" in result.output and "validate trains" in result.output
    assert "Traceback" not in result.output and snapshot(golden) == before
    assert invoke("prune", "base.jsonl", "--keep", "0.5", "--scores", "g.parquet", "-o", "out.jsonl").exit_code == 0


def test_every_score_setting_is_either_free_or_compared():
    """A new ScoreConfig field must be classified, or --scores would ignore it silently."""
    import dataclasses

    from ches_filter.config import ScoreConfig
    from ches_filter.select import FREE_SCORE_SETTINGS, _score_settings

    fields = {f.name for f in dataclasses.fields(ScoreConfig)}
    compared = set(_score_settings(ScoreConfig(), {}))
    assert fields == FREE_SCORE_SETTINGS | compared, fields ^ (FREE_SCORE_SETTINGS | compared)
    assert not FREE_SCORE_SETTINGS & compared


@pytest.mark.slow
def test_tiny_model_scores_refuse_another_model_and_accept_their_own(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", _hh(4))
    result = invoke("score", "in.jsonl", "-o", "s.parquet", "--model", tiny_model_dir, "--max-length", "300", "-q")
    assert result.exit_code == 0, result.output
    base = ("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl", "--overwrite")
    for ok in ([], ["--model", tiny_model_dir], ["--model", f"{tiny_model_dir}/"], ["--max-length", "300"]):
        result = invoke(*base, *ok)
        assert result.exit_code == 0, (ok, result.output)
    for bad, flag in ((["--model", "other/model"], "--model"), (["--max-length", "299"], "--max-length")):
        result = invoke(*base, *bad)
        assert result.exit_code == 2 and f"`{flag}`" in result.output, (bad, result.output)


# --------------------------------------------------------------------------
# report with no scored rows
# --------------------------------------------------------------------------


def test_report_without_scored_rows_says_so_without_a_warning(tmp_path):
    pytest.importorskip("matplotlib")
    table = pq.read_table(GOLDEN)
    n = table.num_rows
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(["too_long"] * n))
    for name in ("ches", "ln_ches", "last_hidden_ip", "edit_distance"):
        table = table.set_column(table.schema.get_field_index(name), name, pa.nulls(n, pa.float64()))
    pq.write_table(table, tmp_path / "none.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = invoke("report", tmp_path / "none.parquet", "-o", tmp_path / "rep", "-q")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == f"rows: {n}, no scored rows (not scored: too_long {n})"
    assert len(lines) == 2 and lines[1].startswith("report -> ")
    assert "Warning" not in result.output
