"""ches_filter.paths: output clashes checked before anything is written (aliases, globs, directories the user owns, non-UTF-8 names)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import json
import logging
import os
import shutil

import datasets
import pytest

from ches_filter import paths, records
from ches_filter.errors import BadFlagError
from ches_filter.sources import read_dataset

from conftest import EXAMPLE_HH, GOLDEN, HH_PAIR, PAIRS, THREE_HH_PAIRS, invoke, listing, make_scores, one_error_line, run_score, snapshot, write_bytes, write_jsonl, write_lines


def hh_rows(n: int) -> list[str]:
    with open(EXAMPLE_HH, encoding="utf-8") as handle:
        return [next(handle) for _ in range(n)]


def tree(path) -> dict[str, str]:
    """Every file under ``path`` (relative path -> text), to compare before and after."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as handle:
                out[os.path.relpath(full, path)] = handle.read()
    return out


def victim(path):
    """A directory of the user's: a note and a nested file."""
    (path / "deep").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "deep" / "y").write_text("y")
    return path


PRUNE = ["prune", EXAMPLE_HH, "--scores", GOLDEN, "--keep", "0.5"]


# ---------------------------------------------------------------- --overwrite on a directory output


@pytest.mark.parametrize("spelling", ["{d}", "{d}/", "./{d}", "{d}/../{d}", "{d}/./"])
def test_prune_overwrite_keeps_the_users_files_in_a_directory_output(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    victim(tmp_path / "victim")
    before = tree(tmp_path / "victim")
    result = invoke(*PRUNE, "-o", spelling.format(d="victim"), "--overwrite")
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "notes.txt" in line and "deep/" in line and "did not write" in line
    assert tree(tmp_path / "victim") == before
    assert sorted(os.listdir(tmp_path)) == ["victim"]  # no temporary, no work directory


def test_rejects_directory_with_the_users_files_is_refused_before_the_output_is_written(tmp_path):
    victim(tmp_path / "rej")
    before = tree(tmp_path / "rej")
    result = invoke(*PRUNE, "-o", tmp_path / "kept.jsonl", "--rejects", tmp_path / "rej", "--overwrite")
    assert result.exit_code == 2 and "`--rejects`" in one_error_line(result) and "notes.txt" in one_error_line(result)
    assert tree(tmp_path / "rej") == before and not (tmp_path / "kept.jsonl").exists()


def test_file_output_that_is_the_users_directory_is_refused(tmp_path):
    # `-o out.parquet` names a directory of the user's: replacing it by a file would delete it.
    victim(tmp_path / "out.parquet")
    result = invoke(*PRUNE, "-o", tmp_path / "out.parquet", "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in one_error_line(result)
    assert (tmp_path / "out.parquet" / "notes.txt").read_text() == "my notes"
    # score too, even before `--overwrite` is considered (an existing output is its resume logic's business)
    result = invoke("score", EXAMPLE_HH, "-o", tmp_path / "out.parquet", "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in one_error_line(result)
    result = invoke("displacement", EXAMPLE_HH, "-o", tmp_path / "out.parquet", "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in one_error_line(result)
    assert (tmp_path / "out.parquet" / "deep" / "y").read_text() == "y"
    assert sorted(os.listdir(tmp_path)) == ["out.parquet"]


def test_overwrite_replaces_a_directory_ches_filter_wrote(tmp_path):
    out = tmp_path / "pruned"
    assert invoke(*PRUNE, "-o", out).exit_code == 0
    first = sorted(os.listdir(out))
    assert "state.json" in first
    result = invoke(*PRUNE[:-1], "0.25", "-o", str(out) + "/", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == first
    import datasets

    assert len(datasets.load_from_disk(str(out))) < 100  # the second run's quarter, not the first run's half
    # ...but not once the user has put a file of theirs into it
    (out / "README.txt").write_text("mine")
    result = invoke(*PRUNE, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "README.txt" in one_error_line(result)
    assert (out / "README.txt").read_text() == "mine"
    # an empty directory holds nothing of the user's
    (tmp_path / "empty").mkdir()
    assert invoke(*PRUNE, "-o", tmp_path / "empty", "--overwrite").exit_code == 0


def test_a_saved_dataset_dict_and_hidden_files(tmp_path):
    import datasets

    from ches_filter.paths import foreign_to_dataset

    ds = datasets.Dataset.from_dict({"a": [1, 2]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    assert foreign_to_dataset(str(tmp_path / "dd")) == []
    (tmp_path / "dd" / "train" / ".git").mkdir()
    (tmp_path / "dd" / ".DS_Store").write_text("")
    os.symlink(tmp_path / "dd" / "test" / "state.json", tmp_path / "dd" / "test" / "link.json")
    assert foreign_to_dataset(str(tmp_path / "dd")) == [".DS_Store", "test/link.json", "train/.git/"]


def test_overwrite_of_a_link_to_the_users_directory_replaces_the_link_only(tmp_path):
    victim(tmp_path / "victim")
    before = tree(tmp_path / "victim")
    os.symlink(tmp_path / "victim", tmp_path / "link")
    result = invoke(*PRUNE, "-o", tmp_path / "link", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not os.path.islink(tmp_path / "link") and (tmp_path / "link" / "state.json").is_file()
    assert tree(tmp_path / "victim") == before


def test_unlistable_directory_output_is_refused_in_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root lists every directory")
    victim(tmp_path / "victim")
    os.chmod(tmp_path / "victim", 0o300)
    try:
        result = invoke(*PRUNE, "-o", tmp_path / "victim", "--overwrite")
        assert result.exit_code == 2 and "cannot be listed" in one_error_line(result)
    finally:
        os.chmod(tmp_path / "victim", 0o700)
    assert (tmp_path / "victim" / "notes.txt").read_text() == "my notes"


def test_report_overwrite_keeps_the_users_files(tmp_path):
    from ches_filter.report import REPORT_FILES

    out = tmp_path / "rep"
    victim(out)
    before = tree(out)
    result = invoke("report", GOLDEN, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in one_error_line(result) and "deep/" in one_error_line(result)
    assert tree(out) == before
    shutil.rmtree(out)
    assert invoke("report", GOLDEN, "-o", out).exit_code == 0
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES)  # what the check accepts is what a report holds
    result = invoke("report", GOLDEN, "-o", f"{out}/", "--overwrite", "--top", "3")
    assert result.exit_code == 0, result.output
    (out / "my.css").write_text("mine")
    result = invoke("report", GOLDEN, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "my.css" in one_error_line(result) and (out / "my.css").read_text() == "mine"


def test_validate_overwrite_refuses_what_it_would_destroy_and_keeps_other_files(tmp_path):
    out = tmp_path / "val"
    (out / "validate.png").mkdir(parents=True)  # a directory where validate writes a file
    (out / "validate.png" / "holiday.png").write_text("photo")
    (out / "scores.parquet.parts").mkdir()  # where validate's scoring keeps its parts, deleted by --overwrite
    (out / "scores.parquet.parts" / "mine.txt").write_text("keep")
    (out / "notes.txt").write_text("kept: validate never touches another name")
    before = tree(out)
    result = invoke("validate", EXAMPLE_HH, "-o", out, "--scores", GOLDEN, "--overwrite")
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "validate.png/" in line and "scores.parquet.parts/" in line and "notes.txt" not in line
    assert tree(out) == before
    assert sorted(os.listdir(out)) == ["notes.txt", "scores.parquet.parts", "validate.png"]  # no lock left


# ---------------------------------------------------------------- names that look like globs


def _rows_read(path) -> int:
    return len(read_dataset(os.fspath(path)))


def test_an_existing_file_named_like_a_glob_is_that_file(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    write_lines("d[1].jsonl", hh_rows(3))
    write_lines("d1.jsonl", hh_rows(5))
    assert _rows_read("d[1].jsonl") == 3
    assert _rows_read(tmp_path / "d[1].jsonl") == 3
    assert _rows_read("./d[1].jsonl") == 3
    os.symlink("d[1].jsonl", "l[1].jsonl")
    assert _rows_read("l[1].jsonl") == 3
    write_lines("x*.jsonl", hh_rows(2))
    write_lines("xa.jsonl", hh_rows(7))
    assert _rows_read("x*.jsonl") == 2
    write_lines("q?.jsonl", hh_rows(4))
    assert _rows_read("q?.jsonl") == 4
    # A path that does not exist is a glob, and the log says how many files it matched.
    with caplog.at_level(logging.INFO, logger="ches_filter"):
        assert _rows_read("d?.jsonl") == 5  # d1.jsonl only: `?` is one character
        assert _rows_read("x[a-z].jsonl") == 7
    assert "d?.jsonl matched 1 file" in caplog.text
    # Files found by a glob or in a directory are read as named too.
    assert _rows_read("*1*.jsonl") == 3 + 5 + 3  # d[1], d1, l[1]
    os.mkdir("dir")
    write_lines("dir/a[1].jsonl", hh_rows(1))
    write_lines("dir/a1.jsonl", hh_rows(6))
    assert _rows_read("dir") == 7


def test_a_broken_link_named_like_a_glob_is_no_glob(tmp_path, monkeypatch):
    from ches_filter.errors import BadDataError

    monkeypatch.chdir(tmp_path)
    write_lines("d1.jsonl", hh_rows(5))
    os.symlink("gone.jsonl", "d[1].jsonl")
    with pytest.raises(BadDataError, match=r"d\[1\]\.jsonl is a symbolic link to gone.jsonl, which does not exist"):
        read_dataset("d[1].jsonl")


def test_alone_a_file_named_like_a_glob_holds_its_rows(tmp_path):
    write_lines(tmp_path / "d[1].jsonl", hh_rows(3))
    assert _rows_read(tmp_path / "d[1].jsonl") == 3


def test_score_and_prune_a_file_named_like_a_glob(tmp_path, monkeypatch, tiny_model_dir):
    # End to end, with an output named like a glob too (its work directory holds `[1]`).
    monkeypatch.chdir(tmp_path)
    write_lines("d[1].jsonl", hh_rows(3))
    write_lines("d1.jsonl", hh_rows(5))
    result = invoke("score", "d[1].jsonl", "-o", "s[1].parquet", "--model", tiny_model_dir, "-q")
    assert result.exit_code == 0, result.output
    assert "of 3 rows" in result.output
    result = invoke("prune", "d[1].jsonl", "--scores", "s[1].parquet", "--keep", "1", "-o", "k[1].jsonl", "--model",
                 tiny_model_dir, "-q")
    assert result.exit_code == 0, result.output
    with open("k[1].jsonl", encoding="utf-8") as handle:
        assert len(handle.readlines()) == 3
    assert sorted(os.listdir(".")) == ["d1.jsonl", "d[1].jsonl", "k[1].jsonl", "s[1].parquet"]


# ---------------------------------------------------------------- names that are not UTF-8


BAD = os.fsdecode(b"bad\xff.jsonl")


@pytest.mark.parametrize("command", ["score", "prune", "validate", "displacement"])
def test_input_name_that_is_not_utf8_is_refused_in_one_line(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    write_lines(BAD, hh_rows(3))
    args = {
        "score": ["score", BAD, "-o", "out.parquet"],
        "prune": ["prune", BAD, "--keep", "0.5", "-o", "out.jsonl"],
        "validate": ["validate", BAD, "-o", "out"],
        "displacement": ["displacement", BAD, "-o", "out.parquet"],
    }[command]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "bad\\xff.jsonl" in line and "not valid UTF-8" in line
    assert os.listdir(".") == [BAD]  # no output, no work directory, no lock


def test_name_that_is_not_utf8_found_in_a_directory_or_by_a_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")
    write_lines(os.path.join("data", BAD), hh_rows(3))
    for source in ("data", "data/*.jsonl"):
        result = invoke("score", source, "-o", "out.parquet")
        assert result.exit_code == 2, result.output
        assert "bad\\xff.jsonl" in one_error_line(result)
        assert os.listdir(".") == ["data"]


def test_utf8_names_in_a_directory_that_is_not_utf8_are_refused(tmp_path, monkeypatch):
    # Work files go under the absolute path: the whole path must be UTF-8, not only the name given.
    cwd = tmp_path / os.fsdecode(b"cwd\xff")
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    write_lines("d.jsonl", hh_rows(3))
    for args in (["score", "d.jsonl", "-o", "s.parquet"], ["prune", "d.jsonl", "--keep", "1", "-o", "k.jsonl"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "cwd\\xff" in one_error_line(result) and "not valid UTF-8" in one_error_line(result)
        assert os.listdir(".") == ["d.jsonl"]


@pytest.mark.parametrize("flag", ["-o", "--rejects", "--work-dir"])
def test_output_name_that_is_not_utf8_is_refused_in_one_line(tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    bad = os.fsdecode(b"out\xfe.parquet")
    args = ["prune", EXAMPLE_HH, "--keep", "0.5", "-o", "good.parquet"]
    if flag == "-o":
        args[-1] = bad
    else:
        args += [flag, bad]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "out\\xfe.parquet" in one_error_line(result)
    assert os.listdir(".") == []
    result = invoke("report", GOLDEN, "-o", os.fsdecode(b"rep\xfe"))
    assert result.exit_code == 2 and "rep\\xfe" in one_error_line(result) and os.listdir(".") == []


# ---------------------------------------------------------------- --id-column


# ---------------------------------------------------------------- content that is not text


def test_output_never_replaces_the_input(tmp_path, tiny_model_dir):
    data = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([HH_PAIR] * 3), data)
    before = data.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = run_score(data, data, tiny_model_dir, *extra)
        assert result.exit_code == 2 and "input" in result.output
    assert data.read_bytes() == before


def test_failed_run_leaves_the_old_output_alone(tmp_path, tiny_model_dir):
    out = tmp_path / "s.parquet"
    out.write_bytes(b"an earlier result")
    data = write_bytes(tmp_path / "d.jsonl", b'{"chosen": "a"\n')
    result = run_score(data, out, tiny_model_dir, "--overwrite")
    assert result.exit_code == 1
    assert out.read_bytes() == b"an earlier result"


@pytest.fixture
def pruneable(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding in.jsonl and its score file s.parquet."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", PAIRS)
    make_scores(tmp_path / "in.jsonl", tmp_path / "s.parquet")
    return tmp_path


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


def test_output_equal_to_input(tmp_path):
    src = str(write_jsonl(tmp_path / "d.jsonl", THREE_HH_PAIRS))
    with pytest.raises(BadFlagError, match="same path as the input"):
        paths.check_output_path(src, inputs=[src], overwrite=True)
    # A differently spelled path to the same file is caught too.
    other = os.path.join(str(tmp_path), ".", "d.jsonl")
    with pytest.raises(BadFlagError, match="same path as the input"):
        paths.check_output_path(other, inputs=[src], overwrite=True)


def test_output_inside_or_around_input_directory(tmp_path):
    datasets.Dataset.from_list(THREE_HH_PAIRS).save_to_disk(str(tmp_path / "saved"))
    saved = str(tmp_path / "saved")
    with pytest.raises(BadFlagError, match="inside the input directory"):
        paths.check_output_path(os.path.join(saved, "out.parquet"), inputs=[saved], overwrite=True)
    with pytest.raises(BadFlagError, match="contains the input"):
        paths.check_output_path(str(tmp_path), inputs=[saved], overwrite=True)


def test_output_checks_accept_hub_ids_and_fresh_paths(tmp_path):
    # A Hub id is no local path, so a fresh output next to nothing is accepted and nothing is created.
    assert paths.check_output_path(str(tmp_path / "out.parquet"), inputs=["owner/name"], overwrite=False) is None
    assert listing(tmp_path) == []
    # The same output named as an input is refused: the check does look at the inputs.
    (tmp_path / "out.parquet").write_bytes(b"x")
    with pytest.raises(BadFlagError):
        paths.check_output_path(str(tmp_path / "out.parquet"), inputs=[str(tmp_path / "out.parquet")], overwrite=True)


def test_existing_output_without_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old", "utf-8")
    with pytest.raises(BadFlagError, match=r"out\.jsonl exists; pass `--overwrite` to replace it"):
        records.write_dataset(datasets.Dataset.from_list(THREE_HH_PAIRS), str(out))
    assert out.read_text("utf-8") == "old"


def test_missing_parent_directory(tmp_path):
    with pytest.raises(BadFlagError, match="does not exist; create it first"):
        records.write_dataset(datasets.Dataset.from_list(THREE_HH_PAIRS), str(tmp_path / "no" / "out.parquet"))


def test_unknown_output_extension(tmp_path):
    with pytest.raises(BadFlagError, match=r"extension `\.tsv`; use `\.parquet`, `\.jsonl`, `\.csv`"):
        records.write_dataset(datasets.Dataset.from_list(THREE_HH_PAIRS), str(tmp_path / "out.tsv"))
    assert not (tmp_path / "out.tsv").exists()
