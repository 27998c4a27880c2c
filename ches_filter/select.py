"""Choose which scored pairs to keep: the ``prune`` pipeline.

:func:`select_rows` is a pure function of the score table; :func:`prune_pairs`
reads the input, scores it (or reuses a score file that belongs to it),
selects, and returns the original rows, untouched, in their original order.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from .config import PruneConfig, ScoreConfig
from .errors import BadDataError
from .measures import MEASURES, risk_key

logger = logging.getLogger(__name__)

__all__ = ["Selection", "select_rows", "prune_pairs", "PruneResult"]

SCORED_STATUS = "ok"
HIGH_SCORE = "high_score"


@dataclass
class Selection:
    """Which rows survive.

    Attributes:
        keep: one bool per input row, in input order.
        reason: ``None`` for kept rows, else ``high_score`` or the row's status.
        threshold: the riskiest kept score (None if no scored row is kept).
        counts: dropped rows per reason.
        n_ok: rows with status ``ok``.
    """

    keep: list[bool]
    reason: list[str | None]
    threshold: float | None
    counts: dict[str, int] = field(default_factory=dict)
    n_ok: int = 0

    @property
    def n_kept(self) -> int:
        return sum(self.keep)


def _check_columns(scores: Any, by: str) -> None:
    if "row_index" not in scores.column_names or "status" not in scores.column_names:
        raise BadDataError(
            f"the score table lacks `row_index`/`status` (columns: {', '.join(scores.column_names)}); "
            "was it written by `ches-filter score`?"
        )
    if by not in scores.column_names:
        present = [m for m in MEASURES.names() if m in scores.column_names]
        raise BadDataError(
            f"the score table has no {by!r} column (measure columns present: {', '.join(present) or 'none'}); "
            f"rank by one of those with `--by`, or rescore with `--measures {by}`"
        )


def rank_scored(scores: Any, by: str) -> tuple[Any, Any, Any]:
    """The scored rows of a score table, safest first.

    A row is scored when its status is ``ok`` and its ``by`` value is not null.
    Ranking follows ``by``'s risk direction (:func:`ches_filter.measures.risk_key`),
    ties broken by ``row_index``; one numpy sort, no Python object per row.

    Args:
        scores: a ``pyarrow.Table`` with ``row_index``, ``status`` and ``by``.
        by: a measure name.

    Returns:
        ``(ranked, values, ok)``: positions of the scored rows ordered safest
        first, the ``by`` column as float64 (NaN for null), and the scored mask.
    """
    import numpy as np
    import pyarrow.compute as pc

    _check_columns(scores, by)
    column = scores.column(by)
    values = np.asarray(pc.fill_null(column.cast("float64"), float("nan")).to_numpy(zero_copy_only=False), dtype=np.float64)
    valid = np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)
    is_ok = np.asarray(pc.fill_null(pc.equal(scores.column("status"), SCORED_STATUS), False).to_numpy(zero_copy_only=False), dtype=bool)
    ok = is_ok & valid
    positions = np.flatnonzero(ok)
    sign = 1.0 if MEASURES.get(by).higher_is_riskier else -1.0
    row_index = np.asarray(scores.column("row_index").to_numpy(zero_copy_only=False), dtype=np.int64)
    ranked = positions[np.lexsort((row_index[positions], sign * values[positions]))]
    return ranked, values, ok


def kept_count(ranked: Any, values: Any, config: PruneConfig) -> int:
    """How many of the ``ranked`` rows (safest first) ``config`` keeps."""
    import numpy as np

    n_keep = config.keep_n(len(ranked))
    if n_keep is not None:
        return n_keep
    risk = values[ranked] if MEASURES.get(config.by).higher_is_riskier else -values[ranked]
    return int(np.searchsorted(risk, risk_key(config.by, config.max_score), side="right"))


def select_rows(scores: Any, config: PruneConfig) -> Selection:
    """Keep the lowest-risk ``ok`` rows.

    Rows are ranked safest first by ``config.by`` in its risk direction
    (:func:`ches_filter.measures.risk_key`), ties broken by ``row_index``;
    ``keep``/``keep_count`` take the first n, ``max_score`` takes every row
    no riskier than ``T`` (``<= T``, or ``>= T`` where lower is riskier).
    Rows whose status is not ``ok`` are dropped with their status as reason
    (``missing_score`` for an ``ok`` row without a ``by`` value), unless
    ``keep_unscored``.

    Args:
        scores: a ``pyarrow.Table`` from :func:`~ches_filter.scoring.score_pairs`
            (``row_index``, ``status`` and the ``by`` column are read).
        config: the selection rule.

    Returns:
        The :class:`Selection`, in ``row_index`` order.
    """
    row_index = scores.column("row_index").to_pylist() if "row_index" in scores.column_names else None
    ranked, values, ok = rank_scored(scores, config.by)
    if row_index != list(range(len(row_index))):
        raise BadDataError("the score table's `row_index` is not 0..N-1 in order; it was edited or is incomplete")
    status = scores.column("status").to_pylist()
    n = len(status)
    kept_ok = ranked[: kept_count(ranked, values, config)]
    keep = [False] * n
    reason: list[str | None] = [None] * n
    for i in kept_ok.tolist():
        keep[i] = True
    for i in range(n):
        if keep[i]:
            continue
        if ok[i]:
            reason[i] = HIGH_SCORE
        elif config.keep_unscored:
            keep[i] = True
        else:
            reason[i] = status[i] if status[i] != SCORED_STATUS else "missing_score"
    counts: dict[str, int] = {}
    for r in reason:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    # The riskiest kept score: the last of the kept rows, which are sorted safest first.
    threshold = float(values[kept_ok[-1]]) if len(kept_ok) else None
    return Selection(keep=keep, reason=reason, threshold=threshold, counts=counts, n_ok=len(ranked))


@dataclass
class PruneResult:
    """What :func:`prune_pairs` returns.

    Attributes:
        kept: the kept original rows (``datasets.Dataset``), original order.
        rejects: the dropped rows with ``ches_filter_reason`` and the scores.
        scores: the score table used.
        selection: the :class:`Selection`.
    """

    kept: Any
    rejects: Any
    scores: Any
    selection: Selection

    def summary(self) -> dict:
        """Counts for printing: rows in, scored, kept, dropped by reason, threshold."""
        sel = self.selection
        return {
            "rows_in": len(sel.keep),
            "scored": sel.n_ok,
            "kept": sel.n_kept,
            "dropped": len(sel.keep) - sel.n_kept,
            "dropped_by_reason": dict(sorted(sel.counts.items())),
            "threshold": sel.threshold,
        }


def _check_scores_match(scores: Any, ds: Any, layout: str, columns: Any, chunk_size: int) -> None:
    from .scoring import input_fingerprint, table_metadata

    meta = table_metadata(scores)
    if scores.num_rows != len(ds):
        raise BadDataError(
            f"`--scores` has {scores.num_rows} rows but the input has {len(ds)}; it was computed for another dataset"
        )
    expected = meta.get("input_fingerprint")
    if expected is None:
        raise BadDataError("`--scores` carries no input fingerprint; rescore with `ches-filter score`")
    stored_columns = meta.get("columns") or {}
    if stored_columns and any(stored_columns.get(k) != getattr(columns, k) for k in ("prompt", "chosen", "rejected")):
        raise BadDataError(
            f"`--scores` was computed with columns {stored_columns}, not the ones given now; pass the same "
            "`--prompt-column/--chosen-column/--rejected-column`"
        )
    if input_fingerprint(ds, meta.get("input_format", layout), columns, chunk_size) != expected:
        raise BadDataError("`--scores` does not belong to this input: the rows differ from the ones it scored")


def prune_pairs(
    data: Any,
    config: PruneConfig | None = None,
    *,
    scores: Any = None,
    score_config: ScoreConfig | None = None,
    model: Any = None,
    **overrides: Any,
) -> PruneResult:
    """Score (or reuse scores) and keep the lowest-risk pairs.

    Args:
        data: path, ``datasets.Dataset`` or list of row dicts.
        config: the :class:`~ches_filter.config.PruneConfig`; keyword
            ``overrides`` replace its fields (or build one).
        scores: a score table (``pyarrow.Table``) or the path of a score
            Parquet for exactly this input; checked by fingerprint.
        score_config: how to read and score ``data``.
        model: an already loaded model to score with.

    Returns:
        A :class:`PruneResult`.
    """
    import pyarrow as pa

    from .io import read_table
    from .scoring import load_input, score_loaded

    config = dataclasses.replace(config, **overrides) if config is not None else PruneConfig(**overrides)
    score_config = score_config or ScoreConfig()
    ds, layout, columns = load_input(data, score_config)
    if scores is None:
        table = score_loaded(ds, layout, columns, score_config, model=model, source=data)
    else:
        table = read_table(str(scores))[0] if not isinstance(scores, pa.Table) else scores
        _check_scores_match(table, ds, layout, columns, score_config.chunk_size)
    selection = select_rows(table, config)
    kept_idx = [i for i, k in enumerate(selection.keep) if k]
    drop_idx = [i for i, k in enumerate(selection.keep) if not k]
    score_cols = [c for c in ("ches", "ln_ches", "status") if c in table.column_names]
    kept = ds.select(kept_idx)
    if config.add_scores:
        for name in score_cols:
            values = table.column(name).to_pylist()
            kept = kept.add_column(_free_name(kept, name), [values[i] for i in kept_idx])
    rejects = ds.select(drop_idx)
    reasons = [selection.reason[i] for i in drop_idx]
    rejects = rejects.add_column(_free_name(rejects, "ches_filter_reason"), reasons)
    for name in score_cols:
        values = table.column(name).to_pylist()
        rejects = rejects.add_column(_free_name(rejects, name), [values[i] for i in drop_idx])
    return PruneResult(kept=kept, rejects=rejects, scores=table, selection=selection)


def _free_name(ds: Any, name: str) -> str:
    # Never clobber a user column that happens to be called "ches".
    candidate = name
    while candidate in ds.column_names:
        candidate = f"ches_filter_{candidate}" if not candidate.startswith("ches_filter_") else candidate + "_"
    return candidate
