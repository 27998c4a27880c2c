"""Scores are bit-identical to the golden file made before the restructure (float32, the embedded model, CPU).

``tests/golden/hh300_scores.parquet`` was written by ``ches-filter score`` at the
commit before the pipeline and registry restructure, on the shipped 300-row
HH-RLHF sample, with every measure. Any change to tokenisation, batching,
masks or the math shows here as a changed bit.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ches_filter.cli import main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "hh300_scores.parquet"
SAMPLE = REPO / "examples" / "data" / "hh_rlhf_harmless_300.jsonl"


@pytest.mark.slow
def test_shipped_sample_scores_bit_identical_to_golden(tmp_path):
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(main, [
        "score", str(SAMPLE), "-o", str(out), "-q", "--measures", "ches,ln_ches,last_hidden_ip,edit_distance",
    ])
    assert result.exit_code == 0, result.output
    got, want = pq.read_table(out), pq.read_table(GOLDEN)
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    for name in want.column_names:
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
