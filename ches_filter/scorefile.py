"""Score files: Parquet with the ``ches_filter`` metadata in the schema, written atomically."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

from .atomic import atomic_path
from .errors import BadDataError, ChesFilterError, reason
from .measures import MEASURES
from .paths import check_output_path

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time
    import pyarrow

# pyarrow is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)


# Metadata key under which write_table stores its JSON blob in the parquet schema.
METADATA_KEY = b"ches_filter"

#: The columns after the measures, with their Arrow types (names of ``pyarrow`` factories);
#: every measure column is float64.
TAIL_COLUMNS = {"prompt_tokens": "int64", "chosen_tokens": "int64", "rejected_tokens": "int64", "status": "string"}
#: The column before the id column and the measures.
HEAD_COLUMNS = {"row_index": "int64"}
#: The column ``--on-special-tokens flag`` adds at the end.
FLAG_COLUMNS = {"special_tokens": "bool_"}


def own_columns() -> tuple[str, ...]:
    """Every column a score file may hold besides ``--id-column`` (which must be none of them).

    Read from the schema's parts and the measure registry, so a new measure or
    tail column is reserved without a second list.
    """
    return (*HEAD_COLUMNS, *MEASURES.names(), *TAIL_COLUMNS, *FLAG_COLUMNS)


def with_metadata(table: Any, metadata: dict) -> Any:
    """``table`` (a pyarrow Table or Schema) with ``metadata`` stored as JSON under ``b"ches_filter"``.

    The one writer of the score-file metadata; :func:`parse_metadata` is its
    one reader. The table's other schema metadata is kept.

    Raises:
        TypeError: ``metadata`` is not JSON-serializable.
    """
    try:
        blob = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"write_table metadata is not JSON-serializable: {exc}") from exc
    schema = getattr(table, "schema", table)
    merged = dict(schema.metadata or {})
    merged[METADATA_KEY] = blob
    if schema is table:
        return schema.with_metadata(merged)
    return table.replace_schema_metadata(merged)


def parse_metadata(schema_metadata: Any, source: str) -> dict:
    """The ``b"ches_filter"`` metadata dict :func:`with_metadata` stored in a schema's metadata (``{}`` when none).

    Args:
        schema_metadata: ``schema.metadata`` of a table or Parquet file (None allowed).
        source: what it came from, for the message.

    Raises:
        BadDataError: the metadata is not JSON, or not a JSON object.
    """
    raw = (schema_metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadDataError(
            f"{source} has corrupt ches_filter metadata ({exc}); re-create the file."
        ) from exc
    if not isinstance(meta, dict):
        raise BadDataError(
            f"{source} has ches_filter metadata that is not a JSON object; re-create the file."
        )
    return meta

def write_table(
    table: "pyarrow.Table",
    path: str,
    *,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> None:
    """Writes a pyarrow table atomically as one parquet file.

    Args:
        table: The table to write.
        path: Destination parquet file.
        metadata: JSON-serializable dict stored in the schema metadata under
            ``b"ches_filter"``; other schema metadata is kept.
        overwrite: Whether an existing ``path`` may be replaced.

    Raises:
        BadFlagError: ``path`` exists without ``overwrite`` or its parent is missing.
        ChesFilterError: The file system refused the write.
        TypeError: ``metadata`` is not JSON-serializable.
    """
    import pyarrow.parquet as pq

    path = os.fspath(path)
    check_output_path(path, inputs=[], overwrite=overwrite)
    if metadata is not None:
        table = with_metadata(table, metadata)
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    except OSError as exc:
        raise ChesFilterError(f"could not write {path} ({reason(exc)}).") from exc
    logger.info("wrote table of %d rows to %s", table.num_rows, path)


def read_table(path: str) -> tuple["pyarrow.Table", dict]:
    """Reads a parquet file and the metadata :func:`write_table` stored in it.

    Args:
        path: A parquet file.

    Returns:
        The table (memory-mapped) and the ``b"ches_filter"`` metadata dict, or
        ``{}`` when the file has none.

    Raises:
        BadDataError: The file is missing, not parquet, or its metadata is corrupt.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.exists(path):
        raise BadDataError(f"{path}: no such file or directory.")
    try:
        table = pq.read_table(path, memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise BadDataError(
            f"{path} is not a readable parquet file ({reason(exc)}); pass a file "
            "written by ches-filter."
        ) from exc
    return table, parse_metadata(table.schema.metadata, path)
