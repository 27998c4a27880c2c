"""`ches-filter validate` with the real embedded model: the small CI run (n = 8, one optimizer step)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE_HH, REPO

GOLDEN = Path(__file__).resolve().parent / "golden" / "hh300_scores.parquet"


@pytest.mark.slow
def test_embedded_model_one_step(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "v"
    cmd = [sys.executable, "-m", "ches_filter", "validate", str(EXAMPLE_HH), "-o", str(out), "--scores", str(GOLDEN),
           "--by", "ches", "--subsets", "top", "--subset-size", "8", "--batch-size", "8", "--eval-size", "4", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    assert result.returncode == 0, result.stderr
    assert "verdict" in result.stdout and "top" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["subsets"]
    assert entry["steps"] == 1 and entry["n"] == 8
    assert entry["loss_first"] == pytest.approx(math.log(2), rel=1e-6)  # policy = reference at the first step
    assert summary["logprob_path"] == "packed" and summary["autocast"] is None
    table = pq.read_table(out / "validate.parquet")
    assert table.num_rows == 8 + 4
    deltas = table.column("dlogp_chosen").to_pylist()
    assert all(math.isfinite(d) for d in deltas)
    # One Adam step of the default lr moves every trained y+ far above float32 noise (~1e-4 nats).
    trained = [d for d, s in zip(deltas, table.column("set").to_pylist()) if s == "subset"]
    assert min(abs(d) for d in trained) > 1e-2
    # The trained pairs are the 8 highest-CHES usable pairs outside the eval set.
    golden = pq.read_table(GOLDEN)
    rows = set(table.column("row_index").to_pylist()[:8])
    eval_rows = set(summary["eval_rows"])
    ches = golden.column("ches").to_pylist()
    ok = [i for i, s in enumerate(golden.column("status").to_pylist()) if s == "ok" and i not in eval_rows]
    assert rows == set(sorted(ok, key=lambda i: (ches[i], i))[-8:])
