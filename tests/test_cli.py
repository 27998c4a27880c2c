"""The CLI: help for every command, exit codes and one-line errors for bad flags and bad data."""

from ches_filter.formats import Columns
import math
from ches_filter.formats import normalize_row
import pyarrow.parquet as pq
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from ches_filter.cli import main

from conftest import EXAMPLE_HH, invoke, read_hh


def test_top_level_help():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "score" in result.output and "prune" in result.output


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and command in result.output


@pytest.mark.slow
def test_help_and_the_registries_do_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ches_filter.cli import main\n"
        "import ches_filter.batching, ches_filter.config, ches_filter.formats, ches_filter.measures, ches_filter.strategies\n"
        "for cmd in ([], *[[c] for c in main.commands]):\n"
        "    assert CliRunner().invoke(main, [*cmd, '--help']).exit_code == 0\n"
        "heavy = ('torch', 'transformers', 'datasets', 'pyarrow', 'numpy', 'matplotlib')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.slow
def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "ches_filter", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "ches-filter" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", EXAMPLE_HH, "-o", "OUT.parquet", "--keep", "1.5"], "--keep"),
        (["prune", EXAMPLE_HH, "-o", "OUT.parquet"], "exactly one"),
        (["prune", EXAMPLE_HH, "-o", "OUT.parquet", "--keep", "0.9", "--keep-count", "3"], "exactly one"),
        (["prune", EXAMPLE_HH, "-o", "OUT.parquet", "--keep", "0.9", "--by", "nope"], "nope"),
        (["score", EXAMPLE_HH, "-o", "OUT.parquet", "--dtype", "float8"], "float8"),
        (["score", EXAMPLE_HH, "-o", "OUT.parquet", "--max-batch-tokens", "0"], "--max-batch-tokens"),
        (["score", EXAMPLE_HH, "-o", "OUT.csv"], ".parquet"),
        (["score", EXAMPLE_HH, "-o", "OUT.parquet", "--chosen-column", "x", "--rejected-column", "x"], "different"),
        (["prune", EXAMPLE_HH, "-o", "OUT.txt", "--keep", "0.9"], ".txt"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) if isinstance(a, str) else a for a in args]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_output_equal_to_input_is_refused(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(EXAMPLE_HH.read_text().splitlines()[0] + "\n")
    result = invoke("prune", data, "-o", data, "--keep", "0.9", "--overwrite")
    assert result.exit_code == 2 and "input" in result.output.lower()


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "scores.parquet"
    out.write_bytes(b"x")
    result = invoke("score", EXAMPLE_HH, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert out.read_bytes() == b"x"


def test_missing_file_exits_1(tmp_path):
    result = invoke("score", tmp_path / "nope.jsonl", "-o", tmp_path / "s.parquet")
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output


def test_missing_columns_name_the_available_ones_and_the_flag(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    result = invoke("score", data, "-o", tmp_path / "s.parquet", "--model", "unused")
    assert result.exit_code == 1
    assert "question" in result.output and "--chosen-column" in result.output


def test_malformed_jsonl_names_the_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    result = invoke("score", data, "-o", tmp_path / "s.parquet")
    assert result.exit_code == 1 and "line 2" in result.output


def test_unknown_model_path_exits_1(tmp_path):
    result = invoke("score", EXAMPLE_HH, "-o", tmp_path / "s.parquet", "--model", tmp_path / "no-such-model")
    assert result.exit_code == 1, result.output
    assert "--model" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_bad_data_is_one_line_on_stderr_even_when_a_library_logs_it(tmp_path):
    """datasets logs a failed JSON load at ERROR before raising; the user sees only our line."""
    path = tmp_path / "dup.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "c", "chosen": "b"}\n', encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "ches_filter", "score", str(path), "-o", str(tmp_path / "s.parquet")],
        capture_output=True, text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"Error: {path} line 1 has the key 'chosen' twice in one object; keep one of them (JSON objects need unique keys)."
    ]


# ------------------------------------------------- every numeric flag has a range


def _numeric_options():
    """(command, option) for every int/float option of every command."""
    from ches_filter.cli import main

    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.type, (click.types._NumberParamTypeBase)):
                yield name, command, param


#: Numeric flags that take any finite number.
UNBOUNDED = {("prune", "--max-score")}


def _argv(command, param, value):
    """A command line that is complete but for the one bad value (click parses options before running)."""
    argv = [command.name]
    for other in command.params:
        if isinstance(other, click.Argument):
            argv.append("x")
        elif other.required and other is not param:
            argv += [other.opts[0], "x"]
    return argv + [param.opts[0], value]


def test_every_numeric_flag_of_every_command_has_a_click_range():
    seen = list(_numeric_options())
    assert len(seen) > 20
    for name, _, param in seen:
        if (name, param.opts[0]) in UNBOUNDED:
            continue
        assert isinstance(param.type, (click.IntRange, click.FloatRange)), f"{name} {param.opts[0]} has no click range"


@pytest.mark.parametrize("name, option", [(n, p.opts[0]) for n, _, p in _numeric_options()])
def test_out_of_range_numbers_are_one_line_exit_2(name, option, tmp_path, monkeypatch):
    """Below the minimum, above the maximum, NaN and infinity: exit 2 naming the flag, never a traceback."""
    monkeypatch.chdir(tmp_path)
    command, param = next((c, p) for n, c, p in _numeric_options() if n == name and p.opts[0] == option)
    kind = param.type
    bad = ["nan"] if isinstance(kind, click.types.FloatParamType) or isinstance(kind, click.FloatRange) else []
    if isinstance(kind, click.FloatRange):
        bad += ["inf", "-inf"]
    if getattr(kind, "min", None) is not None:
        bad.append(str(kind.min - 1 if isinstance(kind, click.IntRange) else kind.min - 0.5))
        if isinstance(kind, click.FloatRange) and kind.min_open:
            bad.append(str(kind.min))
    if getattr(kind, "max", None) is not None:
        bad.append(str(kind.max + 1 if isinstance(kind, click.IntRange) else kind.max + 0.5))
    if not bad:
        assert (name, option) in UNBOUNDED
        bad = ["nan"]
    for value in bad:
        result = CliRunner().invoke(main, _argv(command, param, value))
        assert result.exit_code == 2, (value, result.output)
        assert "Traceback" not in result.output and not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit), (value, result.output)
        assert option in result.output or option.lstrip("-") in result.output, (value, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------- --revision where it cannot apply


@pytest.mark.parametrize("command", ["score", "prune", "displacement", "validate"])
@pytest.mark.parametrize("model", [None, "local-dir", "local-dir/model.gguf"])
def test_revision_is_refused_for_the_embedded_model_or_a_local_path(tmp_path, monkeypatch, command, model):
    """A Hub revision means nothing for the embedded model or a local directory/file: refused, not recorded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-dir").mkdir()
    (tmp_path / "local-dir" / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = {"score": ["-o", "s.parquet"], "prune": ["--keep", "0.5", "-o", "p.jsonl"],
           "displacement": ["-o", "d.parquet"], "validate": ["-o", "v"]}[command]
    argv = [command, "in.jsonl", *out, "--revision", "v1.0", *(["--model", model] if model else [])]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert "`--revision v1.0`" in result.output and ("embedded" if model is None else model) in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_revision_is_kept_for_a_hub_id():
    from ches_filter.config import ScoreConfig

    assert ScoreConfig(model="owner/name", revision="v1.0").revision == "v1.0"


def test_score_prune_report_end_to_end(tmp_path, hh_file, tiny_model_dir):
    import datasets

    data, rows = hh_file
    model = ["--model", tiny_model_dir, "-q"]
    scores = tmp_path / "scores.parquet"
    result = invoke("score", data, "-o", scores, *model, "--checkpoint-every", 7)
    assert result.exit_code == 0, result.output
    table = pq.read_table(scores)
    n = len(rows)
    assert table.column("row_index").to_pylist() == list(range(n))
    status = table.column("status").to_pylist()
    expected_status = [normalize_row(r, "implicit_text", Columns()).status for r in rows]
    assert status[-2:] == ["identical_responses", "empty_chosen"]
    assert all(got == want for got, want in zip(status, expected_status) if want != "ok")
    ln = table.column("ln_ches").to_pylist()
    ok = [i for i in range(n) if status[i] == "ok"]
    assert len(ok) >= 20 and all(math.isfinite(ln[i]) for i in ok)
    assert f"scored {len(ok)} of {n} rows" in result.output

    # prune with the score file: the lowest-LN-CHES 90% of the ok rows, in input order, untouched.
    pruned, rejects = tmp_path / "pruned.parquet", tmp_path / "rejects.jsonl"
    result = invoke("prune", data, "--keep", 0.9, "--scores", scores, "-o", pruned, "--rejects", rejects, *model)
    assert result.exit_code == 0, result.output
    n_keep = math.floor(0.9 * len(ok) + 0.5)
    lowest = sorted(sorted(ok, key=lambda i: (ln[i], i))[:n_keep])
    kept = datasets.load_dataset("parquet", data_files=str(pruned), split="train")
    assert kept["extra"] == lowest
    assert kept["chosen"] == [rows[i]["chosen"] for i in lowest]
    dropped = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["extra"] for r in dropped) == sorted(set(range(n)) - set(lowest))
    reasons = {r["extra"]: r["ches_filter_reason"] for r in dropped}
    assert reasons[24] == "identical_responses" and reasons[25] == "empty_chosen"
    threshold = max(ln[i] for i in lowest)
    assert f"kept:     {n_keep}" in result.output and f"threshold: ln_ches <= {threshold:.6g}" in result.output

    # prune that scores by itself keeps the same rows.
    again = tmp_path / "again.jsonl"
    result = invoke("prune", data, "--keep", 0.9, "-o", again, *model)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["extra"] for line in again.read_text(encoding="utf-8").splitlines()] == lowest

    # report: the same threshold for --keep 0.9, and the extremes are the extreme rows.
    report = tmp_path / "report"
    result = invoke("report", scores, "-o", report, "--data", data, "--keep", 0.9, "--top", 3)
    assert result.exit_code == 0, result.output
    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    assert summary["rows"] == n and summary["scored"] == len(ok)
    assert summary["thresholds"]["ln_ches"]["0.9"]["threshold"] == threshold
    assert summary["thresholds"]["ln_ches"]["0.9"]["kept"] == n_keep
    ranked = sorted(ok, key=lambda i: (ln[i], i))
    assert summary["lowest"] == ranked[:3] and summary["highest"] == ranked[::-1][:3]
    assert {p.name for p in report.iterdir()} == {"summary.json", "histogram.png", "length.png", "report.html"}


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    rows = [dict(r, extra=i) for i, r in enumerate(read_hh(24))]
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same", "extra": 24})
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello", "extra": 25})
    path = tmp_path_factory.mktemp("data") / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, rows
