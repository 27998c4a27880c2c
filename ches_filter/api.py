"""The library's entry points: :func:`score_pairs` and :func:`prune_pairs`.

``from ches_filter import score_pairs, prune_pairs`` re-exports them. This is
the top of the import graph: it imports :mod:`run` (the work-directory
pipeline), :mod:`scoring` (the scorer) and :mod:`inputs` (the data layer), and
nothing below imports it.

:func:`score_pairs` scores a list of rows, a ``datasets.Dataset`` or a path in
memory through the scorer directly (:func:`score_in_memory`): no work
directory, lock or manifest. The same rows are cut into the same parts and
chunks as the pipeline's, so the scores are bit for bit those of
``ches-filter score``. Files to resume, shards and torchrun ranks go through
:mod:`ches_filter.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

from .batching import SpecialRows
from .config import JobConfig, PruneConfig, ScoreConfig
from .errors import BadFlagError
from .inputs import check_scores_belong, hash_rows, load_input, load_records
from .model import ModelState, as_loaded_model
from .run import score_to_table
from .run.topology import Topology, part_grid, select_device
from .scorefile import METADATA_KEY, read_table
from .scoring import build_scorer, load_kwargs, merge_counts, status_counts, table_metadata
from .select import PruneResult, select_rows

# pyarrow and tqdm are imported in the functions that use them: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["score_pairs", "prune_pairs", "score_in_memory"]


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
        Scored in memory, in one process: no work directory, lock or manifest
        (under ``torchrun`` the ranks share the work through the pipeline,
        :func:`ches_filter.run.score_to_table`). To resume after a crash or
        shard a large dataset, use :func:`ches_filter.run.score_to_file`.
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
        if Topology.from_env().world_size > 1:
            table, _ = score_to_table(data, config, model=loaded, progress=progress)
            if table is None:  # ranks other than 0
                return None
        else:
            table = score_in_memory(data, config, model=loaded, progress=progress)
    counts = status_counts(table.column("status"))
    logger.info("scored %d of %d rows (%s)", counts.get("ok", 0), table.num_rows, ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return table


def score_in_memory(data: Any, config: ScoreConfig, *, model: Any = None, progress: bool | None = None) -> Any:
    """Score ``data`` in this process and return the score table; nothing is written to disk.

    The rows are cut on the pipeline's part grid (``JobConfig().part_rows``)
    and each part into the same chunks, so the pairs batched together, and so
    every score to the last bit, are those of the work-directory pipeline. The
    input fingerprint of the metadata is hashed from the chunks as they are
    scored (no second read), so the table can be handed to ``prune --scores``.
    """
    import pyarrow as pa
    from tqdm.auto import tqdm

    config, _ = select_device(config, Topology())
    ds, layout, columns = load_input(data, config)
    scorer = build_scorer(ds, layout, columns, config, model)
    digest = hashlib.sha256()
    names = scorer.names
    show = (not config.quiet) if progress is None else progress
    tables, special, counts = [], SpecialRows(), {}
    with tqdm(total=len(ds), unit="pair", desc="scoring", dynamic_ncols=True, disable=not show) as bar:
        ranges = part_grid(len(ds), JobConfig().part_rows(len(ds)))
        for _, _, table in scorer.score_ranges(ranges, on_chunk=lambda start, chunk, rows: hash_rows(digest, chunk, names),
                                               on_rows=bar.update):
            special.add(SpecialRows.from_metadata(table.schema.metadata))
            merge_counts(counts, status_counts(table.column("status")))  # in part order, as the pipeline adds them
            tables.append(table)
    table = pa.concat_tables(tables) if tables else scorer.schema.empty_table()
    # The pipeline's metadata as its manifest stores it (keys sorted), then the counts.
    template = scorer.metadata(data=data, fingerprint=digest.hexdigest(), counts={})
    del template["counts"]
    metadata = json.loads(json.dumps(template, sort_keys=True))
    metadata["counts"] = counts
    metadata["special_token_rows"] = special.count
    special.log(metadata.get("on_special_tokens"))
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, ensure_ascii=False).encode("utf-8")})


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
