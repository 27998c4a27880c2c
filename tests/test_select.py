"""Prune selection: rounding, ties, statuses, determinism."""

import pyarrow.parquet as pq
import pyarrow as pa
import pytest

from ches_filter.config import PruneConfig
from ches_filter.errors import BadDataError, BadFlagError
from ches_filter.select import select_rows

from conftest import FIVE_PAIRS, cli_choices, error_lines, invoke, write_jsonl


def table(scores, statuses=None):
    n = len(scores)
    statuses = statuses or ["ok"] * n
    return pa.table(
        {
            "row_index": pa.array(range(n), pa.int64()),
            "ches": pa.array([None if s is None else s * 10 for s in scores], pa.float64()),
            "ln_ches": pa.array(scores, pa.float64()),
            "status": statuses,
        }
    )


def test_keep_fraction_rounds_half_up():
    # 0.9 * 25 = 22.5 -> 23 (exact decimal arithmetic, half up)
    sel = select_rows(table(list(range(25))), PruneConfig(keep=0.9))
    assert sel.n_kept == 23
    assert sel.keep == [True] * 23 + [False] * 2
    assert sel.threshold == 22
    # 0.5 * 5 = 2.5 -> 3 (Python's round() would give 2)
    assert select_rows(table([5, 4, 3, 2, 1]), PruneConfig(keep=0.5)).keep == [False, False, True, True, True]


def test_keep_one_keeps_every_scored_row():
    sel = select_rows(table([3.0, 1.0, 2.0]), PruneConfig(keep=1.0))
    assert sel.keep == [True, True, True]
    assert sel.counts == {}


def test_ties_break_by_row_index():
    sel = select_rows(table([1.0, 0.0, 1.0, 1.0, 0.0]), PruneConfig(keep_count=3))
    # ranked: (0,1) (0,4) (1,0) (1,2) (1,3) -> keep rows 1, 4, 0
    assert sel.keep == [True, True, False, False, True]
    assert sel.reason == [None, None, "high_score", "high_score", None]


def test_keep_count_larger_than_scored_keeps_all():
    assert select_rows(table([1.0, 2.0]), PruneConfig(keep_count=10)).n_kept == 2


def test_max_score_inclusive():
    sel = select_rows(table([0.5, 1.0, 1.5]), PruneConfig(max_score=1.0))
    assert sel.keep == [True, True, False]
    assert sel.threshold == 1.0


def test_unscored_rows_dropped_with_reason_or_kept_on_request():
    t = table([1.0, None, 2.0, 0.0], ["ok", "empty_chosen", "identical_responses", "ok"])
    sel = select_rows(t, PruneConfig(keep=1.0))
    assert sel.keep == [True, False, False, True]
    assert sel.counts == {"empty_chosen": 1, "identical_responses": 1}
    assert sel.n_ok == 2
    sel = select_rows(t, PruneConfig(keep=0.5, keep_unscored=True))
    assert sel.keep == [False, True, True, True]
    assert sel.counts == {"high_score": 1}


def test_fraction_counts_only_ok_rows():
    t = table([0.0, 1.0, None, None], ["ok", "ok", "too_long", "prompt_mismatch"])
    assert select_rows(t, PruneConfig(keep=0.5)).keep == [True, False, False, False]


def test_by_ches():
    t = table([1.0, 2.0])
    t = t.set_column(1, "ches", pa.array([5.0, -5.0]))
    assert select_rows(t, PruneConfig(keep_count=1, by="ches")).keep == [False, True]


def test_deterministic():
    import random

    rng = random.Random(0)
    scores = [rng.choice([0.0, 1.0, 2.0]) for _ in range(200)]
    first = select_rows(table(scores), PruneConfig(keep=0.7)).keep
    assert all(select_rows(table(scores), PruneConfig(keep=0.7)).keep == first for _ in range(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"keep": 0.9, "keep_count": 3}, "exactly one"),
        ({"keep": 0.0}, r"\(0, 1\]"),
        ({"keep": 1.5}, r"\(0, 1\]"),
        ({"keep_count": -1}, "0 or more"),
        ({"keep": 0.9, "by": "nope"}, "choose one of"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(BadFlagError, match=match):
        PruneConfig(**kwargs)


def test_score_table_must_be_complete():
    t = table([1.0, 2.0]).set_column(0, "row_index", pa.array([0, 2], pa.int64()))
    with pytest.raises(BadDataError, match="row_index"):
        select_rows(t, PruneConfig(keep=0.5))
    with pytest.raises(BadDataError, match="columns"):
        select_rows(t.drop(["ln_ches"]), PruneConfig(keep=0.5))


@pytest.mark.parametrize("by", ["ln_ches", "ches"])
def test_prune_on_scores_without_the_measure_is_one_clear_error(tmp_path, scored_without_ches, by):
    data, scores = scored_without_ches
    out = tmp_path / "kept.jsonl"
    result = invoke("prune", data, "--scores", scores, "--keep", 0.5, "--by", by, "-o", out, "-q")
    assert result.exit_code == 1, result.output
    errors = error_lines(result)
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert f"--by {by}" in errors[0] and "last_hidden_ip" in errors[0] and "edit_distance" in errors[0]
    assert "--measures" in errors[0]  # how to fix: rescore with the measure
    assert not out.exists()


def test_prune_refuses_to_rank_by_a_measure_it_is_told_not_to_compute(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", FIVE_PAIRS)
    result = invoke("prune", data, "--keep", 0.5, "--measures", "last_hidden_ip,edit_distance", "--model", tiny_model_dir,
                    "-o", tmp_path / "kept.jsonl", "-q")
    assert result.exit_code == 2, result.output
    errors = error_lines(result)
    assert len(errors) == 1 and "--by ln_ches" in errors[0] and "--measures" in errors[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_select_rows_names_the_measures_a_table_has():
    table = pa.table({"row_index": [0, 1], "last_hidden_ip": [1.0, 2.0], "edit_distance": [0.5, 0.1], "status": ["ok", "ok"]})
    with pytest.raises(BadDataError, match=r"--by ln_ches.*last_hidden_ip, edit_distance"):
        select_rows(table, PruneConfig(keep=0.5))


def test_prune_by_each_measure_the_cli_offers_and_the_file_has(tmp_path, scored_without_ches):
    """Whatever `prune --by` accepts and the file holds ranks the rows (none today; all four after issue 11)."""
    data, scores = scored_without_ches
    table = pq.read_table(scores)
    for by in [m for m in cli_choices("prune", "by") if m in table.column_names]:
        out = tmp_path / f"kept-{by}.jsonl"
        result = invoke("prune", data, "--scores", scores, "--keep", 1.0, "--by", by, "-o", out, "-q")
        assert result.exit_code == 0, result.output
        assert len(out.read_text().splitlines()) == table.column("status").to_pylist().count("ok")
