"""`report --validate VDIR`: VDIR is an input of the path checks, and a summary.json of the wrong shape is one error."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ches_filter.cli import main
from ches_filter.config import ValidateConfig
from ches_filter.validate import summarize, verdicts

from conftest import REPO

pytest.importorskip("matplotlib")

SCORES = str(REPO / "tests" / "golden" / "hh300_scores.parquet")
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def validate_summary(config: ValidateConfig | None = None) -> dict:
    """A summary.json as `ches-filter validate` writes it, from validate's own summarize and verdicts."""
    config = config or ValidateConfig(subset_size=2, eval_size=2, batch_size=1)
    records, jobs = [], {}
    for k, (measure, name) in enumerate((m, s) for m in config.by_list for s in config.subset_names):
        seed = config.seed
        jobs[(measure, name, seed)] = {"loss_first": 0.69, "loss_last": 0.5 - k / 100, "steps": 2,
                                       "seconds": 1.5, "key_owner": f"{measure}/{name}"}
        for which, rows in (("subset", range(config.subset_size)), ("eval", range(10, 10 + config.eval_size))):
            for row in rows:
                records.append({"measure": measure, "subset": name, "seed": seed, "set": which, "row_index": row,
                                "score": 0.1 * row, "dlogp_chosen": -1.0 - k - row / 10, "dlogp_rejected": -2.0 - k,
                                "prompt_tokens": 5, "chosen_tokens": 7 + row, "rejected_tokens": 9})
    subsets = summarize(records, jobs, config)
    return {
        "ches_filter_version": "test", "kind": "validate", "input": "hh.jsonl", "scores": "scores.parquet",
        "model": {"revision": None, "model": "tiny"}, "token_layout": "chat", "logprob_path": "plain",
        "autocast": None, "config": dataclasses.asdict(config), "eval_rows": [10, 11], "trainings": len(jobs),
        "seconds": 12.5, "phase_seconds": {"train": 3.0}, "subsets": subsets, "verdicts": verdicts(subsets, config),
        "scores_identity": golden_identity(),
    }


def golden_identity() -> dict:
    """The identity validate records for the scores it ranked by: here SCORES's."""
    import pyarrow.parquet as pq

    from ches_filter.scoring import scores_identity, table_metadata

    table = pq.read_table(SCORES)
    return scores_identity(table_metadata(table), table.num_rows)


def make_vdir(path: Path, summary=None, *, text: str | None = None) -> Path:
    """A validate OUT_DIR: validate.parquet, summary.json (``summary`` or raw ``text``) and validate.png."""
    path.mkdir(parents=True)
    (path / "validate.parquet").write_bytes(b"PAR1 not really")
    body = text if text is not None else json.dumps(validate_summary() if summary is None else summary)
    (path / "summary.json").write_text(body, encoding="utf-8")
    (path / "validate.png").write_bytes(PNG)
    return path


def listing(root: Path) -> dict:
    """Every entry under root (root included): kind, size, mtime and inode, symbolic links not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames if dirpath == str(root) else dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def report(*args):
    return CliRunner().invoke(main, ["report", SCORES, *args])


def test_report_shows_a_validate_dir(tmp_path):
    vdir = make_vdir(tmp_path / "v")
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "Validate: DPO on subsets" in page and "verdict (ches)" in page and page.count("data:image/png") == 3
    assert "<td>top</td>" in page and "<td>ln_ches</td>" in page


# ------------------------------------------------ bug 1: --validate is an input
# (VDIR to create, alias symlink -> VDIR or None, report arguments); run in tmp_path.
CLASHES = {
    "same": ("vd", None, ["-o", "vd", "--overwrite", "--validate", "vd"]),
    "same-without-overwrite": ("vd", None, ["-o", "vd", "--validate", "vd"]),
    "dot-slash-trailing-slash": ("vd", None, ["-o", "./vd/", "--overwrite", "--validate", "vd"]),
    "absolute-against-relative": ("vd", None, ["-o", "{tmp}/vd", "--overwrite", "--validate", "./vd"]),
    "dotdot": ("vd", None, ["-o", "vd/../vd", "--overwrite", "--validate", "vd"]),
    "symlink-output": ("vd", "alias", ["-o", "alias", "--overwrite", "--validate", "vd"]),
    "symlink-validate": ("vd", "alias", ["-o", "vd", "--overwrite", "--validate", "alias"]),
    "validate-inside-output": ("P/v", None, ["-o", "P", "--overwrite", "--validate", "P/v"]),
    "validate-inside-output-without-overwrite": ("P/v", None, ["-o", "P", "--validate", "P/v"]),
    "validate-inside-symlinked-output": ("P/v", "alias", ["-o", "alias", "--overwrite", "--validate", "P/v"]),
    "output-inside-validate": ("vd", None, ["-o", "vd/rep", "--validate", "vd"]),
    "output-inside-validate-by-symlink": ("vd", "alias", ["-o", "alias/rep", "--overwrite", "--validate", "vd"]),
}


@pytest.mark.parametrize("vdir, alias, args", CLASHES.values(), ids=CLASHES.keys())
def test_report_output_that_clashes_with_validate_dir_is_refused(tmp_path, monkeypatch, vdir, alias, args):
    monkeypatch.chdir(tmp_path)
    make_vdir(tmp_path / vdir)
    if alias:
        os.symlink(vdir.split("/")[0], tmp_path / alias, target_is_directory=True)
    before = listing(tmp_path)
    result = report(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert "`--output`" in line and "`--validate`" in line, line
    assert listing(tmp_path) == before  # the validate run's outputs and the output location are untouched


def test_report_validate_dir_as_output_through_the_api_is_refused(tmp_path):
    from ches_filter.errors import BadFlagError
    from ches_filter.report import build_report

    vdir = make_vdir(tmp_path / "v")
    before = listing(tmp_path)
    with pytest.raises(BadFlagError, match="`--validate`"):
        build_report(SCORES, vdir, overwrite=True, validate=vdir)
    assert listing(tmp_path) == before


def test_report_next_to_validate_dir_is_allowed(tmp_path, monkeypatch):
    """A sibling whose name starts like VDIR's is no clash."""
    monkeypatch.chdir(tmp_path)
    make_vdir(tmp_path / "o_A")
    before = listing(tmp_path / "o_A")
    result = report("-o", "o_A2", "--validate", "o_A")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path / "o_A") == before


# ------------------------------------------ bug 2: the shape of summary.json
def _with(path: str, value):
    """A valid validate summary with the field at ``path`` (dotted, [i] for list items) set to ``value``."""
    summary = validate_summary()
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    target = summary
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return summary


HOSTILE = {
    "subsets-of-numbers": ({"kind": "validate", "subsets": [1, 2]}, "subsets[0]", "a number (1)", "an object"),
    "subsets-text": (_with("subsets", "top"), "subsets", "text", "a list of objects"),
    "subsets-object": (_with("subsets", {"a": 1}), "subsets", "an object", "a list of objects"),
    "subsets-missing": ({"kind": "validate"}, "subsets", "null", "a list of objects"),
    "verdicts-number": ({"kind": "validate", "subsets": [], "verdicts": 5}, "verdicts", "a number (5)", "a list of text"),
    "verdicts-text": (_with("verdicts", "all fine"), "verdicts", "text", "a list of text"),
    "verdicts-item": (_with("verdicts[0]", {"x": 1}), "verdicts[0]", "an object", "text"),
    "model-text": ({"kind": "validate", "subsets": [], "model": "x"}, "model", 'text ("x")', "an object"),
    "model-list": (_with("model", ["tiny"]), "model", "a list", "an object"),
    "model-name-number": (_with("model.model", 3), "model.model", "a number (3)", "text"),
    "n-text-and-mean-list": ({"kind": "validate", "subsets": [{"measure": "ches", "n": "abc", "mean_dlogp_chosen": [1]}]},
                             "subsets[0].n", 'text ("abc")', "a number or null"),
    "mean-list": (_with("subsets[0].mean_dlogp_chosen", [1]), "subsets[0].mean_dlogp_chosen", "a list ([1])",
                  "a number or null"),
    "n-boolean": (_with("subsets[1].n", True), "subsets[1].n", "a boolean (true)", "a number or null"),
    "seconds-object": (_with("subsets[2].seconds", {"s": 1}), "subsets[2].seconds", "an object", "a number or null"),
    "fell-boolean": (_with("subsets[0].frac_chosen_decreased", False), "subsets[0].frac_chosen_decreased",
                     "a boolean (false)", "a number or null"),
    "measure-number": (_with("subsets[0].measure", 5), "subsets[0].measure", "a number (5)", "text"),
    "subset-list": (_with("subsets[3].subset", ["top"]), "subsets[3].subset", "a list", "text"),
}


@pytest.mark.parametrize("summary, field, held, expected", HOSTILE.values(), ids=HOSTILE.keys())
def test_report_refuses_a_validate_summary_of_the_wrong_shape(tmp_path, summary, field, held, expected):
    vdir = make_vdir(tmp_path / "v", summary)
    before = listing(tmp_path)
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 1, result.output
    line = _error_line(result)
    assert "Traceback" not in result.output
    assert f"`--validate` {vdir}" in line and str(vdir / "summary.json") in line, line
    assert f"`{field}` holds {held}" in line and f"where {expected}" in line and "is expected" in line, line
    assert line.rstrip(".").endswith("pass another OUT_DIR of `ches-filter validate`"), line
    assert listing(tmp_path) == before  # no report directory, no temporary


@pytest.mark.parametrize("text, pattern", [
    ('[{"kind": "validate"}]', r"not a summary of `ches-filter validate`"),
    ('{"kind": "score", "subsets": []}', r'`kind` text \("score"\), not `kind` "validate"'),
    ('{"kind": "validate", "subsets": [', r"cannot read .*summary\.json"),
    ("[" * 100000 + "]" * 100000, r"cannot read .*summary\.json"),
    ("\udcff", r"cannot read .*summary\.json"),
], ids=["list", "other-kind", "truncated", "deeply-nested", "not-utf8"])
def test_report_refuses_a_file_that_is_no_validate_summary(tmp_path, text, pattern):
    vdir = tmp_path / "v"
    vdir.mkdir()
    (vdir / "summary.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 1, result.output
    import re

    assert re.search(pattern, _error_line(result)) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["validate.png", "summary.json"])
def test_report_refuses_a_validate_file_that_is_a_directory(tmp_path, name):
    vdir = make_vdir(tmp_path / "v")
    (vdir / name).unlink()
    (vdir / name).mkdir()
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 1, result.output
    line = _error_line(result)
    assert f"{vdir / name} is a directory" in line and "`--validate`" in line, line
    assert name == "summary.json" or "rerun validate" in line
    assert not (tmp_path / "r").exists()


def test_report_without_validate_png_has_no_validate_plot(tmp_path):
    vdir = make_vdir(tmp_path / "v")
    (vdir / "validate.png").unlink()
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "Validate: DPO on subsets" in page and page.count("data:image/png") == 2


def test_report_accepts_nan_infinity_and_nulls_in_a_validate_summary(tmp_path):
    summary = validate_summary()
    entry = summary["subsets"][0]
    entry.update(mean_dlogp_chosen=float("nan"), mean_dlogp_rejected=float("inf"), seconds=float("-inf"),
                 eval_mean_dlogp_chosen=None, n=10**30)
    del entry["mean_chosen_tokens"]
    summary["config"]["lr"] = float("nan")
    summary["model"] = None
    del summary["verdicts"]
    text = json.dumps(summary)  # Python writes NaN, Infinity and -Infinity, and reads them back
    assert "NaN" in text and "-Infinity" in text
    vdir = make_vdir(tmp_path / "v", text=text)
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert ">nan<" in page and ">inf<" in page and ">-inf<" in page and str(10**30) in page


# ------------------------------------------------ the verdicts must belong to SCORES
@pytest.mark.parametrize("key, value", [
    ("input_fingerprint", "0" * 64),  # another input's scores
    ("num_rows", 299),
    ("model", "google/gemma-3-270m"),  # the same input scored by another model
    ("token_layout", "trl"),
    ("use_chat_template", False),
])
def test_report_refuses_verdicts_computed_from_other_scores(tmp_path, key, value):
    summary = validate_summary()
    summary["scores_identity"][key] = value
    vdir = make_vdir(tmp_path / "v", summary)
    before = listing(tmp_path)
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 1, result.output
    line = _error_line(result)
    assert "other scores than SCORES" in line and key in line and "scores.parquet" in line
    assert listing(tmp_path) == before  # nothing written


def test_report_warns_when_a_summary_cannot_be_checked(tmp_path, caplog):
    summary = validate_summary()
    del summary["scores_identity"]  # written before validate recorded it
    vdir = make_vdir(tmp_path / "v", summary)
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 0, result.output
    assert "cannot be checked against SCORES" in result.output + caplog.text


def test_validate_and_report_share_one_summary_type_and_one_table(tmp_path):
    """summary.json round-trips through ValidateSummary; the terminal table and the report's show the same cells."""
    import html

    from ches_filter.validate import ValidateSummary, format_table, table_rows

    summary = validate_summary()
    typed = ValidateSummary.from_dict(json.loads(json.dumps(summary)), "x")
    assert typed.to_dict() == summary
    assert list(typed.to_dict()) == [f.name for f in dataclasses.fields(ValidateSummary)]
    heads, rows = table_rows(summary["subsets"])
    lines = format_table(summary)
    assert len(lines) == 1 + len(rows) == 1 + len(summary["subsets"])
    vdir = make_vdir(tmp_path / "v", summary)
    result = report("-o", str(tmp_path / "r"), "--validate", str(vdir))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    for head in heads:
        assert f"<th>{html.escape(head)}</th>" in page and head in lines[0]
    for row, line in zip(rows, lines[1:]):
        assert "\u2013" not in "".join(row)  # validate fills every column
        for cell in row:
            assert f">{html.escape(cell)}</td>" in page and cell in line, cell
