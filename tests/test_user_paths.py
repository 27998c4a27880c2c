"""What a careless user's paths and columns must not break (issue 15, hostile pass).

- ``--overwrite`` replaces only what ches-filter wrote in a directory output;
  the user's other files there are refused by name, never deleted.
- An existing path is the file it names, whatever characters it holds; only a
  path that does not exist is a glob.
- A file name that is not UTF-8 is refused up front in one line, nothing written.
- ``--id-column`` may not name a column the score file writes itself.
- Message content that is not text is a status of its own, counted in the summary.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from click.testing import CliRunner

from ches_filter.cli import main
from ches_filter.config import ScoreConfig
from ches_filter.errors import BadFlagError
from ches_filter.sources import read_dataset

from conftest import EXAMPLE_HH, REPO

GOLDEN = REPO / "tests" / "golden" / "hh300_scores.parquet"


def run(*args):
    return CliRunner().invoke(main, [os.fspath(a) for a in args])


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output, result.output
    return lines[0]


def hh_rows(n: int) -> list[str]:
    with open(EXAMPLE_HH, encoding="utf-8") as handle:
        return [next(handle) for _ in range(n)]


def write_lines(path, lines) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(lines)


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
    result = run(*PRUNE, "-o", spelling.format(d="victim"), "--overwrite")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "notes.txt" in line and "deep/" in line and "did not write" in line
    assert tree(tmp_path / "victim") == before
    assert sorted(os.listdir(tmp_path)) == ["victim"]  # no temporary, no work directory


def test_rejects_directory_with_the_users_files_is_refused_before_the_output_is_written(tmp_path):
    victim(tmp_path / "rej")
    before = tree(tmp_path / "rej")
    result = run(*PRUNE, "-o", tmp_path / "kept.jsonl", "--rejects", tmp_path / "rej", "--overwrite")
    assert result.exit_code == 2 and "`--rejects`" in error_line(result) and "notes.txt" in error_line(result)
    assert tree(tmp_path / "rej") == before and not (tmp_path / "kept.jsonl").exists()


def test_file_output_that_is_the_users_directory_is_refused(tmp_path):
    # `-o out.parquet` names a directory of the user's: replacing it by a file would delete it.
    victim(tmp_path / "out.parquet")
    result = run(*PRUNE, "-o", tmp_path / "out.parquet", "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in error_line(result)
    assert (tmp_path / "out.parquet" / "notes.txt").read_text() == "my notes"
    # score too, even before `--overwrite` is considered (an existing output is its resume logic's business)
    result = run("score", EXAMPLE_HH, "-o", tmp_path / "out.parquet", "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in error_line(result)
    result = run("displacement", EXAMPLE_HH, "-o", tmp_path / "out.parquet", "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in error_line(result)
    assert (tmp_path / "out.parquet" / "deep" / "y").read_text() == "y"
    assert sorted(os.listdir(tmp_path)) == ["out.parquet"]


def test_overwrite_replaces_a_directory_ches_filter_wrote(tmp_path):
    out = tmp_path / "pruned"
    assert run(*PRUNE, "-o", out).exit_code == 0
    first = sorted(os.listdir(out))
    assert "state.json" in first
    result = run(*PRUNE[:-1], "0.25", "-o", str(out) + "/", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == first
    import datasets

    assert len(datasets.load_from_disk(str(out))) < 100  # the second run's quarter, not the first run's half
    # ...but not once the user has put a file of theirs into it
    (out / "README.txt").write_text("mine")
    result = run(*PRUNE, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "README.txt" in error_line(result)
    assert (out / "README.txt").read_text() == "mine"
    # an empty directory holds nothing of the user's
    (tmp_path / "empty").mkdir()
    assert run(*PRUNE, "-o", tmp_path / "empty", "--overwrite").exit_code == 0


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
    result = run(*PRUNE, "-o", tmp_path / "link", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not os.path.islink(tmp_path / "link") and (tmp_path / "link" / "state.json").is_file()
    assert tree(tmp_path / "victim") == before


def test_unlistable_directory_output_is_refused_in_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root lists every directory")
    victim(tmp_path / "victim")
    os.chmod(tmp_path / "victim", 0o300)
    try:
        result = run(*PRUNE, "-o", tmp_path / "victim", "--overwrite")
        assert result.exit_code == 2 and "cannot be listed" in error_line(result)
    finally:
        os.chmod(tmp_path / "victim", 0o700)
    assert (tmp_path / "victim" / "notes.txt").read_text() == "my notes"


def test_report_overwrite_keeps_the_users_files(tmp_path):
    from ches_filter.report import REPORT_FILES

    out = tmp_path / "rep"
    victim(out)
    before = tree(out)
    result = run("report", GOLDEN, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "notes.txt" in error_line(result) and "deep/" in error_line(result)
    assert tree(out) == before
    shutil.rmtree(out)
    assert run("report", GOLDEN, "-o", out).exit_code == 0
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES)  # what the check accepts is what a report holds
    result = run("report", GOLDEN, "-o", f"{out}/", "--overwrite", "--top", "3")
    assert result.exit_code == 0, result.output
    (out / "my.css").write_text("mine")
    result = run("report", GOLDEN, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "my.css" in error_line(result) and (out / "my.css").read_text() == "mine"


def test_validate_overwrite_refuses_what_it_would_destroy_and_keeps_other_files(tmp_path):
    out = tmp_path / "val"
    (out / "validate.png").mkdir(parents=True)  # a directory where validate writes a file
    (out / "validate.png" / "holiday.png").write_text("photo")
    (out / "scores.parquet.parts").mkdir()  # where validate's scoring keeps its parts, deleted by --overwrite
    (out / "scores.parquet.parts" / "mine.txt").write_text("keep")
    (out / "notes.txt").write_text("kept: validate never touches another name")
    before = tree(out)
    result = run("validate", EXAMPLE_HH, "-o", out, "--scores", GOLDEN, "--overwrite")
    assert result.exit_code == 2, result.output
    line = error_line(result)
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
    result = run("score", "d[1].jsonl", "-o", "s[1].parquet", "--model", tiny_model_dir, "-q")
    assert result.exit_code == 0, result.output
    assert "of 3 rows" in result.output
    result = run("prune", "d[1].jsonl", "--scores", "s[1].parquet", "--keep", "1", "-o", "k[1].jsonl", "--model",
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
    result = run(*args)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "bad\\xff.jsonl" in line and "not valid UTF-8" in line
    assert os.listdir(".") == [BAD]  # no output, no work directory, no lock


def test_name_that_is_not_utf8_found_in_a_directory_or_by_a_glob(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")
    write_lines(os.path.join("data", BAD), hh_rows(3))
    for source in ("data", "data/*.jsonl"):
        result = run("score", source, "-o", "out.parquet")
        assert result.exit_code == 2, result.output
        assert "bad\\xff.jsonl" in error_line(result)
        assert os.listdir(".") == ["data"]


def test_utf8_names_in_a_directory_that_is_not_utf8_are_refused(tmp_path, monkeypatch):
    # Work files go under the absolute path: the whole path must be UTF-8, not only the name given.
    cwd = tmp_path / os.fsdecode(b"cwd\xff")
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    write_lines("d.jsonl", hh_rows(3))
    for args in (["score", "d.jsonl", "-o", "s.parquet"], ["prune", "d.jsonl", "--keep", "1", "-o", "k.jsonl"]):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert "cwd\\xff" in error_line(result) and "not valid UTF-8" in error_line(result)
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
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "out\\xfe.parquet" in error_line(result)
    assert os.listdir(".") == []
    result = run("report", GOLDEN, "-o", os.fsdecode(b"rep\xfe"))
    assert result.exit_code == 2 and "rep\\xfe" in error_line(result) and os.listdir(".") == []


# ---------------------------------------------------------------- --id-column


def _own_columns() -> tuple[str, ...]:
    from ches_filter.scoring import own_columns

    return own_columns()


def test_own_columns_are_read_from_the_schema_and_the_registry(tiny_model_dir):
    from ches_filter.measures import MEASURES
    from ches_filter.api import score_pairs
    from ches_filter.scoring import TAIL_COLUMNS

    own = _own_columns()
    assert set(MEASURES.names()) <= set(own) and set(TAIL_COLUMNS) <= set(own)
    rows = [json.loads(line) for line in hh_rows(2)]
    for i, row in enumerate(rows):
        row["pair_id"] = f"p{i}"
    config = ScoreConfig(model=os.fspath(tiny_model_dir), measures=",".join(MEASURES.names()), id_column="pair_id",
                         on_special_tokens="flag", quiet=True)
    table = score_pairs(rows, config)
    # Every column a score file can hold is reserved, and nothing else is.
    assert set(table.column_names) - {"pair_id"} == set(own)


@pytest.mark.parametrize("name", ["status", "ches", "ln_ches", "row_index", "prompt_tokens", "special_tokens",
                                  "edit_distance", "last_hidden_ip"])
def test_id_column_named_like_a_score_column_is_refused_up_front(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert name in _own_columns()
    with pytest.raises(BadFlagError, match="--id-column"):
        ScoreConfig(id_column=name)
    for args in (["score", EXAMPLE_HH, "-o", "out.parquet"], ["prune", EXAMPLE_HH, "--keep", "0.5", "-o", "out.jsonl"],
                 ["validate", EXAMPLE_HH, "-o", "out"], ["displacement", EXAMPLE_HH, "-o", "out.parquet"]):
        result = run(*args, "--id-column", name)
        assert result.exit_code == 2, result.output
        assert f"'{name}'" in error_line(result) and "rename" in error_line(result)
        assert os.listdir(".") == []


def test_id_column_named_like_a_displacement_column_is_refused(tmp_path):
    from ches_filter.config import DisplacementConfig
    from ches_filter.displacement import measure_displacement

    rows = [dict(json.loads(line), grad_inner=i) for i, line in enumerate(hh_rows(2))]
    with pytest.raises(BadFlagError, match="grad_inner"):
        measure_displacement(rows, DisplacementConfig(sample=2), ScoreConfig(id_column="grad_inner"))
    with pytest.raises(BadFlagError, match="dlogp_yes"):
        measure_displacement(rows, DisplacementConfig(sample=2), ScoreConfig(id_column="dlogp_yes"), watch={"yes": " Yes"})


# ---------------------------------------------------------------- content that is not text


def test_image_part_is_counted_as_non_text_content(tmp_path, tiny_model_dir):
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    rows = [
        {"prompt": [{"role": "user", "content": [text("What is in this picture? "), {"type": "image", "image": "cat.png"}]}],
         "chosen": "A cat.", "rejected": "A dog."},
        {"prompt": [{"role": "user", "content": [text("Name a colour.")]}], "chosen": "Blue.", "rejected": "Loud."},
        {"prompt": [{"role": "user", "content": "Name a fruit."}], "chosen": "Apple.", "rejected": "Chair."},
    ]
    data = tmp_path / "mm.jsonl"
    write_lines(data, [json.dumps(row) + "\n" for row in rows])
    result = run("score", data, "-o", tmp_path / "s.parquet", "--model", tiny_model_dir, "-q")
    assert result.exit_code == 0, result.output
    assert "scored 2 of 3 rows" in result.output and "non_text_content 1" in result.output
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "s.parquet").column("status").to_pylist() == ["non_text_content", "ok", "ok"]
    result = run("prune", data, "--scores", tmp_path / "s.parquet", "--keep", "1", "-o", tmp_path / "k.jsonl",
                 "--model", tiny_model_dir, "-q")
    assert result.exit_code == 0, result.output
    assert "non_text_content 1" in result.output and "kept:     2" in result.output
