"""The library's entry points: :func:`score_pairs` and :func:`prune_pairs`.

``from ches_filter import score_pairs, prune_pairs`` re-exports them. This is
the top of the import graph: it imports :mod:`run` (the work-directory
pipeline), :mod:`scoring` (the scorer) and :mod:`inputs` (the data layer), and
nothing below imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

from .config import JobConfig, PruneConfig, ScoreConfig
from .errors import BadFlagError
from .inputs import check_scores_belong, load_records
from .io import read_table
from .model import ModelState, as_loaded_model
from .run import score_to_table
from .scoring import load_kwargs, status_counts, table_metadata
from .select import PruneResult, select_rows

logger = logging.getLogger(__name__)

__all__ = ["score_pairs", "prune_pairs"]


def score_pairs(
    data: Any,
    config: ScoreConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool | None = None,
    **overrides: Any,
):
    """Score every pair of a preference dataset, through the same pipeline as ``ches-filter score``.

    Args:
        data: a path (see :func:`ches_filter.sources.read_dataset`), a
            ``datasets.Dataset`` or a list of row dicts.
        config: a :class:`~ches_filter.config.ScoreConfig`; keyword
            ``overrides`` replace its fields (or build one).
        model: what a training script holds: a transformers model object
            (``AutoModelForCausalLM``; scored in place, in its dtype, in eval
            mode with every dropout rate at 0, then given back as it came:
            train/eval flags and dropout rates restored) with ``tokenizer``,
            a Hub id or local path, a :class:`~ches_filter.model.LoadedModel`,
            or None for ``config.model``.
        tokenizer: the tokenizer of a model object.
        progress: show a progress bar (default: not ``config.quiet``).

    Returns:
        A ``pyarrow.Table`` with one row per input row, in input order:
        ``row_index``, the id column if configured, the ``measures``
        (default ``ches``, ``ln_ches``), ``prompt_tokens``, ``chosen_tokens``, ``rejected_tokens``, ``status``.
        Its schema metadata (key ``ches_filter``) records model, layout and counts.
        The parts go through a temporary work directory; to resume after a
        crash or shard a large dataset, use :func:`ches_filter.run.score_to_file`.
    """
    config = dataclasses.replace(config, **overrides) if config is not None else ScoreConfig(**overrides)
    loaded = None
    if model is not None and not isinstance(model, (str, os.PathLike)):
        loaded = as_loaded_model(model, tokenizer)
    elif model is not None or tokenizer is not None:
        config = dataclasses.replace(config, model=os.fspath(model)) if model is not None else config
        if tokenizer is not None:
            loaded = as_loaded_model(config.model, tokenizer, **load_kwargs(config))
    # A model object is scored in eval mode with every dropout off (TRL's way, wider), and given back as it came.
    with ModelState(loaded.decoder, eval=True) if loaded is not None else contextlib.nullcontext():
        table, _ = score_to_table(data, config, model=loaded, progress=progress)
    counts = status_counts(table.column("status"))
    logger.info("scored %d of %d rows (%s)", counts.get("ok", 0), table.num_rows, ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return table


def prune_pairs(
    data: Any,
    config: PruneConfig | None = None,
    *,
    scores: Any = None,
    score_config: ScoreConfig | None = None,
    job: JobConfig | None = None,
    output: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> PruneResult | None:
    """Score (or reuse scores) and keep the lowest-risk pairs.

    Scoring goes through the one pipeline (:func:`ches_filter.run.score_to_table`):
    resumable in ``job.work_dir`` (default ``OUTPUT.parts`` when ``output``
    is given, else a temporary directory), and data parallel under torchrun.

    Args:
        data: path, ``datasets.Dataset`` or list of row dicts.
        config: the :class:`~ches_filter.config.PruneConfig`; keyword
            ``overrides`` replace its fields (or build one).
        scores: a score table (``pyarrow.Table``) or the path of a score
            Parquet for exactly this input; checked by fingerprint.
        score_config: how to read and score ``data``.
        job: work directory and checkpoint size of the scoring.
        output: where the caller will write the kept rows (names the default work directory).
        model, tokenizer: an already loaded model to score with (see :func:`ches_filter.score_pairs`).

    Returns:
        A :class:`PruneResult` (its ``work`` is the work directory the caller
        removes once its outputs are written), or None on torchrun ranks other than 0.
    """
    import pyarrow as pa

    config = dataclasses.replace(config, **overrides) if config is not None else PruneConfig(**overrides)
    score_config = score_config or ScoreConfig()
    if scores is None and config.by not in score_config.measure_list:
        raise BadFlagError(
            f"`--by {config.by}` ranks by a measure that `--measures {score_config.measures}` does not compute; "
            f"add it: `--measures {score_config.measures},{config.by}`"
        )
    records, layout, columns = load_records(data, score_config)
    ds = records.scored
    work = None
    if scores is None:
        loaded = as_loaded_model(model, tokenizer) if model is not None and not isinstance(model, str) else None
        table, work = score_to_table(
            data, score_config, job, output=output, model=loaded, prepared=(ds, layout, columns)
        )
        if table is None:
            return None
    else:
        table = read_table(str(scores))[0] if not isinstance(scores, pa.Table) else scores
        check_scores_belong(table_metadata(table), table.num_rows, ds, layout, columns, flag="--scores",
                            chunk_size=score_config.chunk_size)
    selection = select_rows(table, config)
    return PruneResult(records=records, scores=table, selection=selection, add_scores=config.add_scores, work=work)
