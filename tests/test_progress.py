"""Progress moves per forward batch, not per chunk, and counts every row once."""

import pytest

from ches_filter.config import ScoreConfig
from ches_filter.inputs import load_input
from ches_filter.scoring import build_scorer

from conftest import read_hh


@pytest.mark.parametrize("measures", ["ches,ln_ches", "ches,last_hidden_ip,edit_distance"])
def test_rows_are_reported_per_batch_and_add_up(tiny_model_dir, measures):
    rows = read_hh(12)
    rows[3] = {"chosen": "", "rejected": rows[3]["rejected"]}  # not scorable: no forward pass
    rows[5] = {"chosen": rows[5]["rejected"], "rejected": rows[5]["rejected"]}  # identical responses
    config = ScoreConfig(model=str(tiny_model_dir), chunk_size=1000, max_batch_tokens=1, measures=measures, quiet=True)
    ds, layout, columns = load_input(rows, config)
    scorer = build_scorer(ds, layout, columns, config)
    chunks, progress = [], []
    tables = list(scorer.score_ranges([(0, 12)], on_chunk=lambda s, c, n: chunks.append(n), on_rows=progress.append))
    assert chunks == [12]  # one chunk ...
    assert len(progress) >= 10 and sum(progress) == 12  # ... but the bar moves per batch, every row once
    assert tables[0][2].num_rows == 12


@pytest.mark.parametrize("workers", [1, 3])
def test_engine_workers_reach_the_engine(tiny_model_dir, workers):
    rows = read_hh(4)
    config = ScoreConfig(model=str(tiny_model_dir), engine_workers=workers, quiet=True)
    ds, layout, columns = load_input(rows, config)
    assert build_scorer(ds, layout, columns, config).engine.workers == workers
