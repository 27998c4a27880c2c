"""Join a work directory's parts, in row order, into one score table or file.

Rank 0 of a finished single-shard job calls :func:`assemble` (``score``) or
:func:`assemble_table` (``prune``, ``validate``, :func:`ches_filter.score_pairs`);
``ches-filter merge`` calls :func:`merge_work_dir` once every shard of a
sharded job has finished. Every part is checked (schema, row range) as it is
read; a missing or damaged part is named with the way to redo it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

from ..atomic import atomic_path
from ..batching import SpecialRows
from ..errors import BadDataError, BadFlagError
from ..paths import check_output_path
from ..scorefile import with_metadata
from ..scoring import merge_counts, status_counts
from .topology import part_grid, shard_slice
from .workdir import WorkDir

# pyarrow is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["assemble", "assemble_table", "merge_work_dir", "ranges_text"]

# Parts are gathered into row groups of about this many rows in the final file:
# one row group per 1000-row part would bloat the footer of a 10M-row output.
_ROW_GROUP_ROWS = 65536


def ranges_text(ranges: list[tuple[int, int]], limit: int = 4) -> str:
    """``0-999, 1000-1999 and 3 more``."""
    shown = ", ".join(f"{a}-{b - 1}" for a, b in ranges[:limit])
    return shown + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")


def _coverage_problem(work: WorkDir, manifest: dict, parts: dict[tuple[int, int], str]) -> str | None:
    grid = part_grid(int(manifest["grid"]["num_rows"]), int(manifest["grid"]["checkpoint_every"]))
    stray = sorted(set(parts) - set(grid))
    if stray:
        return (f"{work.parts_dir} holds parts off this job's grid ({ranges_text(stray)}); they were not "
                "written for this manifest, so delete them")
    missing = [p for p in grid if p not in parts]
    if not missing:
        return None
    text = f"{len(missing)} of {len(grid)} parts have no results yet (rows {ranges_text(missing)})"
    for count, shards in sorted(work.completed_shards().items()):
        owners = sorted({i for i in range(count) for p in shard_slice(grid, i, count) if p in set(missing)})
        if owners:
            text += (f"; with `--num-shards {count}` they belong to `--shard-index` {', '.join(map(str, owners))}"
                     f" ({len(shards)} of {count} shards have finished)")
    return text + "; run those shards (the same command resumes them), then merge again"


def _parts(work: WorkDir, input_name: str | None) -> tuple[dict, list[tuple[tuple[int, int], str]], Any]:
    """The manifest's metadata (with counts), the parts in row order, and the output schema."""
    import pyarrow as pa

    manifest = work.read_manifest()
    if manifest is None:
        raise BadDataError(f"{work.path} has no manifest.json; it is not a ches-filter work directory")
    parts = work.scan_parts()
    problem = _coverage_problem(work, manifest, parts)
    if problem:
        raise BadDataError(f"{work.path}: {problem}")
    ordered = sorted(parts.items())
    if not ordered:
        raise BadDataError(f"{work.path} holds no parts")
    work.remove_temporaries()
    metadata = dict(manifest["metadata"])
    if input_name is not None:
        metadata["input"] = input_name
    counts: dict[str, int] = {}
    special = SpecialRows()
    for _, path in ordered:  # first pass: the counts go into the footer's metadata
        status = _read(path, ["status"])
        merge_counts(counts, status_counts(status.column("status")))
        special.add(SpecialRows.from_metadata(status.schema.metadata))
    metadata["counts"] = counts
    metadata["special_token_rows"] = special.count
    special.log(metadata.get("on_special_tokens"))
    schema = _read(ordered[0][1]).schema.remove_metadata()
    schema = with_metadata(schema, metadata)
    assert isinstance(schema, pa.Schema)
    return metadata, ordered, schema


def _read(path: str, columns: list[str] | None = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns, memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise BadDataError(f"part {path} cannot be read ({exc}); delete it and rerun the same command to redo it") from None


def _checked_tables(ordered: list[tuple[tuple[int, int], str]], schema: Any) -> Iterator[Any]:
    import pyarrow.compute as pc

    for (start, stop), path in ordered:
        table = _read(path)
        if table.schema.remove_metadata() != schema.remove_metadata():
            raise BadDataError(f"part {path} has columns {table.schema.names}, not {schema.names}; delete it and rerun")
        index = table.column("row_index")
        if table.num_rows != stop - start or pc.min(index).as_py() != start or pc.max(index).as_py() != stop - 1:
            raise BadDataError(f"part {path} does not hold rows {start}-{stop - 1}; delete it and rerun")
        yield table.replace_schema_metadata(schema.metadata)


def assemble(work: WorkDir, output: str, *, overwrite: bool = False, input_name: str | None = None) -> dict[str, int]:
    """Join every part of ``work``, in row order, into the Parquet file ``output`` atomically.

    Args:
        work: the work directory of a finished job.
        output: the Parquet file to write.
        overwrite: replace an existing ``output``.
        input_name: the input path recorded in the metadata (default: the manifest's).

    Returns:
        Rows per status.

    Raises:
        BadDataError: a part is missing, unreadable or inconsistent.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    metadata, ordered, schema = _parts(work, input_name)
    check_output_path(output, inputs=[metadata["input"]] if metadata.get("input") else [], overwrite=overwrite)
    with atomic_path(output) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            pending: list[Any] = []
            rows = 0
            for table in _checked_tables(ordered, schema):
                pending.append(table)
                rows += table.num_rows
                if rows >= _ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(pending), row_group_size=rows)
                    pending, rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=max(rows, 1))
    logger.info("assembled %d parts (%d rows) into %s", len(ordered), metadata["num_rows"], output)
    return metadata["counts"]


def assemble_table(work: WorkDir, *, input_name: str | None = None) -> Any:
    """Every part of ``work``, in row order, as one in-memory ``pyarrow.Table`` with the score metadata."""
    import pyarrow as pa

    metadata, ordered, schema = _parts(work, input_name)
    table = pa.concat_tables(list(_checked_tables(ordered, schema)))
    logger.debug("assembled %d parts (%d rows) in memory", len(ordered), metadata["num_rows"])
    return table


def merge_work_dir(work_dir: str, output: str, *, overwrite: bool = False, keep_work_dir: bool = False) -> dict[str, int]:
    """Assemble the output of a sharded job (``ches-filter merge``).

    Returns:
        Rows per status.
    """
    work = WorkDir(work_dir)
    if not os.path.isdir(work.path):
        raise BadDataError(f"{work_dir}: no such directory; pass the work directory the shards wrote (`OUTPUT.parts`)")
    if os.path.realpath(work.path) == os.path.realpath(output):
        raise BadFlagError("`--output` must differ from the work directory")
    counts = assemble(work, output, overwrite=overwrite)
    if not keep_work_dir:
        work.remove()
    return counts
