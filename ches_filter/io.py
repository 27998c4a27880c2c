"""Reading preference datasets and writing results, with clear errors.

Inputs are opened by :func:`open_records` into :class:`~ches_filter.records.Records`:
only the scored columns are parsed (into memory-mapped Arrow), every other
column stays opaque, and outputs are selections of the records themselves
(:func:`ches_filter.records.write_selections`). Outputs are written
atomically: to a hidden sibling first, then renamed into place, so an
interrupted run never leaves a half-written file where the result belongs.

Every problem a user can cause is raised as :class:`BadDataError` (the data or
a file cannot be used) or :class:`BadFlagError` (the flags do not fit
together), with a message that names the file and says how to fix it.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fnmatch
import glob
import gzip
import json
import logging
import os
import re
import shutil
import socket
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable

from .errors import BadDataError, BadFlagError, ChesFilterError

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time
    import datasets
    import pyarrow

    from .records import Records

logger = logging.getLogger(__name__)

# Metadata key under which write_table stores its JSON blob in the parquet schema.
METADATA_KEY = b"ches_filter"

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_INPUT_SUFFIXES = _JSON_SUFFIXES + (".parquet", ".csv")
_INPUT_HELP = (
    "`.jsonl`, `.json`, `.jsonl.gz`, `.json.gz`, `.parquet`, `.csv`, a directory of "
    "such files (one kind), a glob such as `data/*.parquet`, a `save_to_disk` directory, "
    "or a Hub dataset id `owner/name`"
)
_OUTPUT_HELP = (
    "`.parquet`, `.jsonl`, `.csv`, or a path without an extension (written as a "
    "`save_to_disk` directory)"
)
# A Hub id is `owner/name`: one slash, no leading dot or slash. Dots are
# allowed in names (`teknium/OpenHermes-2.5`), so only data-file suffixes rule
# a string out.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_DATA_FILE_SUFFIXES = _INPUT_SUFFIXES + (".gz", ".arrow", ".txt", ".tsv", ".zip")
_GLOB_CHARS = frozenset("*?[")


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


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
    from .records import Records, from_dataset

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
    elif _GLOB_CHARS & set(source):
        _reject_split_subset(source, split, subset)
        ds = _read_glob(source)
    elif _looks_like_hub_id(source):
        ds = _read_hub(source, split=split, subset=subset)
    else:
        raise BadDataError(
            f"{source}: no such file or directory; pass an existing path "
            f"({_INPUT_HELP})."
        )
    return ds


def shown_path(path: str) -> str:
    """``path`` as text that can be printed and stored: a byte that is not UTF-8 as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_name(path: str, what: str = "") -> None:
    """Refuses a path that is not valid UTF-8 (``bad\\xff.jsonl``, or any name in a directory whose name is such).

    Python holds such a byte as a lone surrogate: the file can be opened, but
    its name cannot be written into JSON or Parquet metadata, and pyarrow cannot
    open it. Refused up front, before anything is written. The absolute path is
    checked: work files are written under it.

    Raises:
        BadFlagError: naming the path with the byte shown as ``\\xNN``.
    """
    path = os.fsdecode(path)
    full = os.path.abspath(path)
    try:
        full.encode("utf-8")
    except UnicodeEncodeError:
        try:
            path.encode("utf-8")
            where = f"{path} lies in a directory whose name ({shown_path(os.path.dirname(full))}) is"
        except UnicodeEncodeError:
            where = f"{shown_path(path)} has a name that is"
        raise BadFlagError(
            f"{what + ' ' if what else ''}{where} not valid UTF-8; ches-filter records file names in its outputs' "
            "metadata and pyarrow opens only UTF-8 paths, so rename it (or link it under a UTF-8 name) and pass that name."
        ) from None


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


def _looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(_DATA_FILE_SUFFIXES)


def _file_kind(path: str) -> str:
    """Returns the loader name ("json", "parquet" or "csv") for a file path."""
    lower = path.lower()
    if lower.endswith(_JSON_SUFFIXES):
        return "json"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".csv"):
        return "csv"
    raise BadDataError(
        f"{path} has an unsupported file type; allowed inputs are {_INPUT_HELP}."
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
            f"({_reason(exc)}); re-create it with `save_to_disk`."
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
            f"dataset failed ({_reason(exc)}); check the path, or the Hub id, "
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
        probe = _sibling(os.path.join(cache, "write-check"), "probe")
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
    from .records import read_files

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
            f"{path} is not a readable parquet file ({_reason(exc)}); re-export it as parquet."
        ) from exc
    if rows == 0:
        logger.debug("skipping %s: it holds no rows", path)
    return rows


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _read_bytes(path: str, size: int) -> bytes:
    """Up to ``size`` bytes (-1: all) of a possibly gzip-compressed file, as a BadDataError on failure."""
    try:
        with _open_binary(path) as fh:
            return fh.read(size)
    except FileNotFoundError as exc:
        raise BadDataError(f"{path}: no such file or directory.") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise BadDataError(
            f"{path} is truncated or not a valid gzip file ({_reason(exc)}); "
            "re-download or re-compress it."
        ) from exc
    except OSError as exc:
        raise BadDataError(f"cannot read {path} ({_reason(exc)}); check the file.") from exc


def _reason(exc: BaseException) -> str:
    """Returns the most specific one-line reason from an exception chain."""
    # DatasetGenerationError only says "An error occurred"; the useful text
    # sits in the innermost explicit cause.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------
# Output paths and atomic writes
# --------------------------------------------------------------------------


def output_kind(path: str, flag: str = "--output") -> str:
    """Returns how :func:`write_dataset` would write ``path``.

    Returns:
        "parquet", "jsonl" or "disk" (a ``save_to_disk`` directory).

    Raises:
        BadFlagError: The extension is not one write_dataset supports.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "disk"
    ext = os.path.splitext(os.path.basename(os.path.normpath(path)))[1].lower()
    if ext == ".parquet":
        return "parquet"
    if ext == ".jsonl":
        return "jsonl"
    if ext == ".csv":
        return "csv"
    if ext == "":
        return "disk"
    raise BadFlagError(
        f"`{flag}` {path} has the unsupported extension `{ext}`; use {_OUTPUT_HELP}."
    )


def check_output_path(output: str, *, inputs: list[str], overwrite: bool, flag: str = "--output") -> None:
    """Refuses one output that would clobber an input or an existing file (see :func:`check_paths`).

    Args:
        output: Where results will be written.
        inputs: Input sources (files, directories, globs or Hub ids).
        overwrite: Whether an existing ``output`` may be replaced.
        flag: The option that named ``output``, for the message.
    """
    check_paths({flag: output}, [(None, source) for source in inputs], overwrite=overwrite)


def _named(paths: Any) -> list[tuple[str | None, str]]:
    items = paths.items() if hasattr(paths, "items") else paths
    return [(name, os.fspath(path)) for name, path in items if path is not None]


def _flag(name: str | None) -> str:
    return f"`{name}` " if name else ""


#: The files of one ``save_to_disk`` dataset: all that :func:`write_dataset` leaves in a directory.
_SAVED_FILE = re.compile(r"^(data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json)$")


def foreign_files(path: str, ours: Callable[[str], bool], prefix: str = "") -> list[str]:
    """Entries of the directory ``path`` other than regular files whose name ``ours`` accepts (a directory with a slash)."""
    foreign = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            foreign.append(prefix + name + "/")
        elif os.path.islink(full) or not ours(name):
            foreign.append(prefix + name)
    return foreign


def foreign_to_dataset(path: str) -> list[str]:
    """What the directory ``path`` holds besides a dataset :func:`write_dataset` saved there.

    A dataset's ``data-NNNNN-of-NNNNN.arrow``, ``dataset_info.json`` and
    ``state.json``; a DatasetDict's ``dataset_dict.json`` and one such
    directory per split. Anything else (hidden files, links and the user's
    notes too) is listed, as paths relative to ``path``.
    """
    if not os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return foreign_files(path, _SAVED_FILE.match)
    foreign = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            foreign += foreign_files(full, _SAVED_FILE.match, name + "/")
        elif name != "dataset_dict.json" or os.path.islink(full):
            foreign.append(name)
    return foreign


def _check_replaceable(name: str | None, path: str, foreign_of: Callable[[str], list[str]]) -> None:
    """Refuses to replace the directory ``path`` when it holds anything ches-filter did not write there."""
    try:
        foreign = foreign_of(path)
    except OSError as exc:
        raise BadFlagError(
            f"{_flag(name)}{path} is a directory that cannot be listed ({_reason(exc)}); ches-filter replaces a "
            f"directory only when it holds nothing but its own output: choose another {_flag(name).strip() or 'output'}."
        ) from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BadFlagError(
            f"{_flag(name)}{path} is a directory that holds files ches-filter did not write ({shown}); `--overwrite` "
            f"would delete them, so it replaces only what ches-filter wrote there: move them out or choose another "
            f"{_flag(name).strip() or 'output'}."
        )


def check_paths(
    outputs: Any,
    inputs: Any = (),
    *,
    overwrite: bool,
    may_exist: Iterable[str] = (),
    foreign: Mapping[str, Callable[[str], list[str]]] | None = None,
) -> None:
    """Refuses, before anything is written, outputs that clash with each other or with an input.

    Every output is compared with every other output and with every input by
    resolved identity: ``os.path.realpath`` (symbolic links, ``./x``,
    ``d/../x``, trailing slashes, relative against absolute) and, where both
    exist, the same device and inode (hard links). A path that lies inside
    another (a directory output holding the other output or an input, or an
    output inside an input directory) clashes too, since replacing or adding
    to the directory would change the other.

    Args:
        outputs: ``{flag: path}`` (or ``(flag, path)`` pairs) of what will be
            written, e.g. ``{"--output": ..., "--rejects": ..., "--work-dir": ...}``;
            ``None`` paths are skipped.
        inputs: ``{name: source}`` (or pairs; a name may be None) of what is
            read: files, directories, globs or Hub ids (the latter never clash),
            e.g. ``{"INPUT": ..., "--scores": ...}``.
        overwrite: Whether existing outputs may be replaced.
        may_exist: Output flags whose existing path is expected (a work
            directory to resume); they skip the "exists" check.
        foreign: ``{flag: function}`` listing what an existing directory at
            that output holds besides this command's own output (default
            :func:`foreign_to_dataset`). An output replaced with ``overwrite``
            that is such a directory (not a link to one) must hold nothing
            else: the user's files in it are never deleted.

    Raises:
        BadFlagError: naming both flags of a clash, or the flag of an output
            that exists without ``overwrite`` or whose directory is missing.
    """
    outs = _named(outputs)
    for name, path in outs:
        if not os.fspath(path):
            raise BadFlagError(f"{_flag(name) or 'the output '}is an empty path; give the path to write.")
    for name, path in outs + _named(inputs):
        check_name(path, _flag(name).strip())
    ins = [(name, local) for name, source in _named(inputs) for local in _local_paths(source)]
    may_exist = set(may_exist)
    check_not_matched(outs, inputs)
    # Inputs first: clobbering what is read is the worse outcome, so name it even when outputs clash too.
    for name, path in outs:
        for in_name, source in ins:
            clash = _clash(path, source)
            what = f"the input {_flag(in_name)}{source}"
            if clash == "same":
                raise BadFlagError(
                    f"{_flag(name)}{path} is the same path as {what}{_how(path, source)}; choose a different "
                    f"{_flag(name) or 'output '}so the input is not overwritten."
                )
            if clash == "inside":
                raise BadFlagError(
                    f"{_flag(name)}{path} lies inside the input directory {_flag(in_name)}{source}; choose "
                    f"{_flag(name) or 'an output '}outside it so the input is not modified."
                )
            if clash == "holds":
                # Replacing the output directory would delete the input with it.
                raise BadFlagError(
                    f"{_flag(name)}{path} is a directory that contains {what}; choose a different "
                    f"{_flag(name).strip() or 'output'}."
                )
    for i, (name, path) in enumerate(outs):
        for other_name, other in outs[:i]:
            clash = _clash(path, other)
            if clash == "same":
                raise BadFlagError(
                    f"{_flag(other_name)}{other} and {_flag(name)}{path} are the same file{_how(path, other)}; "
                    f"give {_flag(name) or 'them '}a different path so one result does not overwrite the other."
                )
            if clash:
                inner, outer = (name, path), (other_name, other)
                if clash == "holds":
                    inner, outer = outer, inner
                raise BadFlagError(
                    f"{_flag(inner[0])}{inner[1]} lies inside {_flag(outer[0])}{outer[1]}; writing one would "
                    f"change the other, so give {_flag(name) or 'them '}a path outside it."
                )
    for name, path in outs:
        if name not in may_exist and os.path.lexists(path) and not overwrite:
            raise BadFlagError(f"{_flag(name)}{path} exists; pass `--overwrite` to replace it.")
        # What is replaced is the path as atomic_paths spells it: `dir/`, `./dir` and `d/../dir` are the directory,
        # a symbolic link is itself (what it points at stays).
        target = os.path.abspath(path)
        if name not in may_exist and os.path.isdir(target) and not os.path.islink(target):
            _check_replaceable(name, path, (foreign or {}).get(name, foreign_to_dataset))
        parent = os.path.dirname(os.path.abspath(path))
        # As spelled too: `missing/../out` normalises to an existing parent, but
        # creating it (os.makedirs) would first create `missing/`.
        spelled = os.path.dirname(os.fspath(path).rstrip(os.sep)) or os.curdir
        if not os.path.isdir(spelled):
            parent = spelled
        if not os.path.isdir(parent):
            raise BadFlagError(
                f"the directory {parent} for {_flag(name)}{path} does not exist; create it "
                f"first or choose another {_flag(name).strip() or 'output'}."
            )


def check_not_matched(outputs: Any, inputs: Any) -> None:
    """Refuses an output that an input glob matches (the next run would read it as input).

    Args:
        outputs: ``{flag: path}`` or ``(flag, path)`` pairs, as for :func:`check_paths`;
            also the files a directory output will hold, which :func:`check_paths`
            cannot list.
        inputs: ``{name: source}`` or pairs; sources that exist or hold no glob
            character are skipped.
    """
    for in_name, source in _named(inputs):
        if not os.path.lexists(source) and _GLOB_CHARS & set(source):
            for name, path in _named(outputs):
                # fnmatch's `*` also matches `/`: it may refuse a little more than glob would read, never less.
                if fnmatch.fnmatchcase(os.path.abspath(path), os.path.abspath(source)) or fnmatch.fnmatchcase(
                    os.path.realpath(path), os.path.realpath(os.path.dirname(source)) + os.sep + os.path.basename(source)
                ):
                    raise BadFlagError(
                        f"{_flag(name)}{path} matches the input pattern {_flag(in_name)}{source}, so the next run "
                        f"would read it as input; choose {_flag(name) or 'an output '}that the pattern does not match."
                    )


def _clash(path: str, other: str) -> str | None:
    """``"same"``, ``"inside"`` (path lies in other), ``"holds"`` (other lies in path) or None."""
    real, other_real = os.path.realpath(path), os.path.realpath(other)
    if real == other_real:
        return "same"
    try:
        if os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other):
            return "same"  # hard links, bind mounts, case-insensitive file systems
    except OSError:
        pass
    if _is_within(real, other_real):
        return "inside"
    if _is_within(other_real, real):
        return "holds"
    return None


def _how(path: str, other: str) -> str:
    if os.path.realpath(path) != os.path.realpath(other):
        return " (hard links to one file)"
    if os.path.islink(path) or os.path.islink(other) or os.path.realpath(path) != os.path.abspath(path) or (
        os.path.realpath(other) != os.path.abspath(other)
    ):
        return f" (both resolve to {os.path.realpath(path)})"
    if path != other:
        return f" (both are {os.path.abspath(path)})"
    return ""


def _local_paths(source: str) -> list[str]:
    if os.path.lexists(source):
        return [source]
    if _GLOB_CHARS & set(source):
        return glob.glob(source, recursive=True)
    return []  # a Hub id cannot collide with a local output


def _is_within(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # different drives on Windows
        return False


def _sibling(path: str, tag: str) -> str:
    # Host and pid: processes on several machines may share a network file system.
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{tag}-{socket.gethostname()}-{os.getpid()}")


def _remove_stale_siblings(path: str, tag: str = "tmp") -> None:
    """Delete ``path``'s temporaries left by killed runs on this host (their pid is gone).

    A run killed by SIGKILL (or by SIGTERM before it could clean up) leaves
    ``.NAME.tmp-HOST-PID``; the next run writing the same path removes it.
    Temporaries of live processes, and of other hosts (which cannot be
    checked), are left alone.
    """
    parent, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.{tag}-{socket.gethostname()}-"
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return
    for entry in entries:
        pid = entry[len(prefix):] if entry.startswith(prefix) else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (ours or not): not stale
        except PermissionError:
            continue
        except (ProcessLookupError, OverflowError):
            pass
        try:
            _remove(os.path.join(parent, entry))
            logger.info("removed %s, left by an earlier run that was killed", os.path.join(parent, entry))
        except OSError as exc:
            logger.warning("could not remove the stale temporary %s: %s", os.path.join(parent, entry), exc)


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def write_error(exc: OSError, path: str) -> ChesFilterError:
    """One-line error for an ``OSError`` raised while writing ``path``.

    A full disk names the file system (its mount point) and says that a rerun
    of the same command keeps the finished work; a refused write names the
    path and asks for a writable location.
    """
    text = f"{exc.strerror or ''} {exc}"
    if exc.errno == errno.ENOSPC or "No space left on device" in text:
        return ChesFilterError(
            f"no space left on {_mount_point(os.path.dirname(os.path.abspath(path)) or '.')} writing {path}; "
            "free some space there (or choose another location) and rerun the same command"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text:
        return ChesFilterError(
            f"cannot write {path}: {exc.strerror or 'permission denied'}; choose a location you can write to"
        )
    return ChesFilterError(f"could not write {path} ({_reason(exc)})")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn any ``OSError`` raised inside into :func:`write_error` for ``path``."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, os.fspath(path)) from None


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _fsync_tree(path: str) -> None:
    # Without fsync a power loss right after the rename can leave an empty
    # file at the target on some file systems, which is the half-written
    # result atomic writes exist to prevent.
    if os.path.isdir(path):
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync_file(os.path.join(root, name))
            _fsync_file(root)
    else:
        _fsync_file(path)


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; durability is best effort
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: str, target: str) -> None:
    if os.path.isdir(tmp) or (os.path.isdir(target) and not os.path.islink(target)):
        # os.replace cannot swap a directory for a non-empty one, so the old
        # output steps aside first and is deleted only once the new one is in.
        aside = None
        if os.path.lexists(target):
            aside = _sibling(target, "old")
            _remove(aside)
            os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            if aside is not None:
                os.replace(aside, target)
            raise
        if aside is not None:
            _remove(aside)
    else:
        os.replace(tmp, target)
    _fsync_file(os.path.dirname(target))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary sibling path that replaces ``path`` on success.

    The body writes a file or a directory at the yielded path. On normal exit
    it is renamed onto ``path`` (replacing what was there); on an exception it
    is removed and ``path`` is left untouched.

    Args:
        path: The final location of the file or directory.

    Yields:
        ``.{name}.tmp-<host>-<pid>`` in the same directory, so the rename
        stays on one file system and is atomic.

    Raises:
        ChesFilterError: the file system refused the write (full disk,
            permissions): one line naming the path; the temporary is removed.
    """
    with atomic_paths([path]) as (tmp,), writing(path):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str]) -> Iterator[list[str]]:
    """Like :func:`atomic_path` for outputs that belong together: all of them replace their paths, or none.

    The body writes every temporary. Then each is flushed to disk (``fsync``,
    where a full disk or an I/O error surfaces) before the first rename, so a
    failure anywhere leaves every earlier output untouched; the renames that
    follow stay in their own directories and need no space.

    Yields:
        One temporary sibling per path, in order. An ``OSError`` of the body is
        not translated (the body knows which file it was writing: wrap it in
        :func:`writing`); one of the flush or the renames names its path.
    """
    named = [os.fspath(p) for p in paths]
    targets = [os.path.abspath(p) for p in named]
    tmps = [_sibling(target, "tmp") for target in targets]
    try:
        for tmp, path in zip(tmps, named):
            with writing(path):
                _remove(tmp)  # left behind by a killed run that had the same host and pid
            _remove_stale_siblings(path)  # ... or by killed runs with other pids
        yield tmps
        for tmp, path in zip(tmps, named):
            if not os.path.lexists(tmp):
                raise RuntimeError(f"atomic_paths body wrote nothing at {tmp}")
            with writing(path):
                _fsync_tree(tmp)
        for tmp, target, path in zip(tmps, targets, named):
            with writing(path):
                _commit(tmp, target)
    finally:
        for tmp in tmps:
            try:
                _remove(tmp)  # a no-op after a successful commit
            except OSError as exc:
                logger.warning("could not remove temporary %s: %s", tmp, exc)


def write_dataset(ds: "datasets.Dataset", path: str, *, overwrite: bool = False) -> None:
    """Writes a dataset atomically as parquet, JSON lines, CSV or a saved directory.

    Args:
        ds: The dataset to write (at least one row).
        path: ``*.parquet``, ``*.jsonl``, ``*.csv``, or a path without
            extension (or an existing directory) for ``save_to_disk``.
        overwrite: Whether an existing ``path`` may be replaced.

    Raises:
        BadFlagError: Unknown extension, ``path`` exists without
            ``overwrite``, or its parent directory is missing.
        BadDataError: No row, or a value would not read back identical from
            JSON lines or CSV (one line: column and row; nothing written).
        ChesFilterError: The file system refused the write.
    """
    write_datasets([(None, ds, path)], overwrite=overwrite)


def write_datasets(items: Iterable[tuple[str | None, "datasets.Dataset", str]], *, overwrite: bool = False) -> None:
    """Writes several datasets so that either all of them appear or none does.

    Every dataset is written to its hidden temporary sibling first; only when
    all were written are they renamed into place. A value that JSON lines or
    CSV cannot hold exactly, a full disk or a permission error therefore leaves every
    target as it was.

    Args:
        items: ``(flag, dataset, path)`` triples; ``flag`` (e.g. ``--rejects``)
            names the path in messages and may be None.
        overwrite: Whether existing paths may be replaced.

    Raises:
        The errors of :func:`write_dataset`.
    """
    import datasets

    from .records import Selection, from_dataset, write_selections

    for _flag_name, ds, path in items:
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(f"write_datasets writes a datasets.Dataset, not a {type(ds).__name__} ({path})")
    # A dataset in memory is written as itself: to parquet or a directory unchanged, to JSON lines
    # or CSV only where every value reads back identical (otherwise one line, nothing written).
    outputs = [Selection(flag, os.fspath(path), range(len(ds)), records=from_dataset(os.fspath(path), ds))
               for flag, ds, path in items]
    write_selections(outputs[0].records, outputs, overwrite=overwrite)


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
        raise ChesFilterError(f"could not write {path} ({_reason(exc)}).") from exc
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
            f"{path} is not a readable parquet file ({_reason(exc)}); pass a file "
            "written by ches-filter."
        ) from exc
    return table, parse_metadata(table.schema.metadata, path)
