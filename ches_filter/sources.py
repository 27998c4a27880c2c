"""Finding and opening input sources: a file, a directory, a glob, a ``save_to_disk`` directory or a Hub id.

Inputs are opened by :func:`open_records` into :class:`~ches_filter.records.Records`:
only the scored columns are parsed (into memory-mapped Arrow), every other
column stays opaque, and outputs are selections of the records themselves
(:func:`ches_filter.records.write_selections`). Every problem a user can cause
is raised as :class:`BadDataError` or :class:`BadFlagError`, naming the file
and how to fix it.
"""

from __future__ import annotations

import contextvars
import errno
import glob
import logging
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .atomic import sibling
from .errors import BadDataError, BadFlagError, ChesFilterError, reason
from .paths import GLOB_CHARS, INPUT_HELP, JSON_SUFFIXES, check_name, looks_like_hub_id
from .records import Records, from_dataset, read_files

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time
    import datasets

# datasets and pyarrow are imported in the functions that use them: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)


def read_dataset(
    source: str, *, split: str | None = None, subset: str | None = None
) -> "datasets.Dataset":
    """Every column of a dataset as a ``datasets.Dataset`` (see :func:`open_records`).

    A library convenience: the columns of a JSON or CSV file are given Arrow
    types here. ches-filter itself reads with :func:`open_records`, which
    parses only the scored columns.
    """
    return open_records(source, split=split, subset=subset).scored


#: The columns :func:`_read_files` parses (None: all), set by :func:`open_records`.
_WANTED: contextvars.ContextVar = contextvars.ContextVar("ches_filter_wanted", default=None)


def open_records(
    source: str, *, split: str | None = None, subset: str | None = None, wanted: Sequence[str] | None = None
) -> "Records":
    """Open a preference dataset from a local file, directory, glob or the Hub.

    Args:
        source: A `.jsonl`/`.json` (optionally `.gz`), `.parquet` or `.csv`
            file; a directory of such files, all of one kind (any other
            file in it is refused, never skipped, except hidden files and
            README/LICENSE/``.md``); a glob; a directory written by
            ``save_to_disk``; or a Hub id ``owner/name`` when no such local
            path exists.
        split: Split to take from a ``DatasetDict`` directory or Hub dataset.
        subset: Hub configuration name; only valid for Hub datasets.
        wanted: the columns to parse (the pair columns and ``--id-column``);
            every other column of a JSON or CSV file stays opaque. None: all.

    Returns:
        :class:`~ches_filter.records.Records` with at least one row: its
        ``scored`` dataset (memory-mapped) holds the parsed columns.

    Raises:
        BadDataError: The source is missing, unreadable, malformed or empty.
        BadFlagError: ``split``/``subset`` do not fit the source.
    """

    source = os.fspath(source)
    token = _WANTED.set(list(wanted) if wanted is not None else None)
    try:
        ds = _open(source, split=split, subset=subset)
    finally:
        _WANTED.reset(token)
    if not isinstance(ds, Records):
        ds = from_dataset(source, ds)
    if ds.num_rows == 0:
        raise BadDataError(f"{source} holds no rows; it needs at least one example.")
    logger.info("read %d rows with columns %s from %s (%s)", ds.num_rows, ds.columns, source, ds.kind)
    return ds


def _open(source: str, *, split: str | None, subset: str | None) -> "Records | datasets.Dataset":
    if os.path.isdir(source):
        ds = _read_directory(source, split=split, subset=subset)
    elif os.path.exists(source):
        _reject_split_subset(source, split, subset)
        ds = _read_files(source, [source], _file_kind(source))
    elif os.path.lexists(source):  # a link to nothing: the name is taken, so it is no glob either
        raise BadDataError(
            f"{source} is a symbolic link to {os.readlink(source)}, which does not exist; fix the link or pass the file."
        )
    elif GLOB_CHARS & set(source):
        _reject_split_subset(source, split, subset)
        ds = _read_glob(source)
    elif looks_like_hub_id(source):
        ds = _read_hub(source, split=split, subset=subset)
    else:
        raise BadDataError(
            f"{source}: no such file or directory; pass an existing path "
            f"({INPUT_HELP})."
        )
    return ds


def _reject_split_subset(source: str, split: str | None, subset: str | None) -> None:
    # Silently ignoring `--split` on a plain file would let a user believe they
    # filtered the test split when they did not.
    if split is not None:
        raise BadFlagError(
            f"`--split {split}` does not apply to {source}; `--split` selects a split "
            "of a `save_to_disk` DatasetDict directory or a Hub dataset, so drop it."
        )
    if subset is not None:
        raise BadFlagError(
            f"`--subset {subset}` does not apply to {source}; `--subset` only selects "
            "a configuration of a Hub dataset, so drop it."
        )


def _file_kind(path: str) -> str:
    """Returns the loader name ("json", "parquet" or "csv") for a file path."""
    lower = path.lower()
    if lower.endswith(JSON_SUFFIXES):
        return "json"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".csv"):
        return "csv"
    raise BadDataError(
        f"{path} has an unsupported file type; allowed inputs are {INPUT_HELP}."
    )


def _read_glob(pattern: str) -> "datasets.Dataset":
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise BadDataError(
            f"{pattern} matches no files; check the pattern (quote it so the shell "
            "does not expand it) or pass a file or directory instead."
        )
    logger.info("%s matched %d file%s", pattern, len(files), "" if len(files) == 1 else "s")
    kinds = {_file_kind(f) for f in files}
    if len(kinds) > 1:
        raise BadDataError(
            f"{pattern} matches files of different types ({', '.join(sorted(kinds))}); "
            "narrow the pattern so every match has the same type, e.g. `*.parquet`."
        )
    return _read_files(pattern, files, kinds.pop())


def _read_directory(
    path: str, *, split: str | None, subset: str | None
) -> "datasets.Dataset":
    is_dict = os.path.isfile(os.path.join(path, "dataset_dict.json"))
    is_single = os.path.isfile(os.path.join(path, "state.json"))
    if is_dict or is_single:
        if subset is not None:
            _reject_split_subset(path, None, subset)
        return _read_saved(path, split=split)
    _reject_split_subset(path, split, subset)
    by_kind, unread = _directory_files(path)
    if unread:
        shown = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
        raise BadDataError(
            f"{path} holds files ches-filter does not read ({shown}); rather than skip them, it reads a "
            "directory only when every file in it is a data file of one kind (`.jsonl`, `.json`, `.jsonl.gz`, "
            "`.json.gz`, `.parquet` or `.csv`; hidden files and README/LICENSE/`.md` files are ignored): "
            f"move the others out, or pass a glob such as `{os.path.join(path, '*.parquet')}` that names the files to read."
        )
    if len(by_kind) > 1:
        shown = "; ".join(
            f"{kind}: " + ", ".join(os.path.relpath(f, path) for f in files[:3]) + (" ..." if len(files) > 3 else "")
            for kind, files in sorted(by_kind.items())
        )
        raise BadDataError(
            f"{path} holds data files of several kinds ({shown}); ches-filter reads one kind per directory "
            "rather than skip the rest: pass a glob such as "
            f"`{os.path.join(path, '*.' + sorted(by_kind)[0].replace('json', 'jsonl'))}` to choose one kind, "
            "or convert the files to one kind."
        )
    if not by_kind:
        raise BadDataError(
            f"{path} is neither a `save_to_disk` directory nor a directory of data files "
            f"(`.jsonl`, `.json`, `.parquet`, `.csv`); pass a file, a glob such as "
            f"`{os.path.join(path, '*.jsonl')}`, or such a directory."
        )
    ((kind, files),) = by_kind.items()
    return _read_files(path, files, kind)


#: Files a data directory may hold besides its data: documentation, never rows.
_DOC_FILE = re.compile(r"^(readme|license|licence|copying|notice|citation)(\.[\w.]*)?$|\.md$", re.IGNORECASE)


def _directory_files(path: str) -> tuple[dict[str, list[str]], list[str]]:
    """Data files of ``path`` (recursively) by loader kind, and the other files (relative paths).

    Hidden files and directories (a leading dot: ``.DS_Store``, ``.git``, our
    own ``.name.tmp-PID`` litter) and documentation (README, LICENSE, ``*.md``)
    are left out; every other file is either read or reported, never skipped.
    """
    by_kind: dict[str, list[str]] = {}
    unread: list[str] = []
    seen: set[str] = set()
    for root, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symbolic link loop
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            try:
                kind = _file_kind(full)
            except BadDataError:
                if not _DOC_FILE.search(name):  # a README.jsonl is data, a README.txt is not
                    unread.append(os.path.relpath(full, path))
                continue
            by_kind.setdefault(kind, []).append(full)
    return {kind: sorted(files) for kind, files in by_kind.items()}, sorted(unread)


def _read_saved(path: str, *, split: str | None) -> "datasets.Dataset":
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable directory
        raise BadDataError(
            f"{path} looks like a `save_to_disk` directory but cannot be loaded "
            f"({reason(exc)}); re-create it with `save_to_disk`."
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        if split is None:
            if len(names) == 1:
                return loaded[names[0]]
            raise BadFlagError(
                f"{path} holds several splits; pass `--split NAME`; available splits: "
                f"{', '.join(names)}."
            )
        if split not in loaded:
            raise BadFlagError(
                f"{path} has no split `{split}`; pass `--split NAME`; available splits: "
                f"{', '.join(names)}."
            )
        return loaded[split]
    if split is not None:
        raise BadFlagError(
            f"`--split {split}` does not apply to {path}: it holds a single dataset, "
            "not a DatasetDict, so drop `--split`."
        )
    return loaded


def _read_hub(source: str, *, split: str | None, subset: str | None) -> "datasets.Dataset":
    import datasets

    logger.info("no local path %s; loading it as a Hub dataset", source)
    check_datasets_cache()
    try:
        return datasets.load_dataset(source, subset, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network, auth, config and split errors alike
        raise BadDataError(
            f"{source} is not a local file or directory, and loading it as a Hub "
            f"dataset failed ({reason(exc)}); check the path, or the Hub id, "
            "`--subset` and `--split`."
        ) from exc


def _datasets_cache_variable() -> str:
    """The environment variable that decides where datasets caches: the first of these that is set."""
    for name in ("HF_DATASETS_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        if os.environ.get(name):
            return name
    return "HOME"


def check_datasets_cache() -> None:
    """Refuse a datasets cache that cannot be written, naming it and the variable that sets it.

    ``datasets`` downloads and converts a Hub dataset into its cache (local
    files are read without it); on a read-only HOME, or with
    ``HF_DATASETS_CACHE`` naming a file, its error would otherwise read as a
    problem of the dataset id.
    """
    import datasets

    cache = os.fspath(datasets.config.HF_DATASETS_CACHE)
    try:
        os.makedirs(cache, exist_ok=True)
        if not os.access(cache, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable", cache)
        probe = sibling(os.path.join(cache, "write-check"), "probe")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.unlink(probe)
    except OSError as exc:
        variable = _datasets_cache_variable()
        raise ChesFilterError(
            f"the datasets cache {cache} cannot be written ({exc.strerror or exc}); datasets keeps a Hub dataset "
            f"there, and its location comes from {variable}"
            + ("" if variable == "HF_DATASETS_CACHE" else " (HF_DATASETS_CACHE overrides it)")
            + ": set HF_DATASETS_CACHE to a writable directory"
        ) from None


def _read_files(label: str, files: list[str], kind: str) -> "Records":
    """Opens local files of one kind, parsing only the columns :func:`open_records` wants."""

    for path in files:
        check_name(path, "the input file")  # a file found in a directory or by a glob
    if kind == "parquet":
        # A zero-row file adds nothing; leave it out up front.
        files = [path for path in files if _parquet_row_count(path) > 0]
        if not files:
            raise BadDataError(f"{label} holds no rows; it needs at least one example.")
    return read_files(label, files, kind, _WANTED.get())


def _parquet_row_count(path: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Reading only the footer is cheap and names the bad file, which the
    # datasets loader's error for a list of files does not.
    try:
        with pq.ParquetFile(path) as pf:
            rows = pf.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise BadDataError(
            f"{path} is not a readable parquet file ({reason(exc)}); re-export it as parquet."
        ) from exc
    if rows == 0:
        logger.debug("skipping %s: it holds no rows", path)
    return rows
