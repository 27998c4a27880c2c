"""Choose which scored pairs to keep: the ``prune`` pipeline.

:func:`select_rows` is a pure function of the score table;
:func:`ches_filter.prune_pairs` (:mod:`api`) reads the input, scores it (or
reuses a score file that belongs to it), selects with it, and returns the
original rows, untouched, in their original order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PruneConfig, ScoreConfig
from .errors import BadDataError, BadFlagError
from .measures import MEASURES, risk_key
from .model import DEFAULT_MODEL_FILE
from .records import Selection as Output, free_name, to_dataset, write_selections
from .scorefile import read_table

# datasets, pyarrow and numpy are imported in the functions that use them: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["Selection", "select_rows", "PruneResult"]

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
            f"the score table has no {by!r} column for `--by {by}` (its measure columns: "
            f"{', '.join(present) or 'none'}); rescore with `--measures` including {by}"
            + (f", or pass `--by {present[0]}`" if present else "")
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
    import numpy as np
    import pyarrow.compute as pc

    ranked, values, ok = rank_scored(scores, config.by)
    n = scores.num_rows
    # numpy and dictionary codes, not a Python object per row: a million rows stay a few MB.
    row_index = scores.column("row_index")
    if row_index.null_count or not np.array_equal(np.asarray(row_index.to_numpy(zero_copy_only=False)), np.arange(n)):
        raise BadDataError("the score table's `row_index` is not 0..N-1 in order; it was edited or is incomplete")
    encoded = pc.dictionary_encode(pc.fill_null(scores.column("status"), "")).combine_chunks()
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False))
    names = [name if name not in ("", SCORED_STATUS) else "missing_score" for name in encoded.dictionary.to_pylist()]
    kept_ok = ranked[: kept_count(ranked, values, config)]
    keep_mask = np.zeros(n, dtype=bool)
    keep_mask[kept_ok] = True
    high = ok & ~keep_mask
    unscored = ~ok & ~keep_mask
    if config.keep_unscored:
        keep_mask |= unscored
        unscored[:] = False
    keep = keep_mask.tolist()
    reason: list[str | None] = [None] * n
    for i in np.flatnonzero(high).tolist():
        reason[i] = HIGH_SCORE
    for i in np.flatnonzero(unscored).tolist():
        reason[i] = names[codes[i]]
    counts: dict[str, int] = {}
    for r in reason:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    # The riskiest kept score: the last of the kept rows, which are sorted safest first.
    threshold = float(values[kept_ok[-1]]) if len(kept_ok) else None
    return Selection(keep=keep, reason=reason, threshold=threshold, counts=counts, n_ok=len(ranked))


@dataclass
class PruneResult:
    """What :func:`ches_filter.prune_pairs` returns.

    Attributes:
        records: the input (:class:`~ches_filter.records.Records`).
        scores: the score table used.
        selection: the :class:`Selection`.
        add_scores: whether the kept rows get the score columns appended.
        work: the scoring work directory (:class:`~ches_filter.run.WorkDir`)
            to remove once the outputs are written, or None.
    """

    records: Any
    scores: Any
    selection: Selection
    add_scores: bool = False
    work: Any = None

    def _columns(self) -> list[str]:
        return [m for m in MEASURES.names() if m in self.scores.column_names] + ["status"]

    def outputs(self, output: str | None, rejects: str | None = None) -> list[Any]:
        """The :class:`~ches_filter.records.Selection` of each output: the kept rows, the dropped rows.

        The kept rows get the score columns appended with ``add_scores``; the
        dropped rows get ``ches_filter_reason`` and the score columns. A name
        the input already uses gets a ``ches_filter_`` prefix.
        """
        import numpy as np
        import pyarrow as pa

        keep = np.asarray(self.selection.keep, dtype=bool)
        kept_idx, drop_idx = np.flatnonzero(keep), np.flatnonzero(~keep)
        taken = list(self.records.columns)

        def scores(idx: Any, first: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
            extra = list(first)
            for name in self._columns():
                column = self.scores.column(name).combine_chunks()
                extra.append((free_name(taken, name), column.take(pa.array(idx, pa.int64()))))
            return extra

        out = [Output("--output", output, kept_idx, scores(kept_idx, []) if self.add_scores else [])]
        if rejects is not None:
            reasons = pa.array([self.selection.reason[i] for i in drop_idx.tolist()], pa.string())
            out.append(Output("--rejects", rejects, drop_idx, scores(drop_idx, [(free_name(taken, "ches_filter_reason"), reasons)])))
        return out

    def write(self, output: str, rejects: str | None = None, *, overwrite: bool = False) -> None:
        """Writes the kept rows to ``output`` (and the dropped ones to ``rejects``): both or neither.

        Same kind as the input: the records themselves; across kinds: identical values or refused.
        """
        write_selections(self.records, self.outputs(output, rejects), overwrite=overwrite)

    def _dataset(self, which: int) -> Any:
        import datasets

        chosen = self.outputs(None, "") [which]
        if self.records.kind == "dataset":
            ds = self.records.dataset.select(chosen.rows)
            for name, values in chosen.extra:
                ds = ds.add_column(name, values.to_pylist())
            return ds
        return datasets.Dataset(to_dataset(self.records, chosen))

    @property
    def kept(self) -> Any:
        """The kept rows as a ``datasets.Dataset`` (a file input's values must fit Arrow types exactly)."""
        return self._dataset(0)

    @property
    def rejects(self) -> Any:
        """The dropped rows with ``ches_filter_reason`` and the scores, as a ``datasets.Dataset``."""
        return self._dataset(1)

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


#: ScoreConfig fields that never change a score value: where and how fast scoring runs, what it prints,
#: permission to run remote code, and which rows are read (``--split``/``--subset``; the input
#: fingerprint ties the score file to those rows). Every other field is compared by
#: :func:`check_score_settings`.
FREE_SCORE_SETTINGS = frozenset({
    "device", "device_map", "engine_workers", "max_batch_tokens", "max_batch_size", "chunk_size", "quiet",
    "trust_remote_code", "split", "subset",
})
_MISSING = object()


def _recorded_model(model: str | None) -> str:
    """What :func:`ches_filter.model.load_model` records as ``info["model"]`` for ``--model``."""
    if model is None:
        return f"embedded:{DEFAULT_MODEL_FILE}"
    return str(Path(model).expanduser().resolve()) if os.path.exists(os.path.expanduser(model)) else model


def _score_settings(config: ScoreConfig, meta: dict) -> dict[str, tuple[Any, Any]]:
    """``field -> (value given now, value the score file records)`` (``_MISSING`` where it records none)."""
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    columns = meta.get("columns") if isinstance(meta.get("columns"), dict) else {}
    use_template = meta.get("use_chat_template", _MISSING)
    pairs: dict[str, tuple[Any, Any]] = {
        "model": (_recorded_model(config.model), model.get("model", _MISSING)),
        "revision": (config.revision, model.get("revision", _MISSING)),
        "attn_implementation": (config.attn_implementation, model.get("attn_implementation", _MISSING)),
        # `auto` resolves per device (dtype) or per model (engine): only a named choice can differ.
        "dtype": (config.dtype, model.get("dtype", _MISSING) if config.dtype != "auto" else _MISSING),
        "engine": (config.engine, meta.get("engine", _MISSING) if config.engine != "auto" else _MISSING),
        "input_format": (config.input_format, meta.get("input_format", _MISSING)),
        "prompt_column": (config.prompt_column, columns.get("prompt", _MISSING)),
        "chosen_column": (config.chosen_column, columns.get("chosen", _MISSING)),
        "rejected_column": (config.rejected_column, columns.get("rejected", _MISSING)),
        "id_column": (config.id_column, columns.get("id", _MISSING)),
        "layout": (config.layout, meta.get("token_layout", _MISSING)),
        "measures": (",".join(config.measure_list), ",".join(meta["measures"]) if isinstance(meta.get("measures"), list) else _MISSING),
        "max_length": (config.max_length, meta.get("max_length", _MISSING)),
        "on_special_tokens": (config.on_special_tokens, meta.get("on_special_tokens", _MISSING)),
        # A tokenizer without a chat template records False whatever the flag said, so only
        # `--no-chat-template` against a file scored with the template differs.
        "no_chat_template": (
            config.no_chat_template,
            _MISSING if use_template is _MISSING else (False if use_template is True else config.no_chat_template),
        ),
    }
    return pairs


#: Settings ``validate --scores`` compares even at their defaults: it trains this model on
#: subsets ranked by the file's scores, over the tokens of this layout and template.
TRAINED_SETTINGS = ("model", "revision", "no_chat_template", "layout")


def check_score_settings(scores: str, config: ScoreConfig, explicit: list[str] | tuple[str, ...], *,
                         command: str = "prune") -> None:
    """Refuse scoring flags given with ``--scores`` that the score file was not computed with.

    With ``--scores`` nothing is rescored, so a scoring flag that differs
    from the file's settings would be silently ignored. Only the flags in
    ``explicit`` (given on the command line) are compared, each with what
    the file's ``ches_filter`` metadata records; :data:`FREE_SCORE_SETTINGS`
    never change a score and are always allowed, as are settings the file
    does not record.

    Args:
        scores: path of the score file.
        config: the scoring settings as given now.
        explicit: the :class:`ScoreConfig` fields the user set explicitly.
        command: ``prune`` or ``validate``; ``validate`` also compares
            :data:`TRAINED_SETTINGS` when left at their defaults, because it
            trains that model on the file's ranking.

    Raises:
        BadFlagError: naming every differing flag, its value now and in the file.
        BadDataError: the score file cannot be read.
    """
    _, meta = read_table(str(scores))
    settings = _score_settings(config, meta)
    problems = []
    names = list(dict.fromkeys([*explicit, *(TRAINED_SETTINGS if command == "validate" else ())]))
    for name in names:
        if name in FREE_SCORE_SETTINGS or name not in settings:
            continue
        given, stored = settings[name]
        if stored is _MISSING or given == stored:
            continue
        shown = {"no_chat_template": lambda v: "given" if v else "not given"}.get(name, repr)
        problems.append(f"`--{name.replace('_', '-')}` {shown(given)} now, {shown(stored)} in the score file")
    if problems and command == "validate":
        raise BadFlagError(
            f"`--scores` {scores} was computed with other settings than the flags given now ("
            + "; ".join(problems)
            + "); validate trains the model on subsets ranked by these scores, so the model, its tokens and "
            "the scoring flags must be the file's: pass the file's settings (or drop the flags), or leave out "
            "`--scores` to score INPUT with these flags."
        )
    if problems:
        raise BadFlagError(
            f"`--scores` {scores} was computed with other settings than the flags given now ("
            + "; ".join(problems)
            + "); with `--scores` nothing is rescored, so drop those flags, or rescore with them "
            "(`ches-filter score INPUT -o NEW.parquet ...`) and pass the new file."
        )
