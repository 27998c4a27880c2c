"""`ches-filter report`: summary numbers, plots, the HTML page (escaped, self-contained), errors, Chromium."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import base64
import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ches_filter.cli import main
from ches_filter.config import PruneConfig, ReportConfig
from ches_filter.errors import BadDataError, BadFlagError, ChesFilterError
from ches_filter.report import build_report, summarize, terminal_summary
from ches_filter.stats import describe, rank_correlation

from conftest import FIVE_PAIRS, GOLDEN, REPO, cli_choices, error_lines, invoke, read_hh, write_jsonl

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script> & \"quotes\""


def rows(n=30):
    """Explicit-text pairs; row 3's chosen response carries markup that must come out escaped."""
    out = []
    for i in range(n):
        out.append({
            "prompt": f"question {i}: what is {i} + {i}?",
            "chosen": f"It is {2 * i}." + (" " + EVIL if i == 3 else ""),
            "rejected": f"I think {2 * i + 1}, because " + "really " * (i % 7),
        })
    out.append({"prompt": "empty?", "chosen": "", "rejected": "no"})  # status empty_chosen
    return out


def score_table(data, measure_fn=None):
    """A score table shaped like `ches-filter score` output, with the real fingerprint of ``data``."""
    import datasets
    import pyarrow as pa

    from ches_filter.formats import Columns
    from ches_filter.inputs import input_fingerprint

    measure_fn = measure_fn or (lambda i: (float(i * 1000 - 7000 * (i % 3)), float((i * 37) % 29) - 10.0))
    n = len(data)
    status, ches, ln = [], [], []
    for i, row in enumerate(data):
        ok = bool(row["chosen"])
        status.append("ok" if ok else "empty_chosen")
        c, l = measure_fn(i) if ok else (None, None)
        ches.append(c)
        ln.append(l)
    table = pa.table({
        "row_index": pa.array(range(n), pa.int64()),
        "ches": pa.array(ches, pa.float64()),
        "ln_ches": pa.array(ln, pa.float64()),
        "prompt_tokens": pa.array([10 + i for i in range(n)], pa.int64()),
        "chosen_tokens": pa.array([3 + i % 5 for i in range(n)], pa.int64()),
        "rejected_tokens": pa.array([4 + i % 9 for i in range(n)], pa.int64()),
        "status": pa.array(status, pa.string()),
    })
    ds = datasets.Dataset.from_list(data)
    meta = {
        "model": {"model": "tiny"}, "input_format": "explicit_text", "token_layout": "paper",
        "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": None},
        "input": "rows.jsonl", "num_rows": n, "counts": {},
        "input_fingerprint": input_fingerprint(ds, "explicit_text", Columns()),
    }
    return table.replace_schema_metadata({b"ches_filter": json.dumps(meta).encode()})


def write_scores(path: Path, table) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------- maths
def test_rank_correlation_known_values():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties share the average rank: y ranks are 1, 2, 3.5, 5, 3.5.
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    rx, ry = [1, 2, 3, 4, 5], [1, 2, 3.5, 5, 3.5]
    mx, my = 3, 3
    expected = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)
    )
    assert rank_correlation(x, y) == pytest.approx(expected)
    assert rank_correlation([1, None, 3, float("nan"), 5, 6], [1, 9, 2, 9, 3, 4]) == pytest.approx(1.0)
    assert rank_correlation([1, 1, 1], [1, 2, 3]) is None
    assert rank_correlation([1, 2], [1, 2]) is None


@settings(deadline=None)  # a loaded CI machine must not turn a slow example into a failure
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40))
def test_average_ranks_give_ties_the_mean_of_their_ranks(values):
    from ches_filter.stats import average_ranks

    # By definition: 1 + (number of smaller values) + (number of equal values - 1) / 2.
    want = [1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]
    assert average_ranks(values).tolist() == want


def test_rank_correlation_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(0)
    x = [rng.randint(0, 20) for _ in range(200)]
    y = [a + rng.gauss(0, 8) for a in x]
    assert rank_correlation(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_describe_matches_numpy_percentiles():
    np = pytest.importorskip("numpy")
    values = [3.0, -1.0, 7.5, 2.0, 2.0, 100.0, None, float("nan"), -50.0]
    finite = [v for v in values if v is not None and v == v]
    stats = describe(values)
    assert stats["count"] == len(finite)
    for name, q in (("q05", 5), ("q25", 25), ("median", 50), ("q99", 99), ("max", 100)):
        assert stats[name] == pytest.approx(float(np.percentile(finite, q)))
    assert describe([None]) == {"count": 0}


# -------------------------------------------------------------- summary
def test_summary_counts_thresholds_and_extremes():
    from ches_filter.select import select_rows

    data = rows()
    table = score_table(data)
    summary = summarize(table, ReportConfig(top=5))
    assert summary["rows"] == 31 and summary["scored"] == 30
    assert summary["counts"] == {"ok": 30, "empty_chosen": 1}
    for measure in ("ln_ches", "ches"):
        for keep in (0.95, 0.9, 0.8):
            info = summary["thresholds"][measure][f"{keep:g}"]
            selection = select_rows(table, PruneConfig(keep=keep, by=measure))
            assert info["threshold"] == selection.threshold
            assert info["kept"] == selection.n_kept
    # keep 0.9 of 30 scored rows keeps 27 and drops 3 for their score (and the unscored row).
    assert summary["thresholds"]["ln_ches"]["0.9"]["kept"] == 27
    assert summary["thresholds"]["ln_ches"]["0.9"]["dropped_high_score"] == 3
    ln = table.column("ln_ches").to_pylist()
    ok = [i for i in range(30)]
    by_value = sorted(ok, key=lambda i: (ln[i], i))
    assert summary["lowest"] == by_value[:5]
    assert summary["highest"] == list(reversed(by_value[-5:]))
    assert ln[summary["highest"][0]] == max(ln[i] for i in ok)
    assert summary["measures"]["ches"]["count"] == 30
    lines = terminal_summary(summary)
    assert lines[0].startswith("rows: 31, scored ok: 30") and "empty_chosen 1" in lines[0]
    assert any(line.startswith("--keep 0.9: ln_ches <=") for line in lines)


def test_summary_refuses_a_non_score_table():
    import pyarrow as pa

    with pytest.raises(BadDataError, match="not a score file"):
        summarize(pa.table({"chosen": ["a"], "rejected": ["b"]}))


def test_report_config_checks():
    with pytest.raises(BadFlagError, match="--keep"):
        ReportConfig(keep=(0.9, 0.0))
    with pytest.raises(BadFlagError, match="--by"):
        ReportConfig(by="edit")
    with pytest.raises(BadFlagError, match="--top"):
        ReportConfig(top=-1)
    assert ReportConfig(keep=(0.8, 0.9, 0.9)).keep == (0.9, 0.8)


# ------------------------------------------------------------ the report
def test_report_files_and_escaped_self_contained_html(tmp_path):
    data = rows()
    # Row 3 (with the markup) scores highest on ln_ches, so it is listed first.
    table = score_table(data, lambda i: (float(i), 100.0 if i == 3 else float(i % 11)))
    scores = write_scores(tmp_path / "s.parquet", table)
    source = write_jsonl(tmp_path / "rows.jsonl", data)
    out = tmp_path / "report"
    summary = build_report(str(scores), str(out), ReportConfig(top=4), data=str(source))
    assert sorted(p.name for p in out.iterdir()) == ["histogram.png", "length.png", "report.html", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["highest"][0] == 3
    for name in ("histogram.png", "length.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    page = (out / "report.html").read_text(encoding="utf-8")
    # Self-contained: both plots inline, byte for byte, and nothing fetched from elsewhere.
    inline = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(b) for b in inline] == [(out / "histogram.png").read_bytes(), (out / "length.png").read_bytes()]
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)
    # The markup in the data is shown as text, never as markup.
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert "question 3: what is 3 + 3?" in page
    assert page.count('<table class="pairs">') == 2


def test_report_without_data_has_no_excerpts(tmp_path):
    scores = write_scores(tmp_path / "s.parquet", score_table(rows()))
    build_report(str(scores), str(tmp_path / "r"))
    page = (tmp_path / "r" / "report.html").read_text()
    assert "--data INPUT" in page and "question 3" not in page


def test_report_refuses_data_that_was_not_scored(tmp_path):
    data = rows()
    scores = write_scores(tmp_path / "s.parquet", score_table(data))
    other = [dict(r) for r in data]
    other[5]["chosen"] = "something else"
    with pytest.raises(BadDataError, match="not the input"):
        build_report(str(scores), str(tmp_path / "r"), data=str(write_jsonl(tmp_path / "o.jsonl", other)))
    with pytest.raises(BadDataError, match="rows"):
        build_report(str(scores), str(tmp_path / "r"), data=str(write_jsonl(tmp_path / "short.jsonl", data[:10])))
    assert not (tmp_path / "r").exists()


def test_report_refuses_to_overwrite(tmp_path):
    scores = write_scores(tmp_path / "s.parquet", score_table(rows()))
    (tmp_path / "r").mkdir()
    with pytest.raises(BadFlagError, match="--overwrite"):
        build_report(str(scores), str(tmp_path / "r"))
    build_report(str(scores), str(tmp_path / "r"), overwrite=True)
    assert (tmp_path / "r" / "report.html").exists()


def test_missing_matplotlib_is_one_clear_error(tmp_path, monkeypatch):
    scores = write_scores(tmp_path / "s.parquet", score_table(rows()))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ChesFilterError, match=re.escape("pip install 'ches-filter[report]'")):
        build_report(str(scores), str(tmp_path / "r"))
    result = CliRunner().invoke(main, ["report", str(scores), "-o", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "matplotlib" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_cli_report(tmp_path):
    data = rows()
    scores = write_scores(tmp_path / "s.parquet", score_table(data))
    source = write_jsonl(tmp_path / "rows.jsonl", data)
    result = CliRunner().invoke(
        main, ["report", str(scores), "--data", str(source), "-o", str(tmp_path / "r"), "--keep", "0.9", "--top", "3", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "rows: 31, scored ok: 30" in result.output
    assert "--keep 0.9: ln_ches <=" in result.output and "--keep 0.8" not in result.output
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["highest"].__len__() == 3
    bad = CliRunner().invoke(main, ["report", str(scores), "-o", str(tmp_path / "r2"), "--keep", "2"])
    assert bad.exit_code == 2 and "--keep" in bad.output
    not_scores = CliRunner().invoke(main, ["report", str(source), "-o", str(tmp_path / "r3")])
    assert not_scores.exit_code == 1 and "parquet" in not_scores.output


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="Chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    data = rows()
    build_report(str(write_scores(tmp_path / "s.parquet", score_table(data))), str(tmp_path / "r"),
                 data=str(write_jsonl(tmp_path / "rows.jsonl", data)))
    shot = tmp_path / "shot.png"
    out = subprocess.run(["bash", str(REPO / "examples" / "check_report_html.sh"), str(tmp_path / "r"), str(shot), "1600"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "inline plots: 2" in out.stdout
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20_000


@pytest.mark.slow
def test_report_on_real_scores(tmp_path, embedded):
    from ches_filter.api import score_pairs

    data = read_hh(6)
    source = write_jsonl(tmp_path / "hh.jsonl", data)
    table = score_pairs(str(source), model=embedded, progress=False)
    scores = write_scores(tmp_path / "s.parquet", table)
    summary = build_report(str(scores), str(tmp_path / "r"), ReportConfig(top=3), data=str(source))
    assert summary["rows"] == 6 and summary["input_format"] == "implicit_text"
    page = (tmp_path / "r" / "report.html").read_text()
    # The highest-LN-CHES pair's chosen response is quoted, escaped, in the page.
    from ches_filter.formats import Columns, normalize_row
    import html

    top = normalize_row(data[summary["highest"][0]], "implicit_text", Columns())
    assert html.escape(top.chosen.strip()[:60], quote=True) in page


def test_report_on_scores_without_ches_says_what_is_missing_or_reports_what_is_there(tmp_path, scored_without_ches):
    pytest.importorskip("matplotlib")
    data, scores = scored_without_ches
    present = ["last_hidden_ip", "edit_distance"]
    result = invoke("report", scores, "-o", tmp_path / "r", "-q")
    if result.exit_code != 0:
        assert result.exit_code == 1, result.output
        errors = error_lines(result)
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        assert "ln_ches" in errors[0] and all(m in errors[0] for m in present)
        assert not (tmp_path / "r").exists()
        # Whatever fix the message suggests must be one the CLI accepts.
        suggested = re.findall(r"`--by (\w+)`", errors[0].split(";", 1)[-1])
        assert all(by in cli_choices("report", "by") for by in suggested), errors[0]
    for by in [m for m in cli_choices("report", "by") if m in present]:
        out = tmp_path / f"r-{by}"
        result = invoke("report", scores, "-o", out, "--by", by, "--data", data, "-q")
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["by"] == by and set(summary["measures"]) == set(present)


def test_report_on_scores_with_ches_only_reports_ches(tmp_path, tiny_model_dir):
    """A file with `ches` but not `ln_ches`: the default `--by ln_ches` points at `--by ches`, which works."""
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / "d.jsonl", FIVE_PAIRS)
    scores = tmp_path / "s.parquet"
    assert invoke("score", data, "-o", scores, "--model", tiny_model_dir, "--measures", "ches,edit_distance", "-q").exit_code == 0
    result = invoke("report", scores, "-o", tmp_path / "r", "-q")
    assert result.exit_code == 1, result.output
    (error,) = error_lines(result)
    assert "ln_ches" in error and "`--by ches`" in error
    result = invoke("report", scores, "-o", tmp_path / "r", "--by", "ches", "--keep", 0.5, "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    # Every measure gets prune thresholds, each in its risk direction (lower edit distance = riskier).
    assert set(summary["measures"]) == {"ches", "edit_distance"} and set(summary["thresholds"]) == {"ches", "edit_distance"}
    table = pq.read_table(scores)
    ok = [s == "ok" for s in table.column("status").to_pylist()]
    ches = [v for v, o in zip(table.column("ches").to_pylist(), ok) if o]
    n_keep = math.floor(0.5 * len(ches) + 0.5)
    assert summary["thresholds"]["ches"]["0.5"]["threshold"] == sorted(ches)[n_keep - 1]
    edit = [v for v, o in zip(table.column("edit_distance").to_pylist(), ok) if o]
    assert summary["thresholds"]["edit_distance"]["0.5"]["threshold"] == sorted(edit, reverse=True)[n_keep - 1]


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
