"""The fast tier (`pytest -m "not slow"`): its guard, and the CLI end to end on a tiny random model.

The guard in ``conftest.py`` fails an unmarked test that loads a real model or
starts a subprocess when slow tests are deselected; it is checked here by
running a small inner pytest session in this process (``pytester``). The rest
covers, with a 2-layer random Llama and the embedded model's tokenizer, what
the slow tests check on the real model: ``score`` -> ``prune`` -> ``report``
through the CLI, hostile rows, and list-wise encoding.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ches_filter.cli import main
from ches_filter.formats import Columns, normalize_row

from conftest import fast_tier, read_hh
from test_hostile import DAMAGE, ROWS, check_outcome, encode, run_score

pytest_plugins = ("pytester",)

CONFTEST = Path(__file__).with_name("conftest.py")


# --------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------


class _Config:
    def __init__(self, markexpr):
        self.markexpr = markexpr

    def getoption(self, name, default=None):
        assert name == "markexpr"
        return self.markexpr


@pytest.mark.parametrize(
    "markexpr, fast",
    [("not slow", True), ("", False), (None, False), ("slow", False), ("not slow and not gpu", True),
     ("slow or not slow", False), ("gpu", True), ("not (slow or gpu)", True)],
)
def test_fast_tier_reads_the_mark_expression(markexpr, fast):
    """Fast means: a test marked only `slow` would be deselected."""
    assert fast_tier(_Config(markexpr)) is fast


INNER_TESTS = '''
import subprocess
import sys

import pytest


def test_asks_for_the_embedded_fixture(embedded):
    pass


def test_loads_the_embedded_model():
    from ches_filter.model import load_model

    load_model(None, dtype="float32", device="cpu")


def test_starts_a_subprocess():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_swallows_the_refusal():
    try:
        subprocess.run([sys.executable, "-c", "pass"])
    except BaseException:
        pass


def test_tiny_model_is_fine(tiny_model_dir):
    from ches_filter.model import load_model

    assert load_model(str(tiny_model_dir), dtype="float32", device="cpu").decoder.config.num_hidden_layers == 2


@pytest.mark.slow
def test_marked_slow_is_deselected():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
'''


def test_guard_fails_unmarked_tests_that_load_a_real_model_or_start_a_subprocess(pytester, tiny_model_dir):
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8") + f'''

@pytest.fixture(scope="session")
def tiny_model_dir():
    return {str(tiny_model_dir)!r}
''')
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-m", "not slow", "-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1 and outcomes.get("failed") == 3, result.stdout.str()
    assert outcomes.get("errors", outcomes.get("error")) == 1 and outcomes.get("deselected") == 1, result.stdout.str()
    text = result.stdout.str()
    assert "uses the real-model fixture embedded" in text
    assert "loads the real model" in text and "SmolLM2" in text
    assert "starts a subprocess" in text
    assert "caught by the code under test" in text
    # Without `-m "not slow"` the guard stands aside (the same tests would run for real: run only the safe one).
    plain = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q", "-k", "tiny_model_is_fine")
    assert plain.parseoutcomes().get("passed") == 1


# --------------------------------------------------------------------------
# score -> prune -> report through the CLI, on a tiny random model
# --------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def hh_file(tmp_path_factory):
    rows = [dict(r, extra=i) for i, r in enumerate(read_hh(24))]
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same", "extra": 24})
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello", "extra": 25})
    path = tmp_path_factory.mktemp("data") / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, rows


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


# --------------------------------------------------------------------------
# Hostile rows: a few examples of the slow property in tests/test_hostile.py
# --------------------------------------------------------------------------


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_few_hostile_files_never_crash_and_never_lose_a_row(tiny_model_dir, data):
    rows, damage = data.draw(ROWS), data.draw(DAMAGE)
    payload = encode(rows, damage, lambda n: data.draw(st.integers(0, max(0, n - 1))))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hostile.jsonl")
        with open(path, "wb") as handle:
            handle.write(payload)
        out = os.path.join(tmp, "scores.parquet")
        expected = sum(1 for line in payload.split(b"\n") if line.strip())
        check_outcome(run_score(path, out, tiny_model_dir), path, out, expected)


# --------------------------------------------------------------------------
# List-wise encoding with the embedded tokenizer (tests/test_encoding.py runs more, slow)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "text"])
def test_hh_rows_encode_the_same_as_lists(embedded_tokenizer, chat):
    from ches_filter.batching import PairEncoder

    pairs = [normalize_row(row, "implicit_text", Columns()) for row in read_hh(60)]
    encoder = PairEncoder(embedded_tokenizer, use_chat_template=chat)
    one = [encoder.encode_checked(p, 300) for p in pairs]
    encoder.encode_checked = None  # the list path must not fall back to pair by pair
    assert encoder.encode_checked_many(pairs, 300) == one
    assert {"ok", "too_long"} <= {status for status, _ in one}
