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

from .config import MEASURES, SCORE_MEASURES, PruneConfig, ScoreConfig
from .errors import BadDataError, BadFlagError

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
        threshold: the highest kept score (None if no scored row is kept).
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


def select_rows(scores: Any, config: PruneConfig) -> Selection:
    """Keep the lowest-risk ``ok`` rows.

    Rows are ranked by ``config.by`` ascending, ties broken by ``row_index``;
    ``keep``/``keep_count`` take the first n, ``max_score`` takes every row
    whose score is ``<= T``. Rows whose status is not ``ok`` are dropped with
    their status as reason, unless ``keep_unscored``.

    Args:
        scores: a ``pyarrow.Table`` from :func:`~ches_filter.scoring.score_pairs`
            (``row_index``, ``status`` and the ``by`` column are read).
        config: the selection rule.

    Returns:
        The :class:`Selection`, in ``row_index`` order.
    """
    for name in ("row_index", "status"):
        if name not in scores.column_names:
            raise BadDataError(
                f"the score table has no {name!r} column (columns: {', '.join(scores.column_names)}); "
                "was it written by `ches-filter score`?"
            )
    if config.by not in scores.column_names:
        present = [m for m in SCORE_MEASURES if m in scores.column_names]
        usable = [m for m in MEASURES if m in present]
        raise BadDataError(
            f"the score table has no {config.by!r} column for `--by {config.by}` (its measure columns: "
            f"{', '.join(present) or 'none'}); rescore with `--measures` including {config.by}"
            + (f", or pass `--by {usable[0]}`" if usable else "")
        )
    row_index = scores.column("row_index").to_pylist()
    if row_index != list(range(len(row_index))):
        raise BadDataError("the score table's `row_index` is not 0..N-1 in order; it was edited or is incomplete")
    status = scores.column("status").to_pylist()
    values = scores.column(config.by).to_pylist()
    n = len(status)
    ok = [i for i in range(n) if status[i] == SCORED_STATUS and values[i] is not None]
    ranked = sorted(ok, key=lambda i: (values[i], i))
    n_keep = config.keep_n(len(ok))
    if n_keep is None:
        kept_ok = [i for i in ranked if values[i] <= config.max_score]
    else:
        kept_ok = ranked[:n_keep]
    keep = [False] * n
    reason: list[str | None] = [None] * n
    for i in kept_ok:
        keep[i] = True
    for i in range(n):
        if keep[i]:
            continue
        if status[i] == SCORED_STATUS and values[i] is not None:
            reason[i] = HIGH_SCORE
        elif config.keep_unscored:
            keep[i] = True
        else:
            reason[i] = status[i] if status[i] != SCORED_STATUS else "missing_score"
    counts: dict[str, int] = {}
    for r in reason:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    threshold = values[kept_ok[-1]] if kept_ok and n_keep is not None else (
        max((values[i] for i in kept_ok), default=None)
    )
    return Selection(keep=keep, reason=reason, threshold=threshold, counts=counts, n_ok=len(ok))


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
    if scores is None and config.by not in score_config.measure_list:
        raise BadFlagError(
            f"`--by {config.by}` ranks by a measure that `--measures {score_config.measures}` does not compute; "
            f"add it: `--measures {score_config.measures},{config.by}`"
        )
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
