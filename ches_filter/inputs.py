"""The data layer's entry for scoring: open an input, settle its layout, fingerprint it.

:func:`load_records` opens a path, a ``datasets.Dataset`` or a list of row
dicts as :class:`~ches_filter.records.Records` and detects (or checks) its
layout; :func:`input_fingerprint` ties a score file to the rows it scored and
:func:`check_scores_belong` refuses a score file that was computed on other rows.
Nothing here loads a model or imports torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from typing import Any, Iterator

from .config import ScoreConfig
from .errors import BadDataError
from .formats import Columns, detect_layout, required_columns, used_columns
from .records import from_dataset
from .sources import open_records

# datasets is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = [
    "PageReleaser", "check_scores_belong", "config_columns", "hash_rows", "input_fingerprint", "input_paths", "iter_chunks",
    "load_input", "load_records", "source_name",
]

_SAMPLE_ROWS = 100


def config_columns(config: ScoreConfig) -> Columns:
    return Columns(config.prompt_column, config.chosen_column, config.rejected_column, config.id_column)


def hash_rows(digest: "hashlib._Hash", chunk: dict, names: list[str]) -> None:
    for values in zip(*(chunk[n] for n in names)):
        digest.update(json.dumps(values, sort_keys=True, ensure_ascii=False, default=repr).encode("utf-8", "replace"))
        digest.update(b"\n")


def iter_chunks(ds: Any, names: list[str], chunk_size: int) -> Iterator[tuple[int, dict]]:
    view = ds.select_columns(names)
    release = PageReleaser(ds)
    for start in range(0, len(view), chunk_size):
        chunk = view[start : start + chunk_size]
        release()
        yield start, chunk


class PageReleaser:
    """Drop this process's resident pages of a dataset's memory-mapped Arrow files.

    Every page of a memory-mapped file that the reader touches stays in the
    process's resident set until the kernel needs the memory, so reading a
    5 GB dataset front to back shows a 5 GB RSS: reclaimable, but schedulers
    that police RSS (Slurm's accounting, some container runtimes) kill the job
    for it. Once a chunk has been copied out, ``madvise(MADV_DONTNEED)`` on the
    file's mappings unmaps the pages; a later read faults them back in from
    the page cache. File-backed mappings only, so no data is ever discarded;
    Linux only, a no-op elsewhere.
    """

    _MADV_DONTNEED = 4

    def __init__(self, ds: Any) -> None:
        files = [f.get("filename") for f in getattr(ds, "cache_files", None) or []]
        self.files = {os.path.realpath(f) for f in files if f}
        self.madvise = None
        if self.files and os.path.exists("/proc/self/maps"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                self.madvise = libc.madvise
            except (OSError, AttributeError):
                self.madvise = None

    def __call__(self) -> None:
        if self.madvise is None:
            return
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
                lines = handle.readlines()
        except OSError:
            return
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() in self.files:
                start, stop = (int(x, 16) for x in fields[0].split("-"))
                self.madvise(start, stop - start, self._MADV_DONTNEED)


def input_fingerprint(ds: Any, layout: str, columns: Columns, chunk_size: int = 4096) -> str:
    """SHA-256 over the used columns of every row: ties a score file to its input."""
    names = used_columns(layout, columns, ds.column_names)
    digest = hashlib.sha256()
    for _, chunk in iter_chunks(ds, names, chunk_size):
        hash_rows(digest, chunk, names)
    return digest.hexdigest()


def source_name(data: Any) -> str | None:
    """The path or Hub id ``data`` names, or None for in-memory data."""
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        return os.fsdecode(data) if not isinstance(data, str) else data
    return None


def input_paths(data: Any) -> list[str]:
    """The local paths ``data`` names (none for in-memory data or a Hub id)."""
    return [os.fspath(data)] if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__") else []


def load_input(data: Any, config: ScoreConfig) -> tuple[Any, str, Columns]:
    """Open ``data`` (path, ``datasets.Dataset`` or list of dicts) and settle its layout.

    Returns:
        ``(ds, layout, columns)``: ``ds`` holds the scored columns only (see :func:`load_records`).
    """
    records, layout, columns = load_records(data, config)
    return records.scored, layout, columns


def load_records(data: Any, config: ScoreConfig) -> tuple[Any, str, Columns]:
    """Open ``data`` as :class:`~ches_filter.records.Records`, parsing only the pair and id columns.

    Every other column stays opaque: it is never given a type, so its values
    may vary in shape from row to row, and a selection writes them back as they were.
    """
    import datasets

    columns = config_columns(config)
    wanted = [columns.prompt, columns.chosen, columns.rejected] + ([columns.id] if columns.id else [])
    if isinstance(data, datasets.Dataset):
        records = from_dataset("the input", data)
    elif isinstance(data, (list, tuple)):
        if not data:
            raise BadDataError("the input holds no rows")
        records = from_dataset("the input", datasets.Dataset.from_list(list(data)))
    else:
        records = open_records(str(data), split=config.split, subset=config.subset, wanted=wanted)
    ds = records.scored
    source = source_name(data)
    where = f"{source}: " if source else ""
    names = records.columns
    if columns.id is not None and columns.id not in names:
        raise BadDataError(
            f"{where}`--id-column` {columns.id!r} is not in the input; available columns: {', '.join(names)}"
        )
    if config.input_format is not None:
        layout = config.input_format
        required = required_columns(layout, columns)
        missing = [c for c in required if c not in names]
        if missing:
            raise BadDataError(
                f"{where}`--input-format {layout}` needs column(s) {', '.join(missing)}, which the input lacks; "
                f"available columns: {', '.join(names)}; map them with `--prompt-column`, "
                "`--chosen-column`, `--rejected-column`"
            )
    else:
        present = [c for c in dict.fromkeys(wanted) if c in ds.column_names]
        head = ds.select_columns(present)[: min(_SAMPLE_ROWS, len(ds))]  # through the dataset's transform, if any
        sample = [dict(zip(head, values)) for values in zip(*head.values())] if head else [{}] * min(_SAMPLE_ROWS, len(ds))
        try:
            layout = detect_layout(list(names), sample, columns)
        except BadDataError as exc:
            # Name the file: with several inputs in a pipeline, "column 'chosen'
            # not found" alone does not say which one.
            raise BadDataError(f"{where}{exc}") from None
    logger.info("input: %d rows, layout %s", len(ds), layout)
    return records, layout, columns


def check_scores_belong(meta: dict, score_rows: int, ds: Any, layout: str, columns: Columns, *, flag: str,
                        chunk_size: int = 4096) -> None:
    """Refuse a score file that was not computed for exactly these input rows.

    The one check behind ``prune --scores``, ``validate --scores`` and
    ``report --data``: same row count, same layout and pair columns, and the
    same fingerprint of the used columns (:func:`input_fingerprint`).

    Args:
        meta: the score file's ``ches_filter`` metadata.
        score_rows: its number of rows.
        ds, layout, columns: the input as :func:`load_input` opened it.
        flag: the flag that named the file the user should fix (``--scores``, ``--data``).

    Raises:
        BadDataError: one line saying what differs.
    """
    fix = "pass the input that `ches-filter score` read together with the score file it wrote"
    if score_rows != len(ds):
        raise BadDataError(f"`{flag}`: the score file has {score_rows} rows but the input has {len(ds)}; {fix}")
    stored_layout = meta.get("input_format")
    if stored_layout and stored_layout != layout:
        raise BadDataError(f"`{flag}`: the input reads as {layout} but the score file was computed on {stored_layout} input; {fix}")
    stored_columns = meta.get("columns") or {}
    if stored_columns and any(stored_columns.get(k) != getattr(columns, k) for k in ("prompt", "chosen", "rejected")):
        raise BadDataError(
            f"`{flag}`: the score file was computed with columns {stored_columns}, not the ones given now; pass the same "
            "`--prompt-column/--chosen-column/--rejected-column`"
        )
    expected = meta.get("input_fingerprint")
    if expected is None:
        raise BadDataError(f"`{flag}`: the score file carries no input fingerprint; rescore with `ches-filter score`")
    if input_fingerprint(ds, stored_layout or layout, columns, chunk_size) != expected:
        raise BadDataError(
            f"`{flag}`: the score file does not belong to this input (it is not the input it scored: the rows differ); {fix}"
        )
